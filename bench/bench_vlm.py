"""VLM GSPO-style step: rollout tokens/s of the worker vs plain generate, learner tokens/s and MFU, in one run.

    python bench/bench_vlm.py                 # GPU: InternVL3.5-2B shape, 64 prompts x G=8, <= 1024 tokens
    python bench/bench_vlm.py --small         # CPU smoke: the tiny VLM, 8 prompts x G=2, 16 tokens (< 3 min)
    python bench/bench_vlm.py --build-only    # only build the 2B-shaped model into the cache (about 4 GB)

Model: ``cascade_rl.data.tiny_models.build_tiny_vlm(shape="internvl3_5-2b")``, a random InternVL3.5-2B-shaped
model (InternViT-300M-448px tower, MLP projector, Qwen3-1.7B text model, vocab 151,936) built once into the cache.
Prompts: one image each, sized so InternVL's dynamic tiling (``--max-tiles 4``) makes a 1x1, 2x1, 3x1 or 2x2 grid
(1, 2+1, 3+1, 4+1 tiles with the thumbnail), noise pixels; a short question.

Rollout (same engine, same prompts, temperature 1, ``ignore_eos``, ``max_tokens``; rounds alternate the paths, the
best round of each counts):
- ``plain``: vLLM as its users call it, ``llm.generate([{"prompt": chat text, "multi_modal_data": {"image":
  [PIL]}}], SamplingParams(n=G, ...))``, images already loaded (untimed); on CPU (``--small``, vLLM cannot load
  InternVL without torchvision) the HF backend's model with ``model.generate`` per prompt;
- ``worker``: ``RolloutWorker.generate(messages + image paths, G)``: image loading, chat template and tiling by
  ``cascade_rl.hf.PromptRenderer``, the prompt-id check, records, behaviour log-probs (``logprobs=0``);
- ``worker_no_logprobs``: the same with ``rollout.behaviour_logprobs=false``.
``ratio_worker_over_plain`` (target >= 0.95) uses ``worker_no_logprobs`` (how the production recipes run).

Learner (after the engine is shut down, so it has the GPU): one GSPO step on the worker's responses, images
included, through ``LearnerWorker`` (one rank, bf16, ZeRO-2, gradient checkpointing): ``compute_logprobs`` (π_old)
and ``train_policy``. MFU = FLOPs / s / ``--peak-tflops`` (989: H100 SXM bf16 dense) with FLOPs =
``k · N_text · text tokens + k · N_vision · patch tokens`` (k = 6 to train, 2 forward only; a frozen tower counts 2;
attention FLOPs not counted). Writes ``bench/results/vlm_<device>.json`` (``vlm_cpu_small.json`` with --small).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# device_info() initialises CUDA in this process before the engine starts: a forked engine core could not use it
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
from bench_rollout import device_info  # noqa: E402

GRIDS = [(1, 1), (2, 1), (3, 1), (2, 2)]  # tiles wide x high: 1, 2+1, 3+1, 4+1 tiles with max_tiles=4


def make_prompts(folder: Path, num: int, tile: int) -> list[tuple[list[dict[str, Any]], list[str]]]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    prompts = []
    for i in range(num):
        w, h = GRIDS[i % len(GRIDS)]
        path = folder / f"img{i}.png"
        if not path.is_file():
            Image.effect_noise((w * tile, h * tile), 40 + rng.randrange(40)).convert("RGB").save(path)
        question = f"Describe region {rng.randrange(100)} of the image step by step."
        prompts.append(([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                        [str(path)]))
    return prompts


def best_of_rounds(paths: dict[str, Any], rounds: int) -> dict[str, dict[str, float]]:
    """Run each path once per round (alternating); keep each path's best tokens/s."""
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            tokens = fn()
            s = time.perf_counter() - t0
            if name not in best or tokens / s > best[name]["tokens_per_s"]:
                best[name] = {"tokens": tokens, "seconds": round(s, 3), "tokens_per_s": round(tokens / s, 1)}
    return best


