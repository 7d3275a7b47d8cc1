"""The stage loops against in-process fakes (tests/stages/fakes.py): seconds, no Ray, vLLM or DeepSpeed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fakes import FakeLearner, FakeReward, FakeRollout, make_ctx, make_prompts

from cascade_rl.config import GSPOConfig, StageConfig
from cascade_rl.stages import gspo as gspo_mod
from cascade_rl.stages.batching import epoch_order
from cascade_rl.stages.gspo import _prompts_for_step, _update, combine_minibatch_metrics, run_gspo
from cascade_rl.stages.rollout import run_rollout
from cascade_rl.stages.state import read_driver_state


def _gspo(**kw) -> StageConfig:
    return StageConfig(kind="gspo", name="gspo", gspo=GSPOConfig(clip_low=0.2, clip_high=0.2, **kw))


# ------------------------------------------------------------------ data position


def test_prompts_for_step_same_sequence_and_one_shuffle_per_epoch(monkeypatch):
    # 10 prompts, 4 per step, 8 steps = 32 positions = 3.2 epochs: epochs 0..3 each shuffled once (was 32 times)
    prompts = list(range(10))
    expected = [prompts[epoch_order(10, 7, pos // 10)[pos % 10]] for pos in range(32)]  # the old per-prompt rule
    calls = []

    def counting(n: int, seed: int, epoch: int) -> list[int]:
        calls.append(epoch)
        return epoch_order(n, seed, epoch)

    monkeypatch.setattr(gspo_mod, "epoch_order", counting)
    orders: dict[int, list[int]] = {}
    got = [p for step in range(8) for p in _prompts_for_step(prompts, step, 4, 7, orders)]
    assert got == expected
    assert calls == [0, 1, 2, 3]


# ------------------------------------------------------------------ mini-batches


def test_update_with_fewer_sequences_than_minibatches(tmp_path: Path):
    # 3 kept sequences (indices 1, 4, 6) dealt into 4 mini-batches: parts [1], [4], [6], [] -> 3 updates, 1 skipped.
    # fake metrics per update of one sequence: loss 1, ratio_min 0.99, ratio_max 1.01
    stage = _gspo(num_minibatches=4)
    ctx = make_ctx(tmp_path, [stage], make_prompts([1, 1]), group_size=4)
    out = ctx.rollout.generate(ctx.train_prompts, 4)
    learners: FakeLearner = ctx.learners  # type: ignore[assignment]
    metrics = _update(ctx, stage, out.generations, [0.0, 1.0, 0, 0, -1.0, 0, 0.5, 0], [1, 4, 6])
    trains = [kw for name, kw in learners.calls if name == "train_policy"]
    assert [t["n"] for t in trains] == [1, 1, 1]
    # on-policy: only the later parts [4] and [6] need π_old from the learner, in one pass before any update
    assert learners.names() == ["skip_lr_steps", "compute_logprobs", "train_policy", "train_policy", "train_policy"]
    assert learners.calls[1] == ("compute_logprobs", {"n": 2})
    assert [t["old_is_current"] for t in trains] == [True, False, False]
    assert learners.calls[0] == ("skip_lr_steps", {"num_steps": 1})
    assert learners.schedule_step == 4  # 3 updates + 1 skipped = num_minibatches
    assert metrics["train/loss"] == 1.0  # mean over the 3 updates run (was 3/4 = 0.75: divided by 4 slots)
    assert metrics["train/ratio_min"] == pytest.approx(0.99) and metrics["train/ratio_max"] == pytest.approx(1.01)
    # sequence tokens: sample 1 -> 2 tokens, 4 -> sample 0 of prompt 1 -> 1 token, 6 -> sample 2 -> 3 tokens
    assert [t["num_global_tokens"] for t in trains] == [2, 1, 3]


def test_first_on_policy_update_is_its_own_old_policy_and_the_gap_covers_every_part(tmp_path: Path):
    # kept [1, 4, 6] into 2 parts: [1, 6] and [4]. Tokens (lengths 1, 2, 3, 1, ... by sample index): seq 1 -> 2,
    # seq 6 -> sample 2 of prompt 1 -> 3, seq 4 -> sample 0 of prompt 1 -> 1.
    # Part 1 trains with old_is_current (no old-log-prob pass for it) and gets the engine's -0.25s to compare:
    # the fake's own forward says -0.75, gap 0.5 on 5 tokens. Part 2's π_old comes from compute_logprobs (-0.5):
    # gap |-0.25 - -0.5| = 0.25 on 1 token. Gap over all 6 tokens: (0.5 * 5 + 0.25 * 1) / 6 = 2.75 / 6.
    stage = _gspo(num_minibatches=2)
    ctx = make_ctx(tmp_path, [stage], make_prompts([1, 1]), group_size=4)
    ctx.learners = FakeLearner(logprob=-0.5, current_logprob=-0.75)
    out = ctx.rollout.generate(ctx.train_prompts, 4)
    metrics = _update(ctx, stage, out.generations, [0.0, 1.0, 0, 0, -1.0, 0, 0.5, 0], [1, 4, 6])
    learners: FakeLearner = ctx.learners
    assert learners.names() == ["compute_logprobs", "train_policy", "train_policy"]
    assert learners.calls[0] == ("compute_logprobs", {"n": 1})  # seq 4 only
    first, second = [kw for name, kw in learners.calls if name == "train_policy"]
    assert first["old_is_current"] and first["old_logprobs"] == [[-0.25] * 2, [-0.25] * 3]  # engine's, to compare
    assert not second["old_is_current"] and second["old_logprobs"] == [[-0.5]]
    assert metrics["rollout/behaviour_logprob_gap"] == pytest.approx(2.75 / 6)
    assert "train/behaviour_logprob_gap" not in metrics  # one gap, the stage's


def test_one_minibatch_on_policy_makes_no_old_logprob_pass(tmp_path: Path):
    # num_minibatches=1: the only update starts from π_old, so compute_logprobs is never called (was one full
    # forward of every kept sequence per step); the gap comes from the update itself: |-0.25 - -0.25| = 0
    stage = _gspo(num_minibatches=1)
    ctx = make_ctx(tmp_path, [stage], make_prompts([1, 1]), group_size=4)
    out = ctx.rollout.generate(ctx.train_prompts, 4)
    metrics = _update(ctx, stage, out.generations, [0.5] * 8, [0, 1, 2])
    learners: FakeLearner = ctx.learners  # type: ignore[assignment]
    assert learners.names() == ["train_policy"]
    assert metrics["rollout/behaviour_logprob_gap"] == 0.0


def test_an_empty_response_keeps_the_gap_and_the_overlap_update(tmp_path: Path):
    # seq 1 made empty (no tokens, no log-probs) beside seq 2 (3 tokens at -0.25). On-policy, one part: the fake's
    # own forward says -0.5, gap |-0.25 - -0.5| = 0.25 over the 3 tokens (the empty one adds none). With overlap
    # the empty row's π_old is its empty engine list
    for overlap in (False, True):
        stage = _gspo(num_minibatches=1, overlap=overlap)
        ctx = make_ctx(tmp_path / str(overlap), [stage], make_prompts([1, 1]), group_size=4)
        ctx.learners = FakeLearner(current_logprob=-0.5)
        gens = list(ctx.rollout.generate(ctx.train_prompts, 4).generations)
        gens[1] = dataclasses.replace(gens[1], token_ids=[], logprobs=[])
        metrics = _update(ctx, stage, gens, [0.5] * 8, [1, 2])
        (train,) = [kw for name, kw in ctx.learners.calls if name == "train_policy"]
        assert train["old_logprobs"] == [[], [-0.25] * 3]
        if overlap:
            assert "rollout/behaviour_logprob_gap" not in metrics
        else:
            assert metrics["rollout/behaviour_logprob_gap"] == pytest.approx(0.25)


def test_update_with_nothing_kept_skips_every_update(tmp_path: Path):
    stage = _gspo(num_minibatches=3)
    ctx = make_ctx(tmp_path, [stage], make_prompts([0]), group_size=4)
    out = ctx.rollout.generate(ctx.train_prompts, 4)
    assert _update(ctx, stage, out.generations, [0.0] * 4, []) == {}
    assert ctx.learners.calls == [("skip_lr_steps", {"num_steps": 3})]  # type: ignore[attr-defined]


def test_minibatch_metrics_min_max_and_mean():
    # ratio_min over (0.9, 0.7) is 0.7 (the mean 0.8 was logged); ratio_max over (1.1, 1.3) is 1.3; loss mean 2
    runs = [{"loss": 1.0, "ratio_min": 0.9, "ratio_max": 1.1}, {"loss": 3.0, "ratio_min": 0.7, "ratio_max": 1.3}]
    assert combine_minibatch_metrics(runs) == {"loss": 2.0, "ratio_min": 0.7, "ratio_max": 1.3}


# ------------------------------------------------------------------ the gspo loop


def test_gspo_dynamic_filtering_counters_and_schedule_end(tmp_path: Path):
    # 4 prompts, G = 4: p0 all wrong, p1 2/4 right, p2 all right, p3 1/4 right -> p0 and p2 groups filtered.
    # 2 prompts per step, 2 steps, 2 mini-batches; shuffles decide which prompts each step sees.
    stage = _gspo(num_steps=2, prompts_per_step=2, num_minibatches=2)
    ctx = make_ctx(tmp_path, [stage], make_prompts([0, 2, 4, 1]), group_size=4)
    run_gspo(ctx, stage, 0)
    learners: FakeLearner = ctx.learners  # type: ignore[assignment]
    rollout: FakeRollout = ctx.rollout  # type: ignore[assignment]
    assert (ctx.state.stage_step, ctx.state.global_step) == (2, 2)
    assert learners.calls[0] == ("set_lr", {"lr": ctx.cfg.learner.lr, "total_steps": 4})
    assert learners.schedule_step == 4  # the schedule ends at its end, whatever was filtered
    steps = [c["prompts"] for c in rollout.calls]
    mixed = {"p1": 4, "p3": 4}  # kept sequences per prompt
    filtered = ctx.tracker.series("train/filtered_groups")  # type: ignore[attr-defined]
    kept = ctx.tracker.series("train/num_sequences")  # type: ignore[attr-defined]
    assert [s for s, _ in kept] == [1, 2]  # logged at the global step after each step
    for (_, f), (_, k), ids in zip(filtered, kept, steps, strict=True):
        assert f == sum(p not in mixed for p in ids) and k == sum(mixed.get(p, 0) for p in ids)
    # every step whose batch kept something synced once: policy version = steps with k > 0
    assert ctx.state.policy_version == sum(k > 0 for _, k in kept)


def test_gspo_overlap_trains_on_batches_one_version_behind(tmp_path: Path):
    # all prompts mixed (2/4 right): every step updates and syncs. With overlap, step s+1's batch is submitted
    # before step s's sync, so it carries version s; old log-probs are the engine's (-0.25 per token), and the
    # learner's compute_logprobs is never called.
    stage = _gspo(num_steps=3, prompts_per_step=2, num_minibatches=1, overlap=True)
    ctx = make_ctx(tmp_path, [stage], make_prompts([2, 2, 2]), group_size=4)
    run_gspo(ctx, stage, 0)
    rollout: FakeRollout = ctx.rollout  # type: ignore[assignment]
    learners: FakeLearner = ctx.learners  # type: ignore[assignment]
    assert [c["version"] for c in rollout.calls] == [0, 0, 1]  # step 0 and step 1 submitted before any sync
    assert [c["key"] for c in rollout.calls] == [ctx.sample_key(s) for s in range(3)]  # each step once
    assert "compute_logprobs" not in learners.names()
    trains = [kw for name, kw in learners.calls if name == "train_policy"]
    assert [t["n"] for t in trains] == [8, 8, 8]  # nothing lost: 2 prompts x 4 samples per step
    assert trains[0]["old_logprobs"][0] == [-0.25]
    assert ctx.state.policy_version == 3


# ------------------------------------------------------------------ pass-rate selection


def test_pass_rate_selection_from_the_earlier_rollout_stage(tmp_path: Path):
    # rollout stage: pass rates p0 0/4, p1 1/4, p2 2/4, p3 3/4, p4 4/4; band [0.25, 0.5] keeps p1 and p2 only
    rollout = StageConfig(kind="rollout", name="rollout", num_prompts=5)
    stage = _gspo(num_steps=2, prompts_per_step=2, pass_rate_min=0.25, pass_rate_max=0.5)
    ctx = make_ctx(tmp_path, [rollout, stage], make_prompts([0, 1, 2, 3, 4]), group_size=4)
    run_rollout(ctx, rollout, 0)
    assert (ctx.state.stage_step, ctx.state.global_step) == (1, 1)  # 5 prompts = one chunk
    ctx.state.stage_index, ctx.state.stage_step = 1, 0
    run_gspo(ctx, stage, 1)
    seen = {p for c in ctx.rollout.calls[1:] for p in c["prompts"]}  # type: ignore[attr-defined]
    assert seen == {"p1", "p2"}
    assert ctx.tracker.series("data/pass_rate_num_kept") == [(1, 2.0)]  # type: ignore[attr-defined]
    assert ctx.tracker.series("data/pass_rate_num_prompts") == [(1, 5.0)]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ checkpoint / resume bookkeeping


def test_gspo_resumed_from_a_checkpoint_runs_the_remaining_steps_only(tmp_path: Path):
    # uninterrupted: 4 steps. Interrupted: a checkpoint at step 2 (every_steps=2), a new context restores its
    # driver state and learner, runs steps 2 and 3 with the same prompts and sample keys, and ends in the same state.
    stage = _gspo(num_steps=4, prompts_per_step=2, num_minibatches=2)
    prompts = make_prompts([2, 1, 3, 2, 1])
    ref = make_ctx(tmp_path / "ref", [stage], prompts, every_steps=2)
    run_gspo(ref, stage, 0)
    ckpt = tmp_path / "ref" / "checkpoints" / "s00-gspo" / "step-000002"
    assert (ckpt / "COMPLETE").exists() and not (ckpt.parent / "step-000004").exists()  # last step: the driver's
    saved = read_driver_state(ckpt)
    assert (saved.stage_step, saved.global_step, saved.stage_done) == (2, 2, False)

    resumed = make_ctx(tmp_path / "ref", [stage], prompts, every_steps=2)
    resumed.state = saved
    resumed.learners.load_checkpoint(str(ckpt / "learner"))
    run_gspo(resumed, stage, 0)
    learners: FakeLearner = resumed.learners  # type: ignore[assignment]
    assert "set_lr" not in learners.names()  # the restored schedule is kept
    assert learners.schedule_step == 8 and learners.schedule_total == 8
    ref_calls = ref.rollout.calls  # type: ignore[attr-defined]
    new_calls = resumed.rollout.calls  # type: ignore[attr-defined]
    assert [(c["prompts"], c["key"]) for c in new_calls] == [(c["prompts"], c["key"]) for c in ref_calls[2:]]
    assert (resumed.state.stage_step, resumed.state.global_step) == (ref.state.stage_step, ref.state.global_step)
    # the shards written after step 2 in the reference run were set aside, and the resumed run wrote its own
    logs = tmp_path / "ref" / "rollouts" / "gspo"
    assert len(list(logs.glob("shard-*.parquet"))) == 4
    assert len(list((logs.parent / "gspo.superseded").rglob("shard-*.parquet"))) == 2


# ------------------------------------------------------------------ offline stages and the shared step counter


def test_sft_steps_counters_and_checkpoints(tmp_path: Path):
    # 5 prompts, batch 2, 2 epochs -> 3 batches per epoch (2, 2, 1) = 6 steps; checkpoints every 2 steps at
    # steps 2 and 4 (the last step's checkpoint is the driver's, after the stage)
    from cascade_rl.config import SFTConfig
    from cascade_rl.stages.sft import run_sft

    stage = StageConfig(kind="sft", name="sft", sft=SFTConfig(epochs=2, batch_size=2))
    ctx = make_ctx(tmp_path, [stage], make_prompts([0] * 5), every_steps=2)
    ctx.state.global_step = 10  # steps of earlier stages
    run_sft(ctx, stage, 0)
    learners: FakeLearner = ctx.learners  # type: ignore[assignment]
    assert [kw["n"] for name, kw in learners.calls if name == "train_sft"] == [2, 2, 1, 2, 2, 1]
    # FakeEncoder: response "k" (answer of p<k>) -> 1 token + EOS = 2 tokens per sequence
    assert [kw["num_global_tokens"] for name, kw in learners.calls if name == "train_sft"] == [4, 4, 2, 4, 4, 2]
    assert (ctx.state.stage_step, ctx.state.global_step) == (6, 16)
    assert [s for s, _ in ctx.tracker.series("train/loss")] == [11, 12, 13, 14, 15, 16]  # type: ignore[attr-defined]
    done = sorted(p.name for p in (tmp_path / "checkpoints" / "s00-sft").glob("step-*"))
    assert done == ["step-000002", "step-000004"]
    assert read_driver_state(tmp_path / "checkpoints" / "s00-sft" / "step-000004").global_step == 14


def test_every_stage_runner_has_one_signature():
    import inspect

    from cascade_rl.stages.driver import STAGES

    assert sorted(STAGES) == ["gspo", "mpo", "rollout", "sft"]
    for fn in STAGES.values():
        assert list(inspect.signature(fn).parameters) == ["ctx", "stage", "index"], fn


def test_finish_step_is_the_one_counter_and_log_fires_no_fault(tmp_path: Path, monkeypatch):
    ctx = make_ctx(tmp_path, [_gspo()], make_prompts([1]))
    points: list[str] = []
    monkeypatch.setattr(ctx, "fault_point", points.append)
    ctx.log({"x": 1.0})
    assert points == []  # logging is not a fault point any more
    ctx.finish_step({"y": 2.0})
    ctx.finish_step()
    assert (ctx.state.stage_step, ctx.state.global_step) == (2, 2)
    assert points == ["after-step-1", "after-step-2"]
    assert ctx.tracker.metrics == [(0, {"x": 1.0}), (1, {"y": 2.0})]  # type: ignore[attr-defined]


@pytest.mark.parametrize("pair", ["learner", "rollout", "reward"])
def test_groups_and_fakes_match_the_protocols(pair: str):
    # the Ray groups and the fakes take the parameters the Protocols declare (names and keyword-only-ness)
    import inspect

    from cascade_rl.actors.group import LearnerGroup, RewardGroup, RolloutGroup

    from cascade_rl.stages import protocols as P

    proto, real, fake = {"learner": (P.LearnerGroupProtocol, LearnerGroup, FakeLearner),
                         "rollout": (P.RolloutGroupProtocol, RolloutGroup, FakeRollout),
                         "reward": (P.RewardGroupProtocol, RewardGroup, FakeReward)}[pair]
    methods = [n for n, v in vars(proto).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert methods
    for name in methods:
        want = [(p.name, p.kind) for p in inspect.signature(getattr(proto, name)).parameters.values()]
        for cls in (real, fake):
            got = [(p.name, p.kind) for p in inspect.signature(getattr(cls, name)).parameters.values()]
            assert got[: len(want)] == want, (cls.__name__, name, got)
