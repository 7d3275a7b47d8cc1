"""MLflow: a run with the flattened recipe as params and the resolved recipe as an artifact, read back."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

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


# ---------------------------------------------------------------------------------------------- names and stores

def test_no_metric_name_is_a_prefix_folder_of_another() -> None:
    from cascade_rl.tracking import MetricNames

    names = MetricNames()
    assert names.admit("train/loss") == "train/loss"
    assert names.admit("train/loss/bco_pair") == "train/loss_bco_pair"  # `train/loss` is a metric: no folder
    assert names.admit("train/loss/bco_pair") == "train/loss_bco_pair"  # stable
    assert names.admit("eval/sampled/accuracy") == "eval/sampled/accuracy"
    assert names.admit("eval/sampled") == "eval/sampled_value"  # a folder already: the newcomer is renamed
    assert names.admit("eval/accuracy") == "eval/accuracy"


def test_mpo_metric_names_are_clash_free() -> None:
    """What the learner's MPO step returns, logged as the stage logs it (``train/`` + key, next to the total
    ``train/loss``), needs no renaming."""
    import torch

    from cascade_rl.algos.mpo import RewardShift, compute_mpo_loss
    from cascade_rl.tracking import MetricNames

    one = torch.tensor([-4.0])
    _, metrics = compute_mpo_loss([("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)], one, one - 1, one, one - 1,
                                  reward_shift=RewardShift(), chosen_num_tokens=torch.tensor([4]))
    names = MetricNames()
    for key in ["loss", *metrics]:
        assert names.admit(f"train/{key}") == f"train/{key}"
    assert not names.renamed and {"train/loss_bco_pair", "train/loss_sft"} <= names.names


def test_file_store_takes_a_metric_and_its_terms(tmp_path: Path) -> None:
    """``tracking.uri=file:…``: MLflow's file store keeps each metric as a file under its ``/`` folders."""
    uri = (tmp_path / "mlruns").as_uri()
    tracker = Tracker(uri, "file-exp", tmp_path)
    run_id = tracker.start("tiny")
    tracker.log_metrics({"train/loss": 1.0, "train/loss/bco_pair": 0.5}, step=0)
    tracker.log_metrics({"train/loss": 0.75, "train/loss/bco_pair": 0.25}, step=1)
    tracker.end()
    assert tracker.num_failed_writes == 0
    assert read_metric_history(uri, run_id, "train/loss") == [(0, 1.0), (1, 0.75)]
    assert read_metric_history(uri, run_id, "train/loss_bco_pair") == [(0, 0.5), (1, 0.25)]


# ---------------------------------------------------------------------------------------------- outages

class FlakyClient:
    """Wraps a real client; while ``down`` every write raises as a store error would."""

    def __init__(self, client) -> None:
        self.client, self.down, self.failed_calls = client, False, 0

    def __getattr__(self, name: str):
        real = getattr(self.client, name)

        def call(*args, **kwargs):
            if self.down:
                self.failed_calls += 1
                raise OSError("store unavailable")
            return real(*args, **kwargs)
        return call


