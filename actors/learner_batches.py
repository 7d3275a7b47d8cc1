"""Learner micro-batches: token-budget planning, sequence packing, and where each response token is predicted.

A *unit* is what must share one forward pass: one sequence for policy/SFT training, a (chosen, rejected) pair
for MPO (the DPO term couples the two). Units are grouped into micro-batches of at most
``learner.micro_batch_tokens`` tokens (``cascade_rl.algos.packing.plan_micro_batches``: longest first, balanced).

Two layouts, same results (tests check that neither changes a log-prob beyond float noise):

- **packed**: all sequences of a micro-batch concatenated into one row ``(1, total)`` with ``position_ids``
  restarting at 0 per sequence and no attention mask. transformers >= 4.54 (here 5.x) derives cu_seqlens for
  flash-attention, a block mask for flex attention and a dense block-diagonal mask for sdpa/eager
  (``masking_utils.find_packed_sequence_indices``) from such position ids, *only when no KV cache is in play*: the
  model must be called with ``use_cache=False`` — with the default ``use_cache=True`` sequences silently attend to
  each other (seen: log-prob errors of 0.5).
- **padded**: right-padded rows with an attention mask, grouped longest first; the budget counts padding
  (rows × longest row). Used with sdpa/eager, where a packed row would cost total² attention.

For both, ``target_positions`` index the flattened ``(rows · L)`` hidden states: position ``t`` predicts token
``t + 1``, so response token j of a sequence with prompt length p at offset o is predicted at ``o + p − 1 + j``.
Only those positions are pushed through the LM head.

Also here, as plain functions with no engine state (so ``learner.py`` holds only the worker): image files →
``pixel_values``, metric reduction over micro-batches and ranks, parameter buckets and checkpoint names for
weight sync, the DeepSpeed config, the LR schedule and spec validation.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cascade_rl.algos.packing import plan_micro_batches
from cascade_rl.types import PairBatch, SequenceBatch

# (prompt token ids, response token ids) of one sequence
SequenceTokens = tuple[Sequence[int], Sequence[int]]


@dataclass
class MicroBatch:
    """One forward pass worth of sequences, as tensors on the CPU (the worker moves them)."""

    units: list[int]  # caller's unit indices, in micro-batch order
    input_ids: Tensor  # (R, L) long; R = 1 when packed
    position_ids: Tensor  # (R, L) long
    attention_mask: Tensor | None  # (R, L) long for the padded layout, None when packed
    target_positions: Tensor  # (N,) long index into the flattened (R·L) positions
    targets: Tensor  # (N,) long response tokens predicted there
    response_lengths: list[int]  # per sequence, in micro-batch order (sum == N)
    images: list[str] = field(default_factory=list)  # image paths in token order
    is_dummy: bool = False  # padding micro-batch so every rank runs the same number of passes

    @property
    def num_tokens(self) -> int:
        if self.attention_mask is not None:
            return int(self.attention_mask.sum().item())
        return int(self.input_ids.numel())

    @property
    def num_seqs(self) -> int:
        return len(self.response_lengths)


def plan_units(units: Sequence[Sequence[int]], budget: int, *, packed: bool,
               min_num_micro_batches: int = 1) -> list[list[int]]:
    """Group units (each given by its sequences' lengths) into micro-batches of at most ``budget`` tokens.

    Packed: balanced bins over the units' total lengths (``plan_micro_batches``). Padded: longest first, a unit
    joins the current micro-batch while ``rows × widest row ≤ budget`` (padding counts).
    """
    if not units:
        return []
    totals = [sum(u) for u in units]
    cost = totals if packed else [len(u) * max(u) for u in units]
    if max(cost) > budget:
        what = "pair" if max(len(u) for u in units) > 1 else "sequence"
        raise ValueError(
            f"a {what} of {max(totals)} tokens (prompt + response{'s' if what == 'pair' else ''}) exceeds the "
            f"micro-batch token budget learner.micro_batch_tokens={budget}; raise learner.micro_batch_tokens to at "
            "least the longest prompt + response(s), or lower model.max_response_tokens / model.max_prompt_tokens")
    if packed:
        return plan_micro_batches(totals, budget, min_num_micro_batches=min_num_micro_batches)
    order = sorted(range(len(units)), key=lambda i: (-max(units[i]), i))
    groups: list[list[int]] = []
    rows = width = 0
    for i in order:
        if groups and (rows + len(units[i])) * max(width, max(units[i])) <= budget:
            groups[-1].append(i)
            rows, width = rows + len(units[i]), max(width, max(units[i]))
        else:
            groups.append([i])
            rows, width = len(units[i]), max(units[i])
    return [sorted(g) for g in groups]


def build_micro_batch(
    sequences: Sequence[SequenceTokens], *, packed: bool, pad_token_id: int, units: Sequence[int] = (),
    images: Sequence[str] = (),
) -> MicroBatch:
    """Tensors for ``sequences`` (already in micro-batch order) in the packed or padded layout."""
    if any(len(prompt) < 1 for prompt, _ in sequences):
        raise ValueError("every learner sequence needs a prompt of at least 1 token: the first response token is "
                         "predicted from the last prompt token")
    full = [list(p) + list(r) for p, r in sequences]
    lengths = [len(s) for s in full]
    response_lengths = [len(r) for _, r in sequences]
    if packed:
        input_ids = torch.tensor([tok for s in full for tok in s], dtype=torch.long)[None]  # (1, total)
        position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])[None]  # (1, total)
        attention_mask = None
        row_starts = torch.tensor([0, *lengths[:-1]], dtype=torch.long).cumsum(0)  # offset of each sequence
    else:
        width = max(lengths)
        input_ids = torch.full((len(full), width), pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(full), width), dtype=torch.long)  # (B, L)
        for row, s in enumerate(full):
            input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[row, : len(s)] = 1
        # padded positions get 0..L-1 too; they are masked out of attention and never targeted
        position_ids = torch.arange(width, dtype=torch.long)[None].expand(len(full), width).clone()  # (B, L)
        row_starts = torch.arange(len(full), dtype=torch.long) * width
    positions, targets = [], []
    for (prompt, response), start in zip(sequences, row_starts.tolist(), strict=True):
        first = start + len(prompt) - 1
        positions.append(torch.arange(first, first + len(response), dtype=torch.long))
        targets.append(torch.tensor(list(response), dtype=torch.long))
    return MicroBatch(
        units=list(units), input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
        target_positions=torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long),
        targets=torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long),
        response_lengths=response_lengths, images=list(images),
    )


def dummy_micro_batch(pad_token_id: int, *, packed: bool) -> MicroBatch:
    """A 2-token sequence whose loss is multiplied by 0: keeps ranks' collective calls in step."""
    mb = build_micro_batch([([pad_token_id], [pad_token_id])], packed=packed, pad_token_id=pad_token_id)
    mb.is_dummy = True
    return mb


def split_by_lengths(values: Tensor, lengths: Sequence[int]) -> list[Tensor]:
    """(N,) → per-sequence (len_i,) views."""
    return list(torch.split(values, list(lengths)))


def pad_rows(rows: Sequence[Tensor], *, value: float = 0.0) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D tensors (len_i,) → values (B, T) and bool mask (B, T); T ≥ 1 so losses see a 2-D shape."""
    width = max([1, *(r.numel() for r in rows)])
    ref = rows[0] if rows else torch.zeros(0)
    out = torch.full((len(rows), width), value, dtype=ref.dtype, device=ref.device)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=ref.device)  # (B, T)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
        mask[i, : r.numel()] = True
    return out, mask


def load_images(paths: Sequence[str]) -> list[Any]:
    """PIL RGB images from file paths; a missing file is an error naming it."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"learner batch image not found: {path}") from e
    return images


class ImageInputs:
    """``pixel_values`` for a micro-batch's image files, with the model's own image processor (InternVL-style)."""

    def __init__(self, model_path: str, config: Any) -> None:
        from transformers import AutoImageProcessor

        self.model_path, self.config = model_path, config
        self.processor = AutoImageProcessor.from_pretrained(model_path)

    def pixel_values(self, mb: MicroBatch) -> Tensor:
        """(tiles, 3, H, W) for the micro-batch's images, in token order; checks the image-token count."""
        out = self.processor(images=load_images(mb.images), return_tensors="pt")
        extra = sorted(set(out) - {"pixel_values", "num_patches"})
        if extra:
            raise NotImplementedError(f"the image processor of {self.model_path} returns {extra}; the learner "
                                      "supports InternVL-style VLMs (pixel_values only)")
        pixels = out["pixel_values"]  # (tiles, 3, H, W)
        per_tile, token_id = int(self.config.image_seq_length), int(self.config.image_token_id)
        expected, found = pixels.shape[0] * per_tile, int((mb.input_ids == token_id).sum())
        if found != expected:
            raise ValueError(f"a learner micro-batch has {len(mb.images)} image(s) = {pixels.shape[0]} tile(s) x "
                             f"{per_tile} tokens = {expected} image tokens, but its prompts hold {found} "
                             f"image-context tokens (id {token_id}); prompt_token_ids must be the "
                             "processor-expanded ids (as the rollout engine returns them), one entry per image")
        return pixels

    def dummy_pixel_values(self) -> Tensor:
        """One black tile (1, 3, H, W): keeps the vision tower in a pass that has no image."""
        from PIL import Image

        black = Image.new("RGB", (32, 32))  # the processor resizes it to the model's input size
        return self.processor(images=[black], return_tensors="pt")["pixel_values"][:1]


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


def check_policy_batch(batch: SequenceBatch) -> None:
    if batch.advantages is None or batch.old_logprobs is None:
        raise ValueError("train_policy needs SequenceBatch.advantages (one per sequence) and .old_logprobs (one "
                         "per response token; from compute_logprobs before the update)")
    if len(batch.advantages) != len(batch) or len(batch.old_logprobs) != len(batch):
        raise ValueError(f"train_policy: {len(batch)} sequences but {len(batch.advantages)} advantages and "
                         f"{len(batch.old_logprobs)} old log-prob lists")
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


def validate_spec(spec: Any) -> None:
    """All errors in a ``LearnerSpec`` at once, each naming its recipe key."""
    errors = []
    if spec.dtype not in ("float32", "bfloat16"):
        errors.append(f"model.dtype={spec.dtype!r}: the learner supports float32 and bfloat16")
    if spec.zero_stage not in (0, 1, 2, 3):
        errors.append(f"learner.zero_stage={spec.zero_stage}: must be 0, 1, 2 or 3")
    if spec.lr_schedule not in ("constant", "cosine"):
        errors.append(f"learner.lr_schedule={spec.lr_schedule!r}: must be constant or cosine")
    if spec.packing not in ("auto", "packed", "padded"):
        errors.append(f"learner packing={spec.packing!r}: must be auto, packed or padded")
    if spec.micro_batch_tokens < 2:
        errors.append(f"learner.micro_batch_tokens={spec.micro_batch_tokens}: must be >= 2 tokens")
    if spec.lr < 0 or spec.warmup_steps < 0 or spec.total_steps < 1:
        errors.append(f"learner.lr={spec.lr}, learner.warmup_steps={spec.warmup_steps}, total_steps="
                      f"{spec.total_steps}: need lr >= 0, warmup_steps >= 0, total_steps >= 1")
    if errors:
        raise ValueError("invalid learner settings:\n  " + "\n  ".join(errors))


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