def plain_path(worker: Any, prompts: list, args: argparse.Namespace) -> Any:
    """Plain generate on the worker's own engine, prompts rendered and images loaded beforehand (untimed)."""
    from cascade_rl.hf import load_images

    renderer = worker.engine.renderer
    texts = [renderer.chat_text(m, len(i)) for m, i in prompts]
    images = [load_images(i) for _, i in prompts]
    if args.backend == "vllm":
        from vllm import SamplingParams

        params = SamplingParams(n=args.group_size, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True)
        inputs = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, images, strict=True)]

        def run() -> int:
            outs = worker.engine.llm.generate(inputs, params, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)
        return run
    import torch

    model, proc = worker.engine.model, renderer.processor
    encs = [proc(text=[t], images=im, return_tensors="pt", **renderer.image_kwargs) for t, im in
            zip(texts, images, strict=True)]

    def run_hf() -> int:
        total = 0
        with torch.no_grad():
            for enc in encs:
                out = model.generate(**enc, do_sample=True, top_k=0, num_return_sequences=args.group_size,
                                     max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens)
                total += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        return total
    return run_hf


def bench_rollout(args: argparse.Namespace, model_path: str, prompts: list) -> tuple[dict[str, Any], Any]:
    from cascade_rl.actors.rollout import RolloutSpec, RolloutWorker

    from cascade_rl.stages.workers import spec_with

    spec = spec_with(RolloutSpec, model_path, backend=args.backend, dtype=args.dtype,
                     max_response_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, temperature=1.0,
                     top_p=1.0, gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=2,
                     enforce_eager=args.small, is_vlm=True, ignore_eos=True, max_tiles=args.max_tiles,
                     max_images_per_prompt=1)
    worker = RolloutWorker(spec)
    last: dict[str, Any] = {}

    def worker_path(logprobs: bool) -> Any:
        def run() -> int:
            worker.spec.behaviour_logprobs = logprobs  # the engine reads the same spec object per call
            last["out"] = worker.generate(prompts, args.group_size)
            return last["out"].num_output_tokens
        return run

    paths = {"plain": plain_path(worker, prompts, args), "worker": worker_path(True),
             "worker_no_logprobs": worker_path(False)}
    best = best_of_rounds(paths, args.rounds)
    out = last["out"]
    tiles = [t for g in out.generations if g.sample_index == 0 for t in g.image_tiles]
    worker.shutdown()
    return {"paths": best, "generate_s_worker": round(out.generate_s, 3), "tokenize_s_worker": round(out.tokenize_s, 3),
            "ratio_worker_over_plain": round(best["worker_no_logprobs"]["tokens_per_s"] /
                                             best["plain"]["tokens_per_s"], 3),
            "ratio_worker_logprobs_over_plain": round(best["worker"]["tokens_per_s"] / best["plain"]["tokens_per_s"], 3),
            "tiles_per_image": {str(k): tiles.count(k) for k in sorted(set(tiles))},
            "prompt_tokens_mean": round(out.num_prompt_tokens / max(len(prompts), 1), 1)}, out