def test_store_errors_never_reach_training_and_are_flushed_on_recovery(tmp_path: Path, capsys) -> None:
    tracker = Tracker(None, "flaky-exp", tmp_path, retry_max_s=0.2)
    run_id = tracker.start("tiny")
    tracker.client = flaky = FlakyClient(tracker.client)
    tracker.log_metrics({"train/loss": 2.0}, step=0)
    assert tracker.flush(30)
    flaky.down = True
    for step in range(1, 6):  # during the outage: no exception, nothing lost
        tracker.log_metrics({"train/loss": 2.0 - step / 10}, step=step)
    tracker.log_text("hello", "notes/outage.txt")
    assert not tracker.flush(1.0)  # nothing can be sent yet
    assert flaky.failed_calls >= 2 and tracker.num_failed_writes >= 2  # retried
    flaky.down = False
    tracker.end()
    err = capsys.readouterr().err
    assert err.count("failed (store unavailable)") == 1 and "reachable again" in err  # warned once
    assert [s for s, _ in read_metric_history(tracker.uri, run_id, "train/loss")] == [0, 1, 2, 3, 4, 5]
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/notes/outage.txt") == "hello"
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_writes_unsent_at_the_end_are_saved_and_sent_on_resume(tmp_path: Path) -> None:
    tracker = Tracker(None, "unsent-exp", tmp_path, retry_max_s=0.2, flush_timeout_s=1.0)
    run_id = tracker.start("tiny")
    tracker.client = flaky = FlakyClient(tracker.client)
    flaky.down = True
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.end("KILLED")  # the store is still down: saved, not lost
    assert (tmp_path / "tracking_unsent.jsonl").is_file()
    again = Tracker(None, "unsent-exp", tmp_path)
    again.start("tiny", run_id=run_id)
    again.log_metrics({"train/loss": 0.5}, step=1)
    again.end()
    assert read_metric_history(again.uri, run_id, "train/loss") == [(0, 1.0), (1, 0.5)]
    assert not (tmp_path / "tracking_unsent.jsonl").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(tmp_path: Path, port: int):
    """``mlflow server`` on loopback with a sqlite backend, one worker, no job runner; waits until it answers."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        env=env, cwd=tmp_path, stdout=open(tmp_path / "server.log", "a"), stderr=subprocess.STDOUT,
        start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])


def _stop(proc) -> None:
    import os
    import signal

    os.killpg(proc.pid, signal.SIGKILL)  # the server and its worker: gone, as a crashed host would be
    proc.wait(timeout=30)


def test_http_server_killed_mid_run_and_restarted_loses_nothing(tmp_path: Path) -> None:
    port = _free_port()
    server = _mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        tracker = Tracker(uri, "server-exp", tmp_path / "run", retry_max_s=1.0)
        run_id = tracker.start("tiny")
        tracker.log_params({"seed": 0})
        for step in range(5):
            tracker.log_metrics({"train/loss": 1.0 / (step + 1), "reward/mean": step / 10}, step=step)
        assert tracker.flush(60)
        _stop(server)
        for step in range(5, 10):  # the server is gone: these return at once and are kept
            tracker.log_metrics({"train/loss": 1.0 / (step + 1), "reward/mean": step / 10}, step=step)
        assert server.poll() is not None  # every call above returned while the server was down
        assert not tracker.flush(3.0) and tracker.num_failed_writes >= 1
        server = _mlflow_server(tmp_path, port)  # back, same store
        for step in range(10, 12):
            tracker.log_metrics({"train/loss": 1.0 / (step + 1), "reward/mean": step / 10}, step=step)
        tracker.end()
        assert [s for s, _ in read_metric_history(uri, run_id, "train/loss")] == list(range(12))
        assert [s for s, _ in read_metric_history(uri, run_id, "reward/mean")] == list(range(12))
        from mlflow.tracking import MlflowClient

        run = MlflowClient(uri).get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["seed"] == "0"
    finally:
        _stop(server)


# ---------------------------------------------------------------------------------------------- the view

def test_stages_are_child_runs_with_a_boundary_staircase(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    tracker = Tracker(None, "stages-exp", tmp_path)
    run_id = tracker.start("tiny", {"mlflow.source.git.commit": "abc123", "cascade_rl.recipe_hash": "f00d"})
    tracker.log_metrics({"eval/accuracy": 0.0}, step=0)  # the start evaluation: before any stage
    tracker.begin_stage("rollout", 1, "rollout")
    tracker.log_metrics({"reward/mean": 0.2}, step=1)
    tracker.begin_stage("gspo", 3, "gspo")
    tracker.log_metrics({"reward/mean": 0.4}, step=2)
    tracker.log_metrics({"reward/mean": 0.5}, step=3)
    tracker.end("KILLED")

    client = MlflowClient(tracker.uri)
    exp = client.get_experiment(tracker.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's runs/charts view
    children = {r.data.tags["cascade_rl.stage"]: r for r in client.search_runs([tracker.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == run_id}
    assert set(children) == {"rollout", "gspo"}
    assert children["gspo"].info.run_name == "tiny/3-gspo" and children["gspo"].data.tags["cascade_rl.stage_kind"] == "gspo"
    assert children["gspo"].data.tags["mlflow.source.git.commit"] == "abc123"
    assert (children["rollout"].info.status, children["gspo"].info.status) == ("FINISHED", "KILLED")
    assert read_metric_history(tracker.uri, children["rollout"].info.run_id, "reward/mean") == [(1, 0.2)]
    assert read_metric_history(tracker.uri, children["gspo"].info.run_id, "reward/mean") == [(2, 0.4), (3, 0.5)]
    assert read_metric_history(tracker.uri, run_id, "reward/mean") == [(1, 0.2), (2, 0.4), (3, 0.5)]
    assert read_metric_history(tracker.uri, run_id, "stage/index") == [(1, 1.0), (2, 3.0), (3, 3.0)]
    assert client.get_run(run_id).info.status == "KILLED"

    again = Tracker(None, "stages-exp", tmp_path)  # resume: the stage's child run is found again, not duplicated
    again.start("tiny", run_id=run_id)
    again.begin_stage("gspo", 3, "gspo")
    again.log_metrics({"reward/mean": 0.6}, step=4)
    again.end()
    gspo = [r for r in client.search_runs([tracker.experiment_id]) if r.data.tags.get("cascade_rl.stage") == "gspo"]
    assert len(gspo) == 1 and gspo[0].info.status == "FINISHED"
    assert [s for s, _ in read_metric_history(tracker.uri, gspo[0].info.run_id, "reward/mean")] == [2, 3, 4]


def test_run_tags_name_the_commit_and_the_recipe_hash(monkeypatch) -> None:
    from cascade_rl.stages.driver import ordered_results, resume_command, run_tags

    cfg = load_recipe(ROOT / "recipes" / "tiny_cascade.yaml", [])
    tags = run_tags(cfg, "recipes/tiny_cascade.yaml")
    other = run_tags(load_recipe(ROOT / "recipes" / "tiny_cascade.yaml", ["seed=7"]), None)
    assert len(tags["cascade_rl.recipe_hash"]) == 16 and tags["cascade_rl.recipe_hash"] != other["cascade_rl.recipe_hash"]
    monkeypatch.setenv("CASCADE_RL_GIT_COMMIT", "0123abcd" * 5)  # what submit.sh passes to a job
    assert run_tags(cfg, None)["mlflow.source.git.commit"] == "0123abcd" * 5
    # a resumed run's saved results come back sorted by name: the table keeps recipe order
    saved = {"gspo": {}, "mpo": {}, "sft": {}, "start": {}}
    assert list(ordered_results(cfg, saved)) == ["start", "sft", "mpo", "gspo"]
    assert resume_command("recipes/x.yaml", ["seed=1", "resume=never", "a=b c"]) == \
        "cascade-rl run recipes/x.yaml seed=1 'a=b c' resume=auto"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_cascade_finishes_on_the_file_store(tmp_path: Path, monkeypatch) -> None:
    """``tracking.uri=file:…`` once died in mpo (``train/loss`` beside ``train/loss/bco_pair``)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own reading client
    from tests.e2e_cli import SMALL_HF, run_cli

    store = (tmp_path / "mlruns").as_uri()
    log = tmp_path / "run.log"
    overrides = [*SMALL_HF, f"tracking.uri={store}", "stages.3.gspo.num_steps=2", "checkpoint.export_hf=false"]
    assert run_cli(tmp_path / "run", overrides, log=log) == 0, log.read_text()[-4000:]
    out = log.read_text()
    assert "clashes with another name" not in out and "tracking: writing to MLflow" not in out
    client = MlflowClient(store)
    (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
              if "mlflow.parentRunId" not in r.data.tags]
    assert run.info.status == "FINISHED"
    assert {"train/loss", "train/loss_bco_pair", "train/loss_sigmoid", "eval/accuracy"} <= set(run.data.metrics)


