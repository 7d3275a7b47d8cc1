"""Weight sync learner → vLLM: seconds and GB/s for a Qwen3-0.6B-shaped model's weights, NCCL / CUDA IPC vs object
store.

    python bench/bench_weight_sync.py --device cuda     # 2 GPUs: learner rank 0 on one, the vLLM worker on the other
    python bench/bench_weight_sync.py --device cuda --placement colocated   # 1 GPU shared: CUDA IPC
    python bench/bench_weight_sync.py --device cpu      # smoke: tiny LM, object-store path only (< 2 min)

Run from the repo root with the root on ``PYTHONPATH`` (or after ``pip install --no-deps -e .``): Ray workers and
vLLM's spawned processes import ``cascade_rl.actors`` (the vLLM worker extension lives there).

Real actors in a local Ray: a ``LearnerGroup`` (DeepSpeed, ``--zero-stage``, bf16 on GPU) and a ``RolloutGroup``
with one vLLM worker (``enforce_eager``: the sync does not depend on CUDA graphs, and the engine starts faster).
Before each timed sync one GSPO step with ±1 advantages moves the learner's weights, so every sync visibly changes
vLLM's log-probs. Measured in one run:
- ``nccl`` (GPU): ``RolloutGroup.sync_from`` over NCCL, per ``--bucket-mb``: the learner packs each bucket into
  one flat buffer and broadcasts it; vLLM reloads in place. The first call includes forming the NCCL group
  (reported apart); the best of ``--repeats`` later calls counts. ``broadcast_s`` is the learner's side (pack,
  broadcast, until the last byte is received), ``receive_s`` the vLLM worker's (receive + in-place reload).
- ``ipc`` (GPU, ``--placement colocated``: learner and vLLM share one GPU, fractional GPUs): ``sync_from`` over
  CUDA IPC per ``--bucket-mb``: each bucket is flattened on the GPU and vLLM loads it through an IPC handle.
  ``broadcast_s`` is the learner's side (all buckets loaded), ``receive_s`` vLLM's final reload step.
- ``object_store``: rank 0's weights → Ray object store → ``collective_rpc`` → in-place reload (the CPU path, and
  what colocated GPUs used before CUDA IPC).
Each: seconds, GB/s (weight bytes / seconds of one whole sync), seconds per billion parameters, and the max and
mean |Δ log-prob| between vLLM and the learner on fixed sequences after the sync. For scale the report also holds
the same difference at the start (both sides load the same checkpoint: kernel noise, bf16 on GPU) and just
before a sync (stale weights: what a broken sync would leave). A path that fails records its error and the others
still run. Writes ``bench/results/weight_sync_<device>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

from bench_rollout import DEFAULT_MODEL_DIR, build_qwen3_shape, device_info  # noqa: E402


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


def diffs(a: list[list[float]], b: list[list[float]]) -> dict[str, float]:
    """Max and mean |a - b| over all tokens."""
    d = [abs(x - y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True)]
    return {"max": round(max(d), 6), "mean": round(sum(d) / len(d), 6)}


def summarize(times: list[float], nbytes: int, nparams: int, after: dict[str, float],
              stale: dict[str, float]) -> dict[str, Any]:
    best = min(times)
    return {"seconds": round(best, 4), "all_seconds": [round(t, 4) for t in times],
            "gb_per_s": round(nbytes / best / 1e9, 2), "s_per_billion_params": round(best / (nparams / 1e9), 4),
            "max_abs_logprob_diff_after": after["max"], "mean_abs_logprob_diff_after": after["mean"],
            "max_abs_logprob_diff_stale": stale["max"]}


class Bench:
    """The actors, a fixed batch and the policy version; ``step`` trains once, ``check`` compares log-probs."""

    def __init__(self, model: Path, gpu: bool, zero_stage: int, placement: str) -> None:
        from cascade_rl.actors.group import LearnerGroup, RolloutGroup, make_placement
        from cascade_rl.actors.learner import LearnerSpec
        from cascade_rl.actors.rollout import RolloutSpec

        from cascade_rl.stages.workers import spec_with
        from cascade_rl.types import SequenceBatch

        self.dtype = "bfloat16" if gpu else "float32"
        gpus = (0.5 if placement == "colocated" else 1.0) if gpu else 0.0
        self.placement = make_placement(placement, num_learner_ranks=1, num_gpus_per_rank=gpus,
                                        num_rollout_workers=1, num_gpus_per_worker=gpus)
        self.learners = LearnerGroup(spec_with(LearnerSpec, model_path=str(model), dtype=self.dtype, zero_stage=zero_stage,
                                                 lr=1e-3, micro_batch_tokens=4096),
                                     num_ranks=1, placement=self.placement.learner)
        self.rollout = RolloutGroup(spec_with(RolloutSpec,
            model_path=str(model), backend="vllm", dtype=self.dtype, max_response_tokens=32, max_prompt_tokens=96,
            temperature=1.0, top_p=1.0, seed=0, gpu_memory_utilization=0.3 if placement == "colocated" else 0.5,
            kv_cache_gib=1, enforce_eager=True), num_workers=1, placement=self.placement.rollout)
        out = self.rollout.generate([([{"role": "user", "content": "What is 3 + 4?"}], [])] * 2, 4)
        gens = out.generations
        self.batch = SequenceBatch([g.prompt_token_ids for g in gens], [g.token_ids for g in gens],
                                   advantages=[(-1.0) ** i for i in range(len(gens))],
                                   old_logprobs=[g.logprobs for g in gens])
        self.version = 0

    def vllm_logprobs(self) -> list[list[float]]:
        return self.rollout.compute_logprobs(self.batch.prompt_token_ids, self.batch.response_token_ids)

    def step(self) -> tuple[list[list[float]], dict[str, float]]:
        """One GSPO step; returns the learner's new log-probs and their difference to vLLM's (stale) ones."""
        self.learners.train_policy(self.batch, loss="gspo", clip_low=0.2, clip_high=0.2)
        ref = self.learners.compute_logprobs(self.batch)
        self.version += 1
        return ref, diffs(self.vllm_logprobs(), ref)


def bench_group_sync(b: Bench, path: str, buckets: list[int], repeats: int, nbytes: int,
                     nparams: int) -> dict[str, Any]:
    """``RolloutGroup.sync_from`` as the stages call it; ``path`` ("nccl" | "ipc") is the one it must take."""
    ref, stale = b.step()
    results: dict[str, Any] = {
        "first_call_with_group_setup_s": round(b.rollout.sync_from(b.learners, b.version, buckets[0]), 3)}
    if b.rollout.last_sync_path != path:
        raise RuntimeError(f"RolloutGroup took the {b.rollout.last_sync_path} path, not {path} (NCCL: learner and "
                           "vLLM on different GPUs; CUDA IPC: on the same GPU)")
    results["first_call_diff_after"] = diffs(b.vllm_logprobs(), ref)
    for bucket_mb in buckets:
        times, sides = [], []
        for _ in range(repeats):
            ref, stale = b.step()
            times.append(b.rollout.sync_from(b.learners, b.version, bucket_mb=bucket_mb))
            sides.append(dict(b.rollout.last_sync_sides))
        after = diffs(b.vllm_logprobs(), ref)
        best = min(range(repeats), key=lambda i: times[i])
        results[f"bucket_{bucket_mb}mb"] = {
            **summarize(times, nbytes, nparams, after, stale),
            "broadcast_s": round(sides[best]["broadcast_s"], 4), "receive_s": round(sides[best]["receive_s"], 4),
            "sync_bytes": int(sides[best]["sync_bytes"])}
    return results


def bench_object_store(b: Bench, repeats: int, nbytes: int, nparams: int) -> dict[str, Any]:
    import ray

    times = []
    for _ in range(repeats):
        ref, stale = b.step()
        t0 = time.perf_counter()
        weights = b.learners.weights_ref()
        ray.get([w.update_weights.remote(weights, b.version) for w in b.rollout.workers])
        times.append(time.perf_counter() - t0)
    return summarize(times, nbytes, nparams, diffs(b.vllm_logprobs(), ref), stale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shape", choices=["qwen3-0.6b", "tiny"], default=None, help="default: qwen3-0.6b on cuda")
    ap.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="where --shape qwen3-0.6b is built")
    ap.add_argument("--num-layers", type=int, default=None, help="override the layer count (dry runs)")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--placement", choices=["split", "colocated"], default="split",
                    help="GPU: split (2 GPUs, NCCL) or colocated (1 GPU shared, CUDA IPC)")
    ap.add_argument("--bucket-mb", default="64,256,1024", help="comma-separated bucket sizes (NCCL / IPC paths)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--object-store-repeats", type=int, default=None, help="default: --repeats")
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default="", help="appended to the report's note (the host, what was varied)")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    shape = args.shape or ("qwen3-0.6b" if gpu else "tiny")

    import importlib.util

    if importlib.util.find_spec("cascade_rl.actors") is None:
        raise SystemExit("cascade_rl.actors is not importable: run from the repo root with it on PYTHONPATH, or "
                         "`pip install --no-deps -e .` first (actors/ installs as cascade_rl.actors)")
    import ray
    import torch
    import vllm

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
    report: dict[str, Any] = {
        "bench": "weight_sync", **device_info(args.device), "vllm": vllm.__version__, "torch": torch.__version__,
        "shape": shape, "model": Path(model).name, "num_layers": args.num_layers, "zero_stage": args.zero_stage,
        "placement": args.placement if gpu else "cpu",
        "weight_bytes": nbytes, "params": nparams, "results": {},
        "note": "GB/s = checkpoint weight bytes / seconds of one whole sync (learner gather/pack, transfer, vLLM "
                "in-place reload), driver-side; NCCL needs learner and vLLM on different GPUs, CUDA IPC the same. "
                + args.note}
    tag = args.device + ("_colocated" if gpu and args.placement == "colocated" else "")
    dest = Path(args.out or ROOT / "bench" / "results" / f"weight_sync_{tag}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        dest.write_text(json.dumps(report, indent=2) + "\n")

    t0 = time.perf_counter()
    b = Bench(model, gpu, args.zero_stage, args.placement)
    report["actors_start_s"] = round(time.perf_counter() - t0, 1)
    report["dtype"] = b.dtype
    ref = b.learners.compute_logprobs(b.batch)
    report["logprob_diff_at_start"] = diffs(b.vllm_logprobs(), ref)  # same checkpoint on both sides
    save()
    paths = {"object_store": lambda: bench_object_store(b, args.object_store_repeats or args.repeats, nbytes,
                                                        nparams)}
    if gpu:  # the GPU path first; the object store is the fallback measured for comparison
        buckets = [int(x) for x in args.bucket_mb.split(",")]
        path = "ipc" if args.placement == "colocated" else "nccl"
        paths = {path: lambda: bench_group_sync(b, path, buckets, args.repeats, nbytes, nparams), **paths}
    for name, run in paths.items():
        try:
            report["results"][name] = run()
        except Exception as exc:  # keep what the other path measures; the error is part of the report
            traceback.print_exc()
            report["results"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        save()
        print(json.dumps({name: report["results"][name]}, indent=2), flush=True)
    print(json.dumps(report, indent=2))
    b.rollout.shutdown()
    b.learners.shutdown()
    b.placement.remove()
    ray.shutdown()


if __name__ == "__main__":
    main()
