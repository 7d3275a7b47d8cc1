"""Fixtures for reward tests: this folder on sys.path (for ``my_ext_reward:...``), scorers, tiny models."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade_rl.types import RewardTermConfig

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
if str(HERE) not in sys.path:  # spawned reward workers inherit sys.path, so they can import my_ext_reward too
    sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="module")
def math_pool() -> Iterator[object]:
    """A 2-process scorer of math_verify with a 1 s limit, shared by a module's tests."""
    from cascade_rl.rewards import RewardScorer

    with RewardScorer([RewardTermConfig("math_verify", 1.0, {})], timeout_s=1.0, num_workers=2, grace_s=0.5) as scorer:
        yield scorer
