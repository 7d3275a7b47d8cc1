"""Sequence packing: micro-batches by a token budget, in a packed or a padded layout (what the learner runs).

A *unit* is what must share one forward pass: one sequence for policy/SFT training, a (chosen, rejected) pair
for MPO (the DPO term couples the two).

Planning (``plan_micro_batches``): sequences are sorted longest first and each is placed into the open
micro-batch with the **fewest tokens that still fits it**, opening a new micro-batch when none fits
(worst-fit-decreasing). The number of micro-batches opened up front is ``max(k_ffd, min_num_micro_batches)``,
where ``k_ffd`` is what first-fit-decreasing needs (the usual near-optimal bin count, ≤ 11/9·OPT + 1), so the
budget is respected, loads come out balanced, and data-parallel ranks can be asked for the same number of
micro-batches (``min_num_micro_batches`` = the max over ranks) without empty ones. Ties go to the earliest
sequence / micro-batch, so the plan is deterministic. ``plan_units`` applies it to units (packed), or groups
units longest first while ``rows × widest row ≤ budget`` (padded: padding counts).

Two layouts (``build_micro_batch``), same results (the learner tests check that neither changes a log-prob):

- **packed**: all sequences of a micro-batch concatenated into one row ``(1, total)`` with ``position_ids``
  restarting at 0 per sequence and no attention mask. transformers >= 4.54 derives cu_seqlens for
  flash-attention, a block mask for flex attention and a dense block-diagonal mask for sdpa/eager from such
  position ids, *only when no KV cache is in play*: the model must be called with ``use_cache=False`` — with the
  default ``use_cache=True`` sequences silently attend to each other (seen: log-prob errors of 0.5).
- **padded**: right-padded rows with an attention mask (used with sdpa/eager, where a packed row would cost
  total² attention).

For both, ``target_positions`` index the flattened ``(rows · L)`` hidden states: position ``t`` predicts token
``t + 1``, so response token j of a sequence with prompt length p at offset o is predicted at ``o + p − 1 + j``.
Only those positions go through the LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# (prompt token ids, response token ids) of one sequence
SequenceTokens = tuple[Sequence[int], Sequence[int]]


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
