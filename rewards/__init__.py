"""Reward functions for Cascade RL: a registry, rule-based verifiers, a process reward model, safe scoring.

Importing this package registers the built-in rewards:

| name             | family                                       | module                  |
|------------------|----------------------------------------------|-------------------------|
| ``math_verify``  | math answer equivalence (math-verify, sympy) | ``math_verify_reward``  |
| ``choice``       | multiple-choice letter / option text         | ``choice``              |
| ``exact_match``  | normalised string match                      | ``string_match``        |
| ``format``       | ``<think>...</think>`` answer protocol        | ``format``              |
| ``boxed_format`` | a closed ``\\boxed{}`` in the answer          | ``format``              |
| ``length_penalty`` | DAPO soft overlong penalty                 | ``length``              |
| ``prm``          | process reward model (batched, VisualPRM)    | ``prm``                 |
| ``contains_answer`` | the docs' example reward                  | ``contains_answer``     |

``RewardScorer`` (``scoring``) combines weighted terms into ``RewardResult``s with per-call time limits and crash
isolation (``safe``). See docs/rewards.md to write your own.
"""

from __future__ import annotations

from . import choice, contains_answer, format, length, math_verify_reward, prm, string_match  # noqa: F401
from .prm import best_of_n
from .registry import (
    RewardFn,
    RewardLookupError,
    RewardTerm,
    Verdict,
    check_reward_spec,
    get_reward,
    is_batched,
    is_reward,
    list_rewards,
    register_reward,
    resolve_terms,
    reward,
)
from .safe import CallTimeout, WorkerPool, call_reward, check_output, soft_time_limit
from .scoring import RewardScorer, combine

__all__ = [
    "CallTimeout", "RewardFn", "RewardLookupError", "RewardScorer", "RewardTerm", "Verdict", "WorkerPool",
    "best_of_n", "call_reward", "check_output", "check_reward_spec", "combine", "get_reward", "is_batched",
    "is_reward", "list_rewards", "register_reward", "resolve_terms", "reward", "soft_time_limit",
]
