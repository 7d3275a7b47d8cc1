"""Session fixtures for the reliability tests: one local Ray instance (shared with tests/actors when both run) and
the tiny LM built from config. Faults are injected by killing real actor processes; nothing is mocked."""

from __future__ import annotations

import os
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
# Ray workers (and the reward processes they spawn) must import ``fault_rewards``: they inherit the environment
# of the process that starts Ray, which happens after collection, so setting it here reaches them whichever
# conftest's fixture starts the session's Ray instance.
if HERE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), HERE) if p)
