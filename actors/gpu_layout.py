"""GPU arithmetic of a placement, without Ray: the bundles each group asks for, and whether they fit a cluster.

``placement.py`` makes its placement groups from ``bundle_layout``; ``cascade-rl validate`` checks a recipe against
a cluster with ``fit_problems``. With ``g_l = learner.num_gpus_per_rank``, ``g_r = rollout.num_gpus_per_worker``,
``tp = rollout.tensor_parallel_size``:

- split: a bundle ``{"GPU": g_l}`` per learner rank and ``{"GPU": tp * g_r}`` per rollout worker;
  GPUs needed = ``num_ranks * g_l + num_workers * tp * g_r``. Ray places a bundle on one node, so the ``tp`` GPUs
  of one engine are always on one node: the rollout actor holds them and vLLM starts its tensor-parallel workers
  as child processes of that actor (``distributed_executor_backend="mp"``, ``rollout.py``), one per GPU Ray gave
  it. An engine with ``tp > 1`` therefore takes whole GPUs (``g_r = 1``): Ray gives an actor a fraction of one
  GPU or whole GPUs, never halves of two.
- colocated: ``max(num_ranks, num_workers)`` bundles ``{"GPU": 1}``; learner rank i and rollout worker i share
  bundle i with ``g_l + g_r <= 1``; GPUs needed = ``max(num_ranks, num_workers)``. Only ``tp = 1``: a
  colocated engine lives on one learner rank's GPU (and CUDA IPC weight sync pairs one engine process with one
  learner rank).
- cpu (``g_l = g_r = 0``): no GPUs.

Fit (``fit_problems``): the bundles are placed largest first, a whole-GPU bundle on the first node with that many
free GPUs, a fractional one on the fullest GPU it still fits (fractions of one GPU sum to at most 1). A placement
found this way is one Ray can use; in rare fractional mixes it may miss one Ray would find.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EPS = 1e-9


@dataclass(frozen=True)
class GpuRequest:
    """What a recipe asks for, as numbers (``learner.*`` / ``rollout.*`` of the same meaning)."""

    placement: str  # split | colocated
    num_learner_ranks: int
    num_gpus_per_rank: float
    num_rollout_workers: int
    num_gpus_per_worker: float
    tensor_parallel_size: int = 1


@dataclass(frozen=True)
class BundleLayout:
    """The GPU of every bundle: ``learner`` and ``rollout`` (split, cpu) or ``shared`` (colocated); and what each
    learner / rollout actor asks for (``rollout_gpus`` = one engine, all its tensor-parallel GPUs)."""

    mode: str  # split | colocated | cpu
    learner_gpus: float
    rollout_gpus: float
    learner: list[float] = field(default_factory=list)
    rollout: list[float] = field(default_factory=list)
    shared: list[float] = field(default_factory=list)

    @property
    def bundles(self) -> list[float]:
        return [*self.learner, *self.rollout, *self.shared]

    @property
    def gpus_needed(self) -> float:
        return sum(self.bundles)


def _whole(x: float) -> bool:
    return abs(x - round(x)) < EPS


def request_problems(req: GpuRequest) -> list[str]:
    """What no cluster can satisfy, each naming its recipe key and the fix (empty when the request is sound)."""
    p: list[str] = []
    tp, g_l, g_r = req.tensor_parallel_size, req.num_gpus_per_rank, req.num_gpus_per_worker
    if req.placement not in ("split", "colocated"):
        p.append(f"rollout.placement={req.placement!r}: use 'split' or 'colocated'")
    if tp < 1:
        p.append(f"rollout.tensor_parallel_size={tp}: must be >= 1")
    for key, x in (("learner.num_gpus_per_rank", g_l), ("rollout.num_gpus_per_worker", g_r)):
        if x > 1 and not _whole(x):
            p.append(f"{key}={x}: Ray takes a GPU share above 1 only in whole GPUs; set it to "
                     f"{int(x)} or {int(x) + 1}, or to a fraction below 1")
    if g_l == 0 and g_r == 0:
        return p
    if req.placement == "colocated":
        if tp > 1:
            p.append(f"rollout.tensor_parallel_size={tp} with rollout.placement=colocated: a colocated engine "
                     "shares one learner rank's GPU (Ray gives an actor a fraction of one GPU, never of two); set "
                     "rollout.tensor_parallel_size=1 (one engine per GPU, rollout.num_workers = learner.num_ranks) "
                     "or rollout.placement=split")
        if not (0 < g_l < 1 and 0 < g_r < 1 and g_l + g_r <= 1 + EPS):
            p.append(f"colocated placement shares one GPU between learner rank i and rollout worker i: need "
                     f"fractions with learner.num_gpus_per_rank + rollout.num_gpus_per_worker <= 1, got "
                     f"{g_l} + {g_r}; set e.g. learner.num_gpus_per_rank=0.5 rollout.num_gpus_per_worker=0.5")
    elif tp > 1 and g_r not in (0, 1):
        p.append(f"rollout.tensor_parallel_size={tp} with rollout.num_gpus_per_worker={g_r}: each of an engine's "
                 f"{tp} tensor-parallel processes takes one whole GPU (vLLM puts one rank on each GPU the actor "
                 f"holds); set rollout.num_gpus_per_worker=1 (the engine then holds {tp} GPUs)")
    return p


def bundle_layout(req: GpuRequest) -> BundleLayout:
    """The bundles of ``req`` (module docstring); ValueError naming the keys when ``request_problems`` finds any."""
    problems = request_problems(req)
    if problems:
        raise ValueError("; ".join(problems))
    ranks, workers = req.num_learner_ranks, req.num_rollout_workers
    g_l, g_r, tp = float(req.num_gpus_per_rank), float(req.num_gpus_per_worker), req.tensor_parallel_size
    if g_l == 0 and g_r == 0:
        return BundleLayout("cpu", 0.0, 0.0, learner=[0.0] * ranks)
    if req.placement == "colocated":
        return BundleLayout("colocated", g_l, g_r, shared=[1.0] * max(ranks, workers))
    return BundleLayout("split", g_l, tp * g_r, learner=[g_l] * ranks, rollout=[tp * g_r] * workers)


def nodes_from_total(num_gpus: int, gpus_per_node: int | None = None) -> list[int]:
    """GPUs of each node of a cluster of ``num_gpus`` GPUs, ``gpus_per_node`` a node (default: one node)."""
    per = num_gpus if gpus_per_node is None else gpus_per_node
    if num_gpus < 0 or per < 0 or (num_gpus and not per):
        raise ValueError(f"a cluster of {num_gpus} GPUs with {gpus_per_node} a node: give counts >= 1")
    if not num_gpus:
        return []
    full, rest = divmod(num_gpus, per)
    return [per] * full + ([rest] if rest else [])


def _place(bundles: list[float], node_gpus: list[int]) -> list[float]:
    """Place bundles largest first (module docstring); returns those that found no room."""
    free = [[1.0] * n for n in node_gpus]  # free share of each GPU of each node
    left: list[float] = []
    for b in sorted((b for b in bundles if b > 0), reverse=True):
        if b >= 1 - EPS:
            k = round(b)
            node = next((gpus for gpus in free if sum(f >= 1 - EPS for f in gpus) >= k), None)
            if node is None:
                left.append(b)
                continue
            idle = [i for i, f in enumerate(node) if f >= 1 - EPS][:k]
            for i in idle:
                node[i] = 0.0
            continue
        fits = [(f, n, i) for n, gpus in enumerate(free) for i, f in enumerate(gpus) if f >= b - EPS]
        if not fits:
            left.append(b)
            continue
        _, n, i = min(fits)  # the fullest GPU that still has room: keeps whole GPUs for whole bundles
        free[n][i] -= b
    return left


def fit_problems(req: GpuRequest, node_gpus: list[int], where: str = "the cluster") -> list[str]:
    """Why ``req`` does not fit nodes with ``node_gpus`` GPUs each (empty when it fits), naming the recipe keys."""
    problems = request_problems(req)
    if problems:
        return problems
    layout = bundle_layout(req)
    need, have, biggest = layout.gpus_needed, sum(node_gpus), max(node_gpus, default=0)
    if layout.mode == "cpu":
        return []
    p: list[str] = []
    sum_text = _needed_text(req, layout)
    if need > have + EPS:
        p.append(f"the recipe needs {need:g} GPUs ({sum_text}), {where} has {have}: lower learner.num_ranks / "
                 "rollout.num_workers (or rollout.tensor_parallel_size, the GPUs per rank/worker), or add GPUs")
    if layout.rollout_gpus > biggest + EPS:
        p.append(f"rollout.tensor_parallel_size={req.tensor_parallel_size}: one engine needs "
                 f"{layout.rollout_gpus:g} GPUs on one node, the largest node of {where} has {biggest}; lower "
                 f"rollout.tensor_parallel_size to at most {biggest}, or use nodes with more GPUs")
    if layout.learner_gpus > biggest + EPS:
        p.append(f"learner.num_gpus_per_rank={req.num_gpus_per_rank}: the largest node of {where} has {biggest} "
                 "GPUs; lower it")
    left = _place(layout.bundles, node_gpus)
    if left and not p:
        p.append(f"the recipe's GPU bundles {_bundles_text(layout)} do not fit the nodes of {where} "
                 f"({node_gpus} GPUs): {len(left)} bundle(s) of {left[0]:g} GPU find no room (fractions of one GPU "
                 "sum to at most 1, whole-GPU bundles need free GPUs on one node); lower learner.num_ranks / "
                 "rollout.num_workers or change the GPUs per rank/worker")
    return p


def _needed_text(req: GpuRequest, layout: BundleLayout) -> str:
    if layout.mode == "colocated":
        return (f"colocated: max(learner.num_ranks={req.num_learner_ranks}, "
                f"rollout.num_workers={req.num_rollout_workers}) GPUs, each shared by "
                f"{req.num_gpus_per_rank:g} + {req.num_gpus_per_worker:g}")
    return (f"split: learner.num_ranks={req.num_learner_ranks} x learner.num_gpus_per_rank={req.num_gpus_per_rank:g}"
            f" + rollout.num_workers={req.num_rollout_workers} x rollout.tensor_parallel_size="
            f"{req.tensor_parallel_size} x rollout.num_gpus_per_worker={req.num_gpus_per_worker:g}")


def _bundles_text(layout: BundleLayout) -> str:
    parts = [(name, bs) for name, bs in (("learner", layout.learner), ("rollout", layout.rollout),
                                         ("shared", layout.shared)) if bs]
    return ", ".join(f"{len(bs)} x {bs[0]:g} ({name})" for name, bs in parts)
