"""Weight sync learner → rollout engines, version-tagged by the caller.

Three paths; the driver side of each is one class in ``sync_paths.py``, chosen once per pair of groups:

- **Object store** (CPU; the HF backend; any layout the other two don't cover). Learner rank 0 returns
  ``(name, tensor)`` pairs (all ranks take part: ZeRO-3 gathers are collective); the driver passes that one
  ObjectRef to every rollout worker. A vLLM worker packs the pairs into safetensors
  bytes (plain msgpack bytes, so no ``VLLM_ALLOW_INSECURE_SERIALIZATION`` is needed) and calls
  ``collective_rpc("cascade_load_packed")``; each vLLM worker process loads them with the model runner's
  ``reload_weights`` (layerwise reload), which re-runs the post-load weight processing. On CPU that matters:
  ``model.load_weights`` alone leaves the repacked copies that vLLM's CPU kernels read stale.
- **NCCL** (GPU, learner and vLLM on different GPUs; vLLM's RLHF example pattern). One group: rank 0 is learner
  rank 0, ranks ``1..`` the vLLM worker processes (``rank_offset`` + vLLM rank), made with vLLM's
  ``StatelessProcessGroup`` + ``PyNcclCommunicator`` so it does not touch either side's default process group.
  The learner packs ≤ ``bucket_mb`` of parameters into one flat uint8 buffer per bucket and sends it with an
  NCCL broadcast. Each sync starts with one small header (the bucket size) over the group's TCP store
  (``broadcast_obj``); only the first sync of a group with that bucket size also sends each bucket's
  ``(name, dtype, shape)`` list (``None`` ends it), which both sides keep for the later syncs. Receivers unflatten views and feed a lazy iterator to ``reload_weights``,
  so a bucket is freed once loaded and peak extra memory is one bucket.
- **CUDA IPC** (GPU, colocated: learner rank i and vLLM worker i share GPU i, where NCCL refuses two ranks on one
  device). Every learner rank paired with a worker flattens each bucket as above and hands its worker a CUDA IPC
  handle of the buffer (torch's ``reduce_tensor``, pickled with the GPU's UUID, which the receiver checks); the
  vLLM process maps the same memory (``rebuild_cuda_tensor``), loads views of it between vLLM's
  ``initialize_layerwise_reload`` / ``finalize_layerwise_reload`` and synchronises before the learner frees the
  bucket. No bytes leave the GPU; peak extra memory is one bucket. torch's IPC reference counting keeps a
  buffer alive while the receiver still maps it. That is ``RolloutGroup.ipc_mode="buckets"``; the default
  ``"persistent"`` keeps one flat buffer per dtype holding every weight on each paired learner rank
  (``PersistentBuffers``: one extra copy of the weights in GPU memory), which the worker maps once; a sync is then
  one fused copy into the buffers, one wait, and one reload call on the worker (``cascade_load_persistent``).
  That reload is vLLM's in-place one at the first sync only: the worker records it as a list of copies and checks
  the result against vLLM's reload (``copy_plan.py``); later syncs replay the copies (one ``_foreach_copy_``).

``WeightSyncExtension`` is mixed into vLLM's worker class (``LLM(worker_extension_cls=EXTENSION_QUALNAME)``);
``WeightSender`` is mixed into the learner actor by ``group.py``. GPU code here is exercised only by the
``gpu``-marked ``tests/actors/test_gpu_weight_sync.py`` and ``bench/bench_weight_sync.py``.
"""

from __future__ import annotations

import math
import pickle
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any

from .vllm_load import (
    is_tied,
    load_into_vllm_worker,
    load_persistent_views,
    model_and_config,
    quiet_reload_logger,
    with_tied_head,
)

EXTENSION_QUALNAME = "cascade_rl.actors.weight_sync.WeightSyncExtension"
DEFAULT_BUCKET_MB = 512

BucketMeta = list[tuple[str, str, tuple[int, ...]]]  # (name, dtype name, shape) per tensor of a bucket


# ------------------------------------------------------------------------------------------------ helpers


def find_free_port() -> int:
    """A TCP port free on this node right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def node_ip() -> str:
    """This node's address as Ray sees it (falls back to the hostname's)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray
        return socket.gethostbyname(socket.gethostname())


