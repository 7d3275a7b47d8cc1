"""Learner helpers with no engine state (so ``learner.py`` holds only the worker).

Micro-batch planning and the packed / padded layouts are ``cascade_rl.algos.packing``; here: batches → units,
image files →
``pixel_values`` (through ``cascade_rl.hf``), metric reduction over micro-batches and ranks, parameter buckets and checkpoint names for
weight sync, the DeepSpeed config and the LR schedule.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cascade_rl.algos.packing import MicroBatch, SequenceTokens
from cascade_rl.types import PairBatch, SequenceBatch


class ImageInputs:
    """``pixel_values`` for a micro-batch's image files, tiled by ``cascade_rl.hf.PromptRenderer`` exactly as the
    rollout engines tile them (same processor, same ``model.max_tiles``)."""

    def __init__(self, model_path: str, config: Any, max_tiles: int = 0) -> None:
        from cascade_rl.hf import PromptRenderer

        self.model_path, self.config = model_path, config
        self.renderer = PromptRenderer(model_path, max_tiles=max_tiles, is_vlm=True)

    def pixel_values(self, mb: MicroBatch) -> Tensor:
        """(tiles, 3, H, W) for the micro-batch's images, in token order; checks the image tokens per image."""
        pixels, tiles = self.renderer.pixel_values(mb.images)  # (tiles, 3, H, W)
        per_tile, token_id = int(self.config.image_seq_length), int(self.config.image_token_id)
        expected, found = sum(tiles) * per_tile, int((mb.input_ids == token_id).sum())
        in_prompts = [n for row in mb.input_ids.tolist() for n in self.renderer.tiles_per_image(row)]
        if found != expected or in_prompts != tiles:
            raise ValueError(f"a learner micro-batch has {len(mb.images)} image(s) = {sum(tiles)} tile(s) "
                             f"{tiles} x {per_tile} tokens = {expected} image tokens, but its prompts hold "
                             f"{found} image-context tokens (id {token_id}) in blocks of {in_prompts} tile(s); "
                             "prompt_token_ids must be the processor-expanded ids (cascade_rl.hf.PromptRenderer, "
                             "as the rollout engine returns them) with the same model.max_tiles, and each "
                             "sequence must list its prompt's images")
        return pixels

    def dummy_pixel_values(self) -> Tensor:
        """One black tile (1, 3, H, W): keeps the vision tower in a pass that has no image."""
        return self.renderer.dummy_pixel_values()


VISION_MODULES = ("vision_tower", "vision_model", "visual")  # InternVL / Qwen-VL-style attribute names
PROJECTOR_MODULES = ("multi_modal_projector", "mlp1", "mm_projector")


def freeze_parameters(model: Any, *, vision: bool, projector: bool) -> frozenset[str]:
    """Turn off gradients of the vision tower and/or projector; return the frozen parameter names.

    The optimizer is built from parameters that require gradients only, so frozen ones get no optimizer state.
    """
    wanted = (VISION_MODULES if vision else ()) + (PROJECTOR_MODULES if projector else ())
    if not wanted:
        return frozenset()
    frozen = {n for n, _ in model.named_parameters() if any(part in wanted for part in n.split("."))}
    if vision and not any(any(p in VISION_MODULES for p in n.split(".")) for n in frozen):
        raise ValueError(f"learner.freeze_vision=true, but {type(model).__name__} has no vision tower "
                         f"(a module named one of {VISION_MODULES}); unset it for a text-only model")
    if projector and not any(any(p in PROJECTOR_MODULES for p in n.split(".")) for n in frozen):
        raise ValueError(f"learner.freeze_projector=true, but {type(model).__name__} has no projector (a module "
                         f"named one of {PROJECTOR_MODULES}); unset it for this model")
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return frozenset(frozen)


