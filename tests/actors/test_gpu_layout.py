"""GPU arithmetic of a placement (``actors/gpu_layout.py``): bundles, the sum a recipe needs, and the fit on nodes.

``g_l`` = learner.num_gpus_per_rank, ``g_r`` = rollout.num_gpus_per_worker, ``tp`` = rollout.tensor_parallel_size.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cascade_rl.actors.gpu_layout import (
    GpuRequest,
    bundle_layout,
    fit_problems,
    nodes_from_total,
    request_problems,
)

ROOT = Path(__file__).resolve().parents[2]


def split(ranks: int = 1, g_l: float = 1, workers: int = 1, g_r: float = 1, tp: int = 1) -> GpuRequest:
    return GpuRequest("split", ranks, g_l, workers, g_r, tp)


def colocated(ranks: int = 2, g_l: float = 0.5, workers: int = 2, g_r: float = 0.5, tp: int = 1) -> GpuRequest:
    return GpuRequest("colocated", ranks, g_l, workers, g_r, tp)


def test_split_bundles_keep_an_engines_tensor_parallel_gpus_in_one_bundle() -> None:
    layout = bundle_layout(split(ranks=2, workers=3, tp=2))
    # one bundle per rank of g_l = 1, one per engine of tp * g_r = 2 * 1 = 2 (a bundle lies on one node)
    assert layout.learner == [1.0, 1.0] and layout.rollout == [2.0, 2.0, 2.0]
    assert (layout.learner_gpus, layout.rollout_gpus) == (1.0, 2.0)
    # 2 ranks x 1 + 3 workers x 2 x 1 = 2 + 6 = 8
    assert layout.gpus_needed == 8


def test_colocated_bundles_are_whole_gpus_shared_by_rank_i_and_worker_i() -> None:
    layout = bundle_layout(colocated(ranks=2, workers=1))
    # max(2 ranks, 1 worker) = 2 bundles of one GPU; each actor asks its fraction of bundle i
    assert layout.shared == [1.0, 1.0] and layout.gpus_needed == 2
    assert (layout.learner_gpus, layout.rollout_gpus) == (0.5, 0.5)


def test_cpu_layout_needs_no_gpu_whatever_the_mode() -> None:
    for req in (split(g_l=0, g_r=0, tp=2), colocated(g_l=0, g_r=0)):
        layout = bundle_layout(req)
        assert layout.mode == "cpu" and layout.gpus_needed == 0
        assert fit_problems(req, []) == []  # no GPUs at all is fine


def test_two_gpu_split_fits_two_gpus_and_not_one() -> None:
    req = split()  # 1 rank x 1 + 1 worker x 1 x 1 = 2
    assert fit_problems(req, [2]) == []
    assert fit_problems(req, [1, 1]) == []  # two one-GPU nodes: each bundle has its own
    (problem,) = fit_problems(req, [1], "the test cluster")
    assert "needs 2 GPUs" in problem and "the test cluster has 1" in problem
    assert "learner.num_ranks=1 x learner.num_gpus_per_rank=1" in problem
    assert "rollout.num_workers=1 x rollout.tensor_parallel_size=1 x rollout.num_gpus_per_worker=1" in problem


def test_tensor_parallel_engine_needs_its_gpus_on_one_node() -> None:
    req = split(tp=2)  # 1 x 1 + 1 x 2 x 1 = 3 GPUs, the engine's 2 on one node
    assert fit_problems(req, [2]) != []  # 3 > 2
    assert fit_problems(req, [4]) == []
    assert fit_problems(req, [2, 1]) == []  # engine on the 2-GPU node, learner on the other
    problems = fit_problems(req, [1, 1, 1])  # 3 GPUs in all, but no node holds the engine's 2
    assert len(problems) == 1
    assert "rollout.tensor_parallel_size=2" in problems[0] and "largest node" in problems[0]
    assert "at most 1" in problems[0]


def test_tensor_parallel_above_the_node_size_is_named_with_the_total() -> None:
    problems = fit_problems(split(tp=4), [2, 2])  # 1 + 4 = 5 > 4, and 4 > 2 GPUs a node
    assert len(problems) == 2
    assert "needs 5 GPUs" in problems[0] and "has 4" in problems[0]
    assert "rollout.tensor_parallel_size=4" in problems[1] and "at most 2" in problems[1]


def test_whole_gpu_bundles_pack_largest_first() -> None:
    req = split(ranks=1, workers=2, tp=2)  # bundles 2, 2, 1 = 5 GPUs
    assert fit_problems(req, [3, 2]) == []  # 2 -> node 0 (1 left), 2 -> node 1, 1 -> node 0
    # 5 GPUs in all, but [2, 2, 1] places both engines and the learner; [4, 1] too; [3, 1, 1] leaves an engine out
    assert fit_problems(req, [2, 2, 1]) == [] and fit_problems(req, [4, 1]) == []
    (problem,) = fit_problems(req, [3, 1, 1])
    assert "do not fit" in problem and "1 bundle(s) of 2 GPU" in problem


def test_fractions_of_one_gpu_sum_to_at_most_one() -> None:
    req = split(ranks=3, g_l=0.6, workers=0)  # 3 x 0.6 = 1.8 GPUs, but no GPU holds two 0.6 shares
    assert fit_problems(req, [3]) == []
    (problem,) = fit_problems(req, [2])  # 1.8 <= 2 in sum, 0.6 + 0.6 = 1.2 > 1 on either GPU
    assert "fractions of one GPU sum to at most 1" in problem
    assert fit_problems(split(ranks=2, g_l=0.5, workers=0), [1]) == []  # 0.5 + 0.5 = 1 on one GPU


def test_colocated_sum_and_fit() -> None:
    assert fit_problems(colocated(), [2]) == []  # max(2, 2) = 2 GPUs, 0.5 + 0.5 = 1 on each
    (problem,) = fit_problems(colocated(), [1])
    assert "needs 2 GPUs" in problem and "max(learner.num_ranks=2, rollout.num_workers=2)" in problem
    (problem,) = request_problems(colocated(g_l=0.7, g_r=0.5))  # 0.7 + 0.5 = 1.2 > 1
    assert "learner.num_gpus_per_rank + rollout.num_gpus_per_worker <= 1" in problem and "0.7 + 0.5" in problem


def test_colocated_tensor_parallel_is_refused_with_the_fix() -> None:
    (problem,) = request_problems(colocated(tp=2))
    assert "rollout.tensor_parallel_size=2 with rollout.placement=colocated" in problem
    assert "rollout.tensor_parallel_size=1" in problem and "rollout.placement=split" in problem
    with pytest.raises(ValueError, match="rollout.placement=colocated"):
        bundle_layout(colocated(tp=2))


@pytest.mark.parametrize(("g_r", "tp", "ok"), [(1, 2, True), (0.5, 2, False), (2, 2, False), (0.5, 1, True)])
def test_tensor_parallel_engines_take_whole_gpus(g_r: float, tp: int, ok: bool) -> None:
    problems = request_problems(split(g_r=g_r, tp=tp))
    assert (problems == []) is ok
    if not ok:
        assert f"rollout.num_gpus_per_worker={g_r}" in problems[0] and "set rollout.num_gpus_per_worker=1" in problems[0]


def test_shares_above_one_gpu_must_be_whole_and_tp_at_least_one() -> None:
    (problem,) = request_problems(split(g_l=1.5))
    assert "learner.num_gpus_per_rank=1.5" in problem and "1 or 2" in problem
    assert "rollout.tensor_parallel_size=0: must be >= 1" in request_problems(split(tp=0))


def test_nodes_from_total() -> None:
    assert nodes_from_total(2) == [2]  # one node by default
    assert nodes_from_total(5, 2) == [2, 2, 1]  # 5 = 2 + 2 + 1
    assert nodes_from_total(0) == []
    with pytest.raises(ValueError):
        nodes_from_total(2, 0)


@pytest.mark.slow
def test_make_placement_gives_a_tensor_parallel_engine_one_bundle_of_its_gpus(tmp_path: Path) -> None:
    """Real Ray placement groups on a Ray instance that declares 4 (logical) GPUs: the engine's actor options ask
    for tp GPUs in one bundle; colocated + TP is refused before anything is scheduled."""
    script = textwrap.dedent("""
        import json, ray
        from cascade_rl.actors import placement
        from cascade_rl.actors.placement import make_placement
        ray.init(num_cpus=2, num_gpus=4, object_store_memory=100 << 20, include_dashboard=False,
                 log_to_driver=False)
        p = make_placement("split", num_learner_ranks=1, num_gpus_per_rank=1, num_rollout_workers=1,
                           num_gpus_per_worker=1, tensor_parallel_size=2)
        out = {"mode": p.mode, "rollout_bundles": p.placement_groups[1].bundle_specs,
               "learner_bundles": p.placement_groups[0].bundle_specs,
               "rollout_gpus": p.rollout.options(0)["num_gpus"], "available": ray.available_resources()["GPU"]}
        p.remove()
        try:
            make_placement("colocated", num_learner_ranks=2, num_gpus_per_rank=0.5, num_rollout_workers=2,
                           num_gpus_per_worker=0.5, tensor_parallel_size=2)
        except ValueError as exc:
            out["colocated_error"] = str(exc)
        placement.PLACEMENT_TIMEOUT_S = 3.0
        try:  # 1 x 1 + 2 x 2 x 1 = 5 GPUs on a cluster of 4: the learners' group is placed, the engines' is not
            make_placement("split", num_learner_ranks=1, num_gpus_per_rank=1, num_rollout_workers=2,
                           num_gpus_per_worker=1, tensor_parallel_size=2)
        except RuntimeError as exc:
            out["timeout_error"] = str(exc)
        import time
        for _ in range(50):  # removing a placement group is asynchronous
            if ray.available_resources().get("GPU") == 4:
                break
            time.sleep(0.2)
        out["available_after"] = ray.available_resources().get("GPU")
        ray.shutdown()
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["mode"] == "split" and out["rollout_gpus"] == 2
    assert out["rollout_bundles"] == [{"GPU": 2.0, "CPU": 1.0}] and out["learner_bundles"] == [{"GPU": 1.0, "CPU": 1.0}]
    assert out["available"] == 1  # 4 - (1 learner + 2 engine) = 1 GPU left while the groups are held
    assert "rollout.tensor_parallel_size=2 with rollout.placement=colocated" in out["colocated_error"]
    assert "placement group for rollout workers" in out["timeout_error"]
    assert "the recipe needs 5 GPUs" in out["timeout_error"] and "the cluster now (GPUs per node: [4]) has 4" in (
        out["timeout_error"])
    assert out["available_after"] == 4  # the learners' group was given back
