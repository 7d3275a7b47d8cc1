"""Weight sync learner → rollout: the wire formats, the CPU object-store path into vLLM, and (GPU only) NCCL.

The CPU test first shows that after a training step vLLM's log-probs of a fixed sequence do NOT match the learner's
(so the check can fail), then that they match to 1e-4 after ``sync_from`` (float32 both sides; measured ~1e-6).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from cascade_rl.actors.group import LearnerGroup, RolloutGroup
from cascade_rl.actors.weight_sync import (
    flatten_bucket,
    iter_buckets,
    pack_named_tensors,
    unflatten_bucket,
    unpack_named_tensors,
    with_tied_head,
)

from cascade_rl.types import SequenceBatch

SYNC_TOL = 1e-4


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True))


# ------------------------------------------------------------------------------------------------ wire formats


def test_pack_roundtrip_keeps_dtypes_and_unties_shared_storage() -> None:
    emb = torch.randn(6, 4)
    named = [("model.embed_tokens.weight", emb), ("lm_head.weight", emb),  # tied: one storage
             ("model.norm.weight", torch.randn(4).to(torch.bfloat16)), ("x.t", torch.randn(4, 6).t())]
    back = dict(unpack_named_tensors(pack_named_tensors(named)))
    assert set(back) == {n for n, _ in named}
    for name, t in named:
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_buckets_flatten_and_unflatten_exactly() -> None:
    named = [("a", torch.randn(3, 5)), ("b", torch.arange(7, dtype=torch.int64)),
             ("c", torch.randn(2, 2).to(torch.bfloat16)), ("d", torch.randn(100))]
    buckets = list(iter_buckets(named, bucket_bytes=64))
    # a: 60 B | b: 56 B + c: 8 B = 64 B | d: 400 B, alone (bigger than a bucket)
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["b", "c"], ["d"]]
    for bucket in buckets:
        meta, flat = flatten_bucket(bucket)
        assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * t.element_size() for _, t in bucket)
        for (name, t), (name2, t2) in zip(bucket, unflatten_bucket(meta, flat), strict=True):
            assert name == name2 and t2.dtype == t.dtype and torch.equal(t, t2)


class _Rank:
    """A learner rank's ``WeightSender`` half: ``named_weights_for_sync`` counts its passes (each pass is one
    round of ZeRO-3 gathers, which every rank must run together)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.device, self.passes = rank, torch.device("cpu"), 0
        self.weights = [("a", torch.randn(3, 5)), ("b", torch.randn(4).to(torch.bfloat16))]

    def named_weights_for_sync(self, bucket_bytes: int, *, device: Any = "cpu", all_ranks: bool = False) -> Any:
        self.passes += 1
        for name, t in self.weights:
            yield [(name, t.to(device))]


def test_persistent_ipc_staging_runs_the_same_collective_passes_on_paired_and_unpaired_ranks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """More learner ranks than colocated workers: the paired rank lays out its buffers with one more pass over the
    weights; under ZeRO-3 the unpaired rank must run it too (it used to skip it and the gathers hung)."""
    from cascade_rl.actors import weight_sync

    class Sender(weight_sync.WeightSender, _Rank):
        pass

    class Stream:
        def synchronize(self) -> None: ...

    monkeypatch.setattr(weight_sync, "share_bucket", lambda flat: b"handle")  # CUDA IPC, not on a CPU
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    paired, unpaired = Sender(0), Sender(1)
    for _ in range(2):
        staged = [paired.stage_weights_ipc(True), unpaired.stage_weights_ipc(False)]
        assert paired.passes == unpaired.passes
    assert unpaired.passes == 3 and staged[1]["buffers"] == [] and len(staged[0]["buffers"]) == 2
    assert all(torch.equal(paired._ipc_buffers.views[n], t) for n, t in paired.weights)


def test_with_tied_head_adds_the_head_only_when_tied_and_missing() -> None:
    emb = torch.ones(2)
    named = [("model.embed_tokens.weight", emb), ("model.norm.weight", emb)]
    assert [n for n, _ in with_tied_head(named, tied=True)][-1] == "lm_head.weight"
    assert len(list(with_tied_head(named, tied=False))) == 2
    vlm = [("language_model.model.embed_tokens.weight", emb)]
    assert [n for n, _ in with_tied_head(vlm, tied=True)][-1] == "language_model.lm_head.weight"
    assert len(list(with_tied_head([*named, ("lm_head.weight", emb)], tied=True))) == 3


# ------------------------------------------------------------------------------------------------ CPU path


@pytest.mark.slow
def test_sync_learner_weights_into_vllm(vllm_rollout: RolloutGroup, learner1: LearnerGroup, generated: Any,
                                        make_policy_batch: Any) -> None:
    batch = make_policy_batch(generated)
    learner1.train_policy(batch, loss="gspo", clip_low=0.2, clip_high=0.2)  # lr 1e-2: weights move
    fixed = batch.select([0, 5, 10])
    learner = learner1.compute_logprobs(SequenceBatch(fixed.prompt_token_ids, fixed.response_token_ids))
    before = vllm_rollout.compute_logprobs(fixed.prompt_token_ids, fixed.response_token_ids)
    assert _max_diff(before, learner) > 100 * SYNC_TOL  # stale weights: the check below can fail

    seconds = vllm_rollout.sync_from(learner1, version=1)
    after = vllm_rollout.compute_logprobs(fixed.prompt_token_ids, fixed.response_token_ids)
    assert _max_diff(after, learner) < SYNC_TOL, _max_diff(after, learner)
    assert 0 < seconds < 30
    assert vllm_rollout.policy_versions() == [1]
    out = vllm_rollout.generate([([{"role": "user", "content": "What is 2 + 2?"}], [])], 2)
    assert {g.policy_version for g in out.generations} == {1} and out.policy_version == 1
    # generation also uses the new weights (prefix cache reset): behaviour log-probs == learner's
    new = learner1.compute_logprobs(SequenceBatch([g.prompt_token_ids for g in out.generations],
                                                  [g.token_ids for g in out.generations]))
    assert _max_diff(new, [g.logprobs for g in out.generations]) < SYNC_TOL


# The GPU (NCCL) path is tested in test_gpu_weight_sync.py (marker gpu; run on a 2-GPU host).
