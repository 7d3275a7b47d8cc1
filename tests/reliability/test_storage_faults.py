"""Storage faults around the resume path: corrupted checkpoints, and the MLflow run after a failed resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cascade_rl.stages.state import (
    COMPLETE,
    DriverState,
    finish_checkpoint,
    latest_checkpoint,
    verify_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(run_dir: Path, stage: str, step: int) -> Path:
    import torch

    ckpt = run_dir / "checkpoints" / stage / f"step-{step:06d}"
    (ckpt / "learner").mkdir(parents=True)
    torch.save({"w": torch.arange(4096, dtype=torch.float32) * step}, ckpt / "learner" / "model_states.pt")
    finish_checkpoint(ckpt, DriverState(stage_index=0, stage_step=step), keep_last=3)
    return ckpt


def test_a_truncated_tensor_file_falls_back_to_the_older_intact_checkpoint(tmp_path: Path, capsys) -> None:
    older = _checkpoint(tmp_path, "s00-sft", 2)
    newest = _checkpoint(tmp_path, "s00-sft", 4)
    manifest = json.loads((newest / COMPLETE).read_text())
    assert manifest["hash"] == "blake2b-128" and "learner/model_states.pt" in manifest["files"]
    assert latest_checkpoint(tmp_path) == newest
    tensor = newest / "learner" / "model_states.pt"
    tensor.write_bytes(tensor.read_bytes()[:1000])  # truncated, COMPLETE still there
    assert latest_checkpoint(tmp_path) == older
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newest}" in out and "learner/model_states.pt has 1000 bytes" in out


def test_a_changed_file_of_the_same_size_and_a_missing_file_are_caught(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "s00-sft", 2)
    tensor = ckpt / "learner" / "model_states.pt"
    raw = bytearray(tensor.read_bytes())
    raw[-50] ^= 0xFF
    tensor.write_bytes(bytes(raw))
    assert "blake2b hash differs" in verify_checkpoint(ckpt)
    tensor.unlink()
    assert verify_checkpoint(ckpt) == "learner/model_states.pt is missing"
    assert latest_checkpoint(tmp_path, report=None) is None


def test_an_older_format_marker_is_still_trusted(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "s00-sft", 2)
    (ckpt / COMPLETE).write_text("ok\n")
    assert verify_checkpoint(ckpt) is None and latest_checkpoint(tmp_path) == ckpt


def test_a_failed_resume_does_not_leave_the_mlflow_run_running(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from cascade_rl.config import load_recipe
    from cascade_rl.stages import driver

    cfg = load_recipe(ROOT / "recipes" / "tiny_cascade.yaml", [f"run_dir={tmp_path}", "resume=auto"])

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("resume: cannot load checkpoint (simulated)")

    monkeypatch.setattr(driver, "_start_workers", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        driver._start(cfg, tmp_path)
    (run,) = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()])
    assert run.info.status == "FAILED"
