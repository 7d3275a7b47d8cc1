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

Checkpoints
    ``save_checkpoint`` writes DeepSpeed's state (weights, optimizer, this worker's schedule and MPO reward shift
    in the client state) and then, after a barrier, a ``COMPLETE`` marker on rank 0; ``load_checkpoint`` refuses
    a folder without it, so a half-written checkpoint is never picked up. (A marker rather than temp-dir-and-rename:
    each rank writes its own shard files, which a rename on rank 0 cannot cover on a non-shared filesystem.)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cascade_rl.algos.logprobs import compute_logprobs_from_hidden, compute_token_logprobs
from cascade_rl.algos.mpo import RewardShift, compute_mpo_loss, parse_mpo_terms
from cascade_rl.algos.policy_loss import compute_policy_loss
from cascade_rl.types import PairBatch, SequenceBatch

from .attention import (
    VARLEN_ATTENTION,
    auto_micro_batch_tokens,
    free_device_bytes,
    packed_attention_kwargs,
    register_varlen_attention,
    varlen_available,
)
from .faults import is_memory_text, learner_oom_message
from .learner_batches import (
    ImageInputs,
    LRSchedule,
    MetricAccumulator,
    MicroBatch,
    bucket_parameters,
    build_ds_config,
    build_micro_batch,
    check_policy_batch,
    checkpoint_name_map,
    copy_tokenizer_files,
    dummy_micro_batch,
    pad_rows,
    pad_token_id,
    pair_units,
    plan_units,
    sequence_units,
    split_by_lengths,
    validate_spec,
)

LOGPROB_CHUNK_TOKENS = 1024  # rows of the LM head per chunk: a float32 (1024 × 151,936) buffer is 622 MB
DEFAULT_SYNC_BUCKET_BYTES = 256 << 20
COMPLETE = "COMPLETE"  # marker file written last into a finished learner checkpoint
PACKED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention", VARLEN_ATTENTION)  # Σ len² cost


@dataclass
class LearnerSpec:
    """What one learner rank needs; built by the stage from ``learner.*`` and ``model.*`` of the recipe."""

    model_path: str
    dtype: str = "float32"  # float32 | bfloat16
    zero_stage: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    total_steps: int = 1
    grad_clip: float = 1.0  # <= 0 disables clipping
    micro_batch_tokens: int = 4096
    auto_micro_batch_tokens: bool = False  # GPU: raise the budget to what free memory holds (attention.py)
    shared_gpu_reserve_fraction: float = 0.0  # share of the GPU a colocated engine takes back when it wakes
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    seed: int = 0
    is_vlm: bool = False
    attn_implementation: str = "auto"  # auto: varlen (actors/attention.py) on CUDA, else sdpa; or an HF name
    packing: str = "auto"  # auto: packed rows with varlen attention (flash / flex), else padded | packed | padded


