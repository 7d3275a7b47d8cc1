"""What every stage shares: the recipe, the worker groups, the tracker, the driver state, checkpoints, eval.

Specs for the workers are built here from the recipe's sub-configs (each actor gets its own, never the recipe).

Testing hook: ``CASCADE_RL_FAULT_AT=<stage name>:<point>`` makes the driver SIGKILL itself at one named point (see
``RunContext.fault_point``) so tests can crash a run at a known place and check that ``resume=auto`` recovers.
It is read nowhere else and does nothing when unset; never set it in a real run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RecipeConfig, StageConfig
from ..data.prompts import PromptItem
from ..data.rollout_log import compact_rollout_log, next_shard_index
from ..tracking import Tracker
from ..types import RewardResult, Sample
from .protocols import EncoderProtocol, LearnerGroupProtocol, RewardGroupProtocol, RolloutGroupProtocol
from .state import COMPLETE, DriverState, RunState, checkpoint_dir, finish_checkpoint

FAULT_ENV = "CASCADE_RL_FAULT_AT"


EVAL_KEY = 0  # stage keys start at 1 (sample_key)


@dataclass
class RunContext:
    cfg: RecipeConfig
    run_dir: Path
    model_path: str
    tracker: Tracker
    learners: LearnerGroupProtocol
    rollout: RolloutGroupProtocol
    rewards: RewardGroupProtocol
    train_prompts: list[PromptItem]
    eval_prompts: list[PromptItem]
    encoder: EncoderProtocol | None = None  # prompts/responses to token ids (sft, mpo); the driver sets it
    state: DriverState = field(default_factory=DriverState)
    run_state: RunState = field(default_factory=RunState)
    is_vlm: bool = False
    reward_restarts_logged: int = field(default=0, init=False, repr=False)
    stop: Any = field(default=None, repr=False)  # console.GracefulStop, set by the driver

    def require_encoder(self) -> EncoderProtocol:
        if self.encoder is None:
            raise RuntimeError("RunContext.encoder is not set: the driver sets it before running sft/mpo stages")
        return self.encoder

    def shutdown_workers(self) -> None:
        """Stop every actor cleanly: the rollout engines first (else vLLM, killed at exit, warns that its engine
        core died), then the learners and reward workers."""
        for group in (self.rollout, self.learners, self.rewards):
            group.shutdown()

    # ------------------------------------------------------------------ logging

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics(metrics, self.state.global_step if step is None else step)

    def finish_step(self, metrics: dict[str, float] | None = None) -> None:
        """The one place a stage's step counts: stage and global step advance, the step's metrics are logged (at
        the new global step), then the ``after-step-<N>`` fault point, then the step boundary (a Ctrl-C/SIGTERM
        asked during the step stops the run here)."""
        self.state.stage_step += 1
        self.state.global_step += 1
        if metrics is not None:
            self.log(metrics)
        self.fault_point(f"after-step-{self.state.stage_step}")
        self.step_boundary()

    def fault_point(self, point: str) -> None:
        """Testing hook: SIGKILL the driver when ``CASCADE_RL_FAULT_AT`` is ``<current stage name>:<point>``.

        Points: ``after-step-<N>`` — the stage has done N steps and logged step N (its records are in the rollout
        log), its checkpoint not yet written; ``checkpoint-<N>`` — step N's checkpoint is half written (learner state
        saved, no COMPLETE marker); ``done`` — the stage's final checkpoint is complete, its evaluation not yet run.
        When the driver leads its process group, the whole group is killed (the local Ray head with it; Ray's
        workers, in groups of their own, exit when their raylet dies), as after a crash of the node.
        """
        target = os.environ.get(FAULT_ENV)
        if not target or self.state.stage_index >= len(self.cfg.stages):
            return
        if target == f"{self.cfg.stages[self.state.stage_index].name}:{point}":
            print(f"{FAULT_ENV}={target}: killing the driver (testing hook)", file=sys.stderr, flush=True)
            sys.stdout.flush()
            if os.getpgid(0) == os.getpid():
                os.killpg(os.getpid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    def start_schedule(self, lr: float, total_steps: int) -> None:
        """A new LR schedule at a stage's start; a stage resumed mid-way keeps the one its checkpoint restored."""
        if self.state.stage_step == 0:
            self.learners.set_lr(lr, total_steps, self.cfg.learner.warmup_steps)

    # ------------------------------------------------------------------ scoring

    def score(self, prompts: list[PromptItem], generations: list[Any]) -> list[RewardResult]:
        """Score generations (ordered prompt-major) against their prompts' answers."""
        samples = [
            Sample(prompt=prompts[g.prompt_index].messages, response=g.text,
                   ground_truth=prompts[g.prompt_index].answer,
                   metadata={**prompts[g.prompt_index].metadata, "num_response_tokens": len(g.token_ids),
                             "finish_reason": g.finish_reason},
                   images=prompts[g.prompt_index].images)
            for g in generations
        ]
        results = self.rewards.score(samples)
        restarts = getattr(self.rewards, "num_restarts", 0)
        if restarts != self.reward_restarts_logged:  # reward workers died and were replaced during this call
            self.reward_restarts_logged = restarts
            self.tracker.log_metrics({"reward/worker_restarts": float(restarts)}, self.state.global_step)
        return results

    def sample_key(self, step: int) -> int:
        """The sampling key of one step of the current stage: a resumed run draws the same samples."""
        return 1 + self.state.stage_index * 10_000_000 + step

    def sync_weights(self) -> float:
        """Push the learner's weights to the rollout workers, tagged with the next policy version."""
        self.state.policy_version += 1
        self.rollout.wake_up()  # no-op unless rollout.sleep_when_idle put the engines to sleep
        return self.rollout.sync_from(self.learners, self.state.policy_version)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, stage: StageConfig, *, stage_done: bool = False) -> Path:
        """Save learner + driver state; the COMPLETE marker is written last."""
        t0 = time.perf_counter()
        self.state.stage_done = stage_done
        self.state.capture_rng()
        logs = self.run_dir / "rollouts"
        folders = [d for d in (logs.iterdir() if logs.exists() else []) if d.is_dir() and "." not in d.name]
        for d in folders:  # merge small shards, only below the previous checkpoint's boundary (see rollout_log)
            compact_rollout_log(d, below=self.state.num_log_shards.get(d.name, 0))
        self.state.num_log_shards = {d.name: next_shard_index(d) for d in folders}
        ckpt = checkpoint_dir(self.run_dir, self.state.stage_index, stage.name, self.state.stage_step)
        (ckpt / COMPLETE).unlink(missing_ok=True)  # rewriting a folder: it is incomplete until finished again
        self.learners.save_checkpoint(str(ckpt / "learner"), {"driver": self.state.__dict__})
        self.fault_point(f"checkpoint-{self.state.stage_step}")
        finish_checkpoint(ckpt, self.state, self.cfg.checkpoint.keep_last)
        self.log({"perf/checkpoint_s": time.perf_counter() - t0})
        return ckpt

    def step_boundary(self) -> None:
        """Between two steps: a stop asked by Ctrl-C/SIGTERM is raised here (``console.StopRun``), where the state
        is consistent, and the driver checkpoints this boundary."""
        if self.stop is not None:
            self.stop.check()

    def should_checkpoint(self) -> bool:
        """Whether the step just finished (``finish_step``) is due a checkpoint (``checkpoint.every_steps``)."""
        every = self.cfg.checkpoint.every_steps
        return every > 0 and self.state.stage_step % every == 0

    def end_train_step(self, stage: StageConfig, step: int, total: int, metrics: dict[str, float], train_s: float,
                       bar: Any) -> None:
        """After one optimizer step of an offline stage (sft, mpo): count it, log it, show it, checkpoint."""
        assert step == self.state.stage_step, (step, self.state.stage_step)  # batches resume at the stage step
        self.finish_step({**{f"train/{k}": v for k, v in metrics.items()}, "perf/train_s": train_s})
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
        if self.should_checkpoint() and self.state.stage_step < total:
            self.checkpoint(stage)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, tag: str) -> dict[str, float]:
        """Greedy (and optionally sampled) accuracy on the held-out prompts; logs ``eval/*`` and a table."""
        ev = self.cfg.eval
        prompts = self.eval_prompts[: ev.num_prompts]
        t0 = time.perf_counter()
        out = self.rollout.generate(prompts, 1, greedy=True)
        results = self.score(prompts, out.generations)
        metrics = _eval_metrics("eval", out.generations, results)
        rows = sample_rows(tag, self.state.global_step, "greedy", prompts, out.generations, results)
        if ev.sampled_n > 0:
            # one fixed key: every evaluation draws with the same random numbers, so stages compare fairly
            sampled = self.rollout.generate(prompts, ev.sampled_n, key=EVAL_KEY)
            sampled_results = self.score(prompts, sampled.generations)
            metrics.update(_eval_metrics("eval/sampled", sampled.generations, sampled_results))
            half = ev.num_table_rows // 2  # sampled responses (what the RL stages optimise) first, then greedy
            rows = sample_rows(tag, self.state.global_step, "sampled", prompts, sampled.generations,
                               sampled_results)[: ev.num_table_rows - half] + rows[:half]
        if ev.best_of_n > 0:  # Best-of-N: a selector term (e.g. the PRM) picks one of N samples per prompt
            cand = self.rollout.generate(prompts, ev.best_of_n, key=EVAL_KEY)
            metrics.update(best_of_n_metrics(cand.generations, self.score(prompts, cand.generations),
                                             ev.best_of_n, ev.best_of_n_by))
        metrics["perf/eval_s"] = time.perf_counter() - t0
        self.log(metrics)
        self.tracker.log_table(rows[: ev.num_table_rows], f"samples/{tag}_step{self.state.global_step:06d}.json")
        return metrics


