"""Weight sync learner → vLLM: seconds and GB/s for a Qwen3-0.6B-shaped model's weights, NCCL vs object store.

    pip install --no-deps --no-build-isolation -e .     # once on the GPU host: Ray workers and vLLM's spawned
                                                        # processes must import cascade_rl.actors
    python bench/bench_weight_sync.py --device cuda     # 2 GPUs: learner rank 0 on one, the vLLM worker on the other
    python bench/bench_weight_sync.py --device cpu      # smoke: tiny LM, object-store path only (< 2 min)

Real actors in a local Ray: a ``LearnerGroup`` (DeepSpeed, ``--zero-stage``, bf16 on GPU) and a ``RolloutGroup``
with one vLLM worker. Before measuring, one GSPO step with random advantages moves the learner's weights, so each
sync visibly changes vLLM's log-probs. Measured in one run:
- ``nccl`` (GPU): ``RolloutGroup.sync_from`` over NCCL, per ``--bucket-mb``: the learner packs each bucket into
  one flat buffer and broadcasts it; vLLM reloads in place. The first call includes forming the NCCL group
  (reported apart); the best of ``--repeats`` later calls counts.
- ``object_store``: rank 0's weights → Ray object store → ``collective_rpc`` → in-place reload (the CPU path).
Each: seconds, GB/s (weight bytes / seconds), seconds per billion parameters, and the max |Δ log-prob| between
vLLM and the learner on fixed sequences after the sync (0 within bf16/fp32 noise = correct).
Writes ``bench/results/weight_sync_<tag>.json`` (tag: ``cpu`` or the GPU's name) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

from bench_rollout import build_qwen3_shape, device_tag  # noqa: E402


def weight_bytes_and_params(model_dir: Path) -> tuple[int, int]:
    """Bytes and parameter count of the checkpoint's tensors (a tied head is stored, and sent, once)."""
    from safetensors import safe_open

    total_bytes = total_params = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                t = st.get_slice(name)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                total_params += numel
                total_bytes += numel * {"BF16": 2, "F16": 2, "F32": 4}.get(t.get_dtype(), 4)
    return total_bytes, total_params


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True))


def summarize(times: list[float], nbytes: int, nparams: int, diff: float) -> dict[str, Any]:
    best = min(times)
    return {"seconds": round(best, 4), "all_seconds": [round(t, 4) for t in times],
            "gb_per_s": round(nbytes / best / 1e9, 2), "s_per_billion_params": round(best / (nparams / 1e9), 4),
            "max_abs_logprob_diff_after": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shape", choices=["qwen3-0.6b", "tiny"], default=None, help="default: qwen3-0.6b on cuda")
    ap.add_argument("--model-dir", default="/tmp/cascade_rl_bench/qwen3-0.6b")
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--bucket-mb", default="64,256,1024", help="comma-separated bucket sizes for the NCCL path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gpu = args.device == "cuda"
    shape = args.shape or ("qwen3-0.6b" if gpu else "tiny")

    import importlib.util

    if importlib.util.find_spec("cascade_rl.actors") is None:
        raise SystemExit("cascade_rl.actors is not importable: run `pip install --no-deps --no-build-isolation -e .` "
                         "in the repo root first (actors/ installs as cascade_rl.actors)")
    import ray
    import torch
    import vllm
    from cascade_rl.actors.group import LearnerGroup, RolloutGroup
    from cascade_rl.actors.learner import LearnerSpec
    from cascade_rl.actors.rollout import RolloutSpec

    from cascade_rl.types import SequenceBatch

    if shape == "tiny":
        from cascade_rl.data.tiny_models import build_tiny_lm

        model = build_tiny_lm()
    else:
        model = build_qwen3_shape(Path(args.model_dir), args.num_layers)
    nbytes, nparams = weight_bytes_and_params(model)
    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "NCCL_", "CASCADE_RL_", "TORCH_EXT", "HF_"))}
    if gpu:
        ray.init(include_dashboard=False, runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=2, object_store_memory=512 << 20, include_dashboard=False, runtime_env={"env_vars": env})
    dtype = "bfloat16" if gpu else "float32"
    learners = LearnerGroup(LearnerSpec(model_path=str(model), dtype=dtype, zero_stage=args.zero_stage, lr=1e-3,
                                        micro_batch_tokens=4096), num_ranks=1, num_gpus_per_rank=1 if gpu else 0)
    rollout = RolloutGroup(RolloutSpec(model_path=str(model), backend="vllm", dtype=dtype, max_response_tokens=32,
                                       max_prompt_tokens=96, temperature=1.0, top_p=1.0, seed=0,
                                       gpu_memory_utilization=0.5, kv_cache_gib=1, enforce_eager=True),
                           num_workers=1, num_gpus_per_worker=1 if gpu else 0)
    out = rollout.generate([([{"role": "user", "content": "What is 3 + 4?"}], [])] * 2, 4)
    batch = SequenceBatch([g.prompt_token_ids for g in out.generations], [g.token_ids for g in out.generations],
                          advantages=[(-1.0) ** i for i in range(len(out.generations))],
                          old_logprobs=[g.logprobs for g in out.generations])
    version = 0
    results: dict[str, Any] = {}

    def step_and_check_stale() -> list[list[float]]:
        learners.train_policy(batch, loss="gspo", clip_low=0.2, clip_high=0.2)
        return learners.compute_logprobs(batch)

    if gpu:
        buckets = [int(x) for x in args.bucket_mb.split(",")]
        step_and_check_stale()
        version += 1
        results["nccl_first_call_with_group_setup_s"] = round(rollout.sync_from(learners, version, buckets[0]), 3)
        for bucket_mb in buckets:
            times = []
            for _ in range(args.repeats):
                ref_lp = step_and_check_stale()
                version += 1
                times.append(rollout.sync_from(learners, version, bucket_mb=bucket_mb))
            diff = max_diff(rollout.compute_logprobs(batch.prompt_token_ids, batch.response_token_ids), ref_lp)
            results[f"nccl_bucket_{bucket_mb}mb"] = summarize(times, nbytes, nparams, diff)
    times = []
    for _ in range(args.repeats):
        ref_lp = step_and_check_stale()
        version += 1
        t0 = time.perf_counter()
        ref = learners.weights_ref()
        ray.get([w.update_weights.remote(ref, version) for w in rollout.workers])
        times.append(time.perf_counter() - t0)
    diff = max_diff(rollout.compute_logprobs(batch.prompt_token_ids, batch.response_token_ids), ref_lp)
    results["object_store"] = summarize(times, nbytes, nparams, diff)

    tag, device_name = device_tag(args.device)
    report = {"bench": "weight_sync", "device": args.device, "device_name": device_name, "vllm": vllm.__version__,
              "torch": torch.__version__, "shape": shape, "model": str(model), "dtype": dtype,
              "zero_stage": args.zero_stage, "weight_bytes": nbytes, "params": nparams, "results": results,
              "note": "GB/s = checkpoint weight bytes / seconds of one whole sync (learner gather/pack, transfer, "
                      "vLLM in-place reload); NCCL needs learner and vLLM on different GPUs"}
    dest = Path(args.out or ROOT / "bench" / "results" / f"weight_sync_{tag}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    rollout.shutdown()
    learners.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
