"""End-to-end helpers: run the real ``cascade-rl run`` CLI as a subprocess, SIGKILL it, read what a run left behind.

A run is started in its own session (``start_new_session=True``) so that killing its process group kills the driver
and the local Ray head it started, as a crashed node would; Ray's actors (and vLLM's engine processes under them)
exit when their raylet dies, and any that linger are killed by ``CliRun``. Stdout and stderr go to a log file next
to the run folder. ``read_run`` gathers the facts the resume tests compare: rollout-log record ids per
stage, checkpoints, preference pairs, the MLflow run and its status.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_cascade.yaml"
RUN_TIMEOUT_S = 900.0

# The tiny cascade (sft -> rollout -> mpo -> gspo) cut down for tests: rollout 2 chunks of 32 prompts x G=8,
# gspo 4 steps of 16 prompts x G=8 (2 optimizer steps each), a checkpoint every 2 steps (keep 2 per stage), short
# greedy evaluations. A 5-step LR warm-up at each stage start makes a schedule wrongly restarted by a resume
# visible in train/lr. Everything else (stage LRs, sft and mpo sizes) comes from the recipe.
NUM_ROLLOUT_PROMPTS, GROUP_SIZE, GSPO_STEPS, GSPO_PROMPTS, WARMUP = 64, 8, 4, 16, 5
SMALL = [f"stages.1.num_prompts={NUM_ROLLOUT_PROMPTS}", f"stages.3.gspo.num_steps={GSPO_STEPS}",
         f"stages.3.gspo.prompts_per_step={GSPO_PROMPTS}", "stages.3.gspo.num_minibatches=2",
         f"rollout.group_size={GROUP_SIZE}", f"learner.warmup_steps={WARMUP}", "learner.lr_schedule=constant",
         "eval.num_prompts=16", "eval.sampled_n=0", "eval.every_steps=0", "checkpoint.every_steps=2",
         "checkpoint.keep_last=2"]
# The HF generate backend starts in seconds where vLLM takes half a minute or more on a loaded 2-core machine; record
# ids, counts, checkpoints and LR schedules do not depend on the engine, so runs that only check the driver use it.
SMALL_HF = [*SMALL, "rollout.backend=hf"]
EXPECTED_RECORDS = {"rollout": NUM_ROLLOUT_PROMPTS * GROUP_SIZE, "gspo": GSPO_STEPS * GSPO_PROMPTS * GROUP_SIZE}


@functools.cache
def small_recipe() -> Any:
    """The resolved recipe the tests run (``SMALL`` over tiny_cascade.yaml)."""
    from cascade_rl.config import load_recipe

    return load_recipe(RECIPE, SMALL)


def cli_env(**extra: str) -> dict[str, str]:
    """The test session's environment (tests/conftest.py) without any fault hook, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_RL_FAULT_AT"}
    env.update({"PYTHONUNBUFFERED": "1", **extra})
    return env


class CliRun:
    """``cascade-rl run`` on the tiny recipe in a new session, output appended to ``log``.

    While it runs, its descendants are noted (Ray puts its workers in process groups of their own; they exit when
    their raylet dies with the driver's group). Once the driver is gone, any noted process still alive after a
    grace period is killed, so one test's crash never leaves load behind for the next.
    """

    def __init__(self, run_dir: Path, overrides: list[str], *, log: Path, recipe: Path = RECIPE, **env: str) -> None:
        cmd = [sys.executable, "-m", "cascade_rl", "run", str(recipe), f"run_dir={run_dir}", *overrides]
        self.log = log
        with open(log, "a") as out:
            out.write(f"\n===== {' '.join(cmd[3:])} {env or ''}\n")
            out.flush()
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.seen: dict[int, Any] = {}

    def poll(self) -> int | None:
        import psutil

        try:
            self.seen.update({p.pid: p for p in psutil.Process(self.proc.pid).children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
        return self.proc.poll()

    def wait_for(self, predicate: Any, timeout_s: float = RUN_TIMEOUT_S, poll_s: float = 0.1) -> bool:
        """Poll ``predicate()`` until true (True) or the driver exits first (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.poll() is not None:
                return bool(predicate())
            time.sleep(poll_s)
        self.kill()
        raise TimeoutError(f"condition not met within {timeout_s:.0f} s")

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        """The driver's exit code (-9: SIGKILLed)."""
        deadline = time.monotonic() + timeout_s
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"cascade-rl run did not finish within {timeout_s:.0f} s; see {self.log}")
            time.sleep(0.5)
        self._reap()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL the run's process group (driver, Ray head, its children), as a crash of the node would."""
        self.poll()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        self._reap()
        return self.proc.returncode

    def _reap(self, grace_s: float = 30.0) -> None:
        import psutil

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a finished run leaves nothing in its group either
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=grace_s)
        for p in alive:
            try:
                p.kill()  # psutil checks the pid still names the same process
            except psutil.NoSuchProcess:
                pass
        if alive:
            with open(self.log, "a") as out:
                out.write(f"\n[e2e_cli] killed {len(alive)} process(es) that outlived the driver by {grace_s:.0f} s: "
                          f"{sorted(p.pid for p in alive)}\n")


