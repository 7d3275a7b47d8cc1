"""MLflow tracking: the one module that talks to MLflow, for every store (sqlite, file, an HTTP server).

Default store: ``sqlite:///<run_dir>/mlflow.db`` with artifacts in ``<run_dir>/mlartifacts``. Params are the
flattened resolved recipe; the resolved recipe YAML is an artifact. Metrics are grouped by prefix:
``rollout/ reward/ train/ eval/ perf/ system/``. A resumed run reopens the same run id.

Tracking never stops or stalls training. Only ``start`` talks to MLflow on the caller's thread (a run id is needed
before anything else); every later write is queued and sent, in order, by one background thread. A failed write
(a store error, a server gone away) stays at the head of the queue and is retried with a backoff of at most
``retry_max_s``; the first failure of an outage prints one warning, recovery prints one line with the number of
writes flushed. ``end`` waits at most ``flush_timeout_s`` for the queue; what is still unsent is saved to
``<run_dir>/tracking_unsent.jsonl`` and sent first by the next ``Tracker`` of that run (``resume=auto``).

Stages are visible in MLflow itself: each stage gets a child run (tag ``mlflow.parentRunId``) holding that stage's
metrics, so the UI draws rollout and gspo rewards as separate curves, and the recipe run logs ``stage/index`` with
every step (a staircase marking each boundary). See docs/dashboard.md.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
UNSENT_FILE = "tracking_unsent.jsonl"
STAGE_TAG = "cascade_rl.stage"  # on a stage's child run: the stage name
# Errors a retry cannot fix (a bad value, a key logged twice): the write is dropped with a warning.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST", "INVALID_STATE"}


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


class MetricNames:
    """Refuses names that are a prefix-folder of another (``a/b`` and ``a/b/c``): MLflow's file store keeps a
    metric as a file under folders named by its ``/`` parts, and the UI groups by the same parts. A clashing name
    is logged with its last clashing ``/`` turned into ``_`` (warned once); the stages name theirs clash-free."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.folders: set[str] = set()
        self.renamed: dict[str, str] = {}

    def clashes(self, name: str) -> bool:
        parts = name.split("/")
        return name in self.folders or any("/".join(parts[:i]) in self.names for i in range(1, len(parts)))

    def admit(self, name: str) -> str:
        if name in self.names:
            return name
        if name in self.renamed:
            return self.renamed[name]
        fixed = name
        while self.clashes(fixed):
            fixed = fixed + "_value" if "/" not in fixed or fixed in self.folders else "_".join(fixed.rsplit("/", 1))
        if fixed != name:
            self.renamed[name] = fixed
            print(f"tracking: metric {name!r} clashes with another name's folder; logged as {fixed!r}",
                  file=sys.stderr, flush=True)
        self.names.add(fixed)
        parts = fixed.split("/")
        self.folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        return fixed


