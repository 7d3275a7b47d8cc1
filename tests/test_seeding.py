"""``derive_seed``: one seed scheme, stable across processes, used by every sampler of a run."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cascade_rl.seeding import derive_seed

ROOT = Path(__file__).resolve().parents[1]


def test_derive_seed_is_stable_across_processes_and_unambiguous() -> None:
    code = "from cascade_rl.seeding import derive_seed; print(derive_seed(7, 'rollout', 3, 'p-1'))"
    outs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout.strip() for h in ("1", "2")}
    assert outs == {str(derive_seed(7, "rollout", 3, "p-1"))}
    assert derive_seed("a/b") != derive_seed("a", "b") and derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(0, "x", 1) != derive_seed(0, "x", "1")  # an index and a name never collide
    seeds = {derive_seed(0, "rollout", call, i) for call in range(20) for i in range(50)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(TypeError, match="float"):
        derive_seed(0, 1.5)


def test_samplers_of_a_run_use_derive_seed() -> None:
    from cascade_rl.stages.batching import epoch_order

    order = list(range(10))
    random.Random(derive_seed(3, "epoch", 1)).shuffle(order)
    assert epoch_order(10, 3, 1) == order
    # no module keeps its own arithmetic seed scheme
    for path in [*(ROOT / "actors").glob("*.py"), ROOT / "cascade_rl/stages/batching.py",
                 ROOT / "cascade_rl/data/pairs.py"]:
        text = path.read_text()
        for old in ("1_000_003", "100_003", "65_537", 'Random(f"'):
            assert old not in text, f"{path.name} has its own seed scheme ({old}); use derive_seed"
