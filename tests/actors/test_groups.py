"""Actor groups in a local Ray: vLLM generation, reward scoring, learner sharding, worker restarts.

Shares the session's one vLLM engine (``vllm_rollout``) and 1-rank learner (``learner1``) with
``test_weight_sync.py``; see ``conftest.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from cascade_rl.actors.group import (
    LearnerGroup,
    RewardGroup,
    RolloutGroup,
    make_placement,
    shard_by_tokens,
    split_evenly,
)

from cascade_rl.types import RewardTermConfig, Sample

G = 4

# ------------------------------------------------------------------------------------------------ pure helpers


def test_split_evenly_gives_contiguous_slices_differing_by_at_most_one() -> None:
    assert split_evenly(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_evenly(2, 3) == [(0, 1), (1, 2), (2, 2)]  # a worker may get nothing
    assert split_evenly(0, 2) == [(0, 0), (0, 0)]


def test_shard_by_tokens_balances_tokens_and_fills_every_rank() -> None:
    lengths = [100, 10, 10, 10, 60, 50, 5]  # 245 tokens
    shards = shard_by_tokens(lengths, 2)
    assert sorted(i for s in shards for i in s) == list(range(7)) and all(s == sorted(s) for s in shards)
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= 20, loads  # greedy: 100+10+10 | 60+50+10+5 -> 120 | 125
    # the lightest rank takes the next sequence, but an empty rank comes first: every rank gets one
    assert all(shard_by_tokens([1000, 1, 1], 3))
    with pytest.raises(ValueError, match="lower learner.num_ranks"):
        shard_by_tokens([5], 2)


# ------------------------------------------------------------------------------------------------ rollout (vLLM)


@pytest.mark.slow
def test_vllm_group_generates_g_samples_per_prompt(vllm_rollout: RolloutGroup, generated: Any, prompts: list,
                                                   tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    gens = generated.generations
    assert len(gens) == len(prompts) * G and generated.num_prompts == len(prompts)
    assert [(g.prompt_index, g.sample_index) for g in gens] == [(i, j) for i in range(len(prompts)) for j in range(G)]
    eos = {tok.eos_token_id, tok.pad_token_id}  # the tiny models' generation_config stops on both
    for g in gens:
        assert len(g.logprobs) == len(g.token_ids) >= 1
        assert all(lp <= 0 and math.isfinite(lp) for lp in g.logprobs)
        assert g.finish_reason in ("stop", "length") and g.policy_version == 0
        if g.finish_reason == "length":
            assert len(g.token_ids) == vllm_rollout.spec.max_response_tokens
        else:
            assert g.token_ids[-1] in eos
        text = tok.apply_chat_template(prompts[g.prompt_index][0], add_generation_prompt=True, tokenize=False)
        assert g.prompt_token_ids == tok(text, add_special_tokens=False)["input_ids"]
        assert g.num_prompt_tokens == len(g.prompt_token_ids)
    assert len({tuple(g.token_ids) for g in gens[:G]}) > 1  # n=G samples differ
    assert generated.num_output_tokens == sum(len(g.token_ids) for g in gens) and generated.generate_s > 0
    greedy = vllm_rollout.generate(prompts[:2], 2, greedy=True).generations
    assert greedy[0].token_ids == greedy[1].token_ids and greedy[2].token_ids == greedy[3].token_ids
    vllm_rollout.sleep()  # CPU: a logged no-op (vLLM sleep mode needs a GPU)
    vllm_rollout.wake_up()
    # a sampling key fixes the draw whatever happened before (what a resumed run relies on); another key differs
    ids = [[tuple(g.token_ids) for g in vllm_rollout.generate(prompts[:2], G, key=k).generations] for k in (7, 7, 8)]
    assert ids[0] == ids[1] and ids[0] != ids[2]


@pytest.mark.slow
def test_vllm_behaviour_logprobs_equal_the_learners(learner1: LearnerGroup, generated: Any,
                                                   make_policy_batch: Any) -> None:
    """Before any training both hold the start weights: vLLM's sampled-token log-probs are π_old."""
    batch = make_policy_batch(generated)
    learner = learner1.compute_logprobs(batch)
    diff = max(abs(a - b) for x, y in zip(learner, batch.old_logprobs, strict=True) for a, b in zip(x, y, strict=True))
    assert diff < 1e-4, diff  # float32 on both sides; measured ~1e-6


# ------------------------------------------------------------------------------------------------ rewards


