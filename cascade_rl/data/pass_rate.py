"""Pass rates of prompts from a rollout log, and the filter that keeps prompts of moderate accuracy for GSPO.

``pass_rate(p) = num_correct(p) / num_total(p)`` over the logged responses of prompt ``p``. Prompts that every
sample solves (or none does) give a group of equal rewards, hence zero advantages and no gradient in GSPO/GRPO;
InternVL3.5 keeps prompts whose accuracy lies in a band before the online stage.

Counting rules (the same as ``pairs.build_pairs``):
- only records whose prompt has a ground truth count; a prompt without one has no pass rate;
- ``correct is None`` (unparsed answer, failed or timed-out check) counts as not correct.

Filtering rule: a prompt is kept when ``low <= pass_rate <= high`` (both ends inclusive, with a 1e-9 tolerance
for float bounds such as 1/3). Prompts with no logged pass rate are kept (they may be new since the log was
written, or have no checkable answer) and counted as ``num_unlogged`` so the choice is visible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ..types import RolloutRecord

_TOLERANCE = 1e-9


def compute_pass_rates(records: Iterable[RolloutRecord]) -> dict[str, tuple[int, int]]:
    """``{prompt_id: (num_correct, num_total)}`` over records whose prompt has a ground truth."""
    rates: dict[str, tuple[int, int]] = {}
    for r in records:
        if r.ground_truth is None:
            continue
        correct, total = rates.get(r.prompt_id, (0, 0))
        rates[r.prompt_id] = (correct + (r.correct is True), total + 1)
    return rates


def filter_prompts_by_pass_rate(prompt_ids: Sequence[str], pass_rates: Mapping[str, tuple[int, int]],
                                low: float, high: float) -> tuple[list[str], dict[str, float]]:
    """Prompt ids (in input order) whose pass rate lies in ``[low, high]``, plus counts of what was kept/dropped.

    Stats: ``num_prompts``, ``num_kept``, ``num_unlogged`` (kept, no pass rate), ``num_below``, ``num_above``,
    ``low``, ``high``, ``mean_pass_rate_kept`` (over kept prompts that have a pass rate; 0 when none).
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"pass-rate band [{low}, {high}] is invalid: need 0 <= low <= high <= 1 "
                         f"(gspo.pass_rate_min / gspo.pass_rate_max)")
    kept: list[str] = []
    below = above = unlogged = 0
    kept_rates: list[float] = []
    for pid in prompt_ids:
        correct, total = pass_rates.get(pid, (0, 0))
        if total <= 0:
            unlogged += 1
            kept.append(pid)
            continue
        rate = correct / total
        if rate < low - _TOLERANCE:
            below += 1
        elif rate > high + _TOLERANCE:
            above += 1
        else:
            kept.append(pid)
            kept_rates.append(rate)
    stats = {"num_prompts": len(prompt_ids), "num_kept": len(kept), "num_unlogged": unlogged,
             "num_below": below, "num_above": above, "low": low, "high": high,
             "mean_pass_rate_kept": sum(kept_rates) / len(kept_rates) if kept_rates else 0.0}
    return kept, stats
