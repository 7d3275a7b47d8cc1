"""Benchmark: math_verify checks/s with the reward worker pool vs a serial in-process loop.

    python bench/bench_rewards.py                   # 2,000 samples, 2 workers, ~10 s on a 2-core CPU
    python bench/bench_rewards.py --num-workers 4 --num-samples 8000

The same samples (``--num-samples``: 500 problems x 4 responses, a GSPO-like group, about a third wrong, some
unboxed, a few unparseable) are scored three ways, each after a warm-up on other samples:
- ``serial``:   a plain loop calling ``math_verify_reward(sample)`` in this process (no limits, no isolation);
- ``inproc``:   ``RewardScorer(num_workers=0)`` (errors caught, soft time limit, in this process);
- ``pool``:     ``RewardScorer(num_workers=N)`` (spawned workers, hard deadlines); start-up time reported apart.
Every repeat scores a fresh sample set (seeds 100, 101, ...), the same for all three ways, so no way gains
from math-verify's parse caches on repeats (in RL every response is new). Time is the median over repeats.
The 1-minute load average is recorded: on a shared machine other processes take cores from the pool. Writes ``bench/results/rewards_cpu.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade_rl.rewards import RewardScorer  # noqa: E402
from cascade_rl.rewards.math_verify_reward import math_verify_reward  # noqa: E402

from cascade_rl.types import RewardTermConfig, Sample  # noqa: E402


def make_samples(n: int, seed: int, group: int = 4) -> list[Sample]:
    """``n`` responses to ``n / group`` fraction problems in a mix of answer styles."""
    rng = random.Random(seed)
    out = []
    p = q = 1
    for i in range(n):
        if i % group == 0:  # a new problem; its group of responses follows
            p, q = rng.randint(1, 99), rng.randint(2, 99)
        gold = f"\\frac{{{p}}}{{{q}}}"
        right = rng.random() < 0.65
        a, b = (p * 2, q * 2) if right else (p + 1, q)
        style = i % group
        response = [f"Let me compute step by step.\nSo the answer is \\boxed{{\\dfrac{{{a}}}{{{b}}}}}.",
                    f"We get {a}/{b}",
                    f"The result is ${a / b:.6f}$",
                    "I am not sure." if rng.random() < 0.2 else f"\\boxed{{{a}/{b}}}"][style]
        out.append(Sample(prompt=[{"role": "user", "content": f"Problem {i // group}"}], response=response,
                          ground_truth=gold, metadata={"index": i}))
    return out


def _timed(fn: Callable[[list[Sample]], list[float]], sets: list[list[Sample]]) -> tuple[float, list[float]]:
    """Median seconds of ``fn`` over the sample sets, and all its scores."""
    times, scores = [], []
    for samples in sets:
        t0 = time.perf_counter()
        scores += fn(samples)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), scores


def run(num_samples: int, num_workers: int, repeats: int, timeout_s: float) -> dict[str, object]:
    sets, warm = [make_samples(num_samples, seed=100 + r) for r in range(repeats)], make_samples(200, seed=1)
    load_before = os.getloadavg()[0]
    for s in warm:
        math_verify_reward(s)
    serial_s, serial = _timed(lambda xs: [float(math_verify_reward(s) or 0.0) for s in xs], sets)
    with RewardScorer([RewardTermConfig("math_verify", 1.0, {})], timeout_s=timeout_s, num_workers=0) as scorer:
        scorer.score(warm)
        inproc_s, inproc = _timed(lambda xs: [r.total for r in scorer.score(xs)], sets)
    t0 = time.perf_counter()
    with RewardScorer([RewardTermConfig("math_verify", 1.0, {})], timeout_s=timeout_s, num_workers=num_workers) as scorer:
        startup_s = time.perf_counter() - t0
        scorer.score(warm * num_workers)
        pool_s, pool = _timed(lambda xs: [r.total for r in scorer.score(xs)], sets)
    assert pool == serial == inproc, "pool, in-process and serial scores differ"
    return {
        "bench": "rewards", "device": "cpu", "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "config": {"num_samples": num_samples, "num_workers": num_workers, "repeats": repeats,
                   "timeout_s": timeout_s, "reward": "math_verify"},
        "load_avg_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "accuracy": sum(serial) / len(serial),
        "serial": {"time_s": serial_s, "checks_per_s": num_samples / serial_s},
        "inproc_scorer": {"time_s": inproc_s, "checks_per_s": num_samples / inproc_s},
        "pool": {"time_s": pool_s, "checks_per_s": num_samples / pool_s, "startup_s": startup_s},
        "speedup_pool_over_serial": serial_s / pool_s,
        "overhead_inproc_over_serial": inproc_s / serial_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rewards_cpu.json")
    args = parser.parse_args()
    result = run(args.num_samples, args.num_workers, args.repeats, args.timeout_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
