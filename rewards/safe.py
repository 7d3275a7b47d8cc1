"""Safe reward calls: per-call time limits that hold off the main thread, and crash isolation.

Two layers enforce ``timeout_s`` for every reward call:

1. Soft limit, inside the process that calls the reward: ``signal.setitimer`` raises ``CallTimeout`` (a
   ``BaseException``, so a reward's own ``except Exception`` cannot swallow it) when the call overruns. It stops
   pure-Python loops and sleeps, and keeps the process. It needs the process's main thread, which a pool
   worker always is; in-process scoring on another thread runs without it.
2. Hard limit, from the parent (``WorkerPool`` below): each worker publishes the start time of its current call
   in shared memory; when a call overruns by more than ``grace_s`` (C code that never returns to Python, e.g.
   a huge bigint power) the parent kills the worker, records a timeout for that call, starts a fresh worker and
   resubmits the rest of the chunk.

Whatever a reward does (raise, hang, crash the process, exhaust memory, return NaN/Inf, a number beyond
``MAX_ABS_SCORE`` or the wrong type) costs only that sample's term: its component becomes 0.0 with the error recorded, or None where the reward said "not
applicable". A batched reward gets ``timeout_s`` per sample of the batch it is called with.

The pool: ``num_workers`` processes started with ``spawn`` (no inherited threads, locks or CUDA state), each the
leader of its own process group: after every chunk a worker kills what its rewards forked and left running, and
a killed worker takes its group with it. A worker killed by SIGKILL that the pool did not kill is reported as an
out-of-memory kill, with the memory it was last seen using. The parent
splits a batch into chunks, hands each idle worker one chunk, and collects one message per sample as results
arrive (so work finished before a kill is kept); results are returned in input order.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import Any

from cascade_rl.types import Sample

from .registry import RewardTerm, Verdict

# (score or None, extra named components, error/reason or None); plain tuples pickle cheaply between processes.
Outcome = tuple[float | None, dict[str, float], str | None]
Item = tuple[int, Sample, frozenset[str]]  # (position in the batch, sample, term labels already scored)
Emit = Callable[[tuple[Any, ...]], None]

IDLE, START, LIMIT, POS, TERM = 0.0, 0, 1, 2, 3  # slots of a worker's shared progress array
_RETRIED = "\0retried"  # a marker in an item's skip set (never a term label): resubmitted once already


class CallTimeout(BaseException):
    """A reward call ran past its time limit (BaseException: ``except Exception`` in a reward cannot eat it)."""


def _raise_timeout(signum: int, frame: Any) -> None:
    raise CallTimeout()


@contextmanager
def soft_time_limit(seconds: float) -> Iterator[bool]:
    """Raise ``CallTimeout`` in this thread after ``seconds`` (main thread only; yields whether it is armed)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


MAX_ABS_SCORE = 1e6  # a reward beyond this is a bug (1e308 overflows the weighted total and the advantages)


def _finite(label: str, value: Any) -> tuple[float | None, str | None]:
    if isinstance(value, bool):
        return float(value), None
    if not isinstance(value, (int, float)):
        return 0.0, f"{label} returned {type(value).__name__} {str(value)[:40]!r}; expected a float"
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        return 0.0, f"{label} returned an integer of {value.bit_length()} bits; scored 0.0 (|score| must be <= " \
                    f"{MAX_ABS_SCORE:g})"
    if not math.isfinite(value):
        return 0.0, f"{label} returned {value}; scored 0.0"
    if abs(value) > MAX_ABS_SCORE:
        return 0.0, f"{label} returned {value:g}, beyond +-{MAX_ABS_SCORE:g}; scored 0.0 (rescale the reward)"
    return value, None


def check_output(label: str, out: Any) -> Outcome:
    """Validate one reward value: float / Verdict / bool / dict of floats / None -> an ``Outcome``.

    A dict's ``"score"`` entry (else the sum of its entries) is the term's score; every entry is also kept as
    a component ``"<label>/<key>"``.
    """
    if out is None:
        return None, {}, None
    if isinstance(out, dict):
        extras: dict[str, float] = {}
        errors = []
        for key, value in out.items():
            v, err = _finite(f"{label}[{key!r}]", value)
            extras[f"{label}/{key}"] = v if v is not None else 0.0
            if err:
                errors.append(err)
        total = extras.get(f"{label}/score", math.fsum(extras.values()))
        return total, extras, "; ".join(errors) or None
    score, err = _finite(label, out)
    if err is None and isinstance(out, Verdict) and out.reason:
        err = out.reason
    return score, {}, err


def _describe(exc: BaseException, limit_s: float) -> str:
    if isinstance(exc, CallTimeout):
        return f"timed out after {limit_s:g} s"
    if isinstance(exc, MemoryError):
        return ("ran out of memory (MemoryError): the reward allocates more than the worker may use; make it "
                "use less memory or cap its input size")
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {str(exc)[:300]}{where}"


