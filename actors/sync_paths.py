"""Weight sync learner group → rollout group, driver side: one class per path behind one interface.

``choose_sync_path(learners, rollout)`` picks the path once (``RolloutGroup.connect``; ``build_groups`` calls it
when the groups are built, ``RolloutGroup.sync_from`` on first use otherwise):

| path | when | class |
|---|---|---|
| NCCL | GPU learners, vLLM workers on other GPUs (split placement) | ``NcclSync`` |
| CUDA IPC | colocated: vLLM worker i on the GPU of learner rank i | ``IpcSync`` |
| object store | anything else (CPU, the HF backend, unpaired GPUs) | ``ObjectStoreSync`` |

Tensor parallelism (``rollout.tensor_parallel_size``): NCCL and the object store feed every vLLM process of an
engine (each loads its shard from the full weights); colocated CUDA IPC can't and is refused (``ipc_refusal``).

Each class owns its protocol end to end: which learner-rank and rollout-worker methods run, in which order (the
worker-process halves live in ``weight_sync.py``: ``WeightSender`` in the learner actor, ``WeightSyncExtension`` in
vLLM's workers). Interface: ``sync(version, bucket_mb)`` returns ``{"sync_bytes", "broadcast_s", "receive_s"}``
(the learner's and the rollout side's seconds; empty for the object store), ``restarted(i)`` brings a replaced
rollout worker ``i`` to the current version. All buckets come from the learner's one bucket iterator,
``LearnerWorker.named_weights_for_sync``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import ray

logger = logging.getLogger(__name__)


class SyncPath(Protocol):
    name: str

    def sync(self, version: int, bucket_mb: int) -> dict[str, float]: ...
    def restarted(self, i: int, version: int) -> None: ...


class ObjectStoreSync:
    """Learner rank 0's weights → one ObjectRef → every worker's ``update_weights`` (kept for restarted workers)."""

    name = "object_store"

    def __init__(self, learners: Any, rollout: Any) -> None:
        self.learners, self.rollout = learners, rollout
        self.ref: ray.ObjectRef | None = None

    def sync(self, version: int, bucket_mb: int) -> dict[str, float]:
        self.ref = self.learners.weights_ref(bucket_mb)
        self.rollout.version = version  # what a worker restarted from now on loads
        workers = self.rollout.workers
        self.rollout._gather([w.update_weights.remote(self.ref, version) for w in workers],
                             lambda i: self.rollout.workers[i].get_policy_version.remote())  # a restart loaded them
        return {}

    def restarted(self, i: int, version: int) -> None:
        if self.ref is not None:
            ray.get(self.rollout.workers[i].update_weights.remote(self.ref, version))


def nccl_ranks(sizes: list[int]) -> tuple[list[int], int]:
    """First rank of each rollout worker in the NCCL sync group, and the group's size: rank 0 is learner rank 0,
    then every vLLM process of every engine (``sizes[i]`` = worker i's tensor-parallel size), so each
    tensor-parallel shard receives the broadcast and loads its own slice of it."""
    offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
    return offsets, 1 + sum(sizes)


def ipc_refusal(sizes: list[int]) -> str | None:
    """Why colocated CUDA IPC sync can't serve engines of these tensor-parallel sizes (None: it can). The IPC path
    pairs one vLLM process with the learner rank on its GPU; an engine of several processes spans GPUs that no
    single learner rank holds, and the object store would be a silent slowdown, so this is refused."""
    tp = max(sizes, default=1)
    if tp <= 1:
        return None
    return (f"colocated weight sync (CUDA IPC) pairs one vLLM process with the learner rank on its GPU, but the "
            f"rollout engines run {tp} tensor-parallel processes (rollout.tensor_parallel_size={tp}); set "
            "rollout.placement=split (NCCL feeds every tensor-parallel process) or rollout.tensor_parallel_size=1")


class NcclSync:
    """One NCCL group: learner rank 0 broadcasts each bucket to every vLLM worker process (formed at first sync)."""

    name = "nccl"

    def __init__(self, learners: Any, rollout: Any) -> None:
        self.learners, self.rollout = learners, rollout
        self.ready = False

    def _form_group(self) -> None:
        sender, workers = self.learners.workers[0], self.rollout.workers
        addr, port = ray.get(sender.weight_sync_endpoint.remote())
        offsets, world = nccl_ranks(ray.get([w.num_sync_ranks.remote() for w in workers]))
        ray.get([sender.init_weight_sync.remote(addr, port, world)]
                + [w.init_weight_sync.remote(addr, port, off, world) for w, off in zip(workers, offsets, strict=True)])
        self.ready = True

    def sync(self, version: int, bucket_mb: int) -> dict[str, float]:
        if not self.ready:
            self._form_group()
        ranks, workers = self.learners.workers, self.rollout.workers
        out = ray.get([w.broadcast_weights.remote(bucket_mb) for w in ranks]
                      + [w.receive_weights.remote(version) for w in workers])
        sent, received = out[0], out[len(ranks):]  # rank 0's {"sync_bytes", "sync_s"}; seconds per worker
        return {"sync_bytes": sent["sync_bytes"], "broadcast_s": sent["sync_s"], "receive_s": max(received)}

    def restarted(self, i: int, version: int) -> None:
        self.ready = False  # the group lost a member: form it again
        self.sync(version, self.rollout.last_bucket_mb)


class IpcSync:
    """CUDA IPC between learner rank i and the vLLM worker on its GPU; ``rollout.ipc_mode`` picks the variant:
    ``persistent`` (flat per-dtype buffers mapped once, weights copied in per sync: two calls per sync) or
    ``buckets`` (a buffer and an IPC handle per bucket, per sync: less GPU memory)."""

    name = "ipc"

    def __init__(self, learners: Any, rollout: Any) -> None:
        self.learners, self.rollout = learners, rollout
        self.mapped: set[int] = set()  # workers that mapped the learners' persistent buffers

    def sync(self, version: int, bucket_mb: int) -> dict[str, float]:
        if self.rollout.ipc_mode == "persistent":
            return self._persistent(version, bucket_mb)
        ranks, workers = self.learners.workers, self.rollout.workers
        ray.get([w.begin_shared_load.remote() for w in workers])
        paired = [workers[i] if i < len(workers) else None for i in range(len(ranks))]
        sent = ray.get([rank.share_weights.remote(w, bucket_mb) for rank, w in zip(ranks, paired, strict=True)])
        t0 = time.perf_counter()
        ray.get([w.end_shared_load.remote(version) for w in workers])
        return {"sync_bytes": sent[0]["sync_bytes"], "broadcast_s": max(s["sync_s"] for s in sent),
                "receive_s": time.perf_counter() - t0}

    def _persistent(self, version: int, bucket_mb: int) -> dict[str, float]:
        ranks, workers = self.learners.workers, self.rollout.workers
        staged = ray.get([rank.stage_weights_ipc.remote(i < len(workers), bucket_mb) for i, rank in enumerate(ranks)])
        t0 = time.perf_counter()
        how = ray.get([w.load_persistent.remote(None if i in self.mapped else staged[i]["buffers"], version)
                       for i, w in enumerate(workers)])
        self.mapped = set(range(len(workers)))
        loads = [h for per_worker in how for h in per_worker]
        return {"sync_bytes": staged[0]["sync_bytes"], "broadcast_s": max(s["sync_s"] for s in staged),
                "receive_s": time.perf_counter() - t0,
                "replayed_share": sum(h == "replayed" for h in loads) / max(len(loads), 1)}

    def restarted(self, i: int, version: int) -> None:
        self.mapped.discard(i)  # a new process maps the buffers again
        self.sync(version, self.rollout.last_bucket_mb)


def choose_sync_path(learners: Any, rollout: Any) -> SyncPath:
    """The path for these two groups (see the module docstring); asks the actors' GPUs once for CUDA IPC."""
    vllm_on_gpu = learners.uses_gpu and rollout.placement.num_gpus > 0 and rollout.spec.backend == "vllm"
    if vllm_on_gpu and not rollout.placement.shared_gpu:
        return NcclSync(learners, rollout)
    if vllm_on_gpu:
        refusal = ipc_refusal(ray.get([w.num_sync_ranks.remote() for w in rollout.workers]))
        if refusal:
            raise ValueError(refusal)
    if vllm_on_gpu and len(rollout.workers) <= len(learners.workers):
        mine = ray.get([w.gpu_uuid.remote() for w in rollout.workers])
        theirs = ray.get([learners.workers[i].gpu_uuid.remote() for i in range(len(rollout.workers))])
        if None not in mine and mine == theirs:
            return IpcSync(learners, rollout)
        logger.warning("colocated weight sync falls back to the Ray object store: rollout worker GPUs %s are not "
                       "those of learner ranks 0..%d (%s)", mine, len(mine) - 1, theirs)
    return ObjectStoreSync(learners, rollout)
