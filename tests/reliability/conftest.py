"""Session fixtures for the reliability tests: one local Ray instance (shared with tests/actors when both run) and
the tiny LM built from config. Faults are injected by killing real actor processes; nothing is mocked."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
# Ray workers (and the reward processes they spawn) must import ``fault_rewards``: they inherit the environment
# of the process that starts Ray, which happens after collection, so setting it here reaches them whichever
# conftest's fixture starts the session's Ray instance.
if HERE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), HERE) if p)


@pytest.fixture(scope="session")
def tiny_lm() -> Path:
    from cascade_rl.data.tiny_models import build_tiny_lm

    return build_tiny_lm()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Reuses a Ray instance another test folder started; else starts one like tests/actors does."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=512 << 20, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
