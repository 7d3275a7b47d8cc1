"""MLflow: a run with the flattened recipe as params and the resolved recipe as an artifact, read back."""

from __future__ import annotations

from pathlib import Path

import mlflow

from cascade_rl.config import flatten, load_recipe, to_yaml
from cascade_rl.tracking import Tracker, read_metric_history

ROOT = Path(__file__).resolve().parents[1]


def test_run_params_artifact_metrics_and_resume(tmp_path: Path) -> None:
    cfg = load_recipe(ROOT / "recipes" / "tiny_cascade.yaml", [f"run_dir={tmp_path}"])
    tracker = Tracker(None, "test-exp", tmp_path)
    assert tracker.uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    run_id = tracker.start("tiny", {"recipe": cfg.name})
    params = flatten(cfg)
    tracker.log_params(params)
    tracker.log_text(to_yaml(cfg), "recipe/resolved.yaml")
    tracker.log_metrics({"train/loss": 1.5, "reward/mean": float("nan")}, step=0)  # NaN is dropped
    tracker.log_metrics({"train/loss": 1.25}, step=1)
    tracker.end()

    runs = mlflow.search_runs(experiment_names=["test-exp"], output_format="list")
    assert [r.info.run_id for r in runs] == [run_id]
    got = runs[0].data.params
    assert got["stages.3.gspo.clip_low"] == "0.2" and got["rollout.group_size"] == "8"
    assert len(got) == len(params)
    assert runs[0].data.tags["recipe"] == "tiny_cascade"
    assert read_metric_history(tracker.uri, run_id, "train/loss") == [(0, 1.5), (1, 1.25)]
    assert "reward/mean" not in runs[0].data.metrics
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/recipe/resolved.yaml")
    assert "clip_low: 0.2" in text

    again = Tracker(None, "test-exp", tmp_path)  # resume: same run id, params not duplicated
    assert again.start("tiny", run_id=run_id) == run_id
    again.log_params(params)
    again.log_metrics({"train/loss": 1.0}, step=2)
    again.end()
    assert [v for _, v in read_metric_history(tracker.uri, run_id, "train/loss")] == [1.5, 1.25, 1.0]
    assert (tmp_path / "mlartifacts").exists()
