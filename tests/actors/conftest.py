"""Session fixtures for actor tests: one local Ray instance and one vLLM engine (in a rollout actor) per session.

The machine has 2 cores shared with others: Ray gets ``num_cpus=2`` and a 512 MiB object store; actors ask for
0 (or a token 0.01) CPUs, see ``actors/group.py``. The vLLM rollout group, the 1-rank learner group and the
generated batch are built once and shared by ``test_groups.py`` and ``test_weight_sync.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MAX_RESPONSE_TOKENS = 16
NUM_PROMPTS, GROUP_SIZE = 8, 4
SYNC_LR = 1e-2  # large, so one step visibly moves log-probs (the sync test must be able to fail)


def rollout_spec(model_path: str | Path, backend: str = "vllm", **overrides: Any) -> Any:
    from cascade_rl.actors.rollout import RolloutSpec

    from cascade_rl.stages.workers import spec_with

    base: dict[str, Any] = dict(backend=backend, dtype="float32", max_response_tokens=MAX_RESPONSE_TOKENS,
                                max_prompt_tokens=128, kv_cache_gib=1, enforce_eager=True)
    return spec_with(RolloutSpec, str(model_path), **{**base, **overrides})


def learner_spec(model_path: str | Path, **overrides: Any) -> Any:
    from cascade_rl.actors.learner import LearnerSpec

    from cascade_rl.stages.workers import spec_with

    return spec_with(LearnerSpec, str(model_path), **{**dict(lr=SYNC_LR, zero_stage=2, micro_batch_tokens=512,
                                                             total_steps=10), **overrides})


def arithmetic_prompts(n: int = NUM_PROMPTS) -> list[tuple[list[dict[str, Any]], list[str]]]:
    return [([{"role": "user", "content": f"What is {i} + {2 * i + 1}?"}], []) for i in range(n)]


@pytest.fixture(scope="session")
def vllm_rollout(ray_session: None, tiny_lm: Path) -> Iterator[Any]:
    """The session's one vLLM engine, inside a 1-worker RolloutGroup."""
    from cascade_rl.actors.group import RolloutGroup

    group = RolloutGroup(rollout_spec(tiny_lm), num_workers=1)
    yield group
    group.shutdown()


@pytest.fixture(scope="session")
def learner1(ray_session: None, tiny_lm: Path) -> Iterator[Any]:
    """A 1-rank learner group (ZeRO-2, CPU/gloo)."""
    from cascade_rl.actors.group import LearnerGroup

    group = LearnerGroup(learner_spec(tiny_lm), num_ranks=1)
    yield group
    group.shutdown()


@pytest.fixture(scope="session")
def generated(vllm_rollout: Any) -> Any:
    """G=4 responses for 8 prompts from the vLLM engine at policy version 0."""
    return vllm_rollout.generate(arithmetic_prompts(), GROUP_SIZE)


def policy_batch(result: Any) -> Any:
    """A GSPO batch from generations: behaviour log-probs as old log-probs, alternating ±1 advantages
    (rewards of a random tiny model are all 0, which would give zero gradients)."""
    from cascade_rl.types import SequenceBatch

    gens = result.generations
    return SequenceBatch(prompt_token_ids=[g.prompt_token_ids for g in gens],
                         response_token_ids=[g.token_ids for g in gens],
                         advantages=[1.0 if i % 2 else -1.0 for i in range(len(gens))],
                         old_logprobs=[g.logprobs for g in gens])


@pytest.fixture(scope="session")
def make_rollout_spec() -> Any:
    """``make_rollout_spec(model_path, backend="vllm", **overrides) -> RolloutSpec`` for the tests."""
    return rollout_spec


@pytest.fixture(scope="session")
def make_learner_spec() -> Any:
    return learner_spec


@pytest.fixture(scope="session")
def make_policy_batch() -> Any:
    return policy_batch


@pytest.fixture(scope="session")
def prompts() -> list[tuple[list[dict[str, Any]], list[str]]]:
    return arithmetic_prompts()
