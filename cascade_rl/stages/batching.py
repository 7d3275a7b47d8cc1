"""Turning prompts, responses, records and pairs into learner batches (token ids), and iterating batches."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, cast

from ..data.prompts import PromptItem
from ..hf import PromptRenderer
from ..seeding import derive_seed
from ..types import PairBatch, PreferencePair, SequenceBatch
from .protocols import EncoderProtocol


class Encoder:
    """Prompts (chat template + images, by the same ``PromptRenderer`` as the rollout engines) and plain-text
    responses to token ids with the policy's tokenizer."""

    def __init__(self, model_path: str, *, max_tiles: int = 0) -> None:
        self.renderer = PromptRenderer(model_path, max_tiles=max_tiles)
        self.tokenizer = self.renderer.tokenizer
        self.eos = self.tokenizer.eos_token_id

    def prompt(self, messages: list[dict[str, Any]], images: list[str] | tuple[str, ...] = ()) -> list[int]:
        """Processor-expanded prompt ids: equal to what the rollout engine reports for the same prompt."""
        return self.renderer.render(messages, images).token_ids

    def response(self, text: str, *, add_eos: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.eos] if add_eos and self.eos is not None else ids


def sft_batch(items: list[PromptItem], enc: EncoderProtocol) -> SequenceBatch:
    """Prompt + reference response (``PromptItem.sft_target``: ``data.sft_target_key``, else a ``solution``
    column, else the answer cell) for the LM loss."""
    missing = [it.id for it in items if not (it.sft_target or it.answer)]
    if missing:
        raise ValueError(f"sft: prompt(s) {missing[:5]} have no reference response (no answer and no sft target); "
                         "set data.sft_target_key to the column holding the response to train on")
    responses = [enc.response(str(it.sft_target or it.answer)) for it in items]
    return SequenceBatch(prompt_token_ids=[enc.prompt(it.messages, it.images) for it in items],
                         response_token_ids=responses,
                         images=[it.images for it in items] if any(it.images for it in items) else None)


def pair_batch(pairs: list[PreferencePair]) -> PairBatch:
    has_ref = all(p.ref_chosen_logp is not None for p in pairs)
    return PairBatch(prompt_token_ids=[p.prompt_token_ids for p in pairs],
                     chosen_token_ids=[p.chosen_token_ids for p in pairs],
                     rejected_token_ids=[p.rejected_token_ids for p in pairs],
                     ref_chosen_logps=[cast(float, p.ref_chosen_logp) for p in pairs] if has_ref else None,
                     ref_rejected_logps=[cast(float, p.ref_rejected_logp) for p in pairs] if has_ref else None,
                     images=[p.images for p in pairs] if any(p.images for p in pairs) else None)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A deterministic shuffle per (seed, epoch): the data position is just an index into it."""
    order = list(range(n))
    random.Random(derive_seed(seed, "epoch", epoch)).shuffle(order)
    return order


def take_batches(n: int, batch_size: int, seed: int, epochs: int, start_step: int = 0) -> Iterator[tuple[int, list[int]]]:
    """``(step, indices)`` over ``epochs`` passes in batches, resuming at ``start_step``; a short tail is kept."""
    per_epoch = max((n + batch_size - 1) // batch_size, 1)
    for step in range(start_step, per_epoch * epochs):
        epoch, b = divmod(step, per_epoch)
        order = epoch_order(n, seed, epoch)
        idx = order[b * batch_size : (b + 1) * batch_size]
        if idx:
            yield step, idx


def num_batches(n: int, batch_size: int, epochs: int) -> int:
    return max((n + batch_size - 1) // batch_size, 1) * epochs
