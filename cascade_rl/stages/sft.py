"""``sft`` stage: supervised warm start — LM (NLL) loss on prompt + reference solution."""

from __future__ import annotations

import time

from tqdm import tqdm

from ..config import StageConfig
from .batching import num_batches, sft_batch, take_batches
from .context import RunContext


def run_sft(ctx: RunContext, stage: StageConfig, index: int) -> None:
    sft, enc = stage.sft, ctx.require_encoder()
    items = ctx.train_prompts
    total = num_batches(len(items), sft.batch_size, sft.epochs)
    ctx.start_schedule(stage.lr or ctx.cfg.learner.lr, total)
    bar = tqdm(total=total, initial=ctx.state.stage_step, desc=f"[{stage.name}] sft", unit="step")
    for step, idx in take_batches(len(items), sft.batch_size, ctx.cfg.seed, sft.epochs, ctx.state.stage_step):
        batch = sft_batch([items[i] for i in idx], enc)
        t0 = time.perf_counter()
        metrics = ctx.learners.train_sft(batch, num_global_tokens=sum(len(r) for r in batch.response_token_ids))
        ctx.end_train_step(stage, step, total, metrics, time.perf_counter() - t0, bar)
    bar.close()
