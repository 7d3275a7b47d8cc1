"""Tiny random models built from config with a locally trained tokenizer (no model hub), cached by content.

- ``build_tiny_lm``: a Qwen3 causal LM (``Qwen3ForCausalLM``), loadable by transformers and ``vllm.LLM``.
- ``build_tiny_vlm``: an InternVL-architecture VLM (transformers' ``InternVLForConditionalGeneration``: an
  InternViT-style vision tower, pixel-shuffle + MLP projector, a Qwen3 text model), as in InternVL3.5.
  Its processor comes from ``cascade_rl.hf.load_processor``: InternVL's ``AutoProcessor`` also wants a video
  processor, which needs torchvision (not installed on CPU machines), so there the image processor (the PIL
  ``GotOcr2ImageProcessorPil``) and the tokenizer are joined in an image-only ``InternVLProcessor``.

A build lands in ``$CASCADE_RL_CACHE/models/<kind>-<hash>`` (default cache ``~/.cache/cascade_rl``), the hash
covering the build arguments and ``BUILDER_VERSION``; it is written to a temp folder and renamed, so concurrent
builders and crashes never leave a half model, and a second call returns the finished folder at once.
Defaults are sized so the demo learns arithmetic on a 2-core CPU in minutes: head_dim 64 (vLLM's CPU attention
rejects 16), hidden 128, 2 layers; the tokenizer has ~550 tokens (digits one per token).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

BUILDER_VERSION = 3  # bump when a build's output changes, so cached models are rebuilt
STAMP = "cascade_rl_build.json"


def cache_root() -> Path:
    """``$CASCADE_RL_CACHE`` or ``~/.cache/cascade_rl``: where built models and generated data are kept."""
    return Path(os.environ.get("CASCADE_RL_CACHE") or Path.home() / ".cache" / "cascade_rl").expanduser()


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: the synthetic tasks' questions and solutions, all difficulties."""
    from .tasks import DIFFICULTIES, make_arithmetic, shapes_scene

    rows = [r for d in DIFFICULTIES for r in make_arithmetic(1000, seed, difficulty=d)]
    rng = random.Random(seed)
    rows += [shapes_scene(rng) for _ in range(600)]
    return [f"{r['prompt']}\n{r['solution']}" for r in rows] + ["system\nuser\nassistant\n"] * 10


