"""Best-of-N at evaluation: the selector component picks one response per prompt."""

from __future__ import annotations

import pytest

from cascade_rl.stages.context import best_of_n_metrics
from cascade_rl.types import RewardResult


def test_best_of_n_takes_the_selector_s_pick_not_the_best_reward() -> None:
    r = lambda prm, correct: RewardResult(total=float(correct), components={"prm": prm}, correct=correct)  # noqa: E731
    # prompt 0: the PRM prefers the correct one (index 1); prompt 1: it prefers a wrong one though one is right
    results = [r(0.2, False), r(0.9, True), r(0.7, False), r(0.1, True)]
    m = best_of_n_metrics([None] * 4, results, 2, "prm")
    assert m["eval/best_of_n/accuracy"] == 0.5  # (1 + 0) / 2
    assert m["eval/best_of_n/pass_at_n"] == 1.0  # each prompt has a correct sample
    with pytest.raises(ValueError, match=r"eval.best_of_n_by='orm'.*labels: \['prm'\]"):
        best_of_n_metrics([None] * 4, results, 2, "orm")
