"""The learner: one data-parallel rank of DeepSpeed training on a Hugging Face (VL)M, driven by the stages.

``LearnerWorker`` is a plain class (Ray wraps it in ``actors/group.py``): the group starts one per rank, shards a
batch over ranks and passes **global** counts; every ``train_*`` call is exactly one optimizer step.

Micro-batching and normalisation (why 2 ranks × k micro-batches == 1 rank × 1 batch)
    Sequences (pairs for MPO) are grouped into micro-batches of at most ``learner.micro_batch_tokens`` tokens
    (see ``learner_batches``): packed into one row with per-sequence ``position_ids`` when attention is varlen
    (flash-attention, flex), else right-padded rows grouped by length (sdpa/eager would attend over the whole
    packed row). A packed layout is used only after a self-check that a sequence's log-probs ignore its packed
    neighbour; tests show neither layout nor budget changes a log-prob or an update. Each micro-batch's loss is
    normalised by the global count (``num_global_seqs`` / ``num_global_tokens`` / ``num_global_pairs``), so the
    sum over micro-batches and ranks is the whole batch's loss. Gradients accumulate locally with
    ``engine.backward`` (DeepSpeed ``managed_gradient_accumulation: false``: backward only accumulates, the one
    ``engine.step()`` per call is the accumulation boundary); DeepSpeed *averages* gradients over data-parallel
    ranks, so each rank's loss is multiplied by ``world_size`` to turn that average into the sum. All ranks run the
    same number of micro-batches (padded with zero-weight dummy passes) because ZeRO-2/3 collectives run per pass.

Log-probs
    Only positions that predict a response token go through the LM head, via the chunked
    ``compute_logprobs_from_hidden`` (no [tokens × vocab] float32 tensor). Under ZeRO-3 the head's weight is
    partitioned, so the full model runs and ``compute_token_logprobs`` chunks its logits instead.

DeepSpeed
    Config built from the spec: ZeRO stage, bf16 when ``model.dtype=bfloat16``, gradient clipping, optimizer
    offload. The optimizer is ``torch.optim.AdamW`` passed to ``deepspeed.initialize`` (``fused=True`` on CUDA,
    the same single-kernel update as DeepSpeed's FusedAdam without its 40-90 s JIT build); with
    ``learner.offload_optimizer`` on a GPU machine it is DeepSpeedCPUAdam from the config (JIT-built once into
    ``TORCH_EXTENSIONS_DIR``). On CPU DeepSpeed would also JIT-build its shared-memory all-reduce at
    ``init_distributed`` (40-130 s); it only serves DeepSpeed inference's ``inference_all_reduce``, so it is
    skipped (gloo does the training collectives).
    The learning rate follows ``LRSchedule`` (linear warm-up, then constant or cosine to 0), set on the optimizer
    before every step; ``set_lr`` starts a new schedule for a new stage. Deviation from a DeepSpeed/torch
    scheduler: the schedule is plain numbers kept in the checkpoint's client state, so a resumed run needs no
    scheduler object to be rebuilt identically.

Setup (distributed init, model, engine, packing self-check) is ``learner_setup.py``; checkpoints and export
``learner_checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cascade_rl.algos.logprobs import compute_logprobs_from_hidden, compute_token_logprobs
from cascade_rl.algos.mpo import RewardShift, compute_mpo_loss, parse_mpo_terms
from cascade_rl.algos.packing import (
    MicroBatch,
    build_micro_batch,
    dummy_micro_batch,
    pad_rows,
    plan_units,
    split_by_lengths,
)
from cascade_rl.algos.policy_loss import TOKEN_WEIGHTED_METRICS, compute_policy_loss
from cascade_rl.seeding import derive_seed
from cascade_rl.types import PairBatch, SequenceBatch, WorkerSpec

from .attention import (
    VARLEN_ATTENTION,
    auto_micro_batch_tokens,
    free_device_bytes,
    packed_attention_kwargs,
    release_cached_memory,
)
from .faults import is_memory_text, learner_oom_message
from .learner_batches import (
    ImageInputs,
    LRSchedule,
    MetricAccumulator,
    bucket_parameters,
    check_policy_batch,
    checkpoint_name_map,
    pad_token_id,
    pair_units,
    sequence_units,
)
from .learner_checkpoint import COMPLETE, LearnerCheckpointMixin  # noqa: F401  (COMPLETE re-exported)
from .learner_setup import PACKED_ATTENTION, LearnerSetupMixin  # noqa: F401  (re-exported)

LOGPROB_CHUNK_TOKENS = 1024  # rows of the LM head per chunk: a float32 (1024 × 151,936) buffer is 622 MB
DEFAULT_SYNC_BUCKET_BYTES = 256 << 20
Metrics = dict[str, tuple[float | Tensor, float]]  # name -> (value, weight of that value in the step's mean)
LossFn = Callable[[MicroBatch, list[Tensor], list[Tensor]], tuple[Tensor, Metrics]]


@dataclass
class LearnerSpec(WorkerSpec):
    """What one learner rank needs: ``WorkerSpec`` + the fields of ``model.*`` / ``learner.*`` of the same names."""

    total_steps: int  # derived: optimizer steps of the first schedule (``set_lr`` starts each stage's)
    dtype: str
    zero_stage: int
    lr: float
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    grad_clip: float  # <= 0 disables clipping
    micro_batch_tokens: int
    auto_micro_batch_tokens: bool  # GPU: raise the budget to what free memory holds (attention.py)
    shared_gpu_reserve_fraction: float  # derived: share of the GPU a colocated engine takes back when it wakes
    gradient_checkpointing: bool
    offload_optimizer: bool
    attn_implementation: str
    fused_kernels: str  # auto | liger | none (fused_kernels.py)
    packing: str
    max_tiles: int  # InternVL tiles per image cap (model.max_tiles; 0: the model folder's setting)
    freeze_vision: bool  # vision tower: no gradients, no optimizer state, not re-sent in weight sync
    freeze_projector: bool  # vision-to-language projector, likewise


class LearnerWorker(LearnerSetupMixin, LearnerCheckpointMixin):
    """One DeepSpeed data-parallel rank. Every public method is collective: all ranks call it together."""

    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size
        random.seed(derive_seed(spec.seed, "learner", rank))
        torch.manual_seed(derive_seed(spec.seed, "learner"))
        self.device = self._init_distributed(master_addr, master_port)
        self.model = self._load_model()
        self.engine = self._build_engine()
        self._schedule = LRSchedule(spec.lr, spec.total_steps, spec.warmup_steps, spec.lr_schedule)
        self._schedule_step = 0
        self.global_step = 0
        # δ is a mean over all ranks' rewards: RewardShift.update all-reduces its (sum, count) through this
        self.reward_shift = RewardShift(all_reduce_fn=self._all_reduce_sum if world_size > 1 else None)
        self._pad_id = pad_token_id(self.model.config)
        self._images = ImageInputs(spec.model_path, self.model.config, spec.max_tiles) if spec.is_vlm else None
        self._sync_names: dict[str, str] | None = None
        self.packing_check_diff: float | None = None  # log-prob change from a packed neighbour (self-check)
        self._auto_budget_done = False
        self.fused = self._apply_fused_kernels()  # Liger's RMSNorm/RoPE/SwiGLU where they run (auto: CUDA)
        self._packed = self._choose_packing()

    # ------------------------------------------------------------------ log-probs (no gradient)

    @torch.no_grad()
    def compute_logprobs(self, batch: SequenceBatch) -> list[list[float]]:
        """Log-probs of each response token under the current policy (one list per sequence)."""
        out: list[list[float]] = [[] for _ in range(len(batch))]
        self.engine.module.eval()
        units: list[int] = []
        parts: list[Tensor] = []  # kept on the device: one copy to the host at the end, none per micro-batch
        lengths: list[int] = []
        for mb in self._micro_batches(sequence_units(batch), images=batch.images):
            with self._oom_guard(mb, "compute_logprobs"):
                lps, _, _ = self._forward(mb, need_vision=self.spec.zero_stage == 3)
            for u, lp in zip(mb.units, lps, strict=False):
                units.append(u)
                parts.append(lp)
                lengths.append(lp.numel())
        if parts:
            for u, lp in zip(units, torch.cat(parts).cpu().split(lengths), strict=True):
                out[u] = lp.tolist()
        return out

    @torch.no_grad()
    def compute_pair_logps(self, batch: PairBatch) -> tuple[list[float], list[float]]:
        """Summed response log-probs of each pair's chosen and rejected sequence (MPO reference)."""
        chosen, rejected = [0.0] * len(batch), [0.0] * len(batch)
        self.engine.module.eval()
        for mb in self._micro_batches(pair_units(batch), images=batch.images):
            with self._oom_guard(mb, "compute_pair_logps"):
                lps, _, _ = self._forward(mb, need_vision=self.spec.zero_stage == 3)
            for k, u in enumerate(mb.units):
                chosen[u], rejected[u] = float(lps[2 * k].sum()), float(lps[2 * k + 1].sum())
        return chosen, rejected

    # ------------------------------------------------------------------ training (one optimizer step each)

    def train_policy(self, batch: SequenceBatch, *, loss: str, clip_low: float, clip_high: float,
                     num_global_seqs: int, num_global_tokens: int, old_is_current: bool = False) -> dict[str, float]:
        """One GSPO / GSPO-token / GRPO optimizer step on this rank's shard of the batch.

        ``old_is_current``: π_old is the policy this step starts from (the first update after on-policy
        generation), so the ratio's denominator is this forward's own log-probs, detached: the values
        ``compute_logprobs`` would return, without its extra forward pass. ``batch.old_logprobs`` are then
        optional and only compared: their mean |difference| per token is the metric ``behaviour_logprob_gap``.
        """
        check_policy_batch(batch, need_old=not old_is_current)
        by_tokens = TOKEN_WEIGHTED_METRICS[loss]

        def step(mb: MicroBatch, lps: list[Tensor], ents: list[Tensor]) -> tuple[Tensor, Metrics]:
            logprobs, mask = pad_rows(lps)  # (B, T)
            given = None if batch.old_logprobs is None else self._to_device(pad_rows(
                [torch.tensor(batch.old_logprobs[u], dtype=torch.float32) for u in mb.units])[0])  # (B, T)
            old = logprobs.detach() if old_is_current else given
            assert old is not None  # check_policy_batch: old log-probs are given unless old_is_current
            adv = self._to_device(torch.tensor([batch.advantages[u] for u in mb.units], dtype=torch.float32))  # (B,)
            value, metrics = compute_policy_loss(
                loss, logprobs, old, adv, mask, clip_low=clip_low, clip_high=clip_high,
                num_global_seqs=num_global_seqs, num_global_tokens=num_global_tokens)
            # metrics stay 0-d device tensors (MetricAccumulator reads them once per step): no host sync here
            num_tokens = sum(mb.response_lengths)
            out: Metrics = {name: (v, num_tokens if name in by_tokens else mb.num_seqs) for name, v in metrics.items()}
            out["entropy"] = (torch.cat(ents).sum() / max(num_tokens, 1), num_tokens)
            if old_is_current and given is not None:
                gap = ((given - logprobs.detach().float()).abs() * mask).sum() / max(num_tokens, 1)
                out["behaviour_logprob_gap"] = (gap, num_tokens)
            return value, out

        return self._train_step(sequence_units(batch), batch.images, "train_policy", step, want_entropy=True)

    def train_mpo(self, batch: PairBatch, *, terms: list[tuple[str, float]], beta: float,
                  num_global_pairs: int) -> dict[str, float]:
        """One MPO optimizer step: w_p·DPO + w_q·BCO (reward shift δ shared by all ranks) + w_g·LM on chosen."""
        if batch.ref_chosen_logps is None or batch.ref_rejected_logps is None:
            raise ValueError("train_mpo needs reference log-probs in the PairBatch (ref_chosen_logps / "
                             "ref_rejected_logps); compute them once with compute_pair_logps on the start policy")
        ref_chosen, ref_rejected = batch.ref_chosen_logps, batch.ref_rejected_logps
        parsed = parse_mpo_terms(terms)
        uses_shift = any(name == "bco_pair" for name, _ in parsed)

        def step(mb: MicroBatch, lps: list[Tensor], ents: list[Tensor]) -> tuple[Tensor, Metrics]:
            pc = torch.stack([lp.sum() for lp in lps[0::2]])  # (B,)
            pr = torch.stack([lp.sum() for lp in lps[1::2]])  # (B,)
            rc = torch.tensor([ref_chosen[u] for u in mb.units], device=self.device)  # (B,)
            rr = torch.tensor([ref_rejected[u] for u in mb.units], device=self.device)  # (B,)
            n_chosen = torch.tensor([lp.numel() for lp in lps[0::2]], device=self.device)  # (B,)
            value, metrics = compute_mpo_loss(
                parsed, pc, pr, rc.to(pc.dtype), rr.to(pc.dtype), beta=beta,
                reward_shift=self.reward_shift if uses_shift else None, chosen_num_tokens=n_chosen,
                num_global_pairs=num_global_pairs)
            return value, {name: (float(v), len(mb.units)) for name, v in metrics.items()}  # MPO metrics: per pair

        def dummy() -> None:  # every rank folds into δ once per micro-batch: the all-reduce must match
            if uses_shift:
                self.reward_shift.update(torch.zeros(0, device=self.device))

        return self._train_step(pair_units(batch), batch.images, "train_mpo", step, on_dummy=dummy)

    def train_sft(self, batch: SequenceBatch, *, num_global_tokens: int) -> dict[str, float]:
        """One supervised step: summed NLL of the response tokens / ``num_global_tokens``."""
        if num_global_tokens <= 0:
            raise ValueError(f"train_sft needs num_global_tokens > 0, got {num_global_tokens}")

        def step(mb: MicroBatch, lps: list[Tensor], ents: list[Tensor]) -> tuple[Tensor, Metrics]:
            return -sum(lp.sum() for lp in lps) / num_global_tokens, {}

        return self._train_step(sequence_units(batch), batch.images, "train_sft", step)

    def _train_step(self, units: list[list[tuple[list[int], list[int]]]], images: list[list[str]] | None,
                    where: str, loss_fn: LossFn, *, want_entropy: bool = False,
                    on_dummy: Callable[[], None] | None = None) -> dict[str, float]:
        """The one micro-batch loop of every ``train_*``: forward, ``loss_fn``, backward per micro-batch, then one
        optimizer step. ``loss_fn`` returns the micro-batch's loss (normalised by global counts) and its metrics
        as ``{name: (value, weight)}``: each is averaged with its weight over micro-batches and ranks."""
        t0 = time.perf_counter()
        acc = MetricAccumulator()
        self.engine.module.train()
        for mb in self._training_micro_batches(units, images, where):
            with self._oom_guard(mb, where):
                lps, ents, aux = self._forward(mb, need_vision=True, want_entropy=want_entropy)
                if mb.is_dummy:  # zero-weight pass: keeps ZeRO's per-pass collectives in step across ranks
                    if on_dummy is not None:
                        on_dummy()
                    self._backward(sum(lp.sum() for lp in lps) * 0.0 + aux)
                    continue
                value, metrics = loss_fn(mb, lps, ents)
                self._backward(value + aux)
            acc.add_sum("loss", value.detach())
            for name, (v, weight) in metrics.items():
                acc.add(name, v, weight)
            acc.add_sum("num_tokens", float(mb.num_tokens))
        return self._finish_step(acc, t0)

    # ------------------------------------------------------------------ schedule

    def set_lr(self, lr: float, total_steps: int, warmup_steps: int) -> None:
        """Start a new schedule (a new stage): peak ``lr``, ``warmup_steps`` then ``learner.lr_schedule``."""
        self._schedule = LRSchedule(lr, total_steps, warmup_steps, self.spec.lr_schedule)
        self._schedule_step = 0
        self._apply_lr()

    def skip_lr_steps(self, num_steps: int) -> None:
        """Advance the schedule by ``num_steps`` updates that were not run (a gspo mini-batch left empty)."""
        self._schedule_step += int(num_steps)
        self._apply_lr()

    def named_weights_for_sync(self, bucket_bytes: int = DEFAULT_SYNC_BUCKET_BYTES, *,
                               device: str | torch.device = "cpu", all_ranks: bool = False,
                               include_frozen: bool = False) -> Iterator[list[tuple[str, Tensor]]]:
        """Buckets of (checkpoint name, weight) of about ``bucket_bytes`` each, for the rollout engine.

        Names are those of the Hugging Face checkpoint (what ``export_hf`` writes and vLLM's ``load_weights``
        maps). Collective under ZeRO-3 (each bucket is gathered on all ranks); only rank 0 yields tensors,
        other ranks yield empty lists, unless ``all_ranks`` (each rank feeds its own colocated engine). Under
        ZeRO 0-2, tensors already on ``device`` alias the live weights: use them before the next ``train_*`` call.
        Frozen parameters (``learner.freeze_vision`` / ``freeze_projector``) never change, so the engine keeps
        the copy it loaded and they are left out unless ``include_frozen`` (checkpoint export).
        """
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        names = self._checkpoint_names()
        target = torch.device(device)
        zero3 = self.spec.zero_stage == 3
        params = [(n, p) for n, p in self.model.named_parameters() if include_frozen or n not in self.frozen]
        for bucket in bucket_parameters(params, bucket_bytes):
            ctx = GatheredParameters([p for _, p in bucket], modifier_rank=None) if zero3 else contextlib.nullcontext()
            with ctx:
                if self.rank != 0 and not all_ranks:
                    out: list[tuple[str, Tensor]] = []
                else:
                    out = [(names[n], p.detach().to(target, copy=zero3)) for n, p in bucket]
            yield out

    def state_dict_for_sync(self, bucket_mb: float = DEFAULT_SYNC_BUCKET_BYTES / 2**20) -> list[list[tuple[str, Tensor]]]:
        """All buckets of :meth:`named_weights_for_sync`, on the CPU (the Ray object-store path)."""
        return list(self.named_weights_for_sync(int(bucket_mb * 2**20), device="cpu"))

    # ------------------------------------------------------------------ internals

    def _micro_batches(self, units: list[list[tuple[list[int], list[int]]]], *,
                       images: list[list[str]] | None) -> list[MicroBatch]:
        """Plan this rank's units into micro-batches; pad with dummies to the largest count over ranks."""
        lengths = [[len(p) + len(r) for p, r in unit] for unit in units]
        budget = self.spec.micro_batch_tokens
        plan = plan_units(lengths, budget, packed=self._packed)
        count = self._max_over_ranks(len(plan))
        if self._packed and 0 < len(plan) < count:  # re-plan into more, smaller bins rather than dummies
            plan = plan_units(lengths, budget, packed=True, min_num_micro_batches=count)
        out = [build_micro_batch([seq for u in group for seq in units[u]], packed=self._packed,
                                 pad_token_id=self._pad_id, units=group,
                                 # every sequence of a unit (a pair's chosen and rejected) holds the prompt's images
                                 images=[path for u in group for _ in units[u] for path in (images[u] if images
                                                                                           else [])])
               for group in plan]
        return out + [dummy_micro_batch(self._pad_id, packed=self._packed) for _ in range(count - len(out))]

    def _training_micro_batches(self, units: list[list[tuple[list[int], list[int]]]],
                                images: list[list[str]] | None, where: str) -> list[MicroBatch]:
        if self.spec.auto_micro_batch_tokens and self.device.type == "cuda" and not self._auto_budget_done:
            # measured at the first training step: a colocated engine sleeps then, as in every step (its share
            # is free now and is mapped back only after the step, once release_cached_memory has emptied the cache);
            # an engine that stays awake already holds its share, so free memory excludes it. Left free: the
            # weight-sync buffers (weight_bytes) and AUTO_BUDGET_RESERVE_BYTES for the optimizer's first-step state
            self._auto_budget_done = True
            weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
            self.spec.micro_batch_tokens = auto_micro_batch_tokens(
                self.model.config, free_bytes=free_device_bytes(self.device), floor=self.spec.micro_batch_tokens,
                dtype_bytes=2 if self.spec.dtype == "bfloat16" else 4,
                gradient_checkpointing=self.spec.gradient_checkpointing,
                reserve_bytes=weight_bytes)
        micro_batches = self._micro_batches(units, images=images)
        if not micro_batches:  # the count is a max over ranks, so every rank raises together
            raise ValueError(f"{where} got an empty batch on every learner rank; an optimizer step needs data")
        return micro_batches

    def _forward(self, mb: MicroBatch, *, need_vision: bool, want_entropy: bool = False
                 ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Per-sequence response log-probs (float32), entropies (if asked) and an aux term to add to the loss.

        ``aux`` is 0 but keeps the vision tower in the graph when a VLM micro-batch has no image, so every rank's
        backward touches the same parameters (ZeRO reduces per pass) and ZeRO-3 gathers stay in step.
        """
        dev = self.device
        kwargs: dict[str, Any] = {"input_ids": self._to_device(mb.input_ids),
                                  "position_ids": self._to_device(mb.position_ids), "use_cache": False}
        if mb.attention_mask is not None:
            kwargs["attention_mask"] = self._to_device(mb.attention_mask)
        elif self.model.config._attn_implementation == VARLEN_ATTENTION:  # boundaries from the host's packing
            kwargs.update(packed_attention_kwargs(mb.position_ids, dev))
        aux = torch.zeros((), device=dev)
        if self.spec.is_vlm:
            if mb.images:
                kwargs["pixel_values"] = self._images.pixel_values(mb).to(dev, self.model.dtype)
            elif need_vision:
                dummy = self._images.dummy_pixel_values().to(dev, self.model.dtype)
                feats = self.model.get_image_features(pixel_values=dummy).pooler_output
                aux = feats.float().sum() * 0.0
        pos, tgt = self._to_device(mb.target_positions), self._to_device(mb.targets)
        if self._hidden_path:
            hidden = self.model.base_model(**kwargs).last_hidden_state  # (R, L, H)
            h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos)  # (N, H)
            head = self.model.get_output_embeddings().weight  # (V, H)
            res = compute_logprobs_from_hidden(h, head, tgt, chunk_size=LOGPROB_CHUNK_TOKENS,
                                               return_entropy=want_entropy)
        else:
            logits = self.engine(**kwargs).logits  # (R, L, V)
            z = logits.reshape(-1, logits.shape[-1]).index_select(0, pos)  # (N, V)
            res = compute_token_logprobs(z, tgt, chunk_size=LOGPROB_CHUNK_TOKENS, return_entropy=want_entropy)
        lp, ent = res if want_entropy else (res, None)
        lps = split_by_lengths(lp, mb.response_lengths)
        return lps, (split_by_lengths(ent.detach(), mb.response_lengths) if ent is not None else []), aux

    def _to_device(self, t: Tensor) -> Tensor:
        """A host tensor on this rank's device; on CUDA through pinned memory, so the host does not wait for the
        GPU's queue (a pageable copy would)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _backward(self, loss: Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the loss is already normalised by global counts
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def _finish_step(self, acc: MetricAccumulator, t0: float) -> dict[str, float]:
        self._apply_lr()
        lr = self._schedule.lr_at(self._schedule_step)
        self.engine.step()
        self._schedule_step += 1
        self.global_step += 1
        metrics = acc.reduce(self.world_size, self.device)
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        metrics["lr"] = lr
        metrics["step_s"] = time.perf_counter() - t0
        metrics["peak_mem_gib"] = _peak_memory_gib(self.device)
        release_cached_memory(self.device, self.spec.shared_gpu_reserve_fraction)
        return metrics

    def _apply_lr(self) -> None:
        lr = self._schedule.lr_at(self._schedule_step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _max_over_ranks(self, value: int) -> int:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _all_reduce_sum(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(t)
        return t

    def _checkpoint_names(self) -> dict[str, str]:
        if self._sync_names is None:
            self._sync_names = checkpoint_name_map(self.model)
        return self._sync_names

    @contextlib.contextmanager
    def _oom_guard(self, mb: MicroBatch, where: str) -> Iterator[None]:
        """Re-raise an out-of-memory error (CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError) as
        ``torch.OutOfMemoryError`` naming the recipe keys to change (``faults.learner_oom_message``)."""
        try:
            yield
        except RuntimeError as e:
            if not (isinstance(e, torch.OutOfMemoryError) or is_memory_text(str(e))):
                raise
            # the step's activations go back, so a colocated engine can still wake (for the checkpoint, shut-down)
            release_cached_memory(self.device, self.spec.shared_gpu_reserve_fraction)
            s = self.spec
            raise torch.OutOfMemoryError(learner_oom_message(
                rank=self.rank, where=where, num_tokens=mb.num_tokens, num_seqs=mb.num_seqs,
                on_gpu=self.device.type != "cpu", micro_batch_tokens=s.micro_batch_tokens,
                gradient_checkpointing=s.gradient_checkpointing, zero_stage=s.zero_stage,
                offload_optimizer=s.offload_optimizer, detail=f"{type(e).__name__}: {e}")) from e


def _peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated by this rank (GiB); on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