class LearnerWorker:
    """One DeepSpeed data-parallel rank. Every public method is collective: all ranks call it together."""

    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        validate_spec(spec)
        self.spec, self.rank, self.world_size = spec, rank, world_size
        random.seed(spec.seed + rank)
        torch.manual_seed(spec.seed)
        self.device = self._init_distributed(master_addr, master_port)
        self.model = self._load_model()
        self.engine = self._build_engine()
        self._schedule = LRSchedule(spec.lr, spec.total_steps, spec.warmup_steps, spec.lr_schedule)
        self._schedule_step = 0
        self.global_step = 0
        # δ is a mean over all ranks' rewards: RewardShift.update all-reduces its (sum, count) through this
        self.reward_shift = RewardShift(all_reduce_fn=self._all_reduce_sum if world_size > 1 else None)
        self._pad_id = pad_token_id(self.model.config)
        self._images = ImageInputs(spec.model_path, self.model.config) if spec.is_vlm else None
        self._sync_names: dict[str, str] | None = None
        self.packing_check_diff: float | None = None  # log-prob change from a packed neighbour (self-check)
        self._auto_budget_done = False
        self._packed = self._choose_packing()

    # ------------------------------------------------------------------ setup

    def _init_distributed(self, master_addr: str, master_port: int) -> torch.device:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        on_cuda = get_accelerator().device_name() == "cuda"
        local_rank = int(os.environ.get("LOCAL_RANK", "0" if not on_cuda or torch.cuda.device_count() <= 1
                                        else str(self.rank % torch.cuda.device_count())))
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(local_rank))
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cascade_rl" / "torch_extensions"))
        if not on_cuda:
            # the shared-memory all-reduce only serves DeepSpeed inference; building it costs 40-130 s per cache
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        if dist.is_initialized():
            if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
                raise RuntimeError(f"torch.distributed is already set up as rank {dist.get_rank()} of "
                                   f"{dist.get_world_size()}, not rank {self.rank} of {self.world_size}; "
                                   "start one learner per process")
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", auto_mpi_discovery=False,
                                   rank=self.rank, world_size=self.world_size)
        if on_cuda:
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        return torch.device("cpu")

    def _load_model(self) -> Any:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        spec = self.spec
        dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
        self._ds_config = build_ds_config(
            zero_stage=spec.zero_stage, bf16=spec.dtype == "bfloat16", grad_clip=spec.grad_clip,
            offload_optimizer=spec.offload_optimizer, lr=spec.lr, weight_decay=spec.weight_decay,
            on_cuda=self.device.type == "cuda", world_size=self.world_size)
        hf_ds_config = None
        if spec.zero_stage == 3 and importlib.util.find_spec("accelerate") is not None:
            from transformers.integrations import HfDeepSpeedConfig

            # while it lives, from_pretrained partitions weights as it loads (zero.Init). It is process-global, so
            # it is dropped right after. Without accelerate (transformers requires it for this) each rank loads
            # the full model and deepspeed.initialize partitions it.
            hf_ds_config = HfDeepSpeedConfig(self._ds_config)
        cls = AutoModelForImageTextToText if spec.is_vlm else AutoModelForCausalLM
        model = cls.from_pretrained(spec.model_path, dtype=dtype, attn_implementation=self._attn_implementation())
        del hf_ds_config
        model.config.use_cache = False
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        text_config = model.config.get_text_config()
        head = model.get_output_embeddings()
        # logits == hidden @ W^T (no soft-capping or scaling) is what the hidden-state path assumes
        self._hidden_path = (spec.zero_stage < 3 and getattr(head, "bias", None) is None
                             and getattr(text_config, "final_logit_softcapping", None) is None
                             and getattr(text_config, "logit_scale", None) in (None, 1.0))
        return model

    def _attn_implementation(self) -> str:
        if self.spec.attn_implementation == "varlen" or (self.spec.attn_implementation == "auto"
                                                          and varlen_available(self.device)):
            return register_varlen_attention()
        if self.spec.attn_implementation != "auto":
            return self.spec.attn_implementation
        if self.device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"

    def _build_engine(self) -> Any:
        import deepspeed

        decay, no_decay = [], []
        for _, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)  # ZeRO-3: ds_shape
        groups = [{"params": decay, "weight_decay": self.spec.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        optimizer = None
        if "optimizer" not in self._ds_config:  # torch's AdamW (fused kernel on CUDA): no JIT-built Adam
            optimizer = torch.optim.AdamW(groups, lr=self.spec.lr, betas=(0.9, 0.999), eps=1e-8,
                                          fused=self.device.type == "cuda")
        engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                          model_parameters=None if optimizer is not None else groups,
                                          config=self._ds_config, dist_init_required=False)
        return engine

    def _choose_packing(self) -> bool:
        """Packed rows only where attention is varlen (cost Σ len²); sdpa/eager would attend over the whole row.

        sdpa and eager get the block-diagonal mask as a dense (total × total) mask: correct, but every packed
        row costs total² attention (measured on an H100, Qwen3-0.6B shape, 16k-token micro-batches: 2.8x slower
        than padded rows of similar lengths), so ``auto`` pads there.
        """
        attn = self.model.config._attn_implementation
        want = self.spec.packing == "packed" or (self.spec.packing == "auto" and attn in PACKED_ATTENTION)
        if not want:
            return False
        ok = self._packing_isolates_sequences()
        if not ok and self.spec.packing == "packed":
            raise RuntimeError(f"learner.packing=packed, but with attention {attn!r} packed sequences attend "
                               f"to each other (log-prob change {self.packing_check_diff:.2e}); set "
                               "learner.packing=auto or padded")
        return ok

    def _packing_isolates_sequences(self) -> bool:
        """Self-check: in a packed row, does a sequence's output ignore its neighbour's tokens? Else pad.

        With a block-diagonal mask the neighbour's keys get attention weight exactly 0, so changing them leaves
        the log-probs unchanged up to rounding in any dtype; cross-contamination moves them by far more.
        """
        if self.spec.is_vlm and self.spec.zero_stage == 3:
            return True  # a text-only probe would skip the vision tower's collectives; covered by the tests
        other = ([7, 8, 9, 10], [11, 12, 13])
        rows = []
        self.engine.module.eval()
        with torch.no_grad():
            for first in (([1, 2, 3], [4, 5, 6, 1]), ([6, 5, 4], [3, 2, 1, 2])):
                mb = build_micro_batch([first, other], packed=True, pad_token_id=self._pad_id)
                rows.append(self._forward(mb, need_vision=False)[0][1])
        self.packing_check_diff = float((rows[0] - rows[1]).abs().max())
        ok = self.packing_check_diff < 1e-4
        if not ok and self.rank == 0:
            print(f"[learner] packed sequences attend across boundaries with this model / attention "
                  f"({self.model.config._attn_implementation}, log-prob change {self.packing_check_diff:.2e}); "
                  "using padded micro-batches instead")
        return ok

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
                     num_global_seqs: int, num_global_tokens: int) -> dict[str, float]:
        """One GSPO / GSPO-token / GRPO optimizer step on this rank's shard of the batch."""
        check_policy_batch(batch)
        t0 = time.perf_counter()
        acc = MetricAccumulator()
        self.engine.module.train()
        for mb in self._training_micro_batches(sequence_units(batch), batch.images, "train_policy"):
            with self._oom_guard(mb, "train_policy"):
                lps, ents, aux = self._forward(mb, need_vision=True, want_entropy=True)
                if mb.is_dummy:
                    self._backward(sum(lp.sum() for lp in lps) * 0.0 + aux)
                    continue
                logprobs, mask = pad_rows(lps)  # (B, T)
                old_cpu, _ = pad_rows([torch.tensor(batch.old_logprobs[u], dtype=torch.float32)
                                       for u in mb.units])  # (B, T), built on the host
                old = self._to_device(old_cpu)
                adv = self._to_device(torch.tensor([batch.advantages[u] for u in mb.units],
                                                   dtype=torch.float32))  # (B,)
                value, metrics = compute_policy_loss(
                    loss, logprobs, old, adv, mask, clip_low=clip_low, clip_high=clip_high,
                    num_global_seqs=num_global_seqs, num_global_tokens=num_global_tokens)
                self._backward(value + aux)
            # metrics stay 0-d device tensors (MetricAccumulator reads them once per step): no host sync here
            num_tokens = sum(mb.response_lengths)
            acc.add_sum("loss", value.detach())
            for name, v in metrics.items():
                by_tokens = loss == "grpo" or name == "approx_kl" or (loss == "gspo_token" and "clip" in name)
                acc.add(name, v, num_tokens if by_tokens else mb.num_seqs)
            acc.add("entropy", torch.cat(ents).sum() / max(num_tokens, 1), num_tokens)
            acc.add_sum("num_tokens", float(mb.num_tokens))
        return self._finish_step(acc, t0)

    def train_mpo(self, batch: PairBatch, *, terms: list[tuple[str, float]], beta: float,
                  num_global_pairs: int) -> dict[str, float]:
        """One MPO optimizer step: w_p·DPO + w_q·BCO (reward shift δ shared by all ranks) + w_g·LM on chosen."""
        if batch.ref_chosen_logps is None or batch.ref_rejected_logps is None:
            raise ValueError("train_mpo needs reference log-probs in the PairBatch (ref_chosen_logps / "
                             "ref_rejected_logps); compute them once with compute_pair_logps on the start policy")
        parsed = parse_mpo_terms(terms)
        uses_shift = any(name == "bco_pair" for name, _ in parsed)
        t0 = time.perf_counter()
        acc = MetricAccumulator()
        self.engine.module.train()
        for mb in self._training_micro_batches(pair_units(batch), batch.images, "train_mpo"):
            with self._oom_guard(mb, "train_mpo"):
                lps, _, aux = self._forward(mb, need_vision=True)
                if mb.is_dummy:
                    if uses_shift:  # every rank folds into δ once per micro-batch: the all-reduce must match
                        self.reward_shift.update(torch.zeros(0, device=self.device))
                    self._backward(sum(lp.sum() for lp in lps) * 0.0 + aux)
                    continue
                pc = torch.stack([lp.sum() for lp in lps[0::2]])  # (B,)
                pr = torch.stack([lp.sum() for lp in lps[1::2]])  # (B,)
                rc = torch.tensor([batch.ref_chosen_logps[u] for u in mb.units], device=self.device)  # (B,)
                rr = torch.tensor([batch.ref_rejected_logps[u] for u in mb.units], device=self.device)  # (B,)
                n_chosen = torch.tensor([lp.numel() for lp in lps[0::2]], device=self.device)  # (B,)
                value, metrics = compute_mpo_loss(
                    parsed, pc, pr, rc.to(pc.dtype), rr.to(pc.dtype), beta=beta,
                    reward_shift=self.reward_shift if uses_shift else None, chosen_num_tokens=n_chosen,
                    num_global_pairs=num_global_pairs)
                self._backward(value + aux)
            acc.add_sum("loss", float(value.detach()))
            for name, v in metrics.items():
                acc.add(name, float(v), len(mb.units))
            acc.add_sum("num_tokens", float(mb.num_tokens))
        return self._finish_step(acc, t0)

    def train_sft(self, batch: SequenceBatch, *, num_global_tokens: int) -> dict[str, float]:
        """One supervised step: summed NLL of the response tokens / ``num_global_tokens``."""
        if num_global_tokens <= 0:
            raise ValueError(f"train_sft needs num_global_tokens > 0, got {num_global_tokens}")
        t0 = time.perf_counter()
        acc = MetricAccumulator()
        self.engine.module.train()
        for mb in self._training_micro_batches(sequence_units(batch), batch.images, "train_sft"):
            with self._oom_guard(mb, "train_sft"):
                lps, _, aux = self._forward(mb, need_vision=True)
                nll = -sum(lp.sum() for lp in lps)
                value = nll * 0.0 if mb.is_dummy else nll / num_global_tokens
                self._backward(value + aux)
            if not mb.is_dummy:
                acc.add_sum("loss", float(value.detach()))
                acc.add_sum("num_tokens", float(mb.num_tokens))
        return self._finish_step(acc, t0)

    # ------------------------------------------------------------------ schedule

    def set_lr(self, lr: float, total_steps: int, warmup_steps: int) -> None:
        """Start a new schedule (a new stage): peak ``lr``, ``warmup_steps`` then ``learner.lr_schedule``."""
        self._schedule = LRSchedule(lr, total_steps, warmup_steps, self.spec.lr_schedule)
        self._schedule_step = 0
        self._apply_lr()

    # ------------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self, folder: str, client_state: dict) -> None:
        """DeepSpeed state + ``client_state`` + schedule + reward shift; ``COMPLETE`` is written last."""
        import torch.distributed as dist

        path = Path(folder)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            (path / COMPLETE).unlink(missing_ok=True)
        dist.barrier()
        state = {"cascade_rl": {"client_state": client_state, "reward_shift": self.reward_shift.state_dict(),
                                "schedule": asdict(self._schedule), "schedule_step": self._schedule_step,
                                "global_step": self.global_step}}
        self.engine.save_checkpoint(str(path), tag="state", client_state=state, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            tmp = path / f".{COMPLETE}.tmp"
            tmp.write_text(f"global_step={self.global_step}\n")
            os.replace(tmp, path / COMPLETE)
        dist.barrier()

    def load_checkpoint(self, folder: str) -> dict:
        """Restore weights, optimizer, schedule and reward shift; return the ``client_state`` given at save."""
        path = Path(folder)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete learner checkpoint (no {COMPLETE} marker): it was "
                                    "never finished; resume from an earlier checkpoint")
        load_path, states = self.engine.load_checkpoint(str(path), tag="state", load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
        if load_path is None or "cascade_rl" not in (states or {}):
            raise RuntimeError(f"DeepSpeed could not load the learner checkpoint in {path} (same learner.zero_stage "
                               "and number of ranks as when it was saved?)")
        ours = states["cascade_rl"]
        self.reward_shift.load_state_dict(ours["reward_shift"])
        self._schedule = LRSchedule(**ours["schedule"])
        self._schedule_step = int(ours["schedule_step"])
        self.global_step = int(ours["global_step"])
        self._apply_lr()
        return ours["client_state"]

    def export_hf(self, folder: str) -> None:
        """Rank 0 writes a Hugging Face folder (config, safetensors, tokenizer/processor files), atomically."""
        import torch.distributed as dist

        state = self._gathered_state_dict()
        if self.rank == 0:
            target = Path(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
            self.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            copy_tokenizer_files(Path(self.spec.model_path), tmp)
            if target.exists():
                old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        dist.barrier()

    def named_weights_for_sync(self, bucket_bytes: int = DEFAULT_SYNC_BUCKET_BYTES, *,
                               device: str | torch.device = "cpu",
                               all_ranks: bool = False) -> Iterator[list[tuple[str, Tensor]]]:
        """Buckets of (checkpoint name, weight) of about ``bucket_bytes`` each, for the rollout engine.

        Names are those of the Hugging Face checkpoint (what ``export_hf`` writes and vLLM's ``load_weights``
        maps). Collective under ZeRO-3 (each bucket is gathered on all ranks); only rank 0 yields tensors,
        other ranks yield empty lists, unless ``all_ranks`` (each rank feeds its own colocated engine). Under
        ZeRO 0-2, tensors already on ``device`` alias the live weights: use them before the next ``train_*`` call.
        """
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        names = self._checkpoint_names()
        target = torch.device(device)
        zero3 = self.spec.zero_stage == 3
        for bucket in bucket_parameters(list(self.model.named_parameters()), bucket_bytes):
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
                                 images=[path for u in group for path in (images[u] if images else [])])
               for group in plan]
        return out + [dummy_micro_batch(self._pad_id, packed=self._packed) for _ in range(count - len(out))]

    def _training_micro_batches(self, units: list[list[tuple[list[int], list[int]]]],
                                images: list[list[str]] | None, where: str) -> list[MicroBatch]:
        if self.spec.auto_micro_batch_tokens and self.device.type == "cuda" and not self._auto_budget_done:
            # measured at the first training step, when a colocated engine sleeps as it will in every step
            # the caching allocator keeps what it once held: leave a waking engine its share and the sync buffers
            self._auto_budget_done = True
            total = torch.cuda.get_device_properties(self.device).total_memory
            weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
            self.spec.micro_batch_tokens = auto_micro_batch_tokens(
                self.model.config, free_bytes=free_device_bytes(self.device), floor=self.spec.micro_batch_tokens,
                dtype_bytes=2 if self.spec.dtype == "bfloat16" else 4,
                gradient_checkpointing=self.spec.gradient_checkpointing,
                reserve_bytes=int(self.spec.shared_gpu_reserve_fraction * total) + weight_bytes)
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

    def _gathered_state_dict(self) -> dict[str, Tensor]:
        """Full weights on the CPU of rank 0 (empty elsewhere); ZeRO-3 gathers bucket by bucket."""
        state: dict[str, Tensor] = {}
        names = {v: k for k, v in self._checkpoint_names().items()}  # checkpoint name -> module name
        for bucket in self.named_weights_for_sync(device="cpu"):
            for ckpt_name, t in bucket:
                state[names[ckpt_name]] = t
        if self.rank == 0:  # persistent buffers (ZeRO never partitions buffers)
            persistent = set(self.model.state_dict())
            state.update({n: b.detach().cpu() for n, b in self.model.named_buffers() if n in persistent})
        return state

    @contextlib.contextmanager
    def _oom_guard(self, mb: MicroBatch, where: str) -> Iterator[None]:
        """Re-raise an out-of-memory error (CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError) as
        ``torch.OutOfMemoryError`` naming the recipe keys to change (``faults.learner_oom_message``)."""
        try:
            yield
        except RuntimeError as e:
            if not (isinstance(e, torch.OutOfMemoryError) or is_memory_text(str(e))):
                raise
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
