"""``cascade-rl validate`` checks a recipe's GPU arithmetic against a cluster; the two-GPU recipes fit two GPUs.

two_gpu_split:  1 learner rank x 1 GPU + 1 engine x TP 1 x 1 GPU = 2 GPUs (split, NCCL, gspo.overlap)
two_gpu_zero3:  max(2 ranks, 2 engines) = 2 GPUs, each shared 0.5 + 0.5 (colocated, ZeRO-3, CUDA IPC)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cascade_rl.cli import main
from cascade_rl.config import ConfigError, load_recipe
from cascade_rl.recipe_checks import check_gpus, gpu_summary

ROOT = Path(__file__).resolve().parents[1]
SPLIT, ZERO3 = ROOT / "recipes" / "two_gpu_split.yaml", ROOT / "recipes" / "two_gpu_zero3.yaml"


def test_two_gpu_split_recipe() -> None:
    cfg = load_recipe(SPLIT)
    r, lr = cfg.rollout, cfg.learner
    assert (r.placement, r.num_workers, r.num_gpus_per_worker, r.tensor_parallel_size) == ("split", 1, 1, 1)
    assert (lr.num_ranks, lr.num_gpus_per_rank) == (1, 1)
    assert [s.gspo.overlap for s in cfg.stages if s.kind == "gspo"] == [True]
    assert r.behaviour_logprobs and not r.sleep_when_idle  # what overlap needs
    assert check_gpus(cfg, [2], "2 GPUs") == [] and check_gpus(cfg, [1, 1], "2 nodes") == []
    (problem,) = check_gpus(cfg, [1], "1 GPU")
    assert "needs 2 GPUs" in problem and "1 GPU has 1" in problem
    assert gpu_summary(cfg) == "GPUs: 2 (split: 1 learner rank(s) x 1, 1 engine(s) x 1)"


def test_two_gpu_split_with_a_tensor_parallel_engine_needs_three() -> None:
    cfg = load_recipe(SPLIT, ["rollout.tensor_parallel_size=2"])
    # 1 x 1 + 1 x 2 x 1 = 3 GPUs, the engine's 2 on one node
    assert "needs 3 GPUs" in check_gpus(cfg, [2], "2 GPUs")[0]
    assert check_gpus(cfg, [2, 2], "2 nodes of 2") == []
    assert gpu_summary(cfg) == "GPUs: 3 (split: 1 learner rank(s) x 1, 1 engine(s) x 2 (TP 2))"


def test_two_gpu_zero3_recipe() -> None:
    cfg = load_recipe(ZERO3)
    r, lr = cfg.rollout, cfg.learner
    assert (r.placement, r.num_workers, r.num_gpus_per_worker, r.sleep_when_idle) == ("colocated", 2, 0.5, True)
    assert (lr.num_ranks, lr.num_gpus_per_rank, lr.zero_stage) == (2, 0.5, 3)
    assert not any(s.gspo.overlap for s in cfg.stages if s.kind == "gspo")
    assert check_gpus(cfg, [2], "2 GPUs") == [] and check_gpus(cfg, [1, 1], "2 nodes") == []
    assert "needs 2 GPUs" in check_gpus(cfg, [1], "1 GPU")[0]


@pytest.mark.parametrize(("overrides", "words"), [
    (["rollout.tensor_parallel_size=2"], ["rollout.tensor_parallel_size=2 with rollout.placement=colocated",
                                          "rollout.placement=split"]),
    (["rollout.num_gpus_per_worker=0.7"], ["learner.num_gpus_per_rank + rollout.num_gpus_per_worker <= 1"]),
])
def test_colocated_gpu_mistakes_fail_at_load_naming_the_key(overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_recipe(ZERO3, overrides)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_tensor_parallel_needs_the_vllm_backend_and_whole_gpus() -> None:
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size=2 needs rollout.backend=vllm"):
        load_recipe(SPLIT, ["rollout.tensor_parallel_size=2", "rollout.backend=hf"])
    with pytest.raises(ConfigError, match="set rollout.num_gpus_per_worker=1"):
        load_recipe(SPLIT, ["rollout.tensor_parallel_size=2", "rollout.num_gpus_per_worker=0.5"])


TINY = ["model.path=tiny:lm", "model.dtype=float32"]  # the shipped paths name checkpoints that are not here


def test_cli_validate_against_a_cluster_of_gpus(capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(SPLIT), *TINY, "--gpus", "2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "GPUs: 2 (split" in out and "fits the cluster (--gpus 2)" in out
    assert main(["validate", str(SPLIT), *TINY, "rollout.tensor_parallel_size=2", "--gpus", "4",
                 "--gpus-per-node", "1"]) == 1
    err = capsys.readouterr().err
    assert "rollout.tensor_parallel_size=2: one engine needs 2 GPUs on one node" in err
    assert "the cluster (--gpus 4 --gpus-per-node 1)" in err
    assert main(["validate", str(ZERO3), *TINY, "--gpus", "1"]) == 1
    assert "needs 2 GPUs" in capsys.readouterr().err
    assert main(["validate", str(SPLIT), *TINY, "--gpus-per-node", "2"]) == 2
    assert "--gpus-per-node needs --gpus" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_validate_reads_the_gpus_of_a_running_ray_cluster(tmp_path: Path) -> None:
    """A Ray instance that declares 1 (logical) GPU: the split recipe needs 2 and is refused, naming the cluster."""
    script = textwrap.dedent(f"""
        import ray, sys
        from cascade_rl.cli import main
        ray.init(num_cpus=1, num_gpus=1, object_store_memory=100 << 20, include_dashboard=False,
                 log_to_driver=False)
        code = main(["validate", {str(SPLIT)!r}, "model.path=tiny:lm", "model.dtype=float32",
                     "--ray-address", "auto"])
        ray.shutdown()
        sys.exit(code)
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "the Ray cluster at auto (GPUs per node: [1]) has 1" in res.stderr
