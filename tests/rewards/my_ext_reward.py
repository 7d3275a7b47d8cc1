"""Rewards defined outside the package, referenced as ``my_ext_reward:<function>`` by the tests.

Besides a normal reward, these misbehave on purpose on samples whose metadata asks for it, to show that one
sample's failure costs only that sample: raise, sleep for ever, return NaN / the wrong type, kill the process,
or hang deaf to signals (as C code that never returns to the interpreter does).
"""

from __future__ import annotations

import os
import signal
import time

from cascade_rl.rewards import reward

from cascade_rl.types import Sample


@reward
def shout(sample: Sample, *, bonus: float = 0.0) -> float:
    """1.0 + bonus when the response is all upper case."""
    return (1.0 if sample.response.isupper() else 0.0) + bonus


@reward
def index_echo(sample: Sample) -> dict[str, float]:
    """Echo the sample's index, so tests can check ordering; misbehaves on request (metadata["mode"])."""
    mode = sample.metadata.get("mode")
    if mode == "raise":
        raise RuntimeError("boom on purpose")
    if mode == "sleep":
        while True:
            time.sleep(1)
    if mode == "nan":
        return float("nan")
    if mode == "wrong_type":
        return "one"  # type: ignore[return-value]
    if mode == "exit":
        os._exit(3)
    if mode == "deaf_hang":  # like C code that never returns to the interpreter: the soft limit cannot stop it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        while True:
            time.sleep(1)
    return {"score": 1.0, "index": float(sample.metadata["index"])}


@reward(batched=True)
def batched_len(samples: list[Sample]) -> list[float]:
    """Batched: each response's length."""
    return [float(len(s.response)) for s in samples]



@reward(batched=True)
def batched_wrong_length(samples: list[Sample]) -> list[float]:
    """Batched, buggy: one value too few."""
    return [1.0] * (len(samples) - 1)