def run_cli(run_dir: Path, overrides: list[str], *, log: Path, recipe: Path = RECIPE, **env: str) -> int:
    return CliRun(run_dir, overrides, log=log, recipe=recipe, **env).wait()


def complete_steps(run_dir: Path, stage_folder: str) -> list[int]:
    """Steps of the complete checkpoints of one stage folder (e.g. ``s03-gspo``)."""
    folder = run_dir / "checkpoints" / stage_folder
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / "COMPLETE").exists())


@dataclass
class RunFacts:
    run_id: str
    stage_results: dict[str, Any]
    records: dict[str, list[str]]  # stage -> record ids without the run-id prefix, in log order
    record_run_ids: set[str]
    checkpoints: dict[str, list[int]]  # stage folder -> complete steps
    partial_checkpoints: list[str]
    final_driver_state: dict[str, dict[str, Any]]  # stage folder -> driver.json of its newest checkpoint
    pairs: list[Any] = field(default_factory=list)
    mlflow_runs: list[tuple[str, str]] = field(default_factory=list)  # (run id, status) in the experiment
    lr: dict[int, float] = field(default_factory=dict)  # MLflow step -> train/lr (the last value logged there)

    def counts(self) -> dict[str, int]:
        return {stage: len(ids) for stage, ids in self.records.items()}

    def duplicates(self) -> dict[str, list[str]]:
        return {stage: [i for i, n in Counter(ids).items() if n > 1] for stage, ids in self.records.items()}


def read_run(run_dir: Path) -> RunFacts:
    import json

    from cascade_rl.data.pairs import read_pairs
    from cascade_rl.data.rollout_log import read_rollout_table

    run_state = json.loads((run_dir / "run_state.json").read_text())
    run_id = run_state["mlflow_run_id"]
    records, run_ids = {}, set()
    for folder in sorted(p for p in (run_dir / "rollouts").iterdir() if p.is_dir() and "." not in p.name):
        table = read_rollout_table(folder, columns=["record_id", "run_id"]).to_pydict()
        run_ids.update(table["run_id"])
        records[folder.name] = [r.removeprefix(f"{run_id}/") for r in table["record_id"]]
    checkpoints, partial, final = {}, [], {}
    for stage_dir in sorted((run_dir / "checkpoints").iterdir()):
        checkpoints[stage_dir.name] = complete_steps(run_dir, stage_dir.name)
        partial += [str(p.relative_to(run_dir)) for p in stage_dir.glob("step-*")
                    if not ((p / "COMPLETE").exists() and (p / "learner" / "COMPLETE").exists())]
        if checkpoints[stage_dir.name]:
            newest = stage_dir / f"step-{checkpoints[stage_dir.name][-1]:06d}"
            final[stage_dir.name] = json.loads((newest / "driver.json").read_text())
    pairs_files = [f for f in [run_dir / "pairs" / "mpo.parquet"] if f.exists()]
    return RunFacts(run_id=run_id, stage_results=run_state["stage_results"], records=records,
                    record_run_ids=run_ids, checkpoints=checkpoints, partial_checkpoints=partial,
                    final_driver_state=final, pairs=[p for f in pairs_files for p in read_pairs(f)],
                    mlflow_runs=_mlflow_runs(run_dir), lr=_last_per_step(run_dir, run_id, "train/lr"))


