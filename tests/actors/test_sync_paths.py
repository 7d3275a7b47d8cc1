"""GPU weight-sync paths, their logic run on the CPU with an in-memory wire instead of NCCL / CUDA IPC.

- NCCL: the bucket metadata crosses the TCP store once per sync group and bucket size (the first such sync);
  later syncs send one small header and the flat buffers, and the receiver rebuilds the same tensors from its copy
  of the layout.
- CUDA IPC: ``PersistentBuffers`` lays every weight out once per dtype; each sync copies the current weights in.
The real transports run in the ``gpu``-marked ``test_gpu_weight_sync.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from cascade_rl.actors.weight_sync import PersistentBuffers, WeightSender, WeightSyncExtension


class Wire:
    """broadcast_obj / broadcast between one sender and one receiver, in order."""

    def __init__(self) -> None:
        self.objs: list[Any] = []
        self.bufs: list[torch.Tensor] = []
        self.num_objs_sent = 0

    def pg(self, sending: bool) -> Any:
        def broadcast_obj(obj: Any, src: int) -> Any:
            if sending:
                self.objs.append(obj)
                self.num_objs_sent += 1
                return obj
            return self.objs.pop(0)
        return SimpleNamespace(broadcast_obj=broadcast_obj)

    def comm(self, sending: bool) -> Any:
        def broadcast(t: torch.Tensor, src: int, stream: Any = None) -> None:
            if sending:
                self.bufs.append(t.clone())
            else:
                t.copy_(self.bufs.pop(0))
        return SimpleNamespace(broadcast=broadcast)


def _weights(scale: float) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("model.embed_tokens.weight", torch.randn(8, 4, generator=g) * scale),
            ("model.layers.0.w", torch.randn(4, 4, generator=g).to(torch.bfloat16) * scale),
            ("model.norm.weight", torch.randn(4, generator=g) * scale)]


class FakeLearner(WeightSender):
    def __init__(self, wire: Wire) -> None:
        self.rank, self.device = 0, torch.device("cpu")
        self._cascade_sync = (wire.pg(True), wire.comm(True))
        self._cascade_layouts = {}
        self.named = _weights(1.0)

    def named_weights_for_sync(self, bucket_bytes: int, device: Any = "cpu", all_ranks: bool = False):
        yield self.named[:2]  # two buckets, whatever bucket_bytes
        yield self.named[2:]


class FakeVllmWorker(WeightSyncExtension):
    def __init__(self, wire: Wire) -> None:
        self.device = torch.device("cpu")
        self._cascade_sync = (wire.pg(False), wire.comm(False))
        self._cascade_layouts = {}
        self.loaded: list[tuple[str, torch.Tensor]] = []
        self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(
            hf_config=SimpleNamespace(tie_word_embeddings=False), hf_text_config=None))

    def reload_weights(self, weights_iterator: Any) -> None:
        self.loaded = [(n, t.clone()) for n, t in weights_iterator]


@pytest.fixture
def no_cuda_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)


def test_nccl_metadata_crosses_once_per_group_and_later_syncs_rebuild_the_same_tensors(no_cuda_waits: None) -> None:
    wire = Wire()
    learner, worker = FakeLearner(wire), FakeVllmWorker(wire)
    for scale in (1.0, 2.0):  # the second sync carries new values but no metadata
        learner.named = _weights(scale)
        sent = learner.broadcast_weights()
        assert worker.cascade_receive_weights() == 3
        assert [n for n, _ in worker.loaded] == [n for n, _ in learner.named]
        for (_, got), (_, want) in zip(worker.loaded, learner.named, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert sent["sync_bytes"] == sum(t.numel() * t.element_size() for _, t in learner.named)
    # first sync: header + 2 bucket metas + end marker; second: the header only
    assert wire.num_objs_sent == 4 + 1
    learner.broadcast_weights(bucket_mb=1)  # another bucket size: its layout is sent once too
    worker.cascade_receive_weights()
    assert wire.num_objs_sent == 5 + 4 and not wire.objs and not wire.bufs
    learner.named = [*_weights(1.0)[:1], ("model.layers.0.w", torch.zeros(2, 2)), *_weights(1.0)[2:]]
    with pytest.raises(RuntimeError, match="bucket layout changed"):
        learner.broadcast_weights()


def test_persistent_buffers_one_flat_buffer_per_dtype_refreshed_by_each_copy() -> None:
    named = _weights(1.0)
    layout = [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in named]
    buffers = PersistentBuffers(layout, "cpu")
    assert [[n for n, _, _ in m] for m in buffers.metas] == [["model.embed_tokens.weight", "model.norm.weight"],
                                                              ["model.layers.0.w"]]
    assert buffers.nbytes == (32 + 4) * 4 + 16 * 2  # float32: 36 values, bf16: 16
    for scale in (1.0, -3.0):
        named = _weights(scale)
        buffers.copy_in(named[:2])
        buffers.copy_in(named[2:])
        for n, t in named:
            assert torch.equal(buffers.views[n], t)
    with pytest.raises(RuntimeError, match="not in the persistent buffers"):
        buffers.copy_in([("model.new.weight", torch.zeros(1))])


def test_the_path_is_chosen_from_the_placement() -> None:
    from cascade_rl.actors.group import GroupPlacement
    from cascade_rl.actors.sync_paths import NcclSync, ObjectStoreSync, choose_sync_path

    def groups(learner_gpu: bool, rollout_gpus: float, shared: bool, backend: str = "vllm") -> tuple[Any, Any]:
        learners = SimpleNamespace(uses_gpu=learner_gpu, workers=[object()])
        rollout = SimpleNamespace(placement=GroupPlacement(rollout_gpus, 1, shared_gpu=shared), workers=[],
                                  spec=SimpleNamespace(backend=backend))
        return learners, rollout

    assert isinstance(choose_sync_path(*groups(True, 1.0, False)), NcclSync)  # split GPUs
    assert isinstance(choose_sync_path(*groups(False, 0.0, False)), ObjectStoreSync)  # CPU
    assert isinstance(choose_sync_path(*groups(True, 1.0, False, backend="hf")), ObjectStoreSync)  # HF engine


def test_nccl_sync_group_has_a_rank_for_every_tensor_parallel_process() -> None:
    from cascade_rl.actors.sync_paths import nccl_ranks

    # learner rank 0 is rank 0; engines of TP 2, 1 and 4 take ranks 1-2, 3, 4-7: 1 + 2 + 1 + 4 = 8 in all
    assert nccl_ranks([2, 1, 4]) == ([1, 3, 4], 8)
    assert nccl_ranks([1]) == ([1], 2)  # the 2-GPU split recipe: learner + one engine process


def test_colocated_ipc_refuses_tensor_parallel_engines_with_the_fix() -> None:
    from cascade_rl.actors.sync_paths import ipc_refusal

    assert ipc_refusal([1, 1]) is None
    why = ipc_refusal([1, 2])
    assert why is not None and "rollout.tensor_parallel_size=2" in why and "rollout.placement=split" in why
