"""What the actor groups do when a worker dies or runs out of memory, and the messages they raise.

- A rollout or reward actor that dies mid-call (``RayActorError``) is replaced and its slice of the batch is redone
  (``gather_with_restarts``); results of the other workers are kept, so nothing is lost or counted twice.
- A learner rank cannot be replaced mid-run: ranks train together (every step is collective, ZeRO shards the
  optimizer state), so a dead rank stops the run with ``LearnerFailedError``. Checkpoints are only ever used once
  their ``COMPLETE`` marker is written, so the newest complete one is untouched and ``resume=auto`` continues there.
- Out-of-memory errors are rewritten to name the recipe keys to lower (``learner_oom_message`` here, vLLM's own in
  ``rollout.explain_engine_error``).

Ray's generic "actor died" text lists the OOM killer among *possible* causes, so memory advice is added only on
evidence of memory exhaustion (``is_memory_text``), never for every death.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # ray is imported where it is used: the learner imports this module's messages without it
    import ray

# Phrases of real out-of-memory errors: torch (CUDA and CPU allocators), Ray's memory monitor, the C library.
MEMORY_PHRASES = ("out of memory", "can't allocate memory", "cannot allocate memory", "low on memory",
                  "memoryerror")


class LearnerFailedError(RuntimeError):
    """A learner rank died (process killed, crashed, node lost): the stage stops; continue with ``resume=auto``.

    Attributes: ``dead_ranks``, ``call`` (the group method that was running), ``last_checkpoint`` (the newest
    learner checkpoint this group saved or loaded, or None).
    """


class WorkersKeepDyingError(RuntimeError):
    """A rollout or reward worker died again after every allowed restart within one call."""


def is_memory_text(text: str) -> bool:
    return any(p in text.lower() for p in MEMORY_PHRASES)


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:limit]}"


# ------------------------------------------------------------------------------------------------ restarts


def gather_with_restarts(refs: list[ray.ObjectRef], resubmit: Callable[[int], ray.ObjectRef],
                         restart: Callable[[int], None], max_restarts: int, what: str) -> list[Any]:
    """Results of one ref per worker, in order. A worker that died (``RayActorError``) is restarted and its call
    resubmitted, up to ``max_restarts`` times per call; any other error is raised as is."""
    import ray
    from ray.exceptions import RayActorError

    try:
        return ray.get(refs)
    except RayActorError:
        pass
    results: list[Any] = [None] * len(refs)
    todo, attempt = dict(enumerate(refs)), 0
    while todo:
        dead: dict[int, RayActorError] = {}
        for i, ref in todo.items():  # all already submitted: this only collects them
            try:
                results[i] = ray.get(ref)
            except RayActorError as exc:
                dead[i] = exc
        if dead and attempt == max_restarts:
            i, exc = next(iter(dead.items()))
            raise WorkersKeepDyingError(
                f"{what}: worker {i} died {max_restarts + 1} times on the same call, so it was not restarted again. "
                f"Last cause: {first_line(exc)}. Check that worker's log in the Ray dashboard"
                + ("; it looks like memory exhaustion: give the workers more memory or run fewer per node"
                   if is_memory_text(str(exc)) else "") + ".") from exc
        for i in dead:
            restart(i)
        todo, attempt = {i: resubmit(i) for i in dead}, attempt + 1
    return results


def close_all(workers: list[Any], method: str) -> None:
    """Call ``method`` on every live worker, then kill them all (a dead one is skipped, not an error)."""
    import ray
    from ray.exceptions import RayActorError

    try:
        for ref in [getattr(w, method).remote() for w in workers]:
            try:
                ray.get(ref)
            except RayActorError:
                pass
    finally:
        for w in workers:
            ray.kill(w, no_restart=True)


# ------------------------------------------------------------------------------------------------ learners

HEALTH_CHECK_S = 10.0  # while ranks are silent this long, ping them: a dead one ends the wait
PING_TIMEOUT_S = 5.0


class RankDiedError(Exception):
    """Internal to the learner group: ``dead`` maps rank -> the ``RayActorError`` that showed it dead."""

    def __init__(self, dead: dict[int, BaseException]) -> None:
        super().__init__(f"learner rank(s) {sorted(dead)} died")
        self.dead = dead


def dead_ranks(workers: list[Any], timeout_s: float = PING_TIMEOUT_S) -> dict[int, BaseException]:
    """Ranks whose actor is dead, found by pinging every rank (a busy rank's ping just waits in its queue)."""
    import ray
    from ray.exceptions import RayActorError

    pings = [w.ping.remote() for w in workers]
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
    dead: dict[int, BaseException] = {}
    for i, ref in enumerate(pings):
        if ref in ready:
            try:
                ray.get(ref)
            except RayActorError as exc:
                dead[i] = exc
    return dead


def collect_ranks(refs: list[ray.ObjectRef], workers: list[Any], *, skip_fetch: int | None = None) -> list[Any]:
    """Results of one collective call per rank, raising ``RankDiedError`` as soon as a rank is known dead.

    ``ray.get`` of all refs could wait for ever: when one rank dies, the others may block in a collective (gloo
    and NCCL time out after 30 min). So refs are waited for one at a time, and silent ranks are pinged every
    ``HEALTH_CHECK_S``. Another error from a rank is raised as is unless a peer died (then the death is the cause).
    ``skip_fetch``: a rank whose result stays in the object store (weights); its death is found by a ping.
    """
    import ray
    from ray.exceptions import RayActorError

    values: list[Any] = [None] * len(refs)
    pending = {ref: i for i, ref in enumerate(refs)}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=HEALTH_CHECK_S, fetch_local=False)
        if not done:
            dead = dead_ranks(workers)
            if dead:
                raise RankDiedError(dead)
            continue
        i = pending.pop(done[0])
        if i == skip_fetch:
            continue
        try:
            values[i] = ray.get(done[0])
        except RayActorError as exc:
            raise RankDiedError({**dead_ranks(workers, timeout_s=0.5), i: exc}) from exc
        except Exception:
            dead = dead_ranks(workers)
            if dead:
                raise RankDiedError(dead) from None
            raise
    if skip_fetch is not None:
        dead = dead_ranks(workers)
        if dead:
            raise RankDiedError(dead)
    return values