def _client(run_dir: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")


def _mlflow_runs(run_dir: Path) -> list[tuple[str, str]]:
    client = _client(run_dir)
    experiments = [e.experiment_id for e in client.search_experiments()]
    # the recipe runs (each stage's child run, tagged mlflow.parentRunId, belongs to one of them)
    return [(r.info.run_id, r.info.status) for r in client.search_runs(experiments)
            if "mlflow.parentRunId" not in r.data.tags]


def _last_per_step(run_dir: Path, run_id: str, key: str) -> dict[int, float]:
    """A resumed run logs the steps after its checkpoint again: the later value is the one that counts."""
    history = sorted(_client(run_dir).get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


def expected_lrs(stage: str, num_steps: int) -> list[float]:
    """train/lr of each step of a stage: linear warm-up over WARMUP optimizer steps, then constant (gspo: the
    mean over its 2 mini-batch updates per step)."""
    cfg = small_recipe()
    peak = next(s.lr or cfg.learner.lr for s in cfg.stages if s.name == stage)

    def lr_at(k: int) -> float:
        return peak * min(k + 1, WARMUP) / WARMUP

    if stage == "gspo":
        return [(lr_at(2 * k) + lr_at(2 * k + 1)) / 2 for k in range(num_steps)]
    return [lr_at(k) for k in range(num_steps)]


def stage_lrs(facts: RunFacts) -> dict[str, list[float]]:
    """train/lr per trained stage, split by the global step each stage's final checkpoint recorded."""
    out, start = {}, 0
    for folder, state in sorted(facts.final_driver_state.items()):
        name = folder.split("-", 1)[1]
        if name != "rollout":
            out[name] = [facts.lr[s] for s in range(start + 1, state["global_step"] + 1) if s in facts.lr]
        start = state["global_step"]
    return out


def check_consistent(facts: RunFacts, reference: RunFacts | None = None) -> None:
    """What every finished run must satisfy, alone and against an uninterrupted reference run."""
    from cascade_rl.stages.rollout import CHUNK_PROMPTS

    assert facts.mlflow_runs == [(facts.run_id, "FINISHED")], facts.mlflow_runs
    assert facts.record_run_ids == {facts.run_id}
    assert {"start", "sft", "mpo", "gspo"} <= set(facts.stage_results), facts.stage_results.keys()
    assert facts.counts() == EXPECTED_RECORDS, facts.counts()
    assert facts.duplicates() == {stage: [] for stage in EXPECTED_RECORDS}
    assert facts.partial_checkpoints == []
    done = facts.final_driver_state
    assert sorted(done) == ["s00-sft", "s01-rollout", "s02-mpo", "s03-gspo"], sorted(done)
    assert all(state["stage_done"] for state in done.values()), done
    assert all(1 <= len(steps) <= 2 for steps in facts.checkpoints.values()), facts.checkpoints  # keep_last=2
    assert done["s01-rollout"]["stage_step"] == -(-NUM_ROLLOUT_PROMPTS // CHUNK_PROMPTS)
    assert done["s03-gspo"]["stage_step"] == GSPO_STEPS
    mpo = small_recipe().stages[2].mpo
    mpo_steps = -(-len(facts.pairs) // mpo.batch_size) * mpo.epochs
    assert done["s02-mpo"]["stage_step"] == mpo_steps
    # the MLflow step counter counts every stage step exactly once, however often the run was restarted
    assert done["s03-gspo"]["global_step"] == sum(d["stage_step"] for d in done.values())
    logged = {i for ids in facts.records.values() for i in ids}
    sources = {s.removeprefix(f"{facts.run_id}/") for p in facts.pairs for s in p.source_ids}
    assert sources and sources <= logged, sorted(sources - logged)[:5]
    assert len({p.pair_id for p in facts.pairs}) == len(facts.pairs)
    # each stage's LR schedule ran once, start to end: a resume continued it rather than starting it again
    steps = {folder.split("-", 1)[1]: state["stage_step"] for folder, state in done.items()}
    for stage, lrs in stage_lrs(facts).items():
        assert lrs == pytest.approx(expected_lrs(stage, steps[stage]), rel=1e-6), (stage, lrs)
    if reference is not None:
        for stage in EXPECTED_RECORDS:
            assert sorted(facts.records[stage]) == sorted(reference.records[stage]), stage
        assert done["s00-sft"]["stage_step"] == reference.final_driver_state["s00-sft"]["stage_step"]
