"""``cascade-rl report``: a real MLflow store written by the Tracker, read back into a PNG with stage boundaries."""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path

import pytest

from cascade_rl.report import make_report, write_report
from cascade_rl.tracking import Tracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A cascade as the driver logs it: (stage, first global step, last global step, metrics per step).
# The driver logs perf/stage_<name>_s once, at the global step where the stage ended, then evaluates there.
STAGES = [("sft", 1, 10), ("rollout", 11, 13), ("mpo", 14, 20), ("gspo", 21, 30)]


def _log_cascade(tracker: Tracker, stages=STAGES, finished: bool = True) -> None:
    tracker.log_params({f"stages.{i}.name": name for i, (name, _, _) in enumerate(STAGES)}
                       | {f"stages.{i}.kind": name for i, (name, _, _) in enumerate(STAGES)})
    tracker.log_metrics({"eval/accuracy": 0.05, "eval/mean_reward": 0.05}, step=0)  # the start evaluation
    for name, first, last in stages:
        for step in range(first, last + 1):
            m: dict[str, float] = {}
            if name in ("sft", "mpo", "gspo"):
                m["train/loss"] = 2.0 * math.exp(-step / 15)
            if name == "mpo":
                m |= {"train/loss_sigmoid": 0.69 - 0.01 * (step - first), "train/loss_bco_pair": 0.7,
                      "train/loss_sft": 1.1, "train/rewards/margin": 0.1}  # the learner's MPO names
            if name in ("rollout", "gspo"):
                m |= {"reward/mean": 0.2 + 0.01 * step, "reward/accuracy": 0.15 + 0.01 * step}
            if name == "gspo":
                m |= {"train/clip_frac_high": 0.01, "train/ratio_mean": 1.0, "perf/step_s": 1.5}  # not plotted
            tracker.log_metrics(m, step=step)
        if finished or name != stages[-1][0]:
            tracker.log_metrics({f"perf/stage_{name}_s": 12.5, "perf/checkpoint_s": 0.1}, step=last)
            tracker.log_metrics({"eval/accuracy": 0.1 + 0.02 * last}, step=last)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One store (creating it costs ~10 s of MLflow migrations) with two runs: a finished cascade, then a
    newer run that stopped inside mpo."""
    run_dir = tmp_path_factory.mktemp("report_run")
    tracker = Tracker(None, "report-test", run_dir)
    first_id = tracker.start("tiny_cascade")
    _log_cascade(tracker)
    tracker.end()
    time.sleep(0.01)  # start_time orders the runs
    tracker.start("crashed")
    _log_cascade(tracker, stages=STAGES[:3], finished=False)  # sft and rollout ended, mpo still running
    tracker.end("FAILED")
    return run_dir, first_id


def test_report_draws_reward_eval_losses_and_stage_boundaries(store: tuple[Path, str]) -> None:
    run_dir, run_id = store
    report = make_report(run_dir, run_dir / "first.png", run_id=run_id)
    assert report.run_id == run_id and report.run_name == "tiny_cascade"
    assert report.panels == {
        "Training reward (sampled groups)": ["reward/mean", "reward/accuracy"],
        "Held-out accuracy (greedy; sampled = avg@k)": ["eval/accuracy"],
        "Losses": ["train/loss", "train/loss_bco_pair", "train/loss_sft", "train/loss_sigmoid"],  # total first
    }
    assert report.boundaries == [(10, "sft"), (13, "rollout"), (20, "mpo"), (30, "gspo")]
    assert report.running_stage is None
    assert "stage ends: sft@10, rollout@13, mpo@20, gspo@30" in report.summary()
    width, height = _png_size(report.path)
    assert (width, height) == (1210, 1100)  # figsize (11, 10) at 110 dpi
    assert report.path.stat().st_size > 30_000  # three panels of curves, not an empty canvas


def test_report_defaults_to_newest_run_and_labels_the_running_stage(store: tuple[Path, str]) -> None:
    run_dir, _ = store
    out = write_report(run_dir)  # the CLI's call: newest run, RUN_DIR/report.png
    assert out == run_dir / "report.png" and out.read_bytes()[:8] == PNG_MAGIC
    newest = make_report(run_dir, run_dir / "sub" / "newest.png")
    assert newest.run_name == "crashed" and newest.path.is_file()
    assert newest.boundaries == [(10, "sft"), (13, "rollout")]
    assert newest.running_stage == "mpo"


def test_report_without_store_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no MLflow store at .*mlflow.db"):
        write_report(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()  # no empty store was created