def bench_learner(args: argparse.Namespace, model_path: str, prompts: list, out: Any) -> dict[str, Any]:
    import torch
    from cascade_rl.actors.learner import LearnerSpec, LearnerWorker

    from cascade_rl.stages.workers import spec_with
    from cascade_rl.types import SequenceBatch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = spec_with(LearnerSpec, model_path, dtype=args.dtype, zero_stage=args.zero_stage, lr=1e-6,
                     total_steps=10, micro_batch_tokens=args.micro_batch_tokens,
                     gradient_checkpointing=not args.small, is_vlm=True, max_tiles=args.max_tiles,
                     freeze_vision=args.freeze_vision)
    w = LearnerWorker(spec, 0, 1, "127.0.0.1", port)
    gens = out.generations
    batch = SequenceBatch([g.prompt_token_ids for g in gens], [g.token_ids for g in gens],
                          advantages=[1.0 if i % 2 else -1.0 for i in range(len(gens))],
                          images=[prompts[g.prompt_index][1] for g in gens])
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {"logprobs_s": [], "train_s": []}
    for step in range(args.learner_steps + 1):  # the first step warms up (not counted)
        sync()
        t0 = time.perf_counter()
        batch.old_logprobs = w.compute_logprobs(batch)
        sync()
        t1 = time.perf_counter()
        w.train_policy(batch, loss="gspo", clip_low=0.2, clip_high=0.2, num_global_seqs=len(batch),
                       num_global_tokens=sum(map(len, batch.response_token_ids)))
        sync()
        if step:
            times["logprobs_s"].append(t1 - t0)
            times["train_s"].append(time.perf_counter() - t1)
    vision = {n for n, _ in w.model.named_parameters() if "vision_tower" in n}
    n_vision = sum(p.numel() for n, p in w.model.named_parameters() if n in vision)
    n_text = sum(p.numel() for n, p in w.model.named_parameters() if n not in vision)
    cfg = w.model.config.vision_config
    patches = (cfg.image_size[0] // cfg.patch_size[0]) ** 2 if isinstance(cfg.image_size, list | tuple) else \
        (cfg.image_size // cfg.patch_size) ** 2
    text_tokens = sum(len(p) + len(r) for p, r in zip(batch.prompt_token_ids, batch.response_token_ids, strict=True))
    vision_tokens = sum(g.image_tiles[0] if g.image_tiles else 0 for g in gens) * patches
    lp_s, train_s = (min(times[k]) for k in ("logprobs_s", "train_s"))
    peak = (args.peak_tflops or 0.0) * 1e12  # no peak on CPU: MFU left out
    k_vis = 2 if args.freeze_vision else 6

    def mfu(flops: float, seconds: float) -> float | None:
        return round(flops / seconds / peak, 5) if peak else None
    return {"sequences": len(batch), "text_tokens": text_tokens, "vision_patch_tokens": vision_tokens,
            "params_text": n_text, "params_vision": n_vision, "logprobs_s": round(lp_s, 3), "train_s": round(train_s, 3),
            "train_tokens_per_s": round(text_tokens / train_s, 1),
            "logprobs_tokens_per_s": round(text_tokens / lp_s, 1),
            "train_mfu": mfu(6 * n_text * text_tokens + k_vis * n_vision * vision_tokens, train_s),
            "logprobs_mfu": mfu(2 * n_text * text_tokens + 2 * n_vision * vision_tokens, lp_s),
            "peak_tflops": args.peak_tflops, "freeze_vision": args.freeze_vision}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny VLM on CPU with the HF backend (a smoke run)")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--max-tiles", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--learner-steps", type=int, default=1)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--freeze-vision", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="default 989 (H100 bf16 dense) on CUDA")
    ap.add_argument("--note", default="")
    ap.add_argument("--build-only", action="store_true", help="build (and cache) the model, then exit")
    args = ap.parse_args()
    import torch

    from cascade_rl.data.tiny_models import build_tiny_vlm

    small = args.small or not torch.cuda.is_available()
    args.small = small
    args.peak_tflops = args.peak_tflops or (None if small else 989.0)
    args.num_prompts = args.num_prompts or (8 if small else 64)
    args.group_size = args.group_size or (2 if small else 8)
    args.max_tokens = args.max_tokens or (16 if small else 1024)
    args.backend, args.dtype = ("hf", "float32") if small else ("vllm", "bfloat16")
    model_path = str(build_tiny_vlm() if small else build_tiny_vlm(shape="internvl3_5-2b"))
    if args.build_only:
        print(model_path)
        return
    config = json.loads((Path(model_path) / "config.json").read_text())
    tile = config["vision_config"]["image_size"]
    tile = tile[0] if isinstance(tile, list) else tile
    # room for the folder's own worst case too (12 tiles + thumbnail), which vLLM may profile with
    args.max_prompt_tokens = 64 + (max(args.max_tiles, 12) + 1) * config.get("image_seq_length", 256)
    prompts = make_prompts(ROOT / ".cache" / "cascade_rl" / "bench" / f"vlm_images_{tile}", args.num_prompts, tile)
    rollout, out = bench_rollout(args, model_path, prompts)
    learner = bench_learner(args, model_path, prompts, out)
    device = "cpu" if small else "cuda"
    report = {"bench": "vlm", **device_info(device), "model": "tiny:vlm" if small else "internvl3_5-2b (random)",
              "num_prompts": args.num_prompts, "group_size": args.group_size, "max_tokens": args.max_tokens,
              "max_tiles": args.max_tiles, "rollout_backend": args.backend, "rollout": rollout, "learner": learner,
              "step_breakdown_s": {"generate": rollout["generate_s_worker"], "render": rollout["tokenize_s_worker"],
                                   "old_logprobs": learner["logprobs_s"], "train": learner["train_s"]},
              "note": args.note or ("CPU smoke: vLLM cannot load InternVL here (no torchvision), so plain = "
                                    "transformers generate" if small else "")}
    name = "vlm_cpu_small.json" if small else f"vlm_{device}.json"
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / name).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
