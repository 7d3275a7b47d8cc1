"""Learner throughput: tokens/s and MFU of one GSPO optimizer step through ``LearnerWorker`` (one rank).

    python bench/bench_learner.py --device cuda --shape qwen3-0.6b      # H100: 64 x 1024 tokens, bf16, ZeRO-2
    python bench/bench_learner.py --device cpu                          # CPU smoke: the tiny LM, < 1 minute
    python bench/bench_learner.py --model-path /models/Qwen3-8B --device cuda --zero-stage 3

What is timed (median of ``--steps`` after ``--warmup`` untimed steps, each on the same batch):
- ``train``: ``train_policy(loss="gspo")`` = packing, forward + backward of every micro-batch, the optimizer step;
- ``logprobs``: ``compute_logprobs`` (forward only), the old-log-prob pass of every GSPO step.
Sequences are random token ids, ``--seq-len`` tokens each (``--response-frac`` of them response), advantages ±1.

MFU = achieved FLOP/s / ``--peak-tflops`` (default 989: H100 SXM bf16 dense). Achieved FLOPs use the usual
estimate ``6 · N · tokens`` for a training step (``2 · N · tokens`` forward only), N = parameters (a tied
embedding counted once); attention's own FLOPs and gradient-checkpointing recomputation are not counted, and the
learner runs the LM head only on response positions, so the estimate slightly overstates the work actually done.

``--shape qwen3-0.6b`` builds (once, into ``--model-dir``; ``bench_rollout.build_qwen3_shape``, shared by the
benches) a random-initialised Qwen3-0.6B-shaped model (vocab 151,936, hidden 1024, 28 layers, 16/8 heads, head_dim
128, tied embeddings); ``--shape tiny`` uses ``cascade_rl.data.tiny_models.build_tiny_lm``.
Writes ``bench/results/learner_<device>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import DEFAULT_MODEL_DIR, build_qwen3_shape, device_info  # noqa: E402  (one model shape)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(args: argparse.Namespace, vocab: int) -> Any:
    import torch

    from cascade_rl.types import SequenceBatch

    g = torch.Generator().manual_seed(0)
    response = max(1, int(args.seq_len * args.response_frac))
    prompt = args.seq_len - response
    ids = torch.randint(10, vocab, (args.batch, args.seq_len), generator=g)
    return SequenceBatch(prompt_token_ids=ids[:, :prompt].tolist(), response_token_ids=ids[:, prompt:].tolist(),
                         advantages=[1.0 if i % 2 else -1.0 for i in range(args.batch)])


def timed(fn: Any, warmup: int, repeats: int) -> tuple[float, Any]:
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cpu")
    ap.add_argument("--model-path", default=None, help="a Hugging Face folder (overrides --shape)")
    ap.add_argument("--shape", choices=["tiny", "qwen3-0.6b"], default=None,
                    help="model built from config (default: qwen3-0.6b on cuda, tiny on cpu)")
    ap.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="where --shape qwen3-0.6b goes")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024 cuda / 64 cpu)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 64 cuda / 8 cpu)")
    ap.add_argument("--response-frac", type=float, default=0.75, help="share of each sequence that is response")
    ap.add_argument("--micro-batch-tokens", type=int, default=None, help="default 16384 cuda / 256 cpu")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--attn-implementation", default="auto")
    ap.add_argument("--fused-kernels", default="auto", help="learner.fused_kernels: auto | liger | none")
    ap.add_argument("--profile", action="store_true", help="one more step under torch.profiler: op families, top ops")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s (H100 SXM bf16: 989)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/learner_<device>.json)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.shape = args.shape or ("qwen3-0.6b" if cuda else "tiny")
    args.seq_len = args.seq_len or (1024 if cuda else 64)
    args.batch = args.batch or (64 if cuda else 8)
    args.micro_batch_tokens = args.micro_batch_tokens or (16384 if cuda else 256)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch
    from cascade_rl.actors.attention import LearnerSpeedControls
    from cascade_rl.actors.learner import LearnerSpec, LearnerWorker
    from step_metrics import op_shares

    from cascade_rl.stages.workers import spec_with

    if args.model_path:
        path = args.model_path
    elif args.shape == "tiny":
        from cascade_rl.data.tiny_models import build_tiny_lm

        path = str(build_tiny_lm())
    else:
        path = str(build_qwen3_shape(Path(args.model_dir)))
    spec = spec_with(LearnerSpec, model_path=path, dtype=args.dtype, zero_stage=args.zero_stage, lr=1e-6,
                       micro_batch_tokens=args.micro_batch_tokens, gradient_checkpointing=args.gradient_checkpointing,
                       total_steps=args.warmup + args.steps + 1, attn_implementation=args.attn_implementation,
                       fused_kernels=args.fused_kernels)

    class Learner(LearnerSpeedControls, LearnerWorker):  # the actor's mixin: profile_train_policy
        pass

    t0 = time.perf_counter()
    worker = Learner(spec, 0, 1, "127.0.0.1", free_port())
    start_s = time.perf_counter() - t0
    num_params = sum(p.numel() for p in worker.model.parameters())  # tied weights once
    batch = make_batch(args, worker.model.config.get_text_config().vocab_size)
    tokens = batch.num_tokens

    lp_s, old = timed(lambda: worker.compute_logprobs(batch), args.warmup, args.steps)
    batch.old_logprobs = old
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> dict[str, float]:
        return worker.train_policy(batch, loss="gspo", clip_low=0.2, clip_high=0.28, num_global_seqs=len(batch),
                                   num_global_tokens=sum(map(len, batch.response_token_ids)))

    train_s, metrics = timed(step, args.warmup, args.steps)
    profile = None
    if args.profile:
        t0 = time.perf_counter()
        out = worker.profile_train_policy(batch, loss="gspo", clip_low=0.2, clip_high=0.28, num_global_seqs=len(batch),
                                          num_global_tokens=sum(map(len, batch.response_token_ids)))
        wall = time.perf_counter() - t0
        step_s = out["metrics"].get("step_s") or wall  # the update itself, without the profiler start
        profile = {"wall_s": round(wall, 3), "step_s": step_s, **op_shares(out["ops"], step_s),
                   "top_ops": out["table"].splitlines()}
    peak = args.peak_tflops * 1e12
    result = {
        "bench": "learner", **device_info(args.device), "objective": "gspo (clip 0.2 / 0.28)",
        "model": Path(args.model_path).name if args.model_path else args.shape, "num_params": num_params,
        "dtype": args.dtype, "zero_stage": args.zero_stage,
        "attn_implementation": worker.model.config._attn_implementation, "packed": worker._packed,
        "packing_check_diff": worker.packing_check_diff, "gradient_checkpointing": args.gradient_checkpointing,
        "batch": args.batch, "seq_len": args.seq_len, "response_frac": args.response_frac,
        "micro_batch_tokens": args.micro_batch_tokens, "tokens_per_step": tokens,
        "train_step_s": round(train_s, 4), "train_tokens_per_s": round(tokens / train_s, 1),
        "train_tflops": round(6 * num_params * tokens / train_s / 1e12, 4),
        "train_mfu": round(6 * num_params * tokens / train_s / peak, 6),
        "logprobs_s": round(lp_s, 4), "logprobs_tokens_per_s": round(tokens / lp_s, 1),
        "logprobs_mfu": round(2 * num_params * tokens / lp_s / peak, 6),
        "peak_tflops": args.peak_tflops, "flops_estimate": "6*N*tokens (train), 2*N*tokens (forward)",
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "worker_start_s": round(start_s, 1), "loss": metrics["loss"], "grad_norm": metrics.get("grad_norm"),
        "torch": torch.__version__, "repeats": args.steps,
        **{k: worker.fused[k] for k in ("fused_kernels", "fused_modules", "fused_check_diff")},
        "profile": profile,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"learner_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