def sample_rows(tag: str, step: int, mode: str, prompts: list[PromptItem], generations: list[Any],
                results: list[RewardResult]) -> list[dict[str, Any]]:
    """Rows of the MLflow samples table: what decides a reward first (total, correct, each term), then the
    response, then the long columns (answer, prompt), so nothing that matters is off-screen."""
    terms = sorted({k for r in results for k in r.components})
    return [{"stage": tag, "step": step, "mode": mode, "reward": r.total, "correct": r.correct,
             **{f"reward/{k}": r.components.get(k) for k in terms},
             "error": "; ".join(f"{k}: {v}" for k, v in r.errors.items()) if r.errors else "",
             "response": g.text, "answer": prompts[g.prompt_index].answer,
             "prompt": prompts[g.prompt_index].messages[-1]["content"], "sample": g.sample_index}
            for g, r in zip(generations, results, strict=True)]


def _eval_metrics(prefix: str, generations: list[Any], results: list[RewardResult]) -> dict[str, float]:
    n = max(len(results), 1)
    return {
        f"{prefix}/accuracy": sum(bool(r.correct) for r in results) / n,
        f"{prefix}/mean_reward": sum(r.total for r in results) / n,
        f"{prefix}/response_tokens": sum(len(g.token_ids) for g in generations) / n,
    }


