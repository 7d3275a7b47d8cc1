"""Rewards for the fault tests, referenced as ``fault_rewards:<function>`` (this folder is on ``sys.path``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cascade_rl.rewards import reward

from cascade_rl.types import Sample


@reward
def index_stall_once(sample: Sample, *, stall_s: float = 30.0) -> float:
    """The sample's index, so tests can check order and count. A sample whose ``metadata["stall_marker"]`` names a
    file that does not exist yet writes it (its pid) and then stalls, so the test can kill the reward actor
    mid-batch; once the marker exists (the rescoring after a restart) it returns at once. The stall ends early if
    the parent process dies."""
    marker = sample.metadata.get("stall_marker")
    if marker and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        parent, deadline = os.getppid(), time.monotonic() + stall_s
        while time.monotonic() < deadline and os.getppid() == parent:
            time.sleep(0.05)
    return float(sample.metadata["index"])


@reward
def exit_process(sample: Sample) -> float:
    """Ends the process that calls it: with in-process scoring, the reward actor itself dies on every try."""
    os._exit(7)
