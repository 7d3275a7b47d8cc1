"""Sequence packing into micro-batches by a token budget, and right padding.

Planning (``plan_micro_batches``): sequences are sorted longest first and each is placed into the open
micro-batch with the **fewest tokens that still fits it**, opening a new micro-batch when none fits
(worst-fit-decreasing). The number of micro-batches opened up front is ``max(k_ffd, min_num_micro_batches)``,
where ``k_ffd`` is what first-fit-decreasing needs (the usual near-optimal bin count, ≤ 11/9·OPT + 1), so the
budget is respected, loads come out balanced, and data-parallel ranks can be asked for the same number of
micro-batches (``min_num_micro_batches`` = the max over ranks) without empty ones. Ties go to the earliest
sequence / micro-batch, so the plan is deterministic.

Packed layout (flash-attention varlen / HF ``position_ids`` packing)::

    input_ids    (1, total)   sequences concatenated
    position_ids (1, total)   0..len_i−1 restarting per sequence
    cu_seqlens   (n+1,) int32 [0, len_0, len_0+len_1, …]
    indices      (n,)         original index of each packed sequence; results go back with unpack_to_original

Lossless: packing then unpacking returns every sequence unchanged, in its original order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SeqLike = Tensor | Sequence[int]


@dataclass
class PackedMicroBatch:
    """One packed micro-batch of ``num_seqs`` sequences."""

    input_ids: Tensor  # (1, total) long
    position_ids: Tensor  # (1, total) long
    cu_seqlens: Tensor  # (num_seqs + 1,) int32
    max_seqlen: int
    indices: list[int]  # original index of each sequence, in packed order

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1].item())

    @property
    def num_seqs(self) -> int:
        return len(self.indices)


def _first_fit_decreasing_bins(lengths: Sequence[int], order: Sequence[int], max_tokens: int) -> int:
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                loads[b] += lengths[i]
                break
        else:
            loads.append(lengths[i])
    return len(loads)


def plan_micro_batches(
    lengths: Sequence[int], max_tokens: int, *, min_num_micro_batches: int = 1
) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``max_tokens`` tokens each (see module docstring)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if min_num_micro_batches < 1:
        raise ValueError(f"min_num_micro_batches must be >= 1, got {min_num_micro_batches}")
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError("sequence lengths must be >= 0")
    too_long = [n for n in lengths if n > max_tokens]
    if too_long:
        raise ValueError(
            f"a sequence of {max(too_long)} tokens exceeds the micro-batch token budget max_tokens={max_tokens}; "
            "raise the budget to at least the longest prompt+response, or cap the response length"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    num_bins = max(_first_fit_decreasing_bins(lengths, order, max_tokens), min_num_micro_batches)
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0] * num_bins
    for i in order:
        fits = [b for b in range(len(bins)) if loads[b] + lengths[i] <= max_tokens]
        if not fits:
            bins.append([])
            loads.append(0)
            fits = [len(bins) - 1]
        b = min(fits, key=lambda k: (loads[k], len(bins[k]), k))
        bins[b].append(i)
        loads[b] += lengths[i]
    return [sorted(b) for b in bins if b]


def _as_long(seq: SeqLike) -> Tensor:
    return seq.reshape(-1).long() if isinstance(seq, Tensor) else torch.tensor(list(seq), dtype=torch.long)


def pack_micro_batch(sequences: Sequence[SeqLike], indices: Sequence[int]) -> PackedMicroBatch:
    """Concatenate ``sequences[i] for i in indices`` into one packed row."""
    seqs = [_as_long(sequences[i]) for i in indices]
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.int32)  # (n,)
    cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)  # (n+1,)
    cu_seqlens[1:] = torch.cumsum(lengths, dim=0)
    device = seqs[0].device if seqs else None
    input_ids = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.long)  # (total,)
    positions = [torch.arange(s.numel(), dtype=torch.long, device=device) for s in seqs]
    position_ids = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)  # (total,)
    return PackedMicroBatch(
        input_ids=input_ids[None, :],
        position_ids=position_ids[None, :],
        cu_seqlens=cu_seqlens.to(input_ids.device),
        max_seqlen=int(lengths.max().item()) if seqs else 0,
        indices=list(indices),
    )


def pack_sequences(
    sequences: Sequence[SeqLike], max_tokens: int, *, min_num_micro_batches: int = 1
) -> list[PackedMicroBatch]:
    """Plan and pack 1-D token sequences into micro-batches of at most ``max_tokens`` tokens."""
    lengths = [s.numel() if isinstance(s, Tensor) else len(s) for s in sequences]
    plan = plan_micro_batches(lengths, max_tokens, min_num_micro_batches=min_num_micro_batches)
    return [pack_micro_batch(sequences, idx) for idx in plan]


def pack_values(values: Sequence[Tensor], indices: Sequence[int]) -> Tensor:
    """Concatenate per-sequence tensors (len_i, ...) in ``indices`` order → (1, total, ...), e.g. old log-probs."""
    return torch.cat([values[i] for i in indices], dim=0)[None]


def unpack(packed: Tensor, cu_seqlens: Tensor) -> list[Tensor]:
    """Split packed values (1, total, ...) or (total, ...) back into per-sequence tensors (len_i, ...)."""
    bounds = cu_seqlens.tolist()
    is_batched = packed.dim() >= 2 and packed.shape[0] == 1 and packed.shape[1] == bounds[-1]
    flat = packed[0] if is_batched else packed  # (total, ...)
    if bounds[-1] != flat.shape[0]:
        raise ValueError(f"packed values have {flat.shape[0]} positions but cu_seqlens ends at {bounds[-1]}")
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def unpack_to_original(
    per_batch: Sequence[Sequence[Tensor]], batches: Sequence[PackedMicroBatch]
) -> list[Tensor]:
    """Put per-sequence results of every micro-batch (packed order) back into the original sequence order."""
    total = sum(b.num_seqs for b in batches)
    out: list[Tensor | None] = [None] * total
    for results, batch in zip(per_batch, batches, strict=True):
        if len(results) != batch.num_seqs:
            raise ValueError(f"micro-batch has {batch.num_seqs} sequences but {len(results)} results")
        for original, value in zip(batch.indices, results, strict=True):
            out[original] = value
    if any(v is None for v in out):
        raise ValueError("micro-batch indices do not cover 0..n-1 exactly once")
    return [v for v in out if v is not None]


def pad_sequences(
    sequences: Sequence[SeqLike], *, padding_value: float = 0, max_length: int | None = None
) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D sequences → (B, T) tensor and long mask (B, T) with 1 on real tokens.

    Tensors keep their dtype and device; lists become long tensors. ``max_length`` pads further (never truncates).
    """
    tensors = [
        s.reshape(-1) if isinstance(s, Tensor) else torch.tensor(list(s), dtype=torch.long) for s in sequences
    ]
    longest = max((t.numel() for t in tensors), default=0)
    width = longest if max_length is None else max_length
    if width < longest:
        raise ValueError(f"max_length={max_length} is shorter than the longest sequence ({longest} tokens)")
    dtype = tensors[0].dtype if tensors else torch.long
    device = tensors[0].device if tensors else None
    padded = torch.full((len(tensors), width), padding_value, dtype=dtype, device=device)  # (B, T)
    mask = torch.zeros((len(tensors), width), dtype=torch.long, device=device)  # (B, T)
    for row, t in enumerate(tensors):
        padded[row, : t.numel()] = t
        mask[row, : t.numel()] = 1
    return padded, mask