def bucket_parameters(named: Sequence[tuple[str, Any]], bucket_bytes: int) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive groups of parameters of about ``bucket_bytes`` (full size, also when ZeRO-3 partitioned)."""
    bucket: list[tuple[str, Any]] = []
    size = 0
    for name, p in named:
        nbytes = int(getattr(p, "ds_numel", p.numel())) * p.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, p))
        size += nbytes
    if bucket:
        yield bucket


class MetricAccumulator:
    """Per-step metrics over micro-batches and ranks: weighted means, sums, and ``*_min`` / ``*_max`` extremes.

    ``reduce`` is collective: every rank calls it, also a rank that saw only dummy micro-batches (the key sets
    are merged first, so ranks need not have seen the same metrics). Values may be floats or 0-d tensors on the
    device: tensors are summed on the device and read back once, in ``reduce`` (no host sync per micro-batch).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}  # name -> Σ value (sum metrics) or Σ weight·value (means)
        self.weights: dict[str, float] = {}  # name -> Σ weight (means only)
        self.extremes: dict[str, float] = {}  # name -> running min / max

    def add(self, name: str, value: float | Tensor, weight: float) -> None:
        if name.endswith("_min") or name.endswith("_max"):
            if weight > 0:
                old = self.extremes.get(name)
                if old is None:
                    self.extremes[name] = value
                elif isinstance(value, Tensor) or isinstance(old, Tensor):
                    pick = torch.minimum if name.endswith("_min") else torch.maximum
                    self.extremes[name] = pick(torch.as_tensor(old), torch.as_tensor(value))
                else:
                    self.extremes[name] = min(old, value) if name.endswith("_min") else max(old, value)
            return
        self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.weights[name] = self.weights.get(name, 0.0) + weight

    def add_sum(self, name: str, value: float | Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value

    def _read_back(self) -> None:
        """Tensor values → floats with one device-to-host copy."""
        slots = [(d, k) for d in (self.sums, self.extremes) for k, v in d.items() if isinstance(v, Tensor)]
        if slots:
            dev = slots[0][0][slots[0][1]].device
            values = torch.stack([d[k].detach().float().reshape(()).to(dev) for d, k in slots]).tolist()
            for (d, k), v in zip(slots, values, strict=True):
                d[k] = v

    def reduce(self, world_size: int, device: torch.device) -> dict[str, float]:
        self._read_back()
        keys_sum, keys_ext = sorted(self.sums), sorted(self.extremes)
        if world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, (keys_sum, keys_ext))
            keys_sum = sorted({k for ks, _ in gathered for k in ks})
            keys_ext = sorted({k for _, ke in gathered for k in ke})
        sums = torch.tensor([[self.sums.get(k, 0.0), self.weights.get(k, 0.0)] for k in keys_sum],
                            dtype=torch.float64, device=device).reshape(-1, 2)  # (K, 2)
        lows = torch.tensor([self.extremes.get(k, math.inf) if k.endswith("_min") else
                             -self.extremes.get(k, -math.inf) for k in keys_ext],
                            dtype=torch.float64, device=device)  # (E,) maxima stored negated
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
            dist.all_reduce(lows, op=dist.ReduceOp.MIN)
        out: dict[str, float] = {}
        for k, (total, weight) in zip(keys_sum, sums.tolist(), strict=True):
            out[k] = total / weight if weight > 0 else total  # a sum metric has no weight
        for k, v in zip(keys_ext, lows.tolist(), strict=True):
            v = v if k.endswith("_min") else -v
            out[k] = v if math.isfinite(v) else 0.0
        return out


