"""The driver SIGKILLed at named points of every stage, then ``resume=auto``: the run completes, consistent.

One long test chains five crashes through one run folder, each placed by the driver's testing hook
``CASCADE_RL_FAULT_AT=<stage>:<point>`` (``RunContext.fault_point``), which SIGKILLs the driver's whole process
group at that point:

    sft:after-step-6   mid-stage: step 6 trained and logged, its checkpoint not written (resume from step 4)
    sft:done           between stages: sft's final checkpoint complete, the stage not yet evaluated
    rollout:after-step-1  mid-stage: the first chunk's shard is in the rollout log, the second chunk not generated
    mpo:checkpoint-4   mid-checkpoint: the learner state of step 4 written, no COMPLETE marker (resume from step 2)
    gspo:after-step-3  mid-step: step 3's records logged, no checkpoint since step 2 (its shard must be set aside)

Before the last resume the test also plants a newer checkpoint folder without COMPLETE and two temporary shard
files; none may be picked up. The finished run is compared with the uninterrupted ``reference_run``: the same
record ids, nothing twice, one finished MLflow run, complete checkpoints whose steps add up.
The chain uses the ``hf`` rollout backend (six starts of vLLM would cost minutes; the driver logic under test does
not depend on the engine, and tests/stages/test_resume.py resumes a vLLM run).

The fast tests below check the same rules without Ray: incomplete checkpoints and temporary shards are never read,
the hook kills only at its point, and the RNG state a checkpoint saves is restored.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_cli import GROUP_SIZE, GSPO_PROMPTS, ROOT, SMALL_HF, check_consistent, read_run, run_cli

from cascade_rl.data.rollout_log import read_rollout_table
from cascade_rl.stages.rollout import CHUNK_PROMPTS

CHAIN = [  # (fault point, checkpoint the next run must resume from; {sft} = sft's number of steps)
    ("sft:after-step-6", "s00-sft/step-000004"),
    ("sft:done", "s00-sft/step-{sft:06d}"),
    ("rollout:after-step-1", "s00-sft/step-{sft:06d}"),
    ("mpo:checkpoint-4", "s02-mpo/step-000002"),
    ("gspo:after-step-3", "s03-gspo/step-000002"),
]
HF = [*SMALL_HF, "resume=auto"]


def _last_run_output(log: Path) -> str:
    return log.read_text().rsplit("\n===== ", 1)[-1]


def _resumed_from(log: Path) -> str:
    found = re.findall(r"resumed from \S*/checkpoints/(s\d\d-\w+/step-\d+) ", _last_run_output(log))
    return found[-1] if found else "<fresh start>"


def _crash_at(run_dir: Path, log: Path, fault: str) -> None:
    rc = run_cli(run_dir, HF, log=log, CASCADE_RL_FAULT_AT=fault)
    out = _last_run_output(log)
    assert rc == -9 and f"CASCADE_RL_FAULT_AT={fault}: killing the driver" in out, (rc, out[-3000:])


def _plant_half_written(run_dir: Path) -> list[Path]:
    """A newer gspo checkpoint without COMPLETE and interrupted shard writes, as a crash could leave them."""
    fake = run_dir / "checkpoints" / "s03-gspo" / "step-000099"
    (fake / "learner").mkdir(parents=True)
    (fake / "learner" / "junk.pt").write_bytes(b"\0" * 64)
    state = json.loads((run_dir / "checkpoints" / "s03-gspo" / "step-000002" / "driver.json").read_text())
    (fake / "driver.json").write_text(json.dumps({**state, "stage_step": 99, "stage_done": True}))
    logs = run_dir / "rollouts" / "gspo"
    tmp_shards = [logs / ".tmp-0123456789abcdef.parquet", logs / "shard-000042.parquet.tmp"]
    for p in tmp_shards:
        p.write_bytes(b"PAR1 half a shard")
    return [fake, *tmp_shards]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_in_every_stage_then_resume(tmp_path: Path, reference_run) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "cli.log"
    sft_steps = reference_run.final_driver_state["s00-sft"]["stage_step"]
    chain = [(fault, resume_from.format(sft=sft_steps)) for fault, resume_from in CHAIN]
    for i, (fault, _) in enumerate(chain):
        _crash_at(run_dir, log, fault)
        assert _resumed_from(log) == (chain[i - 1][1] if i else "<fresh start>"), fault
        state = json.loads((run_dir / "run_state.json").read_text())
        if fault == "sft:done":
            assert "sft" not in state["stage_results"]
        if fault == "rollout:after-step-1":
            assert len(read_run(run_dir).records["rollout"]) == CHUNK_PROMPTS * GROUP_SIZE  # one chunk logged
        if fault == "mpo:checkpoint-4":
            half = run_dir / "checkpoints" / "s02-mpo" / "step-000004"
            assert (half / "learner").is_dir() and not (half / "COMPLETE").exists()
    planted = _plant_half_written(run_dir)
    assert run_cli(run_dir, HF, log=log) == 0, _last_run_output(log)[-4000:]
    assert _resumed_from(log) == chain[-1][1]
    assert not any(p.exists() for p in planted[:2])  # the partial folder pruned, the .tmp- file removed
    facts = read_run(run_dir)
    check_consistent(facts, reference_run)
    assert set(facts.stage_results) >= {"start", "sft", "mpo", "gspo"}
    aside = list((run_dir / "rollouts" / "gspo.superseded").rglob("shard-*.parquet"))
    steps = [read_rollout_table(p.parent, columns=["step"]).column("step").to_pylist() for p in aside]
    assert len(aside) == 1 and steps == [[2] * GSPO_PROMPTS * GROUP_SIZE]  # step 3's (index 2), after checkpoint 2


# ------------------------------------------------------------------------------------------------ fast checks


def test_incomplete_checkpoint_and_temp_shards_are_never_read(tmp_path: Path) -> None:
    from cascade_rl.data.rollout_log import RolloutLogWriter, count_records, read_rollout_log
    from cascade_rl.stages.state import (
        DriverState,
        finish_checkpoint,
        latest_checkpoint,
        list_complete_checkpoints,
    )
    from cascade_rl.types import RolloutRecord

    ckpts = tmp_path / "checkpoints" / "s01-gspo"
    finish_checkpoint(ckpts / "step-000002", DriverState(stage_index=1, stage_step=2), keep_last=2)
    (ckpts / "step-000004" / "learner").mkdir(parents=True)  # newer, but never finished
    (tmp_path / "checkpoints" / "s02-mpo" / "step-000001").mkdir(parents=True)  # a later stage, unfinished
    assert latest_checkpoint(tmp_path) == ckpts / "step-000002"
    assert list_complete_checkpoints(tmp_path) == [ckpts / "step-000002"]
    finish_checkpoint(ckpts / "step-000006", DriverState(stage_index=1, stage_step=6), keep_last=2)
    assert not (ckpts / "step-000004").exists()  # the unfinished sibling is pruned by the next checkpoint
    assert [p.name for p in list_complete_checkpoints(tmp_path)] == ["step-000002", "step-000006"]

    logs = tmp_path / "rollouts"
    rec = RolloutRecord(record_id="r/0", run_id="r", stage="gspo", step=0, policy_version=1, prompt_id="p",
                        prompt="[]", images=[], ground_truth="1", response="1", prompt_token_ids=[1],
                        response_token_ids=[2], behaviour_logprobs=[-0.5], rewards="{}", reward=1.0, correct=True,
                        finish_reason="stop", num_prompt_tokens=1, num_response_tokens=1, generate_s=0.0, error=None)
    RolloutLogWriter(logs).append([rec])
    (logs / ".tmp-feedface.parquet").write_bytes(b"PAR1 truncated")
    (logs / "shard-000001.parquet.tmp").write_bytes(b"PAR1 truncated")
    assert count_records(logs) == 1 and [r.record_id for r in read_rollout_log(logs)] == ["r/0"]
    writer = RolloutLogWriter(logs)  # a resumed writer clears its own interrupted writes and keeps numbering
    assert writer.num_temp_files_removed == 1 and writer.record_ids == {"r/0"}
    assert writer.append([rec]) is None  # already logged: not written twice


def test_rng_state_survives_a_checkpoint() -> None:
    import numpy as np
    import torch

    from cascade_rl.stages.state import DriverState

    state = DriverState()
    state.capture_rng()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restored = DriverState(**json.loads(json.dumps(state.__dict__)))  # through driver.json
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    restored.restore_rng()
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


_HOOK = """
import os, sys
from cascade_rl.config import RecipeConfig, StageConfig
from cascade_rl.stages.context import RunContext
cfg = RecipeConfig(stages=[StageConfig(kind="sft", name="warm"), StageConfig(kind="gspo", name="online")])
ctx = RunContext(cfg=cfg, run_dir=None, model_path="", tracker=None, learners=None, rollout=None, rewards=None,
                 train_prompts=[], eval_prompts=[])
for index, point in [(0, "after-step-3"), (0, "done"), (1, "after-step-2"), (1, "checkpoint-3"), (1, "done")]:
    ctx.state.stage_index = index
    print(index, point, flush=True)
    ctx.fault_point(point)
print("survived", flush=True)
"""


@pytest.mark.parametrize(("fault", "last_point"), [("online:checkpoint-3", "1 checkpoint-3"),
                                                   ("warm:done", "0 done"), ("online:after-step-7", None),
                                                   ("online:after-step-2", "1 after-step-2"), ("", None)])
def test_fault_hook_kills_only_at_its_point(fault: str, last_point: str | None) -> None:
    env = {"PYTHONPATH": str(ROOT), "CASCADE_RL_FAULT_AT": fault, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", _HOOK], env=env, capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    lines = proc.stdout.splitlines()
    if last_point is None:
        assert proc.returncode == 0 and lines[-1] == "survived", proc.stderr[-2000:]
    else:
        assert proc.returncode == -9 and lines[-1] == last_point, (proc.returncode, lines, proc.stderr[-2000:])
        assert f"CASCADE_RL_FAULT_AT={fault}: killing the driver" in proc.stderr
