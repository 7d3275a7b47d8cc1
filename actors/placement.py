"""Where the actors of the groups go: placement groups for learners and rollout workers.

Placement (``make_placement``; the GPU arithmetic, bundle by bundle, is ``gpu_layout.py``)
    ``split``: learners and rollout workers get their own placement groups (bundles ``{"GPU": 1, "CPU": k}`` per
    learner rank, ``{"GPU": tp * g, "CPU": 1}`` per rollout worker, ``tp`` = ``rollout.tensor_parallel_size``);
    weight sync goes over NCCL to every vLLM process of every engine (each tensor-parallel shard receives the
    full weights and loads its shard). A bundle lies on one node, so an engine's ``tp`` GPUs do too: the rollout
    actor holds them all and vLLM runs one tensor-parallel process per GPU inside it (``rollout.py``).
    ``colocated``: one placement group of ``{"GPU": 1, "CPU": k}`` bundles; learner rank i and rollout worker i
    share bundle i with fractional GPUs (``num_gpus_per_rank + num_gpus_per_worker <= 1``; vLLM's share is set by
    ``rollout.gpu_memory_utilization``), and only with ``tensor_parallel_size=1``. NCCL refuses two ranks on one
    GPU, so colocated sync hands each vLLM worker CUDA IPC handles of its own learner rank's weights
    (``weight_sync.py``); where a worker has no learner rank on its GPU (more workers than ranks) it falls back to
    the object store, and says so in the log.
    CPU-only (all GPU counts 0): learner bundles hold a token ``{"CPU": 0.01}`` and rollout/reward actors ask for
    0 CPUs, so every actor fits a local ``ray.init(num_cpus=2)``; they share the real cores (Ray sets
    ``OMP_NUM_THREADS=1`` in each), which is what a laptop run wants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .gpu_layout import GpuRequest, bundle_layout, fit_problems

CPU_TOKEN = 0.01  # CPUs a learner asks for on CPU-only runs (a placement-group bundle can't be all zeros)
PLACEMENT_TIMEOUT_S = 180.0


# ------------------------------------------------------------------------------------------------ placement


@dataclass
class GroupPlacement:
    """Where the actors of one group go: bundle ``bundle_indices[i]`` of ``pg`` for actor i (no pg: anywhere).
    ``shared_gpu``: the GPU is shared with the other group (colocated), so weight sync can't use NCCL."""

    num_gpus: float
    num_cpus: float
    pg: PlacementGroup | None = None
    bundle_indices: list[int] = field(default_factory=list)
    shared_gpu: bool = False

    def options(self, i: int) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=self.bundle_indices[i])
        return opts


@dataclass
class Placement:
    mode: str  # split | colocated | cpu
    learner: GroupPlacement
    rollout: GroupPlacement
    placement_groups: list[PlacementGroup] = field(default_factory=list)

    def remove(self) -> None:
        for pg in self.placement_groups:
            remove_placement_group(pg)


def node_gpus() -> list[int]:
    """GPUs of each alive node of the Ray cluster this process is connected to."""
    return [int(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]


def _make_pg(bundles: list[dict[str, float]], what: str, req: GpuRequest) -> PlacementGroup | None:
    """A PACKed placement group, waited for; None for no bundles. If it can't be placed in time, the error says
    why in recipe keys where the GPU arithmetic shows it (``gpu_layout.fit_problems`` on the nodes there now)."""
    if not bundles:
        return None
    pg = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        nodes = node_gpus()
        why = fit_problems(req, nodes, f"the cluster now (GPUs per node: {nodes})") or [
            "the recipe's GPUs fit the cluster's nodes, so other jobs or actors hold some of them (`ray status`); "
            "free them, or lower learner.num_ranks / rollout.num_workers (or rollout.tensor_parallel_size, the "
            "GPUs per rank/worker), or add nodes"]
        raise RuntimeError(f"the placement group for {what} ({len(bundles)} bundles of {bundles[0]}) was not "
                           f"scheduled within {PLACEMENT_TIMEOUT_S:.0f} s; the cluster has "
                           f"{ray.cluster_resources()}: " + "; ".join(why))
    return pg


def make_placement(mode: Literal["colocated", "split"], *, num_learner_ranks: int, num_gpus_per_rank: float,
                   num_rollout_workers: int, num_gpus_per_worker: float, num_cpus_per_rank: float = 1.0,
                   tensor_parallel_size: int = 1) -> Placement:
    """Placement groups for the learners and rollout workers (see the module docstring). CPU-only when both GPU
    counts are 0, whatever ``mode`` says. ValueError naming the recipe keys for a layout no cluster satisfies."""
    req = GpuRequest(mode, num_learner_ranks, num_gpus_per_rank, num_rollout_workers, num_gpus_per_worker,
                     tensor_parallel_size)
    layout = bundle_layout(req)
    ranks, workers = list(range(num_learner_ranks)), list(range(num_rollout_workers))
    if layout.mode == "cpu":
        pg = _make_pg([{"CPU": CPU_TOKEN}] * num_learner_ranks, "learners", req)
        return Placement("cpu", GroupPlacement(0, CPU_TOKEN, pg, ranks), GroupPlacement(0, 0),
                         [pg] if pg else [])
    if layout.mode == "colocated":
        bundles = [{"GPU": g, "CPU": num_cpus_per_rank + 1} for g in layout.shared]
        pg = _make_pg(bundles, "colocated learners and rollout workers", req)
        return Placement("colocated", GroupPlacement(layout.learner_gpus, num_cpus_per_rank, pg, ranks, True),
                         GroupPlacement(layout.rollout_gpus, 1, pg, workers, True), [pg] if pg else [])
    lpg = _make_pg([{"GPU": g, "CPU": num_cpus_per_rank} for g in layout.learner], "learners", req)
    try:
        rpg = _make_pg([{"GPU": g, "CPU": 1.0} for g in layout.rollout], "rollout workers", req)
    except RuntimeError:
        if lpg is not None:
            remove_placement_group(lpg)  # the learners' GPUs are not held for a run that can't start
        raise
    return Placement("split", GroupPlacement(layout.learner_gpus, num_cpus_per_rank, lpg, ranks),
                     GroupPlacement(layout.rollout_gpus, 1, rpg, workers), [pg for pg in (lpg, rpg) if pg])
