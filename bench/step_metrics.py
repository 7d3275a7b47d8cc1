"""Step-benchmark bookkeeping for ``bench_step.py``: timed wrappers around the groups, NVML sampling, and the
per-step summary (phases, tokens/s, MFU, the generation KV-read roofline, sync GB/s, GPU busy share); conventions
in ``bench_step.py``'s docstring."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------ recording


class Recorder:
    """Timed events ``(phase, t0, t1, info)`` and the metrics each step logged."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float, dict[str, Any]]] = []
        self.step_ends: list[tuple[float, dict[str, float]]] = []
        self.last_update: tuple[tuple, dict[str, Any]] | None = None  # the last train_policy call's arguments

    def add(self, phase: str, t0: float, info: dict[str, Any] | None = None) -> None:
        self.events.append((phase, t0, time.perf_counter(), info or {}))


class Timed:
    """Forwards every attribute to ``target``; calls named in ``phases`` are timed into the recorder."""

    def __init__(self, target: Any, rec: Recorder, phases: dict[str, str], info: Any = None) -> None:
        self._target, self._rec, self._phases, self._info = target, rec, phases, info

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        phase = self._phases.get(name)
        if phase is None:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = attr(*args, **kwargs)
            if name == "submit":  # generation finishes when its waiter returns
                return lambda: self._finish(phase, t0, out())
            self._rec.add(phase, t0, self._info(name, args, out) if self._info else None)
            if name == "train_policy":
                self._rec.last_update = (args, kwargs)
            return out

        return call

    def _finish(self, phase: str, t0: float, out: Any) -> Any:
        self._rec.add(phase, t0, {"output_tokens": out.num_output_tokens, "generations": len(out.generations)})
        return out


def learner_info(name: str, args: tuple, out: Any) -> dict[str, Any]:
    if name not in ("compute_logprobs", "train_policy"):
        return {}
    batch = args[0]
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_token_ids, batch.response_token_ids, strict=True)]
    info = {"tokens": sum(lengths), "sum_len_sq": sum(n * n for n in lengths), "sequences": len(lengths),
            "kv_token_reads": sum(len(r) * len(p) + len(r) * (len(r) + 1) // 2
                                  for p, r in zip(batch.prompt_token_ids, batch.response_token_ids, strict=True))}
    if isinstance(out, dict):
        info.update({k: out[k] for k in ("step_s", "peak_mem_gib", "grad_norm") if k in out})
    return info


class GpuSampler:
    """NVML utilisation and memory of GPU 0 every ``period_s`` (the driver process never initialises CUDA)."""

    def __init__(self, period_s: float = 0.1) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle, self.period_s = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0), period_s
        self.samples: list[tuple[float, float, float]] = []  # (t, util %, used GiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            used = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**30
            self.samples.append((time.perf_counter(), float(util), used))
            self._stop.wait(self.period_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]


# ------------------------------------------------------------------------------------------------ summary


def model_numbers(model_path: str) -> dict[str, Any]:
    from bench_weight_sync import weight_bytes_and_params

    cfg = json.loads((Path(model_path) / "config.json").read_text())
    nbytes, nparams = weight_bytes_and_params(Path(model_path))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return {"num_params": nparams, "weight_bytes": nbytes, "num_layers": cfg["num_hidden_layers"],
            "attn_dim": cfg["num_attention_heads"] * head_dim,
            "kv_bytes_per_token": 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * 2}