def call_reward(fn: Callable[..., Any], arg: Any, kwargs: dict[str, Any], limit_s: float) -> tuple[Any, str | None]:
    """``(fn(arg, **kwargs), None)``, or ``(None, error)`` when it raised or overran ``limit_s`` (soft limit)."""
    try:
        with soft_time_limit(limit_s):
            return fn(arg, **kwargs), None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a reward's failure costs its sample, never the run
        return None, _describe(exc, limit_s)


def probe_term(term: RewardTerm, sample: Sample, timeout_s: float) -> str | None:
    """Call ``term`` once on ``sample`` as the scorer would (a list of one for a batched term): why it cannot
    score, or None. Catches what would otherwise score every sample 0.0: a signature that does not take
    ``(sample, **kwargs)`` (a misspelt kwarg), a raise, a wrong return type. Runs in this process."""
    fn = term.load()
    arg: Any = [sample] if term.batched else sample
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: the call below tells
        sig = None
    if sig is not None:
        try:
            sig.bind(arg, **term.kwargs)
        except TypeError as exc:
            return f"cannot be called as {term.spec}(sample, **{term.kwargs}): {exc}; its signature is {sig}"
    value, err = call_reward(fn, arg, term.kwargs, timeout_s)
    if err is not None:
        return f"raised {err}"
    if term.batched:
        if not isinstance(value, (list, tuple)) or len(value) != 1:
            return f"batched reward returned {type(value).__name__} for 1 sample; expected a list of one value"
        value = value[0]
    _, _, err = check_output(term.label, value)
    return None if err is None or isinstance(value, Verdict) else err


def _mark(progress: Any, pos: int, term: int, limit_s: float) -> None:
    if progress is not None:
        progress[LIMIT], progress[POS], progress[TERM] = limit_s, pos, term
        progress[START] = time.monotonic()  # written last: the parent reads START != 0 as "call running"


def _unmark(progress: Any) -> None:
    if progress is not None:
        progress[START] = IDLE


def _score_sample(terms: Sequence[RewardTerm], item: Item, timeout_s: float, progress: Any) -> dict[str, Outcome]:
    pos, sample, skip = item
    out: dict[str, Outcome] = {}
    for idx, term in enumerate(terms):
        if term.batched or term.label in skip:
            continue
        _mark(progress, pos, idx, timeout_s)
        value, err = call_reward(term.load(), sample, term.kwargs, timeout_s)
        _unmark(progress)
        out[term.label] = (0.0, {}, f"{term.label}: {err}") if err else check_output(term.label, value)
    return out


def _score_batch(term: RewardTerm, idx: int, items: list[Item], timeout_s: float, progress: Any) -> dict[int, Outcome]:
    limit_s = timeout_s * len(items)
    _mark(progress, -1, idx, limit_s)
    values, err = call_reward(term.load(), [s for _, s, _ in items], term.kwargs, limit_s)
    _unmark(progress)
    if err is None and (not isinstance(values, (list, tuple)) or len(values) != len(items)):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        err = f"batched reward returned {got} for {len(items)} samples; expected a list of one value each"
    if err is not None:
        return {pos: (0.0, {}, f"{term.label}: {err}") for pos, _, _ in items}
    return {pos: check_output(term.label, v) for (pos, _, _), v in zip(items, values, strict=True)}


def run_terms(terms: Sequence[RewardTerm], items: list[Item], timeout_s: float, emit: Emit,
              progress: Any = None) -> None:
    """Score ``items`` with every term not in their skip set, emitting results as they come.

    Emits ``("out", pos, {label: outcome})`` once per sample for the per-sample terms, then, per batched term,
    ``("many", label, {pos: outcome})``. ``progress`` (a worker's shared array) tracks the running call.
    """
    for item in items:
        if any(not t.batched and t.label not in item[2] for t in terms):
            emit(("out", item[0], _score_sample(terms, item, timeout_s, progress)))
    for idx, term in enumerate(terms):
        todo = [it for it in items if term.batched and term.label not in it[2]]
        if todo:
            emit(("many", term.label, _score_batch(term, idx, todo, timeout_s, progress)))


# ---------------------------------------------------------------------------------------------- worker pool


def _group_members(pgid: int) -> list[int]:
    """Pids in process group ``pgid`` other than this process (Linux ``/proc``; empty elsewhere)."""
    me, out = os.getpid(), list[int]()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if name.isdigit() and int(name) != me:
            try:
                if os.getpgid(int(name)) == pgid:
                    out.append(int(name))
            except OSError:  # gone already, or not ours to see
                continue
    return out