def best_of_n_metrics(generations: list[Any], results: list[RewardResult], n: int, by: str) -> dict[str, float]:
    """``eval/best_of_n/*``: accuracy and reward of the response whose ``by`` component is highest among each
    prompt's n samples (first on ties; a sample without that component ranks lowest), and the oracle pass@n."""
    if results and not any(by in r.components for r in results):
        raise ValueError(f"eval.best_of_n_by={by!r}: no reward term with that label scored the samples (labels: "
                         f"{sorted({k for r in results for k in r.components})}); add it to reward.terms (weight 0 "
                         "keeps it out of the training reward) or set eval.best_of_n_by to one of the labels")
    picked, oracle = [], []
    for start in range(0, len(generations), n):
        group = results[start:start + n]
        best = max(range(len(group)), key=lambda j: (group[j].components.get(by, float("-inf")), -j))
        picked.append(group[best])
        oracle.append(any(bool(r.correct) for r in group))
    k = max(len(picked), 1)
    return {"eval/best_of_n/accuracy": sum(bool(r.correct) for r in picked) / k,
            "eval/best_of_n/mean_reward": sum(r.total for r in picked) / k,
            "eval/best_of_n/pass_at_n": sum(oracle) / k}


def reward_metrics(results: list[RewardResult]) -> dict[str, float]:
    """``reward/*``: mean total, accuracy, each component's mean and error counts."""
    n = max(len(results), 1)
    m: dict[str, float] = {"reward/mean": sum(r.total for r in results) / n,
                           "reward/accuracy": sum(bool(r.correct) for r in results) / n,
                           "reward/errors": float(sum(len(r.errors) > 0 for r in results))}
    names = sorted({k for r in results for k in r.components})
    for k in names:
        vals = [r.components[k] for r in results if k in r.components]
        m[f"reward/{k}"] = sum(vals) / max(len(vals), 1)
    return m


def rollout_metrics(out: Any) -> dict[str, float]:
    """``rollout/*``: throughput, lengths and finish reasons of one generate call."""
    gens = out.generations
    n = max(len(gens), 1)
    lengths = [len(g.token_ids) for g in gens]
    m = {"rollout/tokens_per_s": out.num_output_tokens / max(out.generate_s, 1e-9),
         "rollout/response_tokens_mean": sum(lengths) / n,
         "rollout/response_tokens_max": float(max(lengths, default=0)),
         "perf/generate_s": out.generate_s}
    for reason in sorted({g.finish_reason for g in gens}):
        m[f"rollout/finish_{reason}"] = sum(g.finish_reason == reason for g in gens) / n
    return m


def messages_json(item: PromptItem) -> str:
    return json.dumps(item.messages, ensure_ascii=False)
