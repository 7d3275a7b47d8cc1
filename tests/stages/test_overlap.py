"""``gspo.overlap``: one-step off-policy GSPO, run end to end through the CLI on the tiny model.

With overlap the batch of step k+1 is generated while step k trains, so from step 1 on every batch comes from the
policy one update behind the one that trains on it: records of step k carry policy version ``v0 + k - 1`` where an
on-policy run's carry ``v0 + k``. Nothing is lost or doubled: the log holds steps x prompts x G records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_cli import run_cli

pytestmark = pytest.mark.slow

STEPS, PROMPTS, G = 4, 8, 4


def test_overlap_trains_on_batches_one_version_behind(tmp_path: Path) -> None:
    from cascade_rl.data.rollout_log import read_rollout_table

    run_dir = tmp_path / "run"
    stages = ("[{kind: sft, lr: 2.0e-3}, {kind: gspo, lr: 1.0e-4, gspo: {clip_low: 0.2, clip_high: 0.2, "
              f"num_steps: {STEPS}, prompts_per_step: {PROMPTS}, num_minibatches: 2, overlap: true}}}}]")
    rc = run_cli(run_dir, [f"stages={stages}", f"rollout.group_size={G}", "eval.num_prompts=8",
                           "eval.sampled_n=0", "eval.every_steps=0", "checkpoint.every_steps=0"],
                 log=tmp_path / "cli.log")
    assert rc == 0, (tmp_path / "cli.log").read_text()[-4000:]
    table = read_rollout_table(run_dir / "rollouts" / "gspo", columns=["step", "policy_version"]).to_pydict()
    assert len(table["step"]) == STEPS * PROMPTS * G
    version = {}
    for step, v in zip(table["step"], table["policy_version"], strict=True):
        assert version.setdefault(step, v) == v, f"step {step} mixes policy versions"
    v0 = version[0]
    # step 0 has nothing to overlap with; step k >= 1 was generated before update k-1 was synced
    assert [version[k] for k in range(STEPS)] == [v0, v0, v0 + 1, v0 + 2], version