def step_summary(events: list, t0: float, t1: float, m: dict[str, Any], peak: float | None,
                 sampler: GpuSampler | None, hbm: float | None = None) -> dict[str, Any]:
    mine = [e for e in events if t0 <= e[1] <= t1]
    out: dict[str, Any] = {"wall_s": round(t1 - t0, 4)}
    total = 0.0
    for phase in ("generate", "score", "sleep", "old_logprobs", "wake", "sync"):
        s = sum(e[2] - e[1] for e in mine if e[0] == phase)
        out[f"{phase}_s"] = round(s, 4)
        total += s
    updates = [e for e in mine if e[0] == "update"]
    out["update_s"] = [round(e[2] - e[1], 4) for e in updates]
    total += sum(e[2] - e[1] for e in updates)
    out["driver_overhead_s"] = round(t1 - t0 - total, 4)
    gen = [e for e in mine if e[0] == "generate"]
    out["output_tokens"] = sum(e[3].get("output_tokens", 0) for e in gen)
    out["generate_tokens_per_s"] = round(out["output_tokens"] / max(out["generate_s"], 1e-9), 1)
    out["trained_tokens"] = [e[3]["tokens"] for e in updates]
    train_s = sum(e[2] - e[1] for e in updates)
    out["train_tokens_per_s"] = round(sum(out["trained_tokens"]) / max(train_s, 1e-9), 1)
    out["learner_peak_mem_gib"] = max((e[3].get("peak_mem_gib", 0.0) for e in updates), default=None)
    n, layers, attn = m["num_params"], m["num_layers"], m["attn_dim"]
    if peak:
        out["update_mfu_6n"] = [round(6 * n * e[3]["tokens"] / (e[2] - e[1]) / peak, 4) for e in updates]
        out["update_mfu_with_attention"] = [
            round((6 * n * e[3]["tokens"] + 6 * layers * attn * e[3]["sum_len_sq"]) / (e[2] - e[1]) / peak, 4)
            for e in updates]
        olp = [e for e in mine if e[0] == "old_logprobs"]
        out["old_logprobs_mfu_6n"] = [round(2 * n * e[3]["tokens"] / (e[2] - e[1]) / peak, 4) for e in olp]
        learner_s = train_s + sum(e[2] - e[1] for e in olp)
        flops = sum(6 * n * e[3]["tokens"] for e in updates) + sum(2 * n * e[3]["tokens"] for e in olp)
        out["learner_mfu_6n"] = round(flops / max(learner_s, 1e-9) / peak, 4)
    # the updates' batches are the step's generated responses with their prompts, each once (the old-log-prob
    # batch holds only the later mini-batches: the first update is its own π_old)
    reads = sum(e[3].get("kv_token_reads", 0) for e in mine if e[0] == "update")
    if hbm and reads:
        out["generate_kv_read_tb"] = round(reads * m["kv_bytes_per_token"] / 1e12, 3)
        out["generate_kv_roofline_s"] = round(reads * m["kv_bytes_per_token"] / hbm, 3)
        out["generate_share_of_roofline"] = round(out["generate_kv_roofline_s"] / max(out["generate_s"], 1e-9), 3)
    syncs = [e for e in mine if e[0] == "sync"]
    if syncs:
        out["sync_bytes"] = syncs[-1][3].get("sync_bytes") or m["weight_bytes"]
        out["sync_gb_per_s"] = round(out["sync_bytes"] / max(out["sync_s"], 1e-9) / 1e9, 2)
        out["sync_path"] = syncs[-1][3].get("path")
        sides = {k: round(v, 4) for k, v in syncs[-1][3].items() if k in ("broadcast_s", "receive_s", "replayed_share")}
        if sides:
            out["sync_sides"] = sides  # learner side, engine side; share of engine loads that replayed recorded copies
    if sampler is not None:
        w = sampler.window(t0, t1)
        if w:
            out["gpu_busy_share"] = round(statistics.mean(s[1] for s in w) / 100, 3)
            out["gpu_mem_used_max_gib"] = round(max(s[2] for s in w), 2)
    return out


def mean_of(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the steady steps of every number (lists: element-wise means)."""
    out: dict[str, Any] = {}
    for k, v in steps[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = round(statistics.mean(s[k] for s in steps if s.get(k) is not None), 4)
        elif isinstance(v, list) and v and all(len(s.get(k, [])) == len(v) for s in steps):
            out[k] = [round(statistics.mean(s[k][i] for s in steps), 4) for i in range(len(v))]
        elif isinstance(v, dict):
            out[k] = steps[-1].get(k)  # e.g. sync_sides: the last steady step's
    return out


VLLM_TIMING_WORDS = ("took", "takes", "Graph capturing finished", "Maximum concurrency", "KV cache size",
                     "Available KV cache memory")


def vllm_log_lines(logs_dir: Path, limit: int = 40) -> list[str]:
    """The engine's own start-up timings (model load, torch.compile, CUDA graph capture, KV cache) from the Ray
    workers' logs: what the rollout group's start-up time is made of."""
    lines: list[str] = []
    for f in sorted(logs_dir.glob("worker-*.out")) + sorted(logs_dir.glob("worker-*.err")):
        for line in f.read_text(errors="replace").splitlines():
            if ("INFO" in line or "WARNING" in line) and any(w in line for w in VLLM_TIMING_WORDS):
                reloads = sum("Reloading" in ln for ln in lines)  # one per weight sync: the first few say enough
                if "Reloading" not in line or reloads < 4:
                    lines.append(line.strip()[:300])
    return lines[:limit]


# Operator families of a profiled update, first match wins (names as torch.profiler reports kernels and aten ops).
OP_FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("lm_head_softmax", ("log_softmax", "logsumexp", "softmax", "cross_entropy", "nll_loss", "gather")),
    ("fused_norm_rope_mlp", ("liger", "rms_norm", "rope", "swiglu", "triton")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "_amp_")),
    ("matmul", ("gemm", "aten::mm", "aten::addmm", "aten::bmm", "matmul", "cutlass", "nvjet", "xmma", "cublas")),
    ("copy_cast", ("copy", "memcpy", "memset", "aten::to", "aten::cat", "fill", "clone")),
)


def op_shares(ops: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Where a profiled update's device time went: each family's share of the summed self time (``other``: the
    rest, mostly elementwise kernels), and ``busy`` = summed self time / wall (below 1: the device waited on the
    host, or CPU-only ops ran)."""
    totals = {name: 0.0 for name, _ in OP_FAMILIES} | {"other": 0.0}
    for op in ops:
        low = op["name"].lower()
        family = next((name for name, words in OP_FAMILIES if any(w in low for w in words)), "other")
        totals[family] += op["self_ms"]
    total_ms = sum(totals.values())
    return {"device_ms": round(total_ms, 1), "busy": round(total_ms / 1e3 / wall_s, 3) if wall_s else None,
            "shares": {k: round(v / total_ms, 3) if total_ms else 0.0 for k, v in totals.items()}}


def write_json(result: dict[str, Any], out: Path, *, partial: bool) -> None:
    """Atomically (re)write the JSON; ``partial`` marks one written after a variant, before the run ended."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({**result, "partial": partial}, indent=1) + "\n")
    os.replace(tmp, out)
