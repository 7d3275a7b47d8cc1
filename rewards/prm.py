"""``prm``: a process reward model (PRM) in the shape of VisualPRM (Wang et al. 2025, "VisualPRM", InternVL).

The response is split into steps (``step_split``, a regex; default: blank lines or newlines). Each step is
followed by a marker text (``marker``, default ``"<prm>"``), and the model reads

    prompt (chat template, images) + step_1 + marker + "\\n" + step_2 + marker + ...

The score of step k is read at the last token of its k-th marker, where the model predicts the judgement token:

    normalize="pair":   p_k = softmax([z_+, z_-])[0] = sigmoid(z_+ - z_-)     (VisualPRM: "+" vs "-" only)
    normalize="vocab":  p_k = softmax(z)[id_+]                               (over the whole vocabulary)

with ``z`` the logits at that position and ``id_+``/``id_-`` the single token ids of ``positive``/``negative``.
The response score aggregates the p_k: ``min`` (default, as VisualPRM's best-of-N), ``mean``, ``last`` or
``product``. Steps are tokenised one by one and concatenated, so marker positions are exact for any tokenizer.

The checkpoint is any local Hugging Face folder (``AutoModelForImageTextToText`` when its config has a
``vision_config``, else ``AutoModelForCausalLM``), loaded lazily with ``local_files_only=True`` and cached per
process. Samples are scored in padded batches of ``batch_size`` (on the GPU when there is one), text-only and
image samples together; image prompts are rendered by ``cascade_rl.hf.PromptRenderer`` (the policy's tiling,
``max_tiles``), and the batch's tiles are concatenated in row order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cascade_rl.hf import PromptRenderer
from cascade_rl.types import Sample

from .registry import Verdict, register_reward

DEFAULT_STEP_SPLIT = r"\n\s*\n|\n"
AGGREGATES = ("min", "mean", "last", "product")
_CACHE: dict[tuple[str, str, str, int], ProcessRewardModel] = {}


def split_steps(text: str, pattern: str = DEFAULT_STEP_SPLIT, max_steps: int = 64) -> list[str]:
    """Non-empty, stripped steps of ``text`` split by the regex ``pattern``; the tail beyond ``max_steps`` is
    merged into the last step (so every part of the response is scored)."""
    steps = [s.strip() for s in re.split(pattern, text or "") if s and s.strip()]
    if len(steps) > max_steps:
        steps = steps[:max_steps - 1] + ["\n".join(steps[max_steps - 1:])]
    return steps


def aggregate_scores(scores: Sequence[float], how: str = "min") -> float | None:
    """Response score from step scores: min | mean | last | product (None for no steps)."""
    if how not in AGGREGATES:
        raise ValueError(f"prm: kwargs.aggregate={how!r}; valid: {', '.join(AGGREGATES)}")
    if not scores:
        return None
    if how == "min":
        return min(scores)
    if how == "mean":
        return math.fsum(scores) / len(scores)
    if how == "last":
        return scores[-1]
    return math.prod(scores)


def _single_token(tokenizer: Any, text: str, key: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"prm: kwargs.{key}={text!r} is {len(ids)} tokens for this tokenizer; it must be exactly "
                         "one token (the judgement the PRM predicts after each marker)")
    return ids[0]


class ProcessRewardModel:
    """A loaded PRM: ``step_scores(samples)`` -> per-step probabilities of the positive judgement."""

    def __init__(self, model_path: str, *, device: str | None = None, dtype: str = "auto",
                 max_tiles: int = 0) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"prm: kwargs.model_path={model_path!r} is not a local Hugging Face folder (no "
                             "config.json); give the folder of a PRM checkpoint (the hub is never used)")
        self.path = path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.is_vlm = hasattr(config, "vision_config")
        cls = AutoModelForImageTextToText if self.is_vlm else AutoModelForCausalLM
        model: Any = cls.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._renderer: PromptRenderer | None = None
        self.max_tiles = max_tiles

    @property
    def renderer(self) -> PromptRenderer:
        """Prompt + images as the policy sees them (``cascade_rl.hf``), built on first image sample."""
        if self._renderer is None:
            self._renderer = PromptRenderer(str(self.path), max_tiles=self.max_tiles, tokenizer=self.tokenizer,
                                            is_vlm=self.is_vlm)
        return self._renderer

    def _prefix(self, sample: Sample) -> str:
        messages = list(sample.prompt or [])
        if sample.images and self.is_vlm and not any(
                isinstance(m.get("content"), list) and any(p.get("type") == "image" for p in m["content"])
                for m in messages):
            first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
            if first is not None:
                text = messages[first].get("content")
                parts = text if isinstance(text, list) else [{"type": "text", "text": str(text or "")}]
                messages[first] = {**messages[first],
                                   "content": [{"type": "image"} for _ in sample.images] + parts}
        if not messages:
            return ""
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return "\n".join(str(m.get("content", "")) for m in messages) + "\n"

    def build_inputs(self, sample: Sample, steps: list[str], marker: str) -> tuple[list[int], list[int], Any]:
        """``(input_ids, marker positions, pixel_values or None)`` for one sample's steps."""
        tok = self.tokenizer
        marker_ids = tok(marker, add_special_tokens=False)["input_ids"]
        if not marker_ids:
            raise ValueError(f"prm: kwargs.marker={marker!r} tokenises to nothing; use a visible text like '<prm>'")
        pixel_values = None
        if sample.images and self.is_vlm:
            rendered = self.renderer.render(list(sample.prompt or []), sample.images)
            ids, pixel_values = rendered.token_ids, rendered.pixel_values
        else:
            prefix = self._prefix(sample)
            ids = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        positions = []
        for k, step in enumerate(steps):
            ids = ids + tok(step if k == 0 else "\n" + step, add_special_tokens=False)["input_ids"] + marker_ids
            positions.append(len(ids) - 1)
        return ids, positions, pixel_values

    def _forward(self, batch: list[tuple[list[int], list[int], Any]], pos_id: int, neg_id: int,
                 normalize: str) -> list[list[float]]:
        import torch

        width = max(len(ids) for ids, _, _ in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, (ids, _, _) in enumerate(batch):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            mask[b, :len(ids)] = 1
        # InternVL fills image-context tokens in row order: the rows' tiles concatenated in that order
        pixels = [pv for _, _, pv in batch if pv is not None]
        extra = {"pixel_values": torch.cat(pixels).to(self.device, self.model.dtype)} if pixels else {}
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                **extra).logits.float()  # (B, T, V)
        out = []
        for b, (_, positions, _) in enumerate(batch):
            z = logits[b, positions]  # (K, V)
            if normalize == "pair":
                p = torch.softmax(z[:, [pos_id, neg_id]], dim=-1)[:, 0]
            else:
                p = torch.softmax(z, dim=-1)[:, pos_id]
            out.append(p.tolist())
        return out

    def step_scores(self, samples: Sequence[Sample], *, step_split: str = DEFAULT_STEP_SPLIT, marker: str = "<prm>",
                    positive: str = "+", negative: str = "-", normalize: str = "pair", batch_size: int = 8,
                    max_steps: int = 64) -> list[list[float]]:
        """Per-step probabilities of ``positive`` for each sample (an empty list for a response without steps)."""
        if normalize not in ("pair", "vocab"):
            raise ValueError(f"prm: kwargs.normalize={normalize!r}; valid: 'pair', 'vocab'")
        pos_id = _single_token(self.tokenizer, positive, "positive")
        neg_id = _single_token(self.tokenizer, negative, "negative")
        scores: list[list[float]] = [[] for _ in samples]
        inputs = {}
        for i, s in enumerate(samples):
            steps = split_steps(s.response if isinstance(s.response, str) else "", step_split, max_steps)
            if steps:
                inputs[i] = self.build_inputs(s, steps, marker)
        order = list(inputs)  # text-only and image samples share padded batches
        groups = [order[j:j + batch_size] for j in range(0, len(order), max(1, batch_size))]
        for group in groups:
            for i, p in zip(group, self._forward([inputs[i] for i in group], pos_id, neg_id, normalize), strict=True):
                scores[i] = p
        return scores


