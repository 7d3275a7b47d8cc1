"""Reward worker: a thin, Ray-free wrapper around ``cascade_rl.rewards.RewardScorer`` (one per CPU actor).

The scorer owns the per-call time limits and isolates crashes and hangs of single samples (a failing sample costs
that sample's score, recorded in ``RewardResult.errors``). What it cannot survive, the death of the whole actor, is
handled one level up: ``RewardGroup`` restarts the actor and rescores its batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from cascade_rl.types import RewardResult, RewardTermConfig, Sample


@dataclass
class RewardSpec:
    """What a reward worker needs from ``reward.*`` of the recipe (defaults and docs live in ``config.py``)."""

    terms: list[RewardTermConfig]
    timeout_s: float
    correct_threshold: float
    correct_term: str | None = None  # the term deciding `correct` (None: the first)
    num_processes: int = 1  # scorer processes inside one worker (RewardScorer's num_workers)
    extra: dict[str, Any] = field(default_factory=dict)  # further RewardScorer keyword arguments


class RewardWorker:
    """Scores samples with the registered reward terms; ``score`` keeps the input order."""

    def __init__(self, spec: RewardSpec) -> None:
        from cascade_rl.rewards import RewardScorer

        if not spec.terms:
            raise ValueError("reward.terms is empty: name at least one reward, e.g. `[{name: math_verify}]`")
        self.spec = spec
        self.scorer = RewardScorer(list(spec.terms), timeout_s=spec.timeout_s,
                                   num_workers=spec.num_processes, correct_threshold=spec.correct_threshold,
                                   correct_term=spec.correct_term, **spec.extra)
        self.num_scored = 0
        self.score_s = 0.0

    def score(self, samples: list[Sample]) -> list[RewardResult]:
        t0 = time.perf_counter()
        results = list(self.scorer.score(samples)) if samples else []
        if len(results) != len(samples):
            raise RuntimeError(f"reward scorer returned {len(results)} results for {len(samples)} samples")
        self.num_scored += len(samples)
        self.score_s += time.perf_counter() - t0
        return results

    def stats(self) -> dict[str, float]:
        return {"num_scored": float(self.num_scored), "score_s": self.score_s, "pid": float(os.getpid())}

    def close(self) -> None:
        self.scorer.close()