def stop_group_members() -> int:
    """Kill what rewards left running in this worker's process group (forked children, daemons that did not
    leave the group) and reap our own children; return how many were killed. Only in a group leader (a pool
    worker), never in a process that shares its group with others."""
    pgid = os.getpgid(0)
    if pgid != os.getpid():
        return 0
    members = _group_members(pgid)
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    while True:  # reap our zombies so none linger as defunct entries
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    return len(members)


def _rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (Linux ``/proc``; 0.0 where unknown)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _death_reason(code: int | None, peak_rss_mb: float, max_memory_mb: int | None) -> str:
    if code == -signal.SIGKILL:
        seen = f"; it was last seen using {peak_rss_mb:.0f} MiB" if peak_rss_mb else ""
        return (f"reward worker process was killed by SIGKILL during this call, most likely by the kernel's "
                f"out-of-memory killer: the reward used too much memory{seen}. Make it use less memory"
                + (f" (worker limit {max_memory_mb} MiB)" if max_memory_mb else ""))
    return f"reward worker process died (exit code {code}) during this call"


def _worker_main(conn: Any, progress: Any, terms: list[RewardTerm], timeout_s: float,
                 max_memory_mb: int | None) -> None:
    """A pool worker: load the terms, then score chunks until the parent sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        os.setpgid(0, 0)  # own process group: whatever a reward forks can be found and stopped
    except OSError:
        pass
    if max_memory_mb:
        import resource

        limit = int(max_memory_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        for term in terms:
            term.load()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("init_error", f"reward worker could not load its terms: {_describe(exc, 0)}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        chunk_id, items = msg
        run_terms(terms, items, timeout_s, conn.send, progress)
        stop_group_members()
        conn.send(("done", chunk_id))


@dataclasses.dataclass
class _Slot:
    """One worker process and the chunk it is working on."""

    proc: Any
    conn: Any
    progress: Any
    started: float
    ready: bool = False
    chunk: list[Item] | None = None
    killed: bool = False
    peak_rss_mb: float = 0.0


class WorkerPool:
    """Worker processes that score chunks of samples under hard per-call deadlines (see the module docstring)."""

    def __init__(self, terms: Sequence[RewardTerm], num_workers: int, timeout_s: float, *,
                 grace_s: float | None = None, start_method: str = "spawn", max_memory_mb: int | None = None,
                 startup_timeout_s: float = 120.0) -> None:
        if num_workers < 1:
            raise ValueError(f"WorkerPool needs num_workers >= 1, got {num_workers}")
        self.terms = [dataclasses.replace(t, fn=None) for t in terms]  # functions are re-imported by reference
        self.labels = [t.label for t in terms]
        self.timeout_s = float(timeout_s)
        self.grace_s = float(grace_s) if grace_s is not None else max(0.5, 0.25 * self.timeout_s)
        self.startup_timeout_s = startup_timeout_s
        self.max_memory_mb = max_memory_mb
        self.num_restarts = 0
        self._startup_failures = 0
        self._ctx: Any = mp.get_context(start_method)
        self._slots = [self._spawn() for _ in range(num_workers)]
        while not all(s.ready for s in self._slots):
            self._poll(deque(), [])

    def _spawn(self) -> _Slot:
        parent, child = self._ctx.Pipe()
        progress = self._ctx.RawArray("d", 4)
        proc = self._ctx.Process(target=_worker_main, daemon=True, name="reward-worker",
                                 args=(child, progress, self.terms, self.timeout_s, self.max_memory_mb))
        proc.start()
        child.close()
        return _Slot(proc=proc, conn=parent, progress=progress, started=time.monotonic())

    def _stop(self, slot: _Slot) -> None:
        slot.killed = True
        try:
            os.killpg(slot.proc.pid, signal.SIGKILL)  # the worker and anything a reward forked in its group
        except OSError:
            pass
        if slot.proc.is_alive():
            slot.proc.kill()
        slot.proc.join(timeout=5)
        slot.conn.close()

    def run(self, samples: Sequence[Sample], chunk_size: int) -> list[dict[str, Outcome]]:
        """Outcomes per sample, in input order: ``[{label: (score, extras, error)}]``."""
        results: list[dict[str, Outcome]] = [{} for _ in samples]
        items: list[tuple[int, Sample, frozenset[str]]] = [(i, s, frozenset()) for i, s in enumerate(samples)]
        queue = deque(items[i:i + chunk_size] for i in range(0, len(items), max(1, chunk_size)))
        while queue or any(s.chunk for s in self._slots):
            for slot in self._slots:
                if slot.ready and slot.chunk is None and queue:
                    self._send(slot, queue.popleft(), results)
            self._poll(queue, results)
        return results

    def _send(self, slot: _Slot, chunk: list[Item], results: list[dict[str, Outcome]]) -> None:
        try:
            slot.conn.send((id(chunk), chunk))
            slot.chunk = chunk
        except (OSError, EOFError):  # the worker died while idle: its sentinel is handled by _poll
            slot.chunk = chunk
        except Exception as exc:  # noqa: BLE001 - e.g. unpicklable metadata: costs these samples only
            for pos, _, _ in chunk:
                for label in self.labels:
                    results[pos].setdefault(label, (0.0, {}, f"{label}: sample could not be sent to a "
                                                              f"reward worker ({type(exc).__name__}: {exc})"))

    def _poll(self, queue: deque, results: list[dict[str, Outcome]]) -> None:
        """Wait briefly for messages or deaths, then apply them and enforce deadlines."""
        waitables = [s.conn for s in self._slots] + [s.proc.sentinel for s in self._slots]
        wait(waitables, timeout=0.05)
        for i, slot in enumerate(self._slots):
            if slot.chunk is not None:
                slot.peak_rss_mb = max(slot.peak_rss_mb, _rss_mb(slot.proc.pid))
            alive = self._drain(slot, results)
            overdue = self._overdue(slot)
            if alive and overdue is None:
                continue
            self._replace(i, slot, results, queue, overdue)

    def _drain(self, slot: _Slot, results: list[dict[str, Outcome]]) -> bool:
        """Apply every message waiting from ``slot``; False when its process has died."""
        try:
            while slot.conn.poll():
                msg = slot.conn.recv()
                kind = msg[0]
                if kind == "out":
                    results[msg[1]].update(msg[2])
                elif kind == "many":
                    for pos, outcome in msg[2].items():
                        results[pos][msg[1]] = outcome
                elif kind == "done":
                    slot.chunk = None
                elif kind == "ready":
                    slot.ready = True
                elif kind == "init_error":
                    self.close()
                    raise RuntimeError(msg[1])
        except (EOFError, OSError):
            return False
        return slot.proc.is_alive()

    def _overdue(self, slot: _Slot) -> str | None:
        now = time.monotonic()
        if not slot.ready:
            return f"reward worker did not start within {self.startup_timeout_s:g} s" \
                if now - slot.started > self.startup_timeout_s else None
        start, limit = slot.progress[START], slot.progress[LIMIT]
        if start != IDLE and slot.chunk is not None and now - start > limit + self.grace_s:
            return f"timed out after {limit:g} s (worker process killed)"
        return None

    def _replace(self, i: int, slot: _Slot, results: list[dict[str, Outcome]], queue: deque,
                 overdue: str | None) -> None:
        """Kill or bury a worker, charge its running call, resubmit the rest of its chunk, start a new one."""
        code = slot.proc.exitcode
        running = slot.progress[START] != IDLE
        pos, term_idx = int(slot.progress[POS]), int(slot.progress[TERM])
        self._stop(slot)
        why = overdue or _death_reason(code, slot.peak_rss_mb, self.max_memory_mb)
        if slot.chunk is not None and running:
            label = self.labels[term_idx]
            positions = [pos] if pos >= 0 else [p for p, _, _ in slot.chunk if label not in results[p]]
            for p in positions:
                results[p][label] = (0.0, {}, f"{label}: {why}")
        if slot.chunk is not None:
            self._resubmit(slot.chunk, results, queue, blamed=running, why=why)
        self.num_restarts += 1
        self._startup_failures = 0 if slot.ready else self._startup_failures + 1
        if self._startup_failures > 3:
            self.close()
            raise RuntimeError(f"reward workers keep dying before they are ready; last cause: {why}")
        self._slots[i] = self._spawn()

    def _resubmit(self, chunk: list[Item], results: list[dict[str, Outcome]], queue: deque, *, blamed: bool,
                  why: str) -> None:
        """Queue the unscored part of a dead worker's chunk again.

        A death during a call was charged to that call, so the chunk made progress. A death between calls
        blames nothing: the chunk is retried once, then its remaining terms are charged with ``why``.
        """
        rest = [(p, s, frozenset(results[p]) | (skip & {_RETRIED})) for p, s, skip in chunk
                if len(results[p]) < len(self.labels)]
        if rest and not blamed:
            if any(_RETRIED in skip for _, _, skip in rest):
                for p, _, _ in rest:
                    for label in self.labels:
                        results[p].setdefault(label, (0.0, {}, f"{label}: {why}"))
                return
            rest = [(p, s, skip | {_RETRIED}) for p, s, skip in rest]
        if rest:
            queue.appendleft(rest)

    def close(self) -> None:
        """Ask every worker to exit, then kill what is left."""
        for slot in self._slots:
            if slot.killed:
                continue
            try:
                slot.conn.send(None)
            except (OSError, EOFError, ValueError):
                pass
        for slot in self._slots:
            if not slot.killed:
                slot.proc.join(timeout=1)
                self._stop(slot)