def load_prm(model_path: str, *, device: str | None = None, dtype: str = "auto",
             max_tiles: int = 0) -> ProcessRewardModel:
    """A ``ProcessRewardModel`` for ``model_path``, loaded once per process and cached."""
    key = (str(Path(model_path).expanduser().resolve()), device or "", dtype, max_tiles)
    if key not in _CACHE:
        _CACHE[key] = ProcessRewardModel(model_path, device=device, dtype=dtype, max_tiles=max_tiles)
    return _CACHE[key]


@register_reward("prm", batched=True)
def prm_reward(samples: list[Sample], *, model_path: str, aggregate: str = "min",
               step_split: str = DEFAULT_STEP_SPLIT, marker: str = "<prm>", positive: str = "+",
               negative: str = "-", normalize: str = "pair", batch_size: int = 8, device: str | None = None,
               dtype: str = "auto", max_steps: int = 64, max_tiles: int = 0) -> list[float | None]:
    """Process reward model (VisualPRM-style): per-step P(+) at step markers, aggregated (min|mean|last|product)."""
    aggregate_scores([], aggregate)  # validate before loading a model
    prm = load_prm(model_path, device=device, dtype=dtype, max_tiles=max_tiles)
    steps = prm.step_scores(samples, step_split=step_split, marker=marker, positive=positive, negative=negative,
                            normalize=normalize, batch_size=batch_size, max_steps=max_steps)
    out: list[float | None] = []
    for p in steps:
        value = aggregate_scores(p, aggregate)
        out.append(Verdict(0.0, "empty response: no steps to score") if value is None else value)
    return out


def best_of_n(samples_by_prompt: Sequence[Sequence[Sample]],
              scorer: Callable[[list[Sample]], Sequence[float | None]]) -> list[int]:
    """For each prompt's candidates, the index of the highest-scored one (first on ties; None scores lowest).

    ``scorer`` takes a flat list of samples (e.g. ``lambda s: prm_reward(s, model_path=...)``) and is called
    once for all prompts.
    """
    flat = [s for group in samples_by_prompt for s in group]
    scores = list(scorer(flat))
    if len(scores) != len(flat):
        raise ValueError(f"best_of_n: scorer returned {len(scores)} scores for {len(flat)} samples")
    chosen, start = [], 0
    for group in samples_by_prompt:
        if not group:
            raise ValueError("best_of_n: a prompt has no candidate responses")
        vals = [-math.inf if v is None else float(v) for v in scores[start:start + len(group)]]
        chosen.append(vals.index(max(vals)))  # the first of the best
        start += len(group)
    return chosen
