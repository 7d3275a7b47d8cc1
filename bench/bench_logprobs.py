"""Micro-benchmark: chunked vs naive response log-probs at a Qwen-sized vocabulary (151,936).

    python bench/bench_logprobs.py                 # CPU: 2 x 512 tokens, bf16 logits, < 1 minute
    python bench/bench_logprobs.py --device cuda   # GPU, adds the hidden-state (lm_head) path

naive   = ``logits.float().log_softmax(-1).gather(-1, labels)`` (what most trainers do)
chunked = ``cascade_rl.algos.logprobs.compute_token_logprobs`` (float32 only per chunk of tokens)
With ``--hidden-size H`` (default 4096 on cuda, 0 = off on cpu) also ``hidden @ W.T`` then naive, against
``compute_logprobs_from_hidden``.

Each variant runs in a fresh subprocess so peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated``
minus what the inputs hold; on CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs; falling back
to ``ru_maxrss``) minus the resident set after the inputs are built. Time is the median of ``--repeats`` runs after
the measured first run. Writes ``bench/results/logprobs_<device>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade_rl.algos.logprobs import compute_logprobs_from_hidden, compute_token_logprobs  # noqa: E402

MIB = 2**20


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _make_inputs(args: argparse.Namespace, device: torch.device, path: str) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g, device=device)
    if path == "logits":
        logits = torch.empty(args.batch, args.seq, args.vocab, dtype=dtype, device=device)
        # filled in place in the model dtype: no float32 spike while building the inputs
        logits.normal_(0.0, 2.0, generator=g)
        return {"logits": logits.requires_grad_(args.mode == "fwd_bwd"), "labels": labels}
    hidden = torch.randn(args.batch, args.seq, args.hidden_size, generator=g, device=device).to(dtype)
    weight = (torch.randn(args.vocab, args.hidden_size, generator=g, device=device) * 0.02).to(dtype)
    grad = args.mode == "fwd_bwd"
    return {"hidden": hidden.requires_grad_(grad), "weight": weight.requires_grad_(grad), "labels": labels}


def _run_variant(
    variant: str, inputs: dict[str, torch.Tensor], chunk_size: int, backward: bool
) -> torch.Tensor:
    labels = inputs["labels"]
    if variant == "naive":
        logits = inputs["logits"] if "logits" in inputs else inputs["hidden"] @ inputs["weight"].T
        lp = logits.float().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    elif "logits" in inputs:
        lp = compute_token_logprobs(inputs["logits"], labels, chunk_size=chunk_size)
    else:
        lp = compute_logprobs_from_hidden(inputs["hidden"], inputs["weight"], labels, chunk_size=chunk_size)
    if backward:
        lp.sum().backward()
    return lp.detach()


def worker(args: argparse.Namespace) -> dict[str, float]:
    """Runs in the subprocess: build inputs, measure the first run's peak memory, then time."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    inputs = _make_inputs(args, device, args.path)
    backward = args.mode == "fwd_bwd"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        base = _rss_bytes("VmRSS") or 0
        base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    lp = _run_variant(args.variant, inputs, args.chunk_size, backward)
    sync()
    first_s = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    elif reset and _rss_bytes("VmHWM") is not None:
        peak = (_rss_bytes("VmHWM") or 0) - base
    else:  # ru_maxrss is a lifetime peak: only meaningful if the run rose above the setup's peak
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_maxrss, 0)
    times = []
    for _ in range(args.repeats):
        for t in inputs.values():
            t.grad = None
        sync()
        t0 = time.perf_counter()
        _run_variant(args.variant, inputs, args.chunk_size, backward)
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "time_s": statistics.median(times) if times else first_s,
        "first_run_s": first_s,
        "peak_mem_mib": peak / MIB,
        "checksum": float(lp.double().sum()),
    }


def _spawn(args: argparse.Namespace, path: str, mode: str, variant: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--path", path, "--mode", mode]
    for key in (
        "device",
        "batch",
        "seq",
        "vocab",
        "hidden_size",
        "dtype",
        "chunk_size",
        "repeats",
        "threads",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant}/{path}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden-size", type=int, default=None, help="0 = skip the lm_head path (default on cpu)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument(
        "--repeats", type=int, default=None, help="timed runs after the first (default 1 cpu, 5 cuda)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads on cpu (0 = torch default)")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 5 if args.device == "cuda" else 1
    if args.hidden_size is None:
        args.hidden_size = 4096 if args.device == "cuda" else 0
    return args


def _print_table(results: dict[str, dict]) -> None:
    header = f"{'case':<18}{'naive s':>10}{'chunked s':>11}{'speedup':>9}{'naive MiB':>11}{'chunked MiB':>13}"
    print(f"\n{header}{'mem x':>7}")
    for case, r in results.items():
        print(
            f"{case:<18}{r['naive']['time_s']:>10.3f}{r['chunked']['time_s']:>11.3f}"
            f"{r['speedup_naive_over_chunked']:>9.2f}{r['naive']['peak_mem_mib']:>11.0f}"
            f"{r['chunked']['peak_mem_mib']:>13.0f}{r['memory_ratio_naive_over_chunked']:>7.1f}"
        )


def main() -> None:
    args = _parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    t_start = time.perf_counter()
    paths = ["logits"] + (["hidden"] if args.hidden_size > 0 else [])
    results: dict[str, dict] = {}
    for path in paths:
        for mode in args.modes.split(","):
            naive = _spawn(args, path, mode, "naive")
            chunked = _spawn(args, path, mode, "chunked")
            results[f"{path}/{mode}"] = {
                "naive": naive,
                "chunked": chunked,
                "speedup_naive_over_chunked": naive["time_s"] / chunked["time_s"],
                "memory_ratio_naive_over_chunked": naive["peak_mem_mib"] / max(chunked["peak_mem_mib"], 1e-9),
                "checksum_abs_diff": abs(naive["checksum"] - chunked["checksum"]),
            }
    config_keys = ("batch", "seq", "vocab", "hidden_size", "dtype", "chunk_size", "repeats")
    report = {
        "bench": "logprobs",
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": {k: getattr(args, k) for k in config_keys},
        "fp32_full_logits_mib": args.batch * args.seq * args.vocab * 4 / MIB,
        "results": results,
        "wall_s": time.perf_counter() - t_start,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"logprobs_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    _print_table(results)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
