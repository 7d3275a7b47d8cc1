"""MLflow tracking: the one module that talks to MLflow.

Default store: ``sqlite:///<run_dir>/mlflow.db`` with artifacts in ``<run_dir>/mlartifacts`` (file stores are
deprecated in MLflow 3). Params are the flattened resolved recipe; the resolved recipe YAML is an artifact.
Metrics are grouped by prefix: ``rollout/ reward/ train/ eval/ perf/``. A resumed run reopens the same run id.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """Owns one MLflow run: start or resume, log params/metrics/artifacts/tables, end."""

    def __init__(self, uri: str | None, experiment: str, run_dir: str | os.PathLike) -> None:
        os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        import mlflow
        from mlflow.tracking import MlflowClient

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = uri or default_tracking_uri(self.run_dir)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifacts = (self.run_dir / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite") else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        else:
            self.experiment_id = exp.experiment_id
        self.run_id: str | None = None

    def start(self, run_name: str, tags: dict[str, str] | None = None, run_id: str | None = None) -> str:
        """Start a new run, or reopen ``run_id`` (resume) and mark it running again."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
            self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        if not rows:
            return
        columns = {k: [json.dumps(r.get(k)) if isinstance(r.get(k), (list, dict)) else r.get(k) for r in rows]
                   for k in rows[0]}
        self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)


def read_metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` of one metric, for reports and tests."""
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]
