"""Run state and checkpoints: what ``resume=auto`` needs to continue exactly where a run stopped.

Layout under ``run_dir``::

    run_state.json                      MLflow run id, stage results (rewritten atomically)
    checkpoints/s<stage>-<name>/step-<N>/
        learner/                        DeepSpeed state (weights, optimizer, LR schedule, MPO reward shift)
        driver.json                     stage index, step, data position, policy version, RNG, log shard count
        COMPLETE                        written last: a checkpoint without it is never picked up
    rollouts/<stage>/shard-*.parquet    rollout logs (see cascade_rl.data.rollout_log)
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class DriverState:
    """Where the driver is: saved in every checkpoint."""

    stage_index: int = 0
    stage_step: int = 0  # steps of the current stage already done
    global_step: int = 0  # MLflow step counter across stages
    policy_version: int = 0
    num_log_shards: dict[str, int] = field(default_factory=dict)  # rollout-log folder -> shards at save
    rng: dict[str, Any] = field(default_factory=dict)
    stage_done: bool = False

    def capture_rng(self) -> None:
        """The driver's global RNG states (Python, NumPy, torch CPU), JSON-ready."""
        import numpy as np
        import torch

        version, internal, gauss = random.getstate()
        np_state: Any = np.random.get_state()  # the legacy 5-tuple
        kind, keys, pos, has_gauss, cached = np_state
        self.rng = {"python": [version, list(internal), gauss],
                    "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                    "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}

    def restore_rng(self) -> None:
        """Put back what ``capture_rng`` saved (states of an older format are left alone)."""
        import numpy as np
        import torch

        if isinstance(self.rng.get("python"), list):
            version, internal, gauss = self.rng["python"]
            random.setstate((version, tuple(internal), gauss))
        if isinstance(self.rng.get("numpy"), list):
            kind, keys, pos, has_gauss, cached = self.rng["numpy"]
            np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        if isinstance(self.rng.get("torch"), str):
            raw = np.frombuffer(base64.b64decode(self.rng["torch"]), dtype=np.uint8).copy()
            torch.set_rng_state(torch.from_numpy(raw))


@dataclass
class RunState:
    """Run-level facts that outlive checkpoints: the MLflow run and each finished stage's evaluation."""

    mlflow_run_id: str | None = None
    stage_results: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        path = run_dir / "run_state.json"
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / "run_state.json", asdict(self))


def checkpoint_dir(run_dir: Path, stage_index: int, stage_name: str, step: int) -> Path:
    return run_dir / "checkpoints" / f"s{stage_index:02d}-{stage_name}" / f"step-{step:06d}"


def list_complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (ordered by stage index, then step)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    found = [p for p in root.glob("s*-*/step-*") if (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: (p.parent.name.split("-")[0], p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = list_complete_checkpoints(run_dir)
    return done[-1] if done else None


def read_driver_state(ckpt: Path) -> DriverState:
    return DriverState(**json.loads((ckpt / "driver.json").read_text()))


def finish_checkpoint(ckpt: Path, state: DriverState, keep_last: int) -> None:
    """Write the driver state and the COMPLETE marker, then prune older checkpoints of the same stage."""
    write_json_atomic(ckpt / "driver.json", asdict(state))
    (ckpt / COMPLETE).write_text("ok\n")
    siblings = sorted(p for p in ckpt.parent.glob("step-*") if (p / COMPLETE).exists())
    for old in siblings[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for partial in ckpt.parent.glob("step-*"):
        if not (partial / COMPLETE).exists() and partial != ckpt:
            shutil.rmtree(partial, ignore_errors=True)
