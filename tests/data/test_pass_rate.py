"""Pass rates per prompt and the band filter that picks prompts of moderate accuracy for GSPO."""

from __future__ import annotations

import json

import pytest

from cascade_rl.data.pass_rate import compute_pass_rates, filter_prompts_by_pass_rate
from cascade_rl.types import RolloutRecord


def rec(pid: str, i: int, correct: bool | None, gt: str | None = "1") -> RolloutRecord:
    return RolloutRecord(
        record_id=f"r/{pid}/{i}", run_id="r", stage="rollout", step=0, policy_version=0, prompt_id=pid,
        prompt=json.dumps([{"role": "user", "content": pid}]), images=[], ground_truth=gt, response="x",
        prompt_token_ids=[], response_token_ids=[], behaviour_logprobs=[], rewards="{}", reward=float(bool(correct)),
        correct=correct, finish_reason="stop", num_prompt_tokens=0, num_response_tokens=0, generate_s=0.0)


def test_compute_pass_rates_counts_none_as_wrong_and_skips_prompts_without_truth() -> None:
    records = [rec("a", 0, True), rec("a", 1, False), rec("a", 2, True),  # 2 of 3
               rec("b", 0, True), rec("b", 1, None),  # None = unparsed: 1 of 2
               rec("c", 0, None, gt=None)]  # no ground truth: no pass rate
    assert compute_pass_rates(records) == {"a": (2, 3), "b": (1, 2)}


def test_band_boundaries_are_inclusive() -> None:
    rates = {"zero": (0, 4), "quarter": (1, 4), "half": (2, 4), "three_q": (3, 4), "all": (4, 4), "third": (1, 3)}
    ids = ["zero", "quarter", "third", "half", "three_q", "all", "new"]
    kept, stats = filter_prompts_by_pass_rate(ids, rates, 0.25, 0.75)
    # 0.25 and 0.75 sit on the bounds and stay; 0 is below, 1 above; "new" was never logged and is kept
    assert kept == ["quarter", "third", "half", "three_q", "new"]
    assert stats == {"num_prompts": 7, "num_kept": 5, "num_unlogged": 1, "num_below": 1, "num_above": 1,
                     "low": 0.25, "high": 0.75,
                     "mean_pass_rate_kept": pytest.approx((0.25 + 1 / 3 + 0.5 + 0.75) / 4)}
    # a decimal bound just under 1/3 (by 3.3e-11) still keeps 1/3: the 1e-9 tolerance
    assert filter_prompts_by_pass_rate(["third"], rates, 0.0, 0.3333333333)[0] == ["third"]
    assert filter_prompts_by_pass_rate(["third"], rates, 0.0, 0.333)[0] == []  # 1/3 - 0.333 = 3.3e-4 > tol
    # the full band keeps everything; a point band keeps exactly that rate
    assert filter_prompts_by_pass_rate(ids, rates, 0.0, 1.0)[0] == ids
    assert filter_prompts_by_pass_rate(ids, rates, 0.5, 0.5)[0] == ["half", "new"]


def test_invalid_band_is_refused() -> None:
    with pytest.raises(ValueError, match=r"pass_rate_min / gspo.pass_rate_max"):
        filter_prompts_by_pass_rate(["a"], {}, 0.8, 0.2)
