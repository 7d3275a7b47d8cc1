"""Rewards that return huge numbers, fork children or exhaust memory cost their sample only, with a named error."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from cascade_rl.rewards import RewardScorer
from cascade_rl.rewards.registry import resolve_terms
from cascade_rl.rewards.safe import MAX_ABS_SCORE, probe_term

from cascade_rl.algos.advantages import compute_group_advantages
from cascade_rl.types import RewardTermConfig, Sample


def test_huge_finite_scores_are_errors_and_advantages_stay_finite() -> None:
    samples = [Sample(prompt=[], response="r", metadata={"value": v}) for v in ("float", "int", "dict", None)]
    with RewardScorer([RewardTermConfig("bad_rewards:huge", 2.0, {})], num_workers=0) as scorer:
        results = scorer.score(samples)
    assert [r.components["huge"] for r in results] == [0.0, 0.0, 1.0, 0.5]  # dict: its "score" entry counts
    assert f"beyond +-{MAX_ABS_SCORE:g}" in results[0].errors["huge"]
    assert "an integer of 1329 bits" in results[1].errors["huge"]  # 10**400 does not fit a float
    assert "huge['bonus'] returned 1e+300" in results[2].errors["huge"] and results[2].components["huge/bonus"] == 0
    advantages = compute_group_advantages(torch.tensor([r.total for r in results]), group_size=4)
    assert torch.isfinite(advantages.advantages).all()  # the gspo stage's next step does not raise


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, waiting for its parent to reap it


def test_children_a_reward_forks_do_not_outlive_scoring(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    with RewardScorer([RewardTermConfig("bad_rewards:forks", 1.0, {"pid_file": str(pid_file)})], num_workers=1) as scorer:
        (result,) = scorer.score([Sample(prompt=[], response="r")])
        pids = [int(p) for p in pid_file.read_text().split()]
        assert result.total == 1.0 and len(pids) == 2  # the child and the detached grandchild
        deadline = time.monotonic() + 5
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, pids)), "a process a reward started is still running after scoring"
        (again,) = scorer.score([Sample(prompt=[], response="r")])  # the worker itself lives on
        assert again.total == 1.0


def test_memory_exhaustion_is_reported_as_memory() -> None:
    samples = [Sample(prompt=[], response="r")]
    with RewardScorer([RewardTermConfig("bad_rewards:grows", 1.0, {})], num_workers=1, max_memory_mb=1024, timeout_s=20) as scorer:
        (result,) = scorer.score(samples)
    assert result.total == 0.0 and "ran out of memory (MemoryError)" in result.errors["grows"]


def test_a_worker_killed_by_sigkill_is_reported_as_an_out_of_memory_kill() -> None:
    with RewardScorer([RewardTermConfig("bad_rewards:oom_killed", 1.0, {}), RewardTermConfig("bad_rewards:needs_bonus", 1.0, {"bonus": 0.25})],
                      num_workers=1) as scorer:
        (result,) = scorer.score([Sample(prompt=[], response="r")])
    err = result.errors["oom_killed"]
    assert "killed by SIGKILL" in err and "out-of-memory killer" in err and "MiB" in err
    assert result.components["needs_bonus"] == 0.25  # the other term still scored after the restart


@pytest.mark.parametrize("kwargs,why", [
    ({"bonu": 1.0}, r"cannot be called as bad_rewards:needs_bonus\(sample, \*\*\{'bonu': 1.0\}\): .*bonu"),
    ({}, None),
])
def test_probe_names_a_misspelt_kwarg(kwargs: dict, why: str | None) -> None:
    import re

    (term,) = resolve_terms([RewardTermConfig("bad_rewards:needs_bonus", 1.0, kwargs)])
    got = probe_term(term, Sample(prompt=[], response="r"), timeout_s=1.0)
    assert (got is None) if why is None else re.search(why, got)


def test_probe_reports_a_raise_and_a_wrong_return_type() -> None:
    (raises,) = resolve_terms([RewardTermConfig("my_ext_reward:index_echo", 1.0, {})])
    got = probe_term(raises, Sample(prompt=[], response="r", metadata={"mode": "raise"}), timeout_s=1.0)
    assert got.startswith("raised RuntimeError: boom on purpose")
    got = probe_term(raises, Sample(prompt=[], response="r", metadata={"mode": "wrong_type"}), timeout_s=1.0)
    assert "expected a float" in got