def learner_failure_message(*, dead_ranks: list[int], num_ranks: int, call: str, cause: BaseException,
                            last_checkpoint: str | None, writing: str | None) -> str:
    """Why the stage stopped, which checkpoint is intact and how to continue."""
    ranks = ", ".join(map(str, dead_ranks))
    msg = (f"learner rank(s) {ranks} of {num_ranks} died during {call} ({first_line(cause)}). Learner ranks train "
           "together, so the stage cannot go on without them; the other ranks were stopped. ")
    if writing is not None:
        msg += (f"The checkpoint being written to {writing} has no COMPLETE marker and will never be used. ")
    if last_checkpoint is not None:
        msg += f"The last complete checkpoint, {last_checkpoint}, is intact. "
    else:
        msg += ("No checkpoint was completed by this process yet; complete checkpoints from earlier runs in the "
                "run folder are intact. ")
    msg += ("To continue, run the same recipe again with `resume=auto` (e.g. `cascade-rl run RECIPE resume=auto`): "
            "it restarts every worker and continues from the newest complete checkpoint.")
    if is_memory_text(str(cause)):
        msg += (" The rank ran out of memory: lower learner.micro_batch_tokens or set "
                "learner.gradient_checkpointing=true before resuming.")
    return msg


def learner_oom_message(*, rank: int, where: str, num_tokens: int, num_seqs: int, on_gpu: bool,
                        micro_batch_tokens: int, gradient_checkpointing: bool, zero_stage: int,
                        offload_optimizer: bool, detail: str) -> str:
    """An out-of-memory error of one learner rank, with the recipe keys to change in order of cost."""
    head = (f"learner rank {rank} ran out of {'accelerator' if on_gpu else 'host'} memory in {where} on a "
            f"micro-batch of {num_tokens} tokens ({num_seqs} sequences). ")
    fixes = [f"lower learner.micro_batch_tokens (now {micro_batch_tokens}; it must stay >= model.max_prompt_tokens "
             "+ model.max_response_tokens)"]
    if not gradient_checkpointing:
        fixes.append("set learner.gradient_checkpointing=true")
    if on_gpu:
        if zero_stage < 3:
            fixes.append(f"raise learner.zero_stage (now {zero_stage}; 3 also shards the parameters)")
        if not offload_optimizer:
            fixes.append("set learner.offload_optimizer=true")
        fixes.append("use model.dtype=bfloat16, or add learner ranks")
    else:
        fixes.append("run fewer actors on this machine (rollout.num_workers, reward.num_workers)")
    said = (detail.strip().splitlines() or [""])[0][:300]
    return head + "In order of cost: " + "; ".join(fixes) + f". ({said})"
