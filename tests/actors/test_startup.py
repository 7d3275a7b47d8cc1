"""Start-up order of ``build_groups`` (with fake groups): every group's actors start before any group is waited
for; a colocated vLLM engine starts only once the learners hold their GPU memory; the sync path is chosen last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.mark.parametrize("placement", ["colocated", "split"])
def test_groups_start_together_and_colocated_engines_wait_for_the_learners(
        placement: str, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade_rl.actors import group

    from cascade_rl.config import RecipeConfig
    from cascade_rl.stages.workers import build_groups

    calls: list[str] = []
    shared = placement == "colocated"

    class Learners:
        def __init__(self, *a: Any, wait: bool = True, **k: Any) -> None:
            calls.append(f"learners(wait={wait})")

        def wait_ready(self) -> None:
            calls.append("learners.wait_ready")

    class Rollout:
        def __init__(self, *a: Any, defer_engines: bool = False, **k: Any) -> None:
            calls.append(f"rollout(defer={defer_engines})")

        def start_engines(self) -> None:
            calls.append("rollout.start_engines")

        def connect(self, learners: Any) -> str:
            calls.append("rollout.connect")
            return "ipc"

    class Rewards:
        def __init__(self, *a: Any, **k: Any) -> None:
            calls.append("rewards")

    place = group.Placement(placement, group.GroupPlacement(0.5, 1, shared_gpu=shared),
                            group.GroupPlacement(0.5, 1, shared_gpu=shared))
    monkeypatch.setattr(group, "LearnerGroup", Learners)
    monkeypatch.setattr(group, "RolloutGroup", Rollout)
    monkeypatch.setattr(group, "RewardGroup", Rewards)
    monkeypatch.setattr(group, "make_placement", lambda *a, **k: place)
    build_groups(RecipeConfig(), str(tiny_lm))
    assert calls == ["learners(wait=False)", f"rollout(defer={shared})", "rewards", "learners.wait_ready",
                     "rollout.start_engines", "rollout.connect"]
    calls.clear()
    build_groups(RecipeConfig(), str(tiny_lm), overlap_start=False)  # the old order: each group waited for
    assert calls[:2] == ["learners(wait=True)", "rollout(defer=False)"]


@pytest.mark.slow
def test_deferred_rollout_engines_start_on_request(ray_session: None, tiny_lm: Path, make_rollout_spec: Any) -> None:
    import ray
    from cascade_rl.actors.group import RolloutGroup

    group = RolloutGroup(make_rollout_spec(tiny_lm, backend="hf"), num_workers=1, defer_engines=True)
    try:
        assert group.start_s == 0.0  # constructed, engine not started yet
        group.start_engines()
        assert group.start_s >= group.engine_start_s > 0
        out = group.generate([([{"role": "user", "content": "1+1="}], [])], 2)
        assert len(out.generations) == 2 and ray.get(group.workers[0].start_engine.remote()) == 0  # idempotent
    finally:
        group.shutdown()
