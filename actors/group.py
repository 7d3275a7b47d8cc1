"""Actor groups: where ``ray.remote`` is applied, placement groups are made, and batches are split and rejoined.

Stages talk only to these groups (``docs/actors_api.md``). Every group call fans out with a comprehension and
collects with one ``ray.get``.

Placement: ``placement.py`` (``make_placement``: split or colocated GPUs).

Usage: ``LearnerGroup(spec, num_ranks, num_gpus_per_rank)`` and ``RolloutGroup(spec, num_workers,
num_gpus_per_worker)`` each make their own ``split`` placement group; for ``colocated``, call ``make_placement`` once
and pass ``placement=p.learner`` / ``placement=p.rollout``.

Failures (``faults.py``): a rollout or reward actor that dies mid-call (``RayActorError``) is replaced and its slice
of the batch resubmitted (up to ``max_restarts`` times per call); a new rollout worker first loads the current policy
version (the last object-store weights and their version are kept for that, one model copy in the object store; on
the NCCL path the group is formed again and synced). A learner rank that dies stops the group: every rank is
killed (the survivors would wait in a collective) and ``LearnerFailedError`` names the last complete checkpoint
and says to resume with ``resume=auto``.

Learner metrics
    ``LearnerWorker.train_*`` already all-reduce their metrics across ranks (sums, token-/sequence-weighted means,
    min/max), so the group returns rank 0's dict unchanged rather than averaging again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from cascade_rl.seeding import derive_seed
from cascade_rl.types import PairBatch, RewardResult, RewardTermConfig, Sample, SequenceBatch

from .faults import (
    LearnerFailedError,
    RankDiedError,
    close_all,
    collect_ranks,
    gather_with_restarts,
    learner_failure_message,
)
from .learner import LearnerSpec  # noqa: F401  (re-exported: the driver builds specs through the group API)
from .placement import CPU_TOKEN, GroupPlacement, Placement, make_placement  # noqa: F401  (group API)
from .reward import RewardSpec, RewardWorker
from .rollout import GenerateResult, PromptInput, RolloutSpec, RolloutWorker, as_prompt_input
from .sync_paths import SyncPath, choose_sync_path
from .weight_sync import DEFAULT_BUCKET_MB, WeightSender, find_free_port, node_ip

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ sharding


def shard_by_tokens(lengths: list[int], num_shards: int) -> list[list[int]]:
    """Indices split into ``num_shards`` sets of about equal token sums (longest first onto the lightest shard),
    each sorted and non-empty. Raises if there are fewer items than shards."""
    if len(lengths) < num_shards:
        raise ValueError(f"a batch of {len(lengths)} sequence(s) cannot be split over {num_shards} learner ranks "
                         "(each rank needs at least one): lower learner.num_ranks or use larger batches")
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    loads = [0] * num_shards
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = min(range(num_shards), key=lambda k: (len(shards[k]) > 0, loads[k], len(shards[k])))
        shards[k].append(i)
        loads[k] += lengths[i]
    return [sorted(s) for s in shards]


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` slices of ``range(n)`` whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for k in range(parts):
        bounds.append(bounds[-1] + base + (k < extra))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _select_pairs(batch: PairBatch, idx: list[int]) -> PairBatch:
    def pick(xs: list | None) -> list | None:
        return None if xs is None else [xs[i] for i in idx]

    return PairBatch(prompt_token_ids=pick(batch.prompt_token_ids), chosen_token_ids=pick(batch.chosen_token_ids),
                     rejected_token_ids=pick(batch.rejected_token_ids), ref_chosen_logps=pick(batch.ref_chosen_logps),
                     ref_rejected_logps=pick(batch.ref_rejected_logps), images=pick(batch.images))


def _unshard(shards: list[list[int]], values: list[list[Any]], n: int) -> list[Any]:
    out: list[Any] = [None] * n
    for idx, vals in zip(shards, values, strict=True):
        for i, v in zip(idx, vals, strict=True):
            out[i] = v
    return out


@ray.remote(num_cpus=0)
def _endpoint() -> tuple[str, int]:
    return node_ip(), find_free_port()


# ------------------------------------------------------------------------------------------------ learners


_LEARNER_ACTOR: Any = None


def _learner_actor() -> Any:
    """``ray.remote`` of LearnerWorker + the weight-sync sender (built once, on first use)."""
    global _LEARNER_ACTOR
    if _LEARNER_ACTOR is None:
        from .attention import LearnerSpeedControls
        from .learner import LearnerWorker

        class LearnerActor(WeightSender, LearnerSpeedControls, LearnerWorker):
            def ping(self) -> int:
                return self.rank

        _LEARNER_ACTOR = ray.remote(LearnerActor)
    return _LEARNER_ACTOR


class LearnerGroup:
    """One learner actor per data-parallel rank; every call goes to all ranks (they are collective)."""

    def __init__(self, spec: Any, num_ranks: int, num_gpus_per_rank: float = 0.0, *,
                 placement: GroupPlacement | None = None, wait: bool = True) -> None:
        """``wait=False`` returns once the actors are created (their constructors still running): call
        ``wait_ready`` before using the group, so other groups can start meanwhile."""
        t0 = time.perf_counter()
        self._own: Placement | None = None
        if placement is None:
            self._own = make_placement("split", num_learner_ranks=num_ranks, num_gpus_per_rank=num_gpus_per_rank,
                                       num_rollout_workers=0, num_gpus_per_worker=num_gpus_per_rank)
            placement = self._own.learner
        self.spec, self.num_ranks, self.placement = spec, num_ranks, placement
        self.uses_gpu = placement.num_gpus > 0
        # the rendezvous port must be free on rank 0's node: probe from rank 0's bundle
        addr, port = ray.get(_endpoint.options(**{**placement.options(0), "num_cpus": 0, "num_gpus": 0}).remote())
        cls = _learner_actor()
        self.workers = [cls.options(**placement.options(r)).remote(spec, r, num_ranks, addr, port)
                        for r in range(num_ranks)]
        self._t0, self.start_s = t0, 0.0  # seconds from construction until every rank is ready
        self._pending: list[ray.ObjectRef] | None = [w.ping.remote() for w in self.workers]
        if wait:
            self.wait_ready()
        self.last_checkpoint: str | None = None  # newest learner checkpoint saved or loaded by this group
        self._writing: str | None = None  # a checkpoint being saved right now
        self._failed: LearnerFailedError | None = None

    def wait_ready(self) -> None:
        """Block until every rank is constructed; construction errors surface here."""
        if self._pending is not None:
            ray.get(self._pending)
            self._pending = None
            self.start_s = time.perf_counter() - self._t0

    def configure_speed(self, **settings: Any) -> dict[str, Any]:
        """``attention`` (``varlen`` | an HF name) and/or ``micro_batch_tokens`` on every rank; rank 0's result."""
        return ray.get([w.configure_speed.remote(**settings) for w in self.workers])[0]

    def _run(self, call: str, refs: list[ray.ObjectRef], *, skip_fetch: int | None = None) -> list[Any]:
        """One result per rank; a dead rank stops every rank and raises ``LearnerFailedError`` (see faults.py)."""
        if self._failed is not None:
            raise self._failed
        try:
            return collect_ranks(refs, self.workers, skip_fetch=skip_fetch)
        except RankDiedError as died:
            cause = next(iter(died.dead.values()))
            err = LearnerFailedError(learner_failure_message(
                dead_ranks=sorted(died.dead), num_ranks=self.num_ranks, call=call, cause=cause,
                last_checkpoint=self.last_checkpoint, writing=self._writing))
            err.dead_ranks, err.call, err.last_checkpoint = sorted(died.dead), call, self.last_checkpoint
            self._failed = err
            for w in self.workers:  # survivors would wait in a collective until it times out
                ray.kill(w, no_restart=True)
            raise err from cause

    def _shard_seqs(self, batch: SequenceBatch) -> list[list[int]]:
        lengths = [len(p) + len(r) for p, r in zip(batch.prompt_token_ids, batch.response_token_ids, strict=True)]
        return shard_by_tokens(lengths, self.num_ranks)

    def _shard_pairs(self, batch: PairBatch) -> list[list[int]]:
        lengths = [len(p) + len(c) + len(r) for p, c, r in
                   zip(batch.prompt_token_ids, batch.chosen_token_ids, batch.rejected_token_ids, strict=True)]
        return shard_by_tokens(lengths, self.num_ranks)

    def _padded(self, n: int) -> list[int]:
        """Indices that give every rank at least one item for inference calls (repeats dropped afterwards)."""
        return list(range(n)) + [i % max(n, 1) for i in range(max(0, self.num_ranks - n))]

    def compute_logprobs(self, batch: SequenceBatch) -> list[list[float]]:
        if len(batch) == 0:
            return []
        padded = batch.select(self._padded(len(batch)))
        shards = self._shard_seqs(padded)
        parts = self._run("compute_logprobs", [w.compute_logprobs.remote(padded.select(s))
                                               for w, s in zip(self.workers, shards, strict=True)])
        return _unshard(shards, parts, len(padded))[:len(batch)]

    def compute_pair_logps(self, batch: PairBatch) -> tuple[list[float], list[float]]:
        if len(batch) == 0:
            return [], []
        padded = _select_pairs(batch, self._padded(len(batch)))
        shards = self._shard_pairs(padded)
        parts = self._run("compute_pair_logps", [w.compute_pair_logps.remote(_select_pairs(padded, s))
                                                 for w, s in zip(self.workers, shards, strict=True)])
        chosen = _unshard(shards, [c for c, _ in parts], len(padded))[:len(batch)]
        rejected = _unshard(shards, [r for _, r in parts], len(padded))[:len(batch)]
        return chosen, rejected

    def train_policy(self, batch: SequenceBatch, *, loss: str, clip_low: float, clip_high: float,
                     num_global_seqs: int | None = None, num_global_tokens: int | None = None,
                     old_is_current: bool = False) -> dict[str, float]:
        """One optimizer step; the global counts default to the whole batch's. ``old_is_current``: see
        ``LearnerWorker.train_policy`` (π_old = this step's own detached forward)."""
        kwargs = dict(loss=loss, clip_low=clip_low, clip_high=clip_high, old_is_current=old_is_current,
                      num_global_seqs=len(batch) if num_global_seqs is None else num_global_seqs,
                      num_global_tokens=(sum(len(r) for r in batch.response_token_ids) if num_global_tokens is None
                                         else num_global_tokens))
        shards = self._shard_seqs(batch)
        return self._run("train_policy", [w.train_policy.remote(batch.select(s), **kwargs)
                                          for w, s in zip(self.workers, shards, strict=True)])[0]

    def train_mpo(self, batch: PairBatch, *, terms: list[tuple[str, float]], beta: float,
                  num_global_pairs: int | None = None) -> dict[str, float]:
        """One optimizer step; ``num_global_pairs`` defaults to the batch size."""
        pairs = len(batch) if num_global_pairs is None else num_global_pairs
        shards = self._shard_pairs(batch)
        return self._run("train_mpo", [w.train_mpo.remote(_select_pairs(batch, s), terms=terms, beta=beta,
                                                          num_global_pairs=pairs)
                                       for w, s in zip(self.workers, shards, strict=True)])[0]

    def train_sft(self, batch: SequenceBatch, *, num_global_tokens: int | None = None) -> dict[str, float]:
        """One optimizer step; ``num_global_tokens`` defaults to the batch's response tokens."""
        tokens = sum(len(r) for r in batch.response_token_ids) if num_global_tokens is None else num_global_tokens
        shards = self._shard_seqs(batch)
        return self._run("train_sft", [w.train_sft.remote(batch.select(s), num_global_tokens=tokens)
                                       for w, s in zip(self.workers, shards, strict=True)])[0]

    def set_lr(self, lr: float, total_steps: int, warmup_steps: int) -> None:
        self._run("set_lr", [w.set_lr.remote(lr, total_steps, warmup_steps) for w in self.workers])

    def skip_lr_steps(self, num_steps: int) -> None:
        self._run("skip_lr_steps", [w.skip_lr_steps.remote(num_steps) for w in self.workers])

    def save_checkpoint(self, folder: str, client_state: dict) -> None:
        self._writing = folder  # named by the failure message if a rank dies while saving
        try:
            self._run("save_checkpoint", [w.save_checkpoint.remote(folder, client_state) for w in self.workers])
        finally:
            self._writing = None
        self.last_checkpoint = folder

    def load_checkpoint(self, folder: str) -> dict:
        state = self._run("load_checkpoint", [w.load_checkpoint.remote(folder) for w in self.workers])[0]
        self.last_checkpoint = folder
        return state

    def export_hf(self, folder: str) -> None:
        self._run("export_hf", [w.export_hf.remote(folder) for w in self.workers])

    # weight sync (used by RolloutGroup.sync_from)
    def weights_ref(self, bucket_mb: int = DEFAULT_BUCKET_MB) -> ray.ObjectRef:
        """An ObjectRef of rank 0's ``(name, tensor)`` list on the CPU; all ranks take part (ZeRO-3 gathers)."""
        refs = [w.weights_for_sync.remote(bucket_mb) for w in self.workers]
        self._run("weights_for_sync", refs, skip_fetch=0)  # rank 0's weights stay in the object store
        return refs[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        if self._own is not None:
            self._own.remove()


# ------------------------------------------------------------------------------------------------ rollout


class RolloutActor(RolloutWorker):
    """A rollout worker whose engine may start later than its process (``start=False``): the process imports the
    engine's modules meanwhile, the slow part of a vLLM start that needs no GPU memory."""

    def __init__(self, spec: RolloutSpec, start: bool = True) -> None:
        self._deferred: RolloutSpec | None = spec
        if start:
            self.start_engine()
        elif spec.backend == "vllm":
            import vllm  # noqa: F401  (warms the import; the engine starts in start_engine)

    def start_engine(self) -> int:
        if self._deferred is not None:
            spec, self._deferred = self._deferred, None
            RolloutWorker.__init__(self, spec)
        return self.get_policy_version()


class RolloutGroup:
    """``num_workers`` rollout workers; prompts are split evenly (contiguous slices), results rejoined in order."""

    def __init__(self, spec: RolloutSpec, num_workers: int = 1, num_gpus_per_worker: float = 0.0, *,
                 placement: GroupPlacement | None = None, max_restarts: int = 2, defer_engines: bool = False) -> None:
        """``defer_engines=True``: the worker processes start and import the engine now, the engines themselves
        only at ``start_engines`` (e.g. once a colocated learner holds its GPU memory: vLLM sizes its KV cache
        from the memory it sees free while it profiles)."""
        t0 = time.perf_counter()
        self._own: Placement | None = None
        if placement is None and num_gpus_per_worker > 0:
            self._own = make_placement("split", num_learner_ranks=0, num_gpus_per_rank=num_gpus_per_worker,
                                       num_rollout_workers=num_workers, num_gpus_per_worker=num_gpus_per_worker,
                                       tensor_parallel_size=spec.tensor_parallel_size)
            placement = self._own.rollout
        self.spec, self.placement = spec, placement or GroupPlacement(0, 0)
        self._cls = ray.remote(RolloutActor)
        self.workers = [self._cls.options(**self.placement.options(i)).remote(self.spec, start=not defer_engines)
                        for i in range(num_workers)]
        self._t0, self.start_s, self.engine_start_s, self._engines_started = t0, 0.0, 0.0, False
        if not defer_engines:
            self.start_engines()
        self.version = 0
        self._calls = 0
        self._sync: SyncPath | None = None  # the weight-sync path, chosen once by connect (sync_paths.py)
        self._learners: LearnerGroup | None = None
        # CUDA IPC: "persistent" (flat buffers shared once, weights copied in per sync) or "buckets" (a buffer
        # and a handle per bucket, per sync: less GPU memory, more calls)
        self.ipc_mode = "persistent"
        self.last_bucket_mb = DEFAULT_BUCKET_MB
        self.last_sync_path = ""  # "nccl" | "ipc" | "object_store"
        # bytes and per-side seconds of the last NCCL / IPC sync: learner side ("broadcast_s": pack + send until
        # the last bucket is taken) and rollout side ("receive_s"; IPC: the final reload step only)
        self.last_sync_sides: dict[str, float] = {}
        self.max_restarts = max_restarts  # per worker and call
        self.num_restarts = 0

    def _spawn(self, i: int) -> Any:
        return self._cls.options(**self.placement.options(i)).remote(self.spec)

    def start_engines(self) -> None:
        """Start the engines of workers made with ``defer_engines`` (a no-op for started ones); errors surface here.
        ``start_s``: seconds from construction until every engine is up; ``engine_start_s``: this call's."""
        if self._engines_started:
            return
        t0 = time.perf_counter()
        ray.get([w.start_engine.remote() for w in self.workers])
        self.engine_start_s, self.start_s = time.perf_counter() - t0, time.perf_counter() - self._t0
        self._engines_started = True

    def _gather(self, refs: list[ray.ObjectRef], resubmit: Any) -> list[Any]:
        """``ray.get`` of one ref per worker; a dead worker is restarted (at the current policy version) and its
        call resubmitted, at most ``max_restarts`` times."""
        return gather_with_restarts(refs, resubmit, self.restart_worker, self.max_restarts, "rollout workers")

    def generate(self, prompts: list[PromptInput], n: int, greedy: bool = False,
                 key: int | None = None) -> GenerateResult:
        """``n`` responses per prompt over all workers; seeds depend on the global prompt index, not the split,
        and on ``key`` (the driver passes one per stage step, so a resumed run samples what an uninterrupted run
        would; without it, a per-group call counter)."""
        return self.submit(prompts, n, greedy, key)()

    def submit(self, prompts: list[PromptInput], n: int, greedy: bool = False,
               key: int | None = None) -> Callable[[], GenerateResult]:
        """Start ``generate`` and return a function that waits for its result, so the driver can train while
        the next batch generates (calls to a worker run in order: a later sync waits for this generation)."""
        t0 = time.perf_counter()
        prompts = [as_prompt_input(p) for p in prompts]  # ship messages and images only
        salt = self._calls if key is None else key
        seeds = [derive_seed(self.spec.seed, "rollout", salt, i) for i in range(len(prompts))]
        self._calls += 1
        slices = split_evenly(len(prompts), len(self.workers))

        def call(i: int) -> ray.ObjectRef:
            a, b = slices[i]
            return self.workers[i].generate.remote(prompts[a:b], n, greedy=greedy, seeds=seeds[a:b])

        refs = [call(i) for i in range(len(self.workers))]
        return lambda: GenerateResult.concat(self._gather(refs, call), time.perf_counter() - t0)

    def compute_logprobs(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]],
                         worker: int = 0) -> list[list[float]]:
        return ray.get(self.workers[worker].compute_logprobs.remote(prompt_token_ids, response_token_ids))

    def connect(self, learners: LearnerGroup) -> str:
        """Choose the weight-sync path to ``learners`` once (``sync_paths.choose_sync_path``); returns its name."""
        self._sync = choose_sync_path(learners, self)
        self._learners = learners
        return self._sync.name

    def sync_from(self, learners: LearnerGroup, version: int, bucket_mb: int = DEFAULT_BUCKET_MB) -> float:
        """Push the learners' current weights to every worker, tagged ``version``, over the path chosen by
        ``connect`` (called here on first use, or for other learners); returns seconds."""
        t0 = time.perf_counter()
        if self._sync is None or self._learners is not learners:
            self.connect(learners)
        self.last_bucket_mb = bucket_mb
        self.last_sync_sides = self._sync.sync(version, bucket_mb)
        self.last_sync_path = self._sync.name
        self.version = version
        return time.perf_counter() - t0

    def restart_worker(self, i: int) -> None:
        """Replace worker ``i`` (dead or alive) and bring it to the current policy version."""
        ray.kill(self.workers[i], no_restart=True)
        self.workers[i] = self._spawn(i)
        self.num_restarts += 1
        ray.get(self.workers[i].get_policy_version.remote())
        if self.version > 0 and self._sync is not None:
            self._sync.restarted(i, self.version)

    def policy_versions(self) -> list[int]:
        return ray.get([w.get_policy_version.remote() for w in self.workers])

    def sleep(self) -> None:
        ray.get([w.sleep.remote() for w in self.workers])

    def wake_up(self) -> None:
        ray.get([w.wake_up.remote() for w in self.workers])

    def shutdown(self) -> None:
        close_all(self.workers, "shutdown")
        if self._own is not None:
            self._own.remove()


