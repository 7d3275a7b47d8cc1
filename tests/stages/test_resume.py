"""Kill the driver mid-GSPO with SIGKILL, rerun with ``resume=auto``: the run finishes as if never interrupted.

The real CLI runs the small tiny cascade (sft → rollout → mpo → gspo, vLLM rollouts, DeepSpeed learner) in its
own session. Once the GSPO stage has a complete checkpoint at step ≥ 1, the test SIGKILLs the whole process group
(driver, Ray, actors, vLLM engine) and starts the same command with ``resume=auto``. Compared with an uninterrupted
run of the same recipe (the session's ``reference_run``): the same record ids per stage in the rollout logs (none
lost, none twice), one MLflow run with the same id, finished, and checkpoints that are complete and agree with the
steps each stage ran. The reference run uses the HF backend (quicker to start): record ids, counts, checkpoints and
LR schedules do not depend on the engine; this test's own run keeps the recipe's vLLM.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from e2e_cli import SMALL, CliRun, check_consistent, complete_steps, read_run, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def test_sigkill_mid_gspo_then_resume_auto(tmp_path: Path, reference_run) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "cli.log"
    run = CliRun(run_dir, SMALL, log=log)
    reached = run.wait_for(lambda: bool(complete_steps(run_dir, "s03-gspo")))
    assert reached, f"the run ended before GSPO wrote a checkpoint:\n{log.read_text()[-3000:]}"
    killed_at = complete_steps(run_dir, "s03-gspo")
    assert run.kill() == -9
    before = read_run(run_dir)
    assert "gspo" not in before.stage_results  # it really died mid-stage
    assert before.mlflow_runs == [(before.run_id, "RUNNING")]  # SIGKILL leaves the run open

    rc = run_cli(run_dir, [*SMALL, "resume=auto"], log=log)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    resumed = re.findall(r"resumed from .*/checkpoints/s03-gspo/step-(\d+) ", text)
    assert resumed and int(resumed[-1]) >= max(killed_at) >= 1, (resumed, killed_at)

    after = read_run(run_dir)
    assert after.run_id == before.run_id  # the same MLflow run, reopened
    check_consistent(after, reference_run)
    check_consistent(reference_run)
    assert after.counts() == reference_run.counts()