def build_ds_config(*, zero_stage: int, bf16: bool, grad_clip: float, offload_optimizer: bool, lr: float,
                    weight_decay: float, on_cuda: bool, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: one micro-batch per engine call, gradient accumulation driven by the worker.

    An ``optimizer`` section (DeepSpeedCPUAdam, JIT-built once) appears only for optimizer offload on a GPU
    machine; otherwise the worker passes a torch AdamW (fused on CUDA). On a CPU-only machine offload is a no-op
    and is dropped.
    """
    offload = offload_optimizer and on_cuda and zero_stage >= 1
    zero: dict[str, Any] = {"stage": zero_stage, "contiguous_gradients": True,
                            "overlap_comm": on_cuda and zero_stage >= 2}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=1e4)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        # backward() only accumulates; the one step() per train_* call reduces and updates
        "managed_gradient_accumulation": False,
        "gradient_clipping": max(grad_clip, 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # the client torch.optim.AdamW
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if offload:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                           "weight_decay": weight_decay}}
    return config


def checkpoint_name_map(model: Any) -> dict[str, str]:
    """Module parameter name -> name in the model's Hugging Face checkpoint (what vLLM and ``from_pretrained`` read).

    transformers 5 renames some checkpoints' keys on load (InternVL: ``language_model.model.*`` on disk,
    ``model.language_model.*`` in memory) and reverts that on save; the same reversal names synced weights.
    """
    names = [n for n, _ in model.named_parameters()]
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: checkpoint names are module names
        return {n: n for n in names}
    probes = {n: torch.empty(0) for n in names}
    reverted = revert_weight_conversion(model, dict(probes))
    by_id = {id(t): n for n, t in probes.items()}
    mapping = {by_id[id(t)]: new for new, t in reverted.items() if id(t) in by_id}
    if len(mapping) != len(names):
        raise NotImplementedError(f"{type(model).__name__} stores fused or split tensors in its checkpoint "
                                  "(transformers weight converters); syncing weights by name is not supported")
    return mapping


def copy_tokenizer_files(source: Path, target: Path) -> None:
    """Copy tokenizer / processor / chat-template files (everything but weights and configs) into an export."""
    skip_suffixes = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")
    skip_names = {"config.json", "generation_config.json", "cascade_rl_build.json"}
    for f in source.iterdir():
        if f.is_file() and f.name not in skip_names and not f.name.endswith(skip_suffixes):
            if not (target / f.name).exists():
                shutil.copy2(f, target / f.name)


def sequence_units(batch: SequenceBatch) -> list[list[SequenceTokens]]:
    """One unit per sequence."""
    return [[(p, r)] for p, r in zip(batch.prompt_token_ids, batch.response_token_ids, strict=True)]


def pair_units(batch: PairBatch) -> list[list[SequenceTokens]]:
    """One unit per pair: [(prompt, chosen), (prompt, rejected)] — the DPO term needs both in one pass."""
    return [[(p, c), (p, r)] for p, c, r in
            zip(batch.prompt_token_ids, batch.chosen_token_ids, batch.rejected_token_ids, strict=True)]


def check_policy_batch(batch: SequenceBatch, *, need_old: bool = True) -> None:
    """Advantages per sequence and (unless ``need_old`` is off) old log-probs per response token."""
    if batch.advantages is None or (need_old and batch.old_logprobs is None):
        raise ValueError("train_policy needs SequenceBatch.advantages (one per sequence) and .old_logprobs (one "
                         "per response token; from compute_logprobs before the update, or old_is_current=True "
                         "for the first on-policy update)")
    if len(batch.advantages) != len(batch):
        raise ValueError(f"train_policy: {len(batch)} sequences but {len(batch.advantages)} advantages")
    if batch.old_logprobs is None:
        return
    if len(batch.old_logprobs) != len(batch):
        raise ValueError(f"train_policy: {len(batch)} sequences but {len(batch.old_logprobs)} old log-prob lists")
    for i, (resp, old) in enumerate(zip(batch.response_token_ids, batch.old_logprobs, strict=True)):
        if len(resp) != len(old):
            raise ValueError(f"sequence {i}: {len(resp)} response tokens but {len(old)} old log-probs")


@dataclass
class LRSchedule:
    """Linear warm-up over ``warmup_steps`` to ``lr``, then constant or cosine decay to 0 at ``total_steps``."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "constant"  # constant | cosine

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def pad_token_id(config: Any) -> int:
    """The id used to fill padded positions (never attended to nor targeted)."""
    text = config.get_text_config()
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(text, name, None) if getattr(text, name, None) is not None else getattr(config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0