def test_system_metrics_go_through_the_queue(tmp_path: Path) -> None:
    import time

    tracker = Tracker(None, "system-exp", tmp_path)
    run_id = tracker.start("tiny")
    assert tracker.start_system_metrics(0.2)  # psutil is installed with MLflow here
    tracker.log_metrics({"train/loss": 1.0}, step=3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not read_metric_history(tracker.uri, run_id,
                                                                  "system/cpu_utilization_percentage"):
        time.sleep(0.3)
    tracker.end()
    history = read_metric_history(tracker.uri, run_id, "system/cpu_utilization_percentage")
    assert history and history[0][0] == 3  # logged at the current training step
    assert not tracker.start_system_metrics(0)  # 0 = off


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_cascade_survives_its_mlflow_server_dying_mid_gspo(tmp_path: Path) -> None:
    """The run's HTTP MLflow server is SIGKILLed after the first gspo step and restarted: the run finishes, and
    every step's metrics (before, during and after the outage) are in the store."""
    import json

    from mlflow.tracking import MlflowClient

    from tests.e2e_cli import SMALL_HF, CliRun

    port = _free_port()
    server = _mlflow_server(tmp_path, port)
    uri, run_dir, log = f"http://127.0.0.1:{port}", tmp_path / "run", tmp_path / "run.log"
    try:
        run = CliRun(run_dir, [*SMALL_HF, f"tracking.uri={uri}", "checkpoint.export_hf=false"], log=log)
        shards = run_dir / "rollouts" / "gspo"
        assert run.wait_for(lambda: len(list(shards.glob("shard-*.parquet"))) >= 1), log.read_text()[-3000:]
        _stop(server)
        server = _mlflow_server(tmp_path, port)  # back after its start-up time; the run went on meanwhile
        assert run.wait() == 0, log.read_text()[-4000:]
        out = log.read_text()
        assert "tracking: writing to MLflow" in out and "reachable again" in out  # the outage was seen, once
        client = MlflowClient(uri)
        (rec,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                  if "mlflow.parentRunId" not in r.data.tags]
        assert rec.info.status == "FINISHED"
        final = sorted((run_dir / "checkpoints" / "s03-gspo").glob("step-*"))[-1]
        total = json.loads((final / "driver.json").read_text())["global_step"]
        history = {k: {m.step for m in client.get_metric_history(rec.info.run_id, k)}
                   for k in ("train/loss", "reward/mean", "perf/step_s", "stage/index")}
        assert len(history["perf/step_s"]) == 4  # every gspo step
        assert history["stage/index"] == set(range(1, total + 1))  # every global step of every stage
        assert history["train/loss"] | history["reward/mean"] >= set(range(1, total + 1))  # no step missing
    finally:
        _stop(server)
