"""``contains_answer``: the example reward of docs/rewards.md — 1.0 when the gold answer appears in the response."""

from __future__ import annotations

from cascade_rl.types import Sample

from .registry import register_reward


@register_reward("contains_answer")
def contains_answer(sample: Sample, *, case_sensitive: bool = False) -> float | None:
    """1.0 when the ground truth appears verbatim in the response, else 0.0 (None without a ground truth)."""
    if not sample.ground_truth:
        return None  # not applicable: the scorer leaves this term out of the total
    response, gold = sample.response or "", sample.ground_truth
    if not case_sensitive:
        response, gold = response.lower(), gold.lower()
    return 1.0 if gold in response else 0.0