@pytest.mark.slow
def test_reward_group_scores_in_order_and_survives_a_dead_worker(ray_session: None, generated: Any,
                                                                 prompts: list) -> None:
    import ray

    rewards = RewardGroup([RewardTermConfig("exact_match", 1.0, {}), RewardTermConfig("math_verify", 0.5, {})], timeout_s=5.0, num_workers=2,
                          correct_threshold=0.5)
    try:
        samples = [Sample(prompt=prompts[g.prompt_index][0], response=g.text, ground_truth="987654321")
                   for g in generated.generations]  # random text: never this answer
        # the last sample is correct; exact_match puts it at total 1 + 0.5 * 1
        samples[-1] = Sample(prompt=prompts[-1][0], response="7", ground_truth="7")
        results = rewards.score(samples)
        assert len(results) == len(samples)
        assert results[-1].correct is True and results[-1].total == pytest.approx(1.5)
        assert all(r.correct is False for r in results[:-1]) and all(r.total == 0.0 for r in results[:-1])
        assert set(results[0].components) == {"exact_match", "math_verify"}
        ray.kill(rewards.workers[1], no_restart=True)  # its half of the next batch hits a dead actor
        again = rewards.score(samples)
        assert rewards.num_restarts == 1
        assert [(r.total, r.correct) for r in again] == [(r.total, r.correct) for r in results]
        assert rewards.score([]) == []
    finally:
        rewards.shutdown()


# ------------------------------------------------------------------------------------------------ learners


@pytest.mark.slow
def test_learner_group_gspo_step_is_the_same_on_one_and_two_ranks(learner1: LearnerGroup, generated: Any,
                                                                   make_learner_spec: Any, make_policy_batch: Any,
                                                                   tiny_lm: Path) -> None:
    batch = make_policy_batch(generated)
    kwargs = dict(loss="gspo", clip_low=3e-4, clip_high=4e-4)
    two = LearnerGroup(make_learner_spec(tiny_lm), num_ranks=2)
    try:
        lp1, lp2 = learner1.compute_logprobs(batch), two.compute_logprobs(batch)
        m1, m2 = learner1.train_policy(batch, **kwargs), two.train_policy(batch, **kwargs)
        after1, after2 = learner1.compute_logprobs(batch), two.compute_logprobs(batch)
        # a batch smaller than the group still works for inference (ranks get a repeated sequence)
        assert len(two.compute_logprobs(batch.select([3]))) == 1
    finally:
        two.shutdown()
    assert max(abs(a - b) for x, y in zip(lp1, lp2, strict=True) for a, b in zip(x, y, strict=True)) < 1e-5
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-5)
    assert m1["num_tokens"] == m2["num_tokens"] == batch.num_tokens
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    # the step moved the policy, identically on both groups
    assert max(abs(a - b) for x, y in zip(lp1, after1, strict=True) for a, b in zip(x, y, strict=True)) > 1e-3
    assert max(abs(a - b) for x, y in zip(after1, after2, strict=True) for a, b in zip(x, y, strict=True)) < 1e-4


# ------------------------------------------------------------------------------------------------ restarts (HF)


@pytest.mark.slow
def test_rollout_group_restarts_a_dead_worker_at_the_current_version(learner1: LearnerGroup,
                                                                      make_rollout_spec: Any, tiny_lm: Path,
                                                                      prompts: list) -> None:
    import ray

    group = RolloutGroup(make_rollout_spec(tiny_lm, backend="hf"), num_workers=2)
    try:
        assert group.sync_from(learner1, version=5) > 0
        assert group.policy_versions() == [5, 5]
        ray.kill(group.workers[1], no_restart=True)
        out = group.generate(prompts, 2)  # worker 1's half fails, is restarted, re-synced and rerun
        assert [(g.prompt_index, g.sample_index) for g in out.generations] == [(i, j) for i in range(8)
                                                                             for j in range(2)]
        assert {g.policy_version for g in out.generations} == {5}
        seq = [(g.prompt_token_ids, g.token_ids) for g in out.generations[-2:]]  # from the restarted worker
        learner = learner1.compute_logprobs(_batch(seq))
        for (p, r), lp in zip(seq, learner, strict=True):
            restarted = group.compute_logprobs([p], [r], worker=1)[0]
            assert max(abs(a - b) for a, b in zip(restarted, lp, strict=True)) < 1e-4
    finally:
        group.shutdown()


def _batch(seqs: list[tuple[list[int], list[int]]]) -> Any:
    from cascade_rl.types import SequenceBatch

    return SequenceBatch(prompt_token_ids=[p for p, _ in seqs], response_token_ids=[r for _, r in seqs])


@pytest.mark.slow
def test_make_placement_validates_colocated_fractions(ray_session: None) -> None:
    with pytest.raises(ValueError, match="learner.num_gpus_per_rank \\+ rollout.num_gpus_per_worker <= 1"):
        make_placement("colocated", num_learner_ranks=1, num_gpus_per_rank=0.7, num_rollout_workers=1,
                       num_gpus_per_worker=0.5)
    cpu = make_placement("split", num_learner_ranks=2, num_gpus_per_rank=0, num_rollout_workers=1,
                         num_gpus_per_worker=0)
    try:
        assert cpu.mode == "cpu" and cpu.learner.options(1)["num_cpus"] == 0.01
        assert cpu.rollout.options(0) == {"num_cpus": 0, "num_gpus": 0}
    finally:
        cpu.remove()