def pack_named_tensors(named: Iterable[tuple[str, Any]]) -> bytes:
    """``(name, tensor)`` pairs as safetensors bytes; tensors sharing storage (tied embeddings) are copied."""
    from safetensors.torch import save

    out: dict[str, Any] = {}
    seen: set[int] = set()
    for name, tensor in named:
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return save(out)


def unpack_named_tensors(payload: bytes) -> list[tuple[str, Any]]:
    from safetensors.torch import load

    return list(load(payload).items())


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def iter_buckets(named: Iterable[tuple[str, Any]], bucket_bytes: int) -> Iterator[list[tuple[str, Any]]]:
    """Group ``(name, tensor)`` pairs into lists of at most ``bucket_bytes`` (a larger tensor is its own bucket)."""
    bucket: list[tuple[str, Any]] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def bucket_layout(meta: BucketMeta) -> tuple[list[int], int]:
    """Byte offset of each tensor of a bucket and the bucket's total bytes. Each tensor starts at a multiple of its
    element size (a bf16 tensor of odd length before a float32 one gets one pad element), so every view is
    aligned; a single-dtype bucket has no padding."""
    import torch

    offsets, end = [], 0
    for _, dtype_name, shape in meta:
        size = torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
        end = -(-end // size) * size
        offsets.append(end)
        end += _numel(shape) * size
    return offsets, end


def flatten_bucket(bucket: list[tuple[str, Any]]) -> tuple[BucketMeta, Any]:
    """One contiguous uint8 buffer (N,) holding every tensor of the bucket (layout: ``bucket_layout``), and its
    metadata."""
    import torch

    meta = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in bucket]
    offsets, total = bucket_layout(meta)
    if total == sum(t.numel() * t.element_size() for _, t in bucket):  # no padding: one cat
        return meta, torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])
    flat = torch.zeros(total, dtype=torch.uint8, device=bucket[0][1].device)
    for (_, t), offset in zip(bucket, offsets, strict=True):
        nbytes = t.numel() * t.element_size()
        flat[offset:offset + nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return meta, flat


def unflatten_bucket(meta: BucketMeta, flat: Any) -> list[tuple[str, Any]]:
    """Views into ``flat`` for each ``(name, dtype, shape)`` of ``meta`` (inverse of ``flatten_bucket``)."""
    import torch

    offsets, _ = bucket_layout(meta)
    out = []
    for (name, dtype_name, shape), offset in zip(meta, offsets, strict=True):
        dtype = getattr(torch, dtype_name)
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        out.append((name, flat[offset:offset + nbytes].view(dtype).view(shape)))
    return out


class PersistentBuffers:
    """Every weight of one learner rank in one flat uint8 GPU buffer per dtype, laid out once (``bucket_layout``)
    and reused by every sync: a sync copies the weights in (``torch._foreach_copy_``) and the colocated engine,
    which mapped the buffers once through CUDA IPC, reads them. Costs one extra copy of the weights in GPU
    memory; buys a sync with no allocation, no per-bucket handle and one wait in all."""

    def __init__(self, layout: list[tuple[str, str, tuple[int, ...]]], device: Any) -> None:
        import torch

        by_dtype: dict[str, BucketMeta] = {}
        for name, dtype, shape in layout:
            by_dtype.setdefault(dtype, []).append((name, dtype, shape))
        self.metas = list(by_dtype.values())
        self.flats = [torch.empty(bucket_layout(m)[1], dtype=torch.uint8, device=device) for m in self.metas]
        self.views = {n: t for m, f in zip(self.metas, self.flats, strict=True) for n, t in unflatten_bucket(m, f)}
        self.nbytes = sum(int(f.numel()) for f in self.flats)
        self._handles: list[tuple[BucketMeta, bytes]] | None = None

    def copy_in(self, bucket: list[tuple[str, Any]]) -> None:
        import torch

        missing = [n for n, _ in bucket if n not in self.views]
        if missing:
            raise RuntimeError(f"CUDA IPC weight sync: weights {missing[:3]} are not in the persistent buffers "
                               "laid out at the first sync (the model's parameters changed)")
        torch._foreach_copy_([self.views[n] for n, _ in bucket], [t.detach() for _, t in bucket])

    def handles(self) -> list[tuple[BucketMeta, bytes]]:
        """``(meta, share_bucket payload)`` per buffer, made once."""
        if self._handles is None:
            self._handles = [(m, share_bucket(f)) for m, f in zip(self.metas, self.flats, strict=True)]
        return self._handles


def gpu_uuid(device: Any) -> str:
    """The physical GPU's UUID (the same in every process, whatever its ``CUDA_VISIBLE_DEVICES``)."""
    import torch

    return str(torch.cuda.get_device_properties(device).uuid)


STORAGE_DEVICE_ARG = 6  # position of the device index in the args of torch's reduce_tensor for CUDA tensors


def share_bucket(flat: Any) -> bytes:
    """A CUDA IPC handle of a GPU buffer (torch's ``reduce_tensor``), pickled with its GPU's UUID. The caller keeps
    ``flat`` alive until the receiver is done with it."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(flat)
    return pickle.dumps((gpu_uuid(flat.device), args))


def open_shared_bucket(payload: bytes, device: Any) -> Any:
    """The buffer of ``share_bucket``, mapped into this process on ``device``, which must be the same GPU."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuid, args = pickle.loads(payload)  # from our own learner actor, like every Ray call's arguments
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if gpu_uuid(index) != uuid:
        raise RuntimeError(f"CUDA IPC weight sync: the learner's buffer is on GPU {uuid}, this vLLM worker on "
                           f"{gpu_uuid(index)}; colocated placement must put learner rank i and rollout worker i "
                           "on the same GPU")
    args = list(args)
    if not isinstance(args[STORAGE_DEVICE_ARG], int):
        raise RuntimeError(f"torch {torch.__version__}: unexpected reduce_tensor layout for CUDA tensors")
    args[STORAGE_DEVICE_ARG] = index  # the sender's index may differ (its own CUDA_VISIBLE_DEVICES)
    return rebuild_cuda_tensor(*args)


def init_nccl_group(master_addr: str, master_port: int, rank: int, world_size: int, device: Any) -> tuple[Any, Any]:
    """(StatelessProcessGroup, PyNcclCommunicator) for the learner↔vLLM sync group; blocks until all ranks join."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=master_addr, port=master_port, rank=rank, world_size=world_size)
    return pg, PyNcclCommunicator(pg, device=device)


# ------------------------------------------------------------------------------------------------ vLLM side


class WeightSyncExtension:
    """Methods added to every vLLM worker process; call them with ``llm.collective_rpc(name, args=...)``."""

    def cascade_load_packed(self, payload: bytes) -> int:
        named = unpack_named_tensors(payload)
        load_into_vllm_worker(self, with_tied_head(named, is_tied(self)))
        return len(named)

    def cascade_init_weight_sync(self, master_addr: str, master_port: int, rank_offset: int,
                                 world_size: int) -> None:
        from vllm.distributed.parallel_state import get_world_group

        rank = rank_offset + get_world_group().rank
        self._cascade_sync = init_nccl_group(master_addr, master_port, rank, world_size, self.device)
        self._cascade_layouts: dict[Any, list[BucketMeta]] = {}  # bucket metadata per layout key, sent once

    def cascade_receive_weights(self) -> int:
        import torch

        pg, comm = self._cascade_sync
        count = 0
        key = pg.broadcast_obj(None, src=0)  # the learner's layout key (its bucket size)

        def metas() -> Iterator[BucketMeta]:
            if key in self._cascade_layouts:  # a layout seen before: buffers only
                yield from self._cascade_layouts[key]
                return
            layout = []
            while (meta := pg.broadcast_obj(None, src=0)) is not None:
                layout.append(meta)
                yield meta
            self._cascade_layouts[key] = layout

        def stream() -> Iterator[tuple[str, Any]]:
            nonlocal count
            for meta in metas():
                flat = torch.empty(bucket_layout(meta)[1], dtype=torch.uint8, device=self.device)
                comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
                count += len(meta)
                yield from unflatten_bucket(meta, flat)

        load_into_vllm_worker(self, with_tied_head(stream(), is_tied(self)))
        torch.cuda.synchronize()
        return count

    def cascade_gpu_uuid(self) -> str:
        return gpu_uuid(self.device)

    def cascade_begin_shared_load(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        quiet_reload_logger()
        initialize_layerwise_reload(model_and_config(self)[0])

    def cascade_load_shared(self, meta: BucketMeta, payload: bytes) -> int:
        import torch

        flat = open_shared_bucket(payload, self.device)
        model_and_config(self)[0].load_weights(with_tied_head(unflatten_bucket(meta, flat), is_tied(self)))
        torch.cuda.synchronize()  # every copy out of the learner's buffer is done before the learner frees it
        del flat
        return len(meta)

    def cascade_load_persistent(self, buffers: list[tuple[BucketMeta, bytes]] | None) -> str:
        """Reload every weight from the learner's persistent buffers (``PersistentBuffers``): ``buffers`` maps
        them (first sync, or after this process restarted); ``None`` reuses the mapping of an earlier call.
        Returns how: ``load_persistent_views``."""
        import torch

        if buffers is not None:
            flats = [open_shared_bucket(payload, self.device) for _, payload in buffers]
            self._cascade_sources = flats
            self._cascade_persistent = [pair for (meta, _), flat in zip(buffers, flats, strict=True)
                                        for pair in unflatten_bucket(meta, flat)]
            self._cascade_plan = None  # new sources: record the copies again
        if getattr(self, "_cascade_persistent", None) is None:
            raise RuntimeError("CUDA IPC weight sync: no persistent buffers mapped in this vLLM worker yet")
        how = load_persistent_views(self)
        torch.cuda.synchronize()  # the learner may overwrite the buffers once this returns
        return how

    def cascade_end_shared_load(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(*model_and_config(self))


# ------------------------------------------------------------------------------------------------ learner side


class WeightSender:
    """Mixed into the learner actor by ``group.py``. Needs the learner's ``rank``, ``device`` and
    ``named_weights_for_sync(bucket_bytes, device=...)``, which yields buckets of ``(checkpoint name, tensor)`` on
    rank 0 and empty buckets elsewhere, and is collective under ZeRO-3 (every rank must iterate it)."""

    rank: int
    device: Any
    named_weights_for_sync: Any  # LearnerWorker's method (not defined here: this mixin comes first in the MRO)

    def weight_sync_endpoint(self) -> tuple[str, int]:
        """(address, free port) on this node, for a process group with rank 0 here."""
        return node_ip(), find_free_port()

    def weights_for_sync(self, bucket_mb: int = DEFAULT_BUCKET_MB) -> list[tuple[str, Any]] | None:
        """Object-store path: rank 0 returns every weight on the CPU (Ray serialises it when the call returns, so
        tensors aliasing live weights are safe); other ranks take part in the gathers and return None."""
        named = [pair for bucket in self.named_weights_for_sync(bucket_mb << 20, device="cpu") for pair in bucket]
        return named if self.rank == 0 else None

    def gpu_uuid(self) -> str | None:
        """This rank's GPU (None on CPU): the group pairs it with a colocated rollout worker's."""
        import torch

        return gpu_uuid(self.device) if torch.device(self.device).type == "cuda" else None

    def share_weights(self, worker: Any | None, bucket_mb: int = DEFAULT_BUCKET_MB) -> dict[str, float]:
        """CUDA IPC path: every rank iterates its weights (ZeRO-3 gathers are collective); a rank paired with a
        rollout worker on its GPU flattens each bucket and has the worker load it through a CUDA IPC handle,
        one bucket at a time. Returns ``{"sync_bytes", "sync_s"}`` (zeros for an unpaired rank)."""
        import ray
        import torch

        t0, total = time.perf_counter(), 0
        for bucket in self.named_weights_for_sync(bucket_mb << 20, device=self.device, all_ranks=True):
            if worker is None or not bucket:
                continue
            meta, flat = flatten_bucket(bucket)
            ray.get(worker.load_shared_bucket.remote(meta, share_bucket(flat)))
            total += flat.numel()
            del flat, bucket
        torch.cuda.ipc_collect()  # free buffers whose last receiver let go only now
        return {"sync_bytes": float(total), "sync_s": time.perf_counter() - t0}

    def stage_weights_ipc(self, paired: bool, bucket_mb: int = DEFAULT_BUCKET_MB) -> dict[str, Any]:
        """CUDA IPC path, persistent buffers: copy this rank's weights into one flat buffer per dtype (allocated at
        the first call, then reused), wait for the copies, and return the buffers' ``(meta, IPC handle)`` list
        (a paired worker maps them once) with ``{"sync_bytes", "sync_s"}``. Every rank iterates its weights
        (ZeRO-3 gathers are collective); an unpaired rank copies nothing."""
        import torch

        t0 = time.perf_counter()
        buffers = getattr(self, "_ipc_buffers", None)
        if buffers is None and not getattr(self, "_ipc_laid_out", False):
            # the layout pass is collective under ZeRO-3 like the copy pass: every rank runs it, at its first call
            layout, self._ipc_laid_out = self._ipc_layout(bucket_mb), True
            buffers = self._ipc_buffers = PersistentBuffers(layout, self.device) if paired else None
        for bucket in self.named_weights_for_sync(bucket_mb << 20, device=self.device, all_ranks=True):
            if buffers is None or not bucket:
                continue
            buffers.copy_in(bucket)
        if buffers is None:
            return {"buffers": [], "sync_bytes": 0.0, "sync_s": time.perf_counter() - t0}
        torch.cuda.current_stream().synchronize()  # the one wait: the engine reads these bytes next
        return {"buffers": buffers.handles(), "sync_bytes": float(buffers.nbytes), "sync_s": time.perf_counter() - t0}

    def _ipc_layout(self, bucket_mb: int) -> list[tuple[str, str, tuple[int, ...]]]:
        """(checkpoint name, dtype, full shape) of every weight, in sync order (no data is touched)."""
        return [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape))
                for bucket in self.named_weights_for_sync(bucket_mb << 20, device="meta", all_ranks=True)
                for n, t in bucket]

    def init_weight_sync(self, master_addr: str, master_port: int, world_size: int) -> None:
        """NCCL path, rank 0 only: join the sync group as its rank 0."""
        self._cascade_sync = init_nccl_group(master_addr, master_port, 0, world_size, self.device)
        self._cascade_layouts: dict[Any, list[BucketMeta]] = {}  # per bucket size, sent with its first sync only

    def broadcast_weights(self, bucket_mb: int = DEFAULT_BUCKET_MB) -> dict[str, float]:
        """NCCL path: every rank iterates its weights (ZeRO-3 gathers); rank 0 broadcasts them bucket by bucket.
        Returns ``{"sync_bytes", "sync_s"}`` (zeros on other ranks)."""
        import torch

        t0, total = time.perf_counter(), 0
        sender = getattr(self, "_cascade_sync", None) if self.rank == 0 else None
        if self.rank == 0 and sender is None:
            raise RuntimeError("broadcast_weights before init_weight_sync: the rollout side would wait forever")
        layouts = getattr(self, "_cascade_layouts", {})
        layout = layouts.get(bucket_mb)
        first = layout is None
        if sender is not None:  # one small header per sync; the bucket metadata only the first time per layout
            sender[0].broadcast_obj(bucket_mb, src=0)
        sent: list[BucketMeta] = []
        for bucket in self.named_weights_for_sync(bucket_mb << 20, device=self.device):
            if sender is None or not bucket:
                continue
            meta, flat = flatten_bucket(bucket)
            if first:  # metadata goes over the TCP store once per group; later syncs send buffers only
                sender[0].broadcast_obj(meta, src=0)
            elif len(sent) >= len(layout) or meta != layout[len(sent)]:
                raise RuntimeError("NCCL weight sync: the weights' bucket layout changed since the first sync "
                                   "(another bucket_mb, or other parameters); the receivers expect the first one")
            sent.append(meta)
            sender[1].broadcast(flat, src=0, stream=torch.cuda.current_stream())
            total += flat.numel()
        if sender is not None:
            if first:
                sender[0].broadcast_obj(None, src=0)
                layouts[bucket_mb] = sent
            elif len(sent) != len(layout):
                raise RuntimeError(f"NCCL weight sync: {len(sent)} buckets, the first sync sent {len(layout)}")
            torch.cuda.synchronize()
        return {"sync_bytes": float(total), "sync_s": time.perf_counter() - t0}
