"""Run state and checkpoints: what ``resume=auto`` needs to continue exactly where a run stopped.

Layout under ``run_dir``::

    run_state.json                      MLflow run id, stage results (rewritten atomically)
    checkpoints/s<stage>-<name>/step-<N>/
        learner/                        DeepSpeed state (weights, optimizer, LR schedule, MPO reward shift)
        driver.json                     stage index, step, data position, policy version, RNG, log shard count
        COMPLETE                        written last: every file's size and BLAKE2b hash (JSON); a checkpoint
                                        without it, or whose files no longer match it, is never resumed from
    rollouts/<stage>/shard-*.parquet    rollout logs (see cascade_rl.data.rollout_log)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
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


def _file_digest(path: Path) -> str:
    """BLAKE2b (16-byte digest) of a file: in the standard library and about as fast as the disk reads."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE)


def checkpoint_manifest(ckpt: Path) -> dict[str, Any]:
    """What COMPLETE records: ``{"hash": "blake2b-128", "files": {relative path: [size, digest]}}``."""
    return {"hash": "blake2b-128", "files": {str(p.relative_to(ckpt)): [p.stat().st_size, _file_digest(p)]
                                             for p in _checkpoint_files(ckpt)}}


def verify_checkpoint(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (a file missing, truncated or changed), or None when it is intact.

    A COMPLETE marker of the older format (no manifest) is trusted as before.
    """
    try:
        manifest = json.loads((ckpt / COMPLETE).read_text())
    except (OSError, ValueError):
        return None  # the older "ok" marker: nothing to check against
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    for rel, (size, digest) in sorted(manifest["files"].items()):
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{rel} has {actual} bytes, {size} when the checkpoint was written (truncated or replaced)"
        if _file_digest(path) != digest:
            return f"{rel} has changed since the checkpoint was written (its blake2b hash differs)"
    return None


def latest_checkpoint(run_dir: Path, report: Callable[[str], None] | None = print) -> Path | None:
    """The newest complete checkpoint whose files match its manifest; each newer one skipped is reported."""
    for ckpt in reversed(list_complete_checkpoints(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        if report is not None:
            report(f"resume: skipping checkpoint {ckpt}: {problem}; trying the next older complete checkpoint")
    return None


def read_driver_state(ckpt: Path) -> DriverState:
    return DriverState(**json.loads((ckpt / "driver.json").read_text()))


def finish_checkpoint(ckpt: Path, state: DriverState, keep_last: int) -> None:
    """Write the driver state and the COMPLETE marker, then prune older checkpoints of the same stage."""
    write_json_atomic(ckpt / "driver.json", asdict(state))
    write_json_atomic(ckpt / COMPLETE, checkpoint_manifest(ckpt))
    siblings = sorted(p for p in ckpt.parent.glob("step-*") if (p / COMPLETE).exists())
    for old in siblings[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for partial in ckpt.parent.glob("step-*"):
        if not (partial / COMPLETE).exists() and partial != ckpt:
            shutil.rmtree(partial, ignore_errors=True)
