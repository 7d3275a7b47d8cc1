"""``RewardScorer``: score samples with weighted reward terms, safely, into ``RewardResult``s.

    total   = sum_k weight_k * score_k      over the terms k that returned a value (None = not applicable)
    correct = score_c > correct_threshold   (term c = ``correct_term``, default the first; None when it returned None)

A term that raised, hung, crashed its worker or returned NaN/Inf/the wrong type scores 0.0 and its error is
kept in ``RewardResult.errors[label]``; a reward's ``Verdict`` reason is kept there too. Dict-valued rewards add
their entries as extra components ``"<label>/<key>"`` (not summed into the total twice).

``num_workers >= 1`` scores in a pool of spawned worker processes with hard per-call deadlines
(``rewards/safe.py``); ``num_workers=0`` scores in this process (debugging): errors are caught, and the time
limit holds only when called from the main thread (``signal.setitimer``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cascade_rl.types import RewardResult, RewardTermConfig, Sample

from .registry import RewardTerm, resolve_terms
from .safe import Outcome, WorkerPool, run_terms


def find_correct_term(terms: Sequence[RewardTerm], correct_term: str | None) -> RewardTerm:
    """The term that decides ``correct``: the one named ``correct_term`` (its name as written in the recipe, or its
    component label), else the first."""
    if correct_term is None:
        return terms[0]
    for term in terms:
        if correct_term in (term.spec, term.label):
            return term
    raise ValueError(f"reward.correct_term={correct_term!r} names none of reward.terms "
                     f"{[t.spec for t in terms]}; set it to one of them")


def combine(terms: Sequence[RewardTerm], outcomes: dict[str, Outcome], correct_threshold: float,
            correct_term: RewardTerm | None = None) -> RewardResult:
    """One ``RewardResult`` from each term's outcome (see the module docstring for the formula)."""
    components: dict[str, float] = {}
    errors: dict[str, str] = {}
    total = 0.0
    for term in terms:
        score, extras, error = outcomes.get(term.label, (0.0, {}, f"{term.label}: not scored (internal error)"))
        if error:
            errors[term.label] = error
        if score is not None:
            components[term.label] = score
            total += term.weight * score
        components.update(extras)
    decider = correct_term or (terms[0] if terms else None)
    score_c = outcomes.get(decider.label, (0.0, {}, None))[0] if decider is not None else None
    correct = None if score_c is None else bool(score_c > correct_threshold)
    return RewardResult(total=total, components=components, correct=correct, errors=errors)


class RewardScorer:
    """Scores ``Sample``s with weighted reward terms; a plain class the Ray reward actor wraps.

    ``terms`` are the recipe's ``RewardTermConfig``s (name or pkg.module:function, weight, kwargs); ``timeout_s``
    limits every reward call (a batched call gets ``timeout_s`` per sample); ``correct_term`` names the term whose
    score decides ``correct`` (default: the first); ``chunk_size`` samples go to a worker at a time
    (default: the batch split four ways per worker, at most 64).
    """

    def __init__(self, terms: Sequence[RewardTermConfig], *, timeout_s: float = 5.0,
                 num_workers: int = 1, correct_threshold: float = 0.5, chunk_size: int | None = None,
                 grace_s: float | None = None, start_method: str = "spawn", max_memory_mb: int | None = None,
                 correct_term: str | None = None) -> None:
        if not terms:
            raise ValueError("reward.terms is empty: name at least one reward, e.g. `[{name: math_verify}]`")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"reward.timeout_s={timeout_s}: must be a positive number of seconds")
        if num_workers < 0:
            raise ValueError(f"reward num_workers={num_workers}: must be >= 0 (0 scores in this process)")
        self.terms = resolve_terms(list(terms))
        self.correct_term = find_correct_term(self.terms, correct_term)
        self.timeout_s = float(timeout_s)
        self.correct_threshold = float(correct_threshold)
        self.num_workers = int(num_workers)
        self.chunk_size = chunk_size
        self._pool: WorkerPool | None = None
        if self.num_workers > 0:
            self._pool = WorkerPool(self.terms, self.num_workers, self.timeout_s, grace_s=grace_s,
                                    start_method=start_method, max_memory_mb=max_memory_mb)

    @property
    def labels(self) -> list[str]:
        """Component names of the terms, in recipe order."""
        return [t.label for t in self.terms]

    def _chunk(self, n: int) -> int:
        if self.chunk_size:
            return max(1, int(self.chunk_size))
        return max(1, min(64, math.ceil(n / (4 * max(1, self.num_workers)))))

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        """One ``RewardResult`` per sample, in input order; never raises for a sample's sake."""
        if self.num_workers > 0 and self._pool is None:
            raise RuntimeError("RewardScorer.score() called after close(); create a new scorer")
        samples = list(samples)
        bad = {i for i, s in enumerate(samples) if not isinstance(s, Sample)}
        good = [s for i, s in enumerate(samples) if i not in bad]
        if self._pool is not None:
            outcomes = self._pool.run(good, self._chunk(len(good))) if good else []
        else:
            outcomes = self._score_here(good)
        results, it = [], iter(outcomes)
        for i, s in enumerate(samples):
            if i in bad:
                err = f"expected a cascade_rl.types.Sample, got {type(s).__name__}"
                results.append(combine(self.terms, {t.label: (0.0, {}, err) for t in self.terms},
                                       self.correct_threshold, self.correct_term))
            else:
                results.append(combine(self.terms, next(it), self.correct_threshold, self.correct_term))
        return results

    def _score_here(self, samples: list[Sample]) -> list[dict[str, Outcome]]:
        results: list[dict[str, Outcome]] = [{} for _ in samples]

        def emit(msg: tuple[Any, ...]) -> None:
            if msg[0] == "out":
                results[msg[1]].update(msg[2])
            else:
                for pos, outcome in msg[2].items():
                    results[pos][msg[1]] = outcome

        run_terms(self.terms, [(i, s, frozenset()) for i, s in enumerate(samples)], self.timeout_s, emit)
        return results

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
