"""Rewards that misbehave in the ways users' rewards do (huge values, forked children, memory growth), referenced
as ``bad_rewards:<function>`` by the tests; spawned reward workers import them from this folder."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from cascade_rl.rewards import reward

from cascade_rl.types import Sample


@reward
def huge(sample: Sample) -> float | int | dict:
    """Returns what metadata["value"] names: a huge float, a huge int, or a dict holding one."""
    kind = sample.metadata.get("value")
    if kind == "float":
        return 1e308
    if kind == "int":
        return 10**400
    if kind == "dict":
        return {"score": 1.0, "bonus": 1e300}
    return 0.5


@reward
def forks(sample: Sample, *, pid_file: str) -> float:
    """Starts a child and a detached grandchild (``sh -c 'sleep &'``) and returns without waiting for them."""
    child = subprocess.Popen(["sleep", "60"])
    out = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    Path(pid_file).write_text(f"{child.pid} {out.stdout.strip()}")
    return 1.0


@reward
def grows(sample: Sample) -> float:
    """Allocates 64 MiB blocks until the allocation fails."""
    blocks = []
    while True:
        blocks.append(bytearray(64 * 2**20))


@reward
def oom_killed(sample: Sample) -> float:
    """Grows a little, then dies by SIGKILL as the kernel's out-of-memory killer kills a process."""
    ballast = bytearray(32 * 2**20)
    time.sleep(0.5)  # memory grows over time before the kernel steps in
    os.kill(os.getpid(), signal.SIGKILL)
    return float(len(ballast))


@reward
def needs_bonus(sample: Sample, *, bonus: float = 0.0) -> float:
    """Well-behaved, with one keyword argument (a recipe that misspells it must be caught)."""
    return bonus