def _cached_build(kind: str, args: dict[str, Any], out_dir: str | Path | None,
                  build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` unless a folder with the same stamp exists; rename the temp folder into place."""
    stamp = {"kind": kind, "builder_version": BUILDER_VERSION, "args": args}
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    target = Path(out_dir) if out_dir is not None else cache_root() / "models" / f"{kind}-{key}"
    if (target / STAMP).is_file():
        if json.loads((target / STAMP).read_text()) == stamp:
            return target
        raise FileExistsError(f"{target} holds a model built with other arguments "
                              f"({(target / STAMP).read_text().strip()}); pass another out_dir or delete it")
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a tiny-model build; pass an empty or new out_dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        (tmp / STAMP).write_text(json.dumps(stamp, sort_keys=True, indent=1))
        if target.exists():
            target.rmdir()  # an empty folder (checked above)
        os.rename(tmp, target)
    except OSError:
        if not (target / STAMP).is_file():  # lost a race to another builder only if its build is complete
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _text_config(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, intermediate_size: int, max_position_embeddings: int, tok: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def _save_generation_config(model: Any, tok: Any, out: Path) -> None:
    from transformers import GenerationConfig

    # Stop on <|im_end|> (end of turn) and <|endoftext|>, as Qwen chat models do; vLLM reads this file too.
    eos = [tok.eos_token_id, tok.pad_token_id]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id)
    model.generation_config.save_pretrained(out)


def _train_tokenizer(out: Path, vocab_size: int, seed: int) -> Any:
    from transformers import AutoTokenizer

    from .tokenizer import train_tokenizer

    train_tokenizer(out, tokenizer_corpus(seed), vocab_size=vocab_size)
    return AutoTokenizer.from_pretrained(out)


def build_tiny_lm(out_dir: str | Path | None = None, *, hidden_size: int = 128, num_layers: int = 2,
                  num_heads: int = 2, num_kv_heads: int = 1, head_dim: int = 64, intermediate_size: int = 384,
                  vocab_size: int = 1024, max_position_embeddings: int = 1024, seed: int = 0) -> Path:
    """Build (or reuse) a random tiny Qwen3 causal LM with its tokenizer; return the Hugging Face folder.

    ``vocab_size`` bounds the BPE; the model's vocabulary is exactly the tokenizer's (``len(tokenizer)``), so
    every id the model can sample decodes. Weights are float32 safetensors, initialised from ``seed``.
    """
    args = {k: v for k, v in locals().items() if k != "out_dir"}

    def build(tmp: Path) -> None:
        import torch
        from transformers import Qwen3ForCausalLM

        tok = _train_tokenizer(tmp, vocab_size, seed)
        config = _text_config(len(tok), hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
                              intermediate_size, max_position_embeddings, tok)
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
        model.save_pretrained(tmp)
        _save_generation_config(model, tok, tmp)

    return _cached_build("lm", args, out_dir, build)


# InternVL3.5-2B: InternViT-300M-448px (24 layers, hidden 1024, 16 heads, 448-px input, patch 14 -> 256 tokens per
# tile after the 0.5 pixel shuffle), MLP projector 4096 -> 2048, Qwen3-1.7B text model (28 layers, hidden 2048,
# 16/8 heads, head_dim 128, vocab 151,936, tied embeddings). Random weights: for throughput benchmarks.
VLM_SHAPES: dict[str, dict[str, Any]] = {
    "internvl3_5-2b": dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                           intermediate_size=6144, model_vocab_size=151_936, max_position_embeddings=40_960,
                           vision_hidden_size=1024, vision_layers=24, vision_heads=16, image_size=448,
                           patch_size=14, max_tiles=12, dtype="bfloat16"),
}


def build_tiny_vlm(out_dir: str | Path | None = None, *, shape: str = "tiny", hidden_size: int = 128,
                   num_layers: int = 2, num_heads: int = 2, num_kv_heads: int = 1, head_dim: int = 64,
                   intermediate_size: int = 384, vocab_size: int = 1024, model_vocab_size: int = 0,
                   max_position_embeddings: int = 1024, vision_hidden_size: int = 64, vision_layers: int = 1,
                   vision_heads: int = 1, image_size: int = 64, patch_size: int = 16, max_tiles: int = 1,
                   dtype: str = "float32", seed: int = 0) -> Path:
    """Build (or reuse) a random InternVL VLM (Qwen3 text model) with tokenizer and image processor.

    An image tile becomes ``(image_size / patch_size)^2`` patches, pixel-shuffled by 0.5 into
    ``image_seq_length = (image_size / patch_size / 2)^2`` tokens (4 by default) in the text stream; the saved
    image processor tiles up to ``max_tiles`` (recipes override it with ``model.max_tiles``). ``shape`` other
    than ``tiny`` (one of ``VLM_SHAPES``, e.g. ``internvl3_5-2b``) sets every size argument from that preset.
    ``model_vocab_size`` pads the embedding beyond the tokenizer (0: exactly the tokenizer's length), as real
    Qwen3 checkpoints do; padded ids decode to nothing. Big shapes are built on the GPU when there is one.
    """
    if shape != "tiny":
        if shape not in VLM_SHAPES:
            raise ValueError(f"tiny:vlm shape={shape!r}: valid shapes are tiny, {', '.join(VLM_SHAPES)}")
        preset = VLM_SHAPES[shape]
        hidden_size, num_layers, num_heads, num_kv_heads = (preset[k] for k in ("hidden_size", "num_layers",
                                                                                 "num_heads", "num_kv_heads"))
        head_dim, intermediate_size, model_vocab_size = preset["head_dim"], preset["intermediate_size"], \
            preset["model_vocab_size"]
        max_position_embeddings, vision_hidden_size = preset["max_position_embeddings"], preset["vision_hidden_size"]
        vision_layers, vision_heads, image_size = preset["vision_layers"], preset["vision_heads"], preset["image_size"]
        patch_size, max_tiles, dtype = preset["patch_size"], preset["max_tiles"], preset["dtype"]
    args = {k: v for k, v in locals().items() if k not in ("out_dir", "preset")}
    if image_size % (2 * patch_size):
        raise ValueError(f"image_size={image_size} must be a multiple of 2 * patch_size={2 * patch_size} "
                         "(InternVL pixel-shuffles the patch grid by 0.5)")

    def build(tmp: Path) -> None:
        import torch
        from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        tok = _train_tokenizer(tmp, vocab_size, seed)
        if model_vocab_size and model_vocab_size < len(tok):
            raise ValueError(f"model_vocab_size={model_vocab_size} is below the tokenizer's {len(tok)} tokens")
        vision = InternVLVisionConfig(
            hidden_size=vision_hidden_size, num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
            intermediate_size=4 * vision_hidden_size, image_size=image_size, patch_size=patch_size)
        text = _text_config(model_vocab_size or len(tok), hidden_size, num_layers, num_heads, num_kv_heads,
                            head_dim, intermediate_size, max_position_embeddings, tok)
        config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                                image_token_id=tok.context_image_token_id,
                                image_seq_length=(image_size // patch_size // 2) ** 2, tie_word_embeddings=True)
        torch.manual_seed(seed)
        if dtype == "float32":
            model = InternVLForConditionalGeneration(config)
        else:  # a benchmark shape: built in its dtype, on the GPU if there is one (a 2B model is 8 GB in fp32)
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                model = InternVLForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(tmp)
        _save_generation_config(model, tok, tmp)
        GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=max_tiles > 1,
                                 min_patches=1, max_patches=max_tiles).save_pretrained(tmp)
        # As in InternVL *-hf folders: AutoProcessor (where torchvision exists) reads image_seq_length here.
        (tmp / "processor_config.json").write_text(json.dumps(
            {"processor_class": "InternVLProcessor", "image_seq_length": config.image_seq_length}, indent=1))

    return _cached_build("vlm", args, out_dir, build)


def load_vlm_processor(path: str | Path) -> Any:
    """The VLM folder's processor, torchvision-free where needed (``cascade_rl.hf.load_processor``).

    Usage: ``text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` (each
    ``{"type": "image"}`` part renders as one ``<IMG_CONTEXT>``), then
    ``proc(text=[text], images=[pil_image], return_tensors="pt")``; to get the exact ids every part of the
    system uses, render with ``cascade_rl.hf.PromptRenderer`` instead.
    """
    from cascade_rl.hf import load_processor

    return load_processor(str(path))


TINY_BUILDERS: dict[str, Callable[..., Path]] = {"lm": build_tiny_lm, "vlm": build_tiny_vlm}


def _parse_value(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def resolve_model_path(spec: str) -> Path:
    """``tiny:lm`` / ``tiny:vlm`` (optionally ``tiny:lm?hidden_size=256&num_layers=4``) -> a built folder;
    any other string is a local Hugging Face folder, which must exist."""
    if spec.startswith("tiny:"):
        name, _, query = spec[len("tiny:"):].partition("?")
        if name not in TINY_BUILDERS:
            raise ValueError(f"model.path={spec!r}: unknown tiny model {name!r}; set model.path to one of "
                             f"{', '.join('tiny:' + k for k in TINY_BUILDERS)} or a local model folder")
        builder = TINY_BUILDERS[name]
        kwargs = {k: _parse_value(v) for k, v in parse_qsl(query, keep_blank_values=True)}
        valid = [p for p in inspect.signature(builder).parameters if p != "out_dir"]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"model.path={spec!r}: unknown argument(s) {', '.join(unknown)} for tiny:{name}; "
                             f"valid: {', '.join(valid)}")
        return builder(**kwargs)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model.path={spec!r}: no such folder. Set model.path to a local Hugging Face "
                                "model folder (config.json + weights + tokenizer) or to tiny:lm / tiny:vlm "
                                "(there is no model hub: names like Qwen/Qwen3-0.6B are not downloaded)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path={spec!r}: {path} has no config.json, so it is not a Hugging Face "
                                "model folder; set model.path to the folder that holds config.json")
    return path.resolve()