# ------------------------------------------------------------------------------------------------ rewards


class RewardGroup:
    """``num_workers`` reward actors (0 CPUs each, see module docstring); ``score`` keeps the sample order."""

    def __init__(self, terms: list[RewardTermConfig], timeout_s: float, num_workers: int, correct_threshold: float, *,
                 num_processes: int = 1, max_restarts: int = 3, correct_term: str | None = None) -> None:
        self.spec = RewardSpec(terms=list(terms), timeout_s=timeout_s, correct_threshold=correct_threshold,
                               correct_term=correct_term, num_processes=num_processes)
        self.max_restarts = max_restarts
        self.num_restarts = 0
        t0 = time.perf_counter()
        self._cls = ray.remote(num_cpus=0)(RewardWorker)
        self.workers = [self._cls.remote(self.spec) for _ in range(num_workers)]
        ray.get([w.stats.remote() for w in self.workers])  # construction errors (unknown reward names) here
        self.start_s = time.perf_counter() - t0

    def score(self, samples: list[Sample]) -> list[RewardResult]:
        slices = split_evenly(len(samples), len(self.workers))

        def call(i: int) -> ray.ObjectRef:
            a, b = slices[i]
            return self.workers[i].score.remote(samples[a:b])

        what = f"reward workers (terms {[t.name for t in self.spec.terms]})"
        parts = gather_with_restarts([call(i) for i in range(len(self.workers))], call, self.restart_worker,
                                     self.max_restarts, what)
        return [r for part in parts for r in part]

    def restart_worker(self, i: int) -> None:
        ray.kill(self.workers[i], no_restart=True)
        self.workers[i] = self._cls.remote(self.spec)
        self.num_restarts += 1

    def stats(self) -> list[dict[str, float]]:
        return ray.get([w.stats.remote() for w in self.workers])

    def shutdown(self) -> None:
        close_all(self.workers, "close")