class Tracker:
    """Owns one MLflow run: start or resume, then queued params/metrics/artifacts/tables/tags, end."""

    def __init__(self, uri: str | None, experiment: str, run_dir: str | os.PathLike, *, retry_max_s: float = 30.0,
                 flush_timeout_s: float = 60.0, max_buffered: int = 200_000) -> None:
        os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        # our writer retries; MLflow's own HTTP retries (minutes by default) would only hold the queue longer
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = uri or default_tracking_uri(self.run_dir)
        if self.uri.startswith("file:") or ("://" not in self.uri and not self.uri.startswith("databricks")):
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 refuses its file store unless told
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = experiment
        self.experiment_id = ""
        self.run_id: str | None = None
        self.retry_max_s, self.flush_timeout_s, self.max_buffered = retry_max_s, flush_timeout_s, max_buffered
        self.names = MetricNames()
        self.stage: str | None = None
        self.stage_index = -1
        self.last_step = 0
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._stage_runs: dict[str, str] = {}
        self.num_failed_writes = 0  # writes that failed at least once (for tests and the summary line)
        self.num_dropped = 0
        self._sampler: SystemMetrics | None = None
        self.observers: list[Any] = []  # called as f(metrics, step) on the caller's thread (console step lines)

    # ------------------------------------------------------------------ start (synchronous)

    def start(self, run_name: str, tags: dict[str, str] | None = None, run_id: str | None = None) -> str:
        """Start a new run, or reopen ``run_id`` (resume) and mark it running again."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            artifacts = (self.run_dir / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite") else None
            # a training experiment: the UI opens its runs and charts view, not the GenAI (traces) one
            self.experiment_id = self.client.create_experiment(
                self.experiment, artifact_location=artifacts, tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            self.experiment_id = exp.experiment_id
            if "mlflow.experimentKind" not in exp.tags:
                self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {}).info.run_id
        self._closing, self._stage_runs, self.stage, self.names = False, {}, None, MetricNames()
        self._replay_unsent()
        self._thread = threading.Thread(target=self._write_loop, name="cascade-rl-tracking", daemon=True)
        self._thread.start()
        return self.run_id

    def start_system_metrics(self, interval_s: float) -> bool:
        """Sample CPU, memory, disk, network (and NVIDIA GPU with pynvml) every ``interval_s`` through MLflow's
        monitors, logged as ``system/*`` through the same queue. False where MLflow cannot (no psutil)."""
        if interval_s <= 0:
            return False
        try:
            self._sampler = SystemMetrics(self, interval_s)
        except Exception as exc:  # noqa: BLE001 - no psutil, or a monitor that cannot start: no system metrics
            print(f"tracking: no system metrics ({exc})", file=sys.stderr, flush=True)
            return False
        return True

    # ------------------------------------------------------------------ queued writes

    def begin_stage(self, name: str, index: int, kind: str) -> None:
        """Metrics logged from now on also go to the stage's child run (created, or found again on resume)."""
        if self.stage is not None and self.stage != name:
            self._put({"op": "status", "stage": self.stage, "status": "FINISHED"})
        self.stage, self.stage_index = name, index
        self._put({"op": "stage", "name": name, "index": index, "kind": kind})

    def log_params(self, params: dict[str, Any]) -> None:
        self._put({"op": "params", "items": {k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for observe in self.observers:
            observe(metrics, step)
        now = int(time.time() * 1000)
        items = [[self.names.admit(k), float(v), now, step] for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if not items:
            return
        self.last_step = step
        if self.stage is not None:
            self._put({"op": "metrics", "stage": self.stage, "items": items})
            items = [*items, [self.names.admit("stage/index"), float(self.stage_index), now, step]]
        self._put({"op": "metrics", "stage": None, "items": items})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put({"op": "text", "text": text, "file": artifact_file})

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        if not rows:
            return
        columns = {k: [json.dumps(r.get(k)) if isinstance(r.get(k), (list, dict)) else r.get(k) for r in rows]
                   for k in rows[0]}
        self._put({"op": "table", "columns": columns, "file": artifact_file})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put({"op": "tags", "items": {k: str(v) for k, v in tags.items()}})

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ``status`` (FINISHED, FAILED, KILLED) and flush: at most ``flush_timeout_s``, then what is
        unsent is saved for the next start of this run."""
        if not self.run_id or self._thread is None:
            return
        if self._sampler is not None:
            self._sampler.stop()
        if self.stage is not None:
            self._put({"op": "status", "stage": self.stage, "status": status})
        self._put({"op": "status", "stage": None, "status": status})
        self.flush(self.flush_timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            left = list(self._queue)
            self._queue.clear()
        self._thread.join(timeout=5)
        self._thread = None
        if left:
            with open(self.run_dir / UNSENT_FILE, "a") as f:
                f.writelines(json.dumps(op) + "\n" for op in left)
            print(f"tracking: MLflow at {self.uri} still unreachable; {len(left)} writes saved to "
                  f"{self.run_dir / UNSENT_FILE}, sent when this run resumes (resume=auto)", file=sys.stderr,
                  flush=True)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write is sent (True) or ``timeout_s`` passes (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=left if left is None else min(left, 0.5))
        return True

    # ------------------------------------------------------------------ the writer thread

    _busy = False

    def _put(self, op: dict[str, Any]) -> None:
        with self._cond:
            if len(self._queue) >= self.max_buffered and op["op"] == "metrics":
                self.num_dropped += 1
                if self.num_dropped == 1:
                    print(f"tracking: {self.max_buffered} writes buffered while MLflow is unreachable; newer "
                          "metrics are dropped until it is back", file=sys.stderr, flush=True)
                return
            self._queue.append(op)
            self._cond.notify_all()

    def _write_loop(self) -> None:
        failing_since: float | None = None
        delay = 0.5
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                op = self._queue[0]
                self._busy = True
            try:
                self._send(op)
            except Exception as exc:  # noqa: BLE001 - any store failure: retry later, never raise into training
                if _is_permanent(exc):
                    print(f"tracking: dropped a {op['op']} write MLflow refused ({_short(exc)})", file=sys.stderr,
                          flush=True)
                else:
                    if failing_since is None:
                        failing_since = time.monotonic()
                        print(f"tracking: writing to MLflow at {self.uri} failed ({_short(exc)}); training goes on, "
                              f"writes are buffered and retried every <= {self.retry_max_s:g} s", file=sys.stderr,
                              flush=True)
                    self.num_failed_writes += 1
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
                        if not self._closing:
                            self._cond.wait(timeout=delay)
                    delay = min(delay * 2, self.retry_max_s)
                    continue
            with self._cond:
                if self._queue and self._queue[0] is op:
                    self._queue.popleft()
                self._busy = False
                self._cond.notify_all()
            if failing_since is not None:
                print(f"tracking: MLflow reachable again after {time.monotonic() - failing_since:.0f} s; "
                      "buffered writes are being flushed", file=sys.stderr, flush=True)
                failing_since, delay = None, 0.5

    def _send(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        if kind == "stage":
            self._stage_run(op["name"], op["index"], op["kind"])
            return
        run_id = self._stage_run(op["stage"]) if op.get("stage") else self.run_id
        if kind == "metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in op["items"]]
            for i in range(0, len(metrics), 500):
                self.client.log_batch(run_id, metrics=metrics[i : i + 500])
        elif kind == "params":
            existing = self.client.get_run(run_id).data.params  # a resumed run keeps its params
            params = [Param(k, v) for k, v in op["items"].items() if k not in existing]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i : i + 100])
        elif kind == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["items"].items()])
        elif kind == "text":
            self.client.log_text(run_id, op["text"], op["file"])
        elif kind == "table":
            self.client.log_table(run_id, data=op["columns"], artifact_file=op["file"])
        elif kind == "status":
            self.client.set_terminated(run_id, status=op["status"])

    def _stage_run(self, name: str, index: int | None = None, kind: str | None = None) -> str:
        """The child run of stage ``name`` under this run: found by tag (a resumed run), else created."""
        if name in self._stage_runs:
            if index is not None:
                self.client.update_run(self._stage_runs[name], status="RUNNING")
            return self._stage_runs[name]
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}' and "
                                                f"tags.`{STAGE_TAG}` = '{name}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            parent = self.client.get_run(self.run_id)
            tags = {"mlflow.parentRunId": self.run_id, STAGE_TAG: name,
                    **{k: v for k, v in parent.data.tags.items() if k.startswith("cascade_rl.") or
                       k == "mlflow.source.git.commit"}}
            if index is not None:
                tags.update({"cascade_rl.stage_index": str(index), "cascade_rl.stage_kind": str(kind)})
            run_name = f"{parent.info.run_name}/{index}-{name}" if index is not None else f"{parent.info.run_name}/{name}"
            run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self._stage_runs[name] = run_id
        return run_id

    def _replay_unsent(self) -> None:
        path = self.run_dir / UNSENT_FILE
        if not path.exists():
            return
        ops = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        path.unlink()
        ops = [op for op in ops if op["op"] != "status"]  # the old run's end status is superseded by this one
        self._queue.extend(ops)
        print(f"tracking: sending {len(ops)} writes saved by an earlier run while MLflow was unreachable",
              file=sys.stderr, flush=True)


class SystemMetrics:
    """MLflow's own system monitors (CPU, memory, disk, network; NVIDIA GPU when pynvml is installed), sampled on
    a thread and logged as ``system/*`` at the tracker's latest step through its queue."""

    def __init__(self, tracker: Tracker, interval_s: float) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s, tracking_uri=tracker.uri)
        self.tracker, self.interval_s = tracker, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cascade-rl-system-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.monitor.collect_metrics()
                metrics = self.monitor.aggregate_metrics()
                for m in self.monitor.monitors:
                    m.clear_metrics()
            except Exception:  # noqa: BLE001 - a sensor that fails once is skipped, never the run
                continue
            now = int(time.time() * 1000)
            items = [[f"system/{k}", float(v), now, self.tracker.last_step] for k, v in metrics.items()
                     if isinstance(v, (int, float)) and math.isfinite(float(v))]
            if items:  # the recipe run only: one set of system curves per run
                self.tracker._put({"op": "metrics", "stage": None, "items": items})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _is_permanent(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in PERMANENT_ERRORS


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def read_metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` of one metric, for reports and tests."""
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]
