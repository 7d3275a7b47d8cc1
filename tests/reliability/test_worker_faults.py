"""Worker faults in a local Ray: real actors are killed mid-call and the groups must recover or stop cleanly.

- A reward actor killed mid-batch is restarted and its slice rescored: every sample scored once, in order.
- A rollout worker killed mid-generation is restarted, re-synced to the current policy version and its prompts are
  generated again: the result equals an undisturbed run (greedy, same weights), nothing lost or duplicated.
- A learner rank killed mid-step stops the group with ``LearnerFailedError`` at once (the surviving rank would wait
  in a collective): the message names the intact checkpoint and ``resume=auto``, and the checkpoint is unchanged.

The module shares one 2-rank learner group (DeepSpeed ZeRO-2 on gloo) and one 2-worker HF rollout group; the
learner test runs last because it ends that group.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cascade_rl.types import RewardTermConfig

pytestmark = pytest.mark.slow

NUM_PROMPTS, N = 8, 2
RESPONSE_TOKENS = 160  # long enough (ignore_eos) that a kill lands inside a generate call


def _pid(actor: Any) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread; its return value or exception lands in the dict."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _kill_when_busy(pid: int, *, cpu_s: float = 0.15, timeout_s: float = 60.0) -> float:
    """SIGKILL ``pid`` once it has used ``cpu_s`` more CPU than now (so it is inside the call); returns the CPU
    seconds it had used by then."""
    start = _cpu_s(pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        used = _cpu_s(pid) - start
        if used >= cpu_s:
            os.kill(pid, signal.SIGKILL)
            return used
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never got busy within {timeout_s} s")


def _prompts(num: int = NUM_PROMPTS) -> list[tuple[list[dict[str, str]], list[str]]]:
    return [([{"role": "user", "content": f"What is {i} + {3 * i + 2}?"}], []) for i in range(num)]


def _policy_batch(result: Any, repeat: int = 1) -> Any:
    from cascade_rl.types import SequenceBatch

    gens = result.generations * repeat
    return SequenceBatch(prompt_token_ids=[g.prompt_token_ids for g in gens],
                         response_token_ids=[g.token_ids for g in gens],
                         # by prompt: greedy repeats a response N times, and ±1 within a prompt would cancel
                         advantages=[1.0 if g.prompt_index % 2 else -1.0 for g in gens],
                         old_logprobs=[g.logprobs for g in gens])


@pytest.fixture(scope="module")
def learners(ray_session: None, tiny_lm: Path) -> Iterator[Any]:
    from cascade_rl.actors.group import LearnerGroup
    from cascade_rl.actors.learner import LearnerSpec

    from cascade_rl.stages.workers import spec_with

    group = LearnerGroup(spec_with(LearnerSpec, str(tiny_lm), lr=1e-2, zero_stage=2, micro_batch_tokens=512,
                                   total_steps=10), num_ranks=2)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def rollout(ray_session: None, tiny_lm: Path) -> Iterator[Any]:
    from cascade_rl.actors.group import RolloutGroup
    from cascade_rl.actors.rollout import RolloutSpec

    from cascade_rl.stages.workers import spec_with

    spec = spec_with(RolloutSpec, str(tiny_lm), backend="hf", dtype="float32", max_response_tokens=RESPONSE_TOKENS,
                     max_prompt_tokens=128, kv_cache_gib=1, enforce_eager=True, ignore_eos=True)
    group = RolloutGroup(spec, num_workers=2)
    yield group
    group.shutdown()


# ------------------------------------------------------------------------------------------------ rewards


@pytest.fixture(scope="module")
def rewards(ray_session: None) -> Iterator[Any]:
    from cascade_rl.actors.group import RewardGroup

    # num_processes=0: scored inside the actor (no pool process to start), so the tests stay quick
    group = RewardGroup([RewardTermConfig("fault_rewards:index_stall_once", 1.0, {})], timeout_s=60.0, num_workers=2,
                        correct_threshold=0.5, num_processes=0)
    yield group
    group.shutdown()


@pytest.mark.parametrize("how", ["os.kill", "ray.kill"])
def test_reward_worker_killed_mid_batch_is_restarted_and_rescores_its_slice(rewards: Any, tmp_path: Path,
                                                                           how: str) -> None:
    import ray

    from cascade_rl.types import Sample

    marker = tmp_path / "stalled"
    pids, restarts = [int(s["pid"]) for s in rewards.stats()], rewards.num_restarts
    scored_before = rewards.stats()[0]["num_scored"]
    # 10 samples: worker 0 scores 0-4, worker 1 scores 5-9 and stalls on sample 7
    samples = [Sample(prompt=[{"role": "user", "content": "q"}], response=str(i),
                      metadata={"index": i, "stall_marker": str(marker) if i == 7 else None}) for i in range(10)]
    thread, out = _run_in_thread(lambda: rewards.score(samples))
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the reward never reached the stalling sample"
    if how == "os.kill":
        os.kill(pids[1], signal.SIGKILL)
    else:
        ray.kill(rewards.workers[1], no_restart=True)
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in out, out.get("error")
    results = out["value"]
    assert [r.total for r in results] == [float(i) for i in range(10)]  # each sample once, in order
    assert all(not r.errors for r in results)
    assert rewards.num_restarts == restarts + 1
    stats = rewards.stats()
    assert int(stats[1]["pid"]) != pids[1] and int(stats[0]["pid"]) == pids[0]
    assert (stats[0]["num_scored"] - scored_before, stats[1]["num_scored"]) == (5.0, 5.0)  # the new worker
    # rescored exactly its slice; the other worker's results were kept, not redone


def test_a_reward_worker_that_dies_on_every_try_gives_a_clear_error(ray_session: None) -> None:
    from cascade_rl.actors.faults import WorkersKeepDyingError
    from cascade_rl.actors.group import RewardGroup

    from cascade_rl.types import Sample

    # num_processes=0 scores inside the actor, so the reward's os._exit ends the actor itself
    rewards = RewardGroup([RewardTermConfig("fault_rewards:exit_process", 1.0, {})], timeout_s=5.0, num_workers=1,
                          correct_threshold=0.5, num_processes=0, max_restarts=1)
    try:
        with pytest.raises(WorkersKeepDyingError, match=r"reward workers \(terms \['fault_rewards:exit_process'\]\): "
                                                         r"worker 0 died 2 times .*Last cause: ActorDiedError"):
            rewards.score([Sample(prompt=[{"role": "user", "content": "q"}], response="r")])
        assert rewards.num_restarts == 1
    finally:
        rewards.shutdown()


# ------------------------------------------------------------------------------------------------ rollout


def test_rollout_worker_killed_mid_generation_is_resynced_and_regenerates(learners: Any, rollout: Any) -> None:
    prompts = _prompts(4 * NUM_PROMPTS)  # worker 1's share then takes ~0.7 CPU s here, so a kill lands well inside it
    start = rollout.generate(prompts, N, greedy=True)  # policy version 0: the start weights
    learners.train_policy(_policy_batch(start), loss="gspo", clip_low=0.2, clip_high=0.2)
    rollout.sync_from(learners, version=3)
    pid = _pid(rollout.workers[1])
    before = _cpu_s(pid)
    reference = rollout.generate(prompts, N, greedy=True)
    call_cpu_s = _cpu_s(pid) - before  # what worker 1's share of this generate costs, undisturbed
    assert call_cpu_s > 0.3, f"worker 1 used {call_cpu_s:.3f} CPU s: too short a call to kill inside it"
    moved = max(abs(a - b) for x, y in zip(start.generations, reference.generations, strict=True)
                for a, b in zip(x.logprobs, y.logprobs, strict=False))
    assert moved > 1e-3, "the training step must change the policy, or a missed re-sync could not be seen"

    thread, out = _run_in_thread(lambda: rollout.generate(prompts, N, greedy=True))
    # a third of the way into the same call (a fixed CPU budget could outlast a fast worker's whole share)
    killed_at = _kill_when_busy(pid, cpu_s=call_cpu_s / 3)
    assert killed_at < call_cpu_s, f"killed after {killed_at:.3f} of {call_cpu_s:.3f} CPU s: past the call"
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in out, out.get("error")
    result = out["value"]

    assert rollout.num_restarts == 1 and _pid(rollout.workers[1]) != pid
    assert rollout.policy_versions() == [3, 3]  # the new worker loaded the kept weights at the same version
    keys = [(g.prompt_index, g.sample_index) for g in result.generations]
    assert keys == [(i, j) for i in range(len(prompts)) for j in range(N)]  # none lost, none twice
    assert result.num_prompts == len(prompts) and {g.policy_version for g in result.generations} == {3}
    for got, want in zip(result.generations, reference.generations, strict=True):
        assert got.token_ids == want.token_ids and len(got.token_ids) == RESPONSE_TOKENS
        assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True)) < 1e-5


# ------------------------------------------------------------------------------------------------ learners


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_learner_rank_killed_mid_step_stops_cleanly_and_names_the_checkpoint(learners: Any, rollout: Any,
                                                                            tmp_path: Path) -> None:
    import ray
    from cascade_rl.actors.faults import LearnerFailedError
    from ray.exceptions import RayActorError

    ckpt = tmp_path / "checkpoints" / "s00-gspo" / "step-000001" / "learner"
    learners.save_checkpoint(str(ckpt), {"driver": {"stage_step": 1}})
    before = _digest(ckpt)
    assert "COMPLETE" in before
    batch = _policy_batch(rollout.generate(_prompts(), N, greedy=True), repeat=4)  # 64 x ~190 tokens: seconds
    pids = [_pid(w) for w in learners.workers]

    t0 = time.monotonic()
    thread, out = _run_in_thread(lambda: learners.train_policy(batch, loss="gspo", clip_low=0.2, clip_high=0.2))
    _kill_when_busy(pids[1])
    thread.join(timeout=120)
    assert not thread.is_alive(), "the group hung after a rank died"
    assert time.monotonic() - t0 < 60
    err = out.get("error")
    assert isinstance(err, LearnerFailedError), repr(err)
    msg = str(err)
    assert "learner rank(s) 1 of 2 died during train_policy" in msg
    assert f"The last complete checkpoint, {ckpt}, is intact" in msg and "resume=auto" in msg
    assert "ran out of memory" not in msg  # a plain kill is not blamed on memory
    assert err.dead_ranks == [1] and err.last_checkpoint == str(ckpt)

    assert _digest(ckpt) == before  # the checkpoint was not touched
    with pytest.raises(RayActorError):  # the surviving rank was stopped too: nothing waits in a collective
        ray.get(learners.workers[0].ping.remote(), timeout=30)
    with pytest.raises(LearnerFailedError):  # and the group stays failed
        learners.compute_logprobs(batch)
