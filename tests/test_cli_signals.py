"""Ctrl-C / SIGTERM and the console, through the real CLI: stop at a step boundary with a complete checkpoint,
the MLflow run marked KILLED, the resume command printed (no traceback); ``resume=auto`` then loses no completed
step, and the final table keeps recipe order. Also: start-up phase lines and one line per step when piped."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from cascade_rl.stages.console import GracefulStop, StepLines, StopRun
from tests.e2e_cli import SMALL_HF, CliRun, check_consistent, complete_steps, read_run, run_cli


def test_first_signal_asks_second_stops_at_once() -> None:
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under a background shell
    stop = GracefulStop().install()
    try:
        stop.check()  # nothing asked yet
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT" and stop.exit_code == 130
        with pytest.raises(StopRun):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # the second signal: at once
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is before  # the handler it replaced is back


def test_step_lines_show_key_metrics_once_per_step(capsys) -> None:
    class T:
        stage = "gspo"

    lines = StepLines(T())
    lines({"reward/mean": 0.25, "reward/accuracy": 0.5, "train/loss": -0.01, "perf/step_s": 2.0}, step=7)
    lines({"perf/checkpoint_s": 0.1}, step=7)  # not a step's end: no line
    assert capsys.readouterr().out == "[gspo] step 7 loss=-0.01 reward=0.25 acc=0.5 step_s=2\n"


def _gspo_shards(run_dir: Path) -> int:
    return len(list((run_dir / "rollouts" / "gspo").glob("shard-*.parquet")))


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_ctrl_c_mid_gspo_then_resume_loses_no_step(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    run = CliRun(run_dir, SMALL_HF, log=log)
    assert run.wait_for(lambda: _gspo_shards(run_dir) >= 1), log.read_text()[-4000:]
    os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    assert run.wait() == 130, log.read_text()[-4000:]
    out = log.read_text()
    done = _gspo_shards(run_dir)  # steps whose records were logged before the stop
    assert "Traceback" not in out, out[-4000:]
    assert re.search(r"cascade-rl run \S+tiny_cascade.yaml .*resume=auto", out), out[-2000:]
    assert done in complete_steps(run_dir, "s03-gspo"), (done, complete_steps(run_dir, "s03-gspo"))
    first = read_run(run_dir)
    assert first.mlflow_runs == [(first.run_id, "KILLED")]
    # console: start-up phases with their times, one line per step (stdout is a file here), library logs kept out
    assert re.search(r"^start-up: Ray \d+\.\d s$", out, re.M) and re.search(r"^\[gspo\] step \d+ .*reward=", out, re.M)
    assert "Started a local Ray instance" not in out and "Creating initial MLflow database" not in out
    assert "Started a local Ray instance" in (run_dir / "logs" / "driver.log").read_text()  # kept, in the file

    assert run_cli(run_dir, [*SMALL_HF, "resume=auto"], log=log) == 0, log.read_text()[-4000:]
    facts = read_run(run_dir)
    check_consistent(facts)  # every record once, every step once, run FINISHED
    assert not (run_dir / "rollouts" / "gspo.superseded").exists()  # no completed step was redone
    table = log.read_text().rsplit("held-out accuracy after each stage", 1)[1]
    names = re.findall(r"^(start|sft|mpo|gspo)\s", table, re.M)
    assert names == ["start", "sft", "mpo", "gspo"], table
