"""``LearnerWorker`` checkpoints and Hugging Face export (a mixin of ``learner.py``'s worker, same ``self``).

Checkpoints
    ``save_checkpoint`` writes DeepSpeed's state (weights, optimizer, this worker's schedule and MPO reward shift
    in the client state) and then, after a barrier, a ``COMPLETE`` marker on rank 0; ``load_checkpoint`` refuses
    a folder without it, so a half-written checkpoint is never picked up. (A marker rather than temp-dir-and-rename:
    each rank writes its own shard files, which a rename on rank 0 cannot cover on a non-shared filesystem.)
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from .learner_batches import LRSchedule, copy_tokenizer_files

COMPLETE = "COMPLETE"  # marker file written last into a finished learner checkpoint


class LearnerCheckpointMixin:
    spec: Any
    rank: int
    model: Any
    engine: Any
    reward_shift: Any
    global_step: int
    _schedule: LRSchedule
    _schedule_step: int

    # ------------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self, folder: str, client_state: dict) -> None:
        """DeepSpeed state + ``client_state`` + schedule + reward shift; ``COMPLETE`` is written last."""
        import torch.distributed as dist

        path = Path(folder)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            (path / COMPLETE).unlink(missing_ok=True)
        dist.barrier()
        state = {"cascade_rl": {"client_state": client_state, "reward_shift": self.reward_shift.state_dict(),
                                "schedule": asdict(self._schedule), "schedule_step": self._schedule_step,
                                "global_step": self.global_step}}
        self.engine.save_checkpoint(str(path), tag="state", client_state=state, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            tmp = path / f".{COMPLETE}.tmp"
            tmp.write_text(f"global_step={self.global_step}\n")
            os.replace(tmp, path / COMPLETE)
        dist.barrier()

    def load_checkpoint(self, folder: str) -> dict:
        """Restore weights, optimizer, schedule and reward shift; return the ``client_state`` given at save."""
        path = Path(folder)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete learner checkpoint (no {COMPLETE} marker): it was "
                                    "never finished; resume from an earlier checkpoint")
        load_path, states = self.engine.load_checkpoint(str(path), tag="state", load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
        if load_path is None or "cascade_rl" not in (states or {}):
            raise RuntimeError(f"DeepSpeed could not load the learner checkpoint in {path} (same learner.zero_stage "
                               "and number of ranks as when it was saved?)")
        ours = states["cascade_rl"]
        self.reward_shift.load_state_dict(ours["reward_shift"])
        self._schedule = LRSchedule(**ours["schedule"])
        self._schedule_step = int(ours["schedule_step"])
        self.global_step = int(ours["global_step"])
        self._apply_lr()
        return ours["client_state"]

    def export_hf(self, folder: str) -> None:
        """Rank 0 writes a Hugging Face folder (config, safetensors, tokenizer/processor files), atomically."""
        import torch.distributed as dist

        state = self._gathered_state_dict()
        if self.rank == 0:
            target = Path(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
            self.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            copy_tokenizer_files(Path(self.spec.model_path), tmp)
            if target.exists():
                old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        dist.barrier()

    def _gathered_state_dict(self) -> dict[str, Tensor]:
        """Full weights on the CPU of rank 0 (empty elsewhere); ZeRO-3 gathers bucket by bucket."""
        state: dict[str, Tensor] = {}
        names = {v: k for k, v in self._checkpoint_names().items()}  # checkpoint name -> module name
        for bucket in self.named_weights_for_sync(device="cpu", include_frozen=True):
            for ckpt_name, t in bucket:
                state[names[ckpt_name]] = t
        if self.rank == 0:  # persistent buffers (ZeRO never partitions buffers)
            persistent = set(self.model.state_dict())
            state.update({n: b.detach().cpu() for n, b in self.model.named_buffers() if n in persistent})
        return state
