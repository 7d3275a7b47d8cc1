"""GPU only: weight sync learner → vLLM end to end, over NCCL (learner rank 0 on one GPU, the vLLM worker on
another: split placement) and over CUDA IPC (both on one GPU: colocated placement).

After ``RolloutGroup.sync_from``, vLLM's log-probs of fixed sequences must equal the learner's within
``TOL_MAX`` per token (and ``TOL_MEAN`` on average). Both sides run bfloat16 with different kernels (vLLM's
FlashAttention and sampler vs transformers' sdpa and the learner's chunked log-softmax), so equality is up to bf16
rounding, not bitwise. The check can fail: a training step first moves the learner's log-probs by more than
``STALE_MIN`` (5 x ``TOL_MAX``), which a stale engine would keep. Three syncs (several buckets, then one; the
later ones reuse the NCCL group formed by the first; over CUDA IPC the later ones replay the copies the first
recorded), and sampling after a sync uses the new weights (behaviour
log-probs == learner log-probs).

Needs CUDA vLLM, and 2 GPUs for the NCCL test (3 for its tensor-parallel variant, not yet run); run with ``pytest -m gpu tests/actors/test_gpu_weight_sync.py``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

TOL_MAX = 0.05  # max |Δ log-prob| per token after a sync (bf16 on both sides)
TOL_MEAN = 0.01  # mean |Δ log-prob| over all tokens after a sync
STALE_MIN = 5 * TOL_MAX  # one step at lr 1e-2 must move the learner by more than this (else the test can't fail)


def _diff(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    """(max, mean) |a - b| over all tokens."""
    d = [abs(x - y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True)]
    return max(d), sum(d) / len(d)


def _start_ray() -> bool:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vLLM")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False)
    return started


def _stop(started: bool, *groups: Any) -> None:
    import ray

    for group in groups:
        group.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(params=[1, 2], ids=["tp1", "tp2"])
def split_groups(request: Any, tiny_lm: Path, make_rollout_spec: Any,
                 make_learner_spec: Any) -> Iterator[tuple[Any, Any]]:
    """A 1-rank bf16 learner on one GPU and a 1-worker vLLM rollout group on others (split placement): one GPU,
    or two for a tensor-parallel engine (both of its processes must receive the broadcast)."""
    tp = request.param
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1 + tp:
        pytest.skip(f"needs {1 + tp} CUDA GPUs: NCCL refuses two ranks on one device")
    started = _start_ray()
    from cascade_rl.actors.group import LearnerGroup, RolloutGroup

    learners = LearnerGroup(make_learner_spec(tiny_lm, dtype="bfloat16"), num_ranks=1, num_gpus_per_rank=1)
    rollout = RolloutGroup(make_rollout_spec(tiny_lm, dtype="bfloat16", gpu_memory_utilization=0.3,
                                             tensor_parallel_size=tp), num_workers=1, num_gpus_per_worker=1)
    yield learners, rollout
    _stop(started, rollout, learners)


@pytest.fixture(params=[1, 2], ids=["1gpu", "2gpus"])
def colocated_groups(request: Any, tiny_lm: Path, make_rollout_spec: Any,
                     make_learner_spec: Any) -> Iterator[tuple[Any, Any]]:
    """Learner rank i and vLLM worker i sharing GPU i (colocated placement, fractional GPUs), on 1 and 2 GPUs."""
    n = request.param
    if not torch.cuda.is_available() or torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA GPU(s)")
    started = _start_ray()
    from cascade_rl.actors.group import LearnerGroup, RolloutGroup, make_placement

    placement = make_placement("colocated", num_learner_ranks=n, num_gpus_per_rank=0.5, num_rollout_workers=n,
                               num_gpus_per_worker=0.5)
    learners = LearnerGroup(make_learner_spec(tiny_lm, dtype="bfloat16"), num_ranks=n, placement=placement.learner)
    rollout = RolloutGroup(make_rollout_spec(tiny_lm, dtype="bfloat16", gpu_memory_utilization=0.3), num_workers=n,
                           placement=placement.rollout)
    yield learners, rollout
    _stop(started, rollout, learners)
    placement.remove()


def check_syncs(learners: Any, rollout: Any, prompts: Any, make_policy_batch: Any, path: str) -> None:
    """Train, sync, compare (twice), then sample with the synced weights."""
    from cascade_rl.types import SequenceBatch

    batch = make_policy_batch(rollout.generate(prompts[:4], 4))  # 16 sequences, ±1 advantages
    fixed = SequenceBatch(batch.prompt_token_ids, batch.response_token_ids)

    def vllm_logprobs(worker: int = 0) -> list[list[float]]:
        return rollout.compute_logprobs(fixed.prompt_token_ids, fixed.response_token_ids, worker=worker)

    def worst(learner: list[list[float]]) -> tuple[float, float]:
        """(max, mean) |Δ| of the worst worker: every engine must hold the new weights."""
        ds = [_diff(vllm_logprobs(w), learner) for w in range(len(rollout.workers))]
        return max(d[0] for d in ds), max(d[1] for d in ds)

    start = _diff(vllm_logprobs(), learners.compute_logprobs(fixed))
    print(f"same checkpoint on both sides: (max, mean) |Δ log-prob| = {start}")
    assert start[0] < TOL_MAX, f"same checkpoint, yet max |Δ| = {start[0]:.4f} before any training"

    # tiny buckets (several per model), then one bucket; CUDA IPC records its copies at v1 and replays them after
    for version, bucket_mb in ((1, 1), (2, 512), (3, 512)):
        learners.train_policy(batch, loss="gspo", clip_low=0.2, clip_high=0.2)
        learner = learners.compute_logprobs(fixed)
        stale = _diff(vllm_logprobs(), learner)
        assert stale[0] > STALE_MIN, f"a step moved log-probs by only {stale[0]:.4f}: the check could not fail"

        seconds = rollout.sync_from(learners, version=version, bucket_mb=bucket_mb)
        after = worst(learner)
        print(f"{path} sync v{version} ({bucket_mb} MiB buckets): {seconds:.3f} s, |Δ| start {start}, "
              f"stale {stale}, after {after}, sides {rollout.last_sync_sides}")
        assert rollout.last_sync_path == path
        assert after[0] < TOL_MAX and after[1] < TOL_MEAN, after
        assert rollout.policy_versions() == [version] * len(rollout.workers)
        assert rollout.last_sync_sides["sync_bytes"] > 0
        if path == "ipc":  # persistent buffers: vLLM's reload (and the recording) first, then the recorded copies
            assert rollout.last_sync_sides["replayed_share"] == (0.0 if version == 1 else 1.0)

    out = rollout.generate(prompts[4:8], 2)  # spread over every worker
    assert {g.policy_version for g in out.generations} == {version}  # the last sync's
    sampled = SequenceBatch([g.prompt_token_ids for g in out.generations], [g.token_ids for g in out.generations])
    behaviour = _diff([g.logprobs for g in out.generations], learners.compute_logprobs(sampled))
    assert behaviour[0] < TOL_MAX, f"sampling after the sync used other weights: |Δ| = {behaviour}"


def test_nccl_sync_makes_vllm_logprobs_equal_the_learners(split_groups: tuple[Any, Any], prompts: Any,
                                                          make_policy_batch: Any) -> None:
    check_syncs(*split_groups, prompts, make_policy_batch, "nccl")


def test_cuda_ipc_sync_makes_colocated_vllm_logprobs_equal_the_learners(colocated_groups: tuple[Any, Any],
                                                                        prompts: Any,
                                                                        make_policy_batch: Any) -> None:
    check_syncs(*colocated_groups, prompts, make_policy_batch, "ipc")
