"""``mpo`` stage: preference pairs (from a rollout log, or a pairs file with ``mpo.pairs``), reference log-probs
once, then w_p·DPO + w_q·BCO + w_g·LM.

Pairs (with their reference log-probs from the frozen start policy) are written to ``pairs/<stage>.parquet``
before training, so a resumed stage reuses them instead of recomputing with a moved policy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from ..config import StageConfig
from ..data.pair_files import load_pair_file
from ..data.pairs import build_pairs, fill_token_ids, no_pairs_hint, read_pairs, write_pairs
from ..data.rollout_log import read_rollout_log
from ..hf import check_image_hashes
from .batching import num_batches, pair_batch, take_batches
from .context import RunContext
from .rollout import log_dir

REF_BATCH = 64


def _source_logs(ctx: RunContext, stage: StageConfig, index: int) -> Path:
    if stage.mpo.logs:
        return Path(stage.mpo.logs)
    previous = [s for s in ctx.cfg.stages[:index] if s.kind == "rollout"]
    return log_dir(ctx, previous[-1].name)
def check_logged_images(records: list) -> None:
    """Each logged image must still hold the content it was sampled with (hash in the log)."""
    seen: set[tuple[str, ...]] = set()
    for r in records:
        key = tuple(r.images or ())
        if key and key not in seen:
            seen.add(key)
            check_image_hashes(list(key), list(r.image_sha256 or []), f"rollout record {r.record_id}")


def prepare_pairs(ctx: RunContext, stage: StageConfig, index: int) -> list:
    path = ctx.run_dir / "pairs" / f"{stage.name}.parquet"
    if path.exists():
        return read_pairs(path)
    if stage.mpo.pairs:  # ready-made pairs (TRL/OpenRLHF files, MMPR meta.json) instead of a rollout log
        pairs, stats = load_pair_file(stage.mpo, key=f"stages.{index}.mpo")
        source = stage.mpo.pairs
    else:
        source = str(_source_logs(ctx, stage, index))
        records = read_rollout_log(source)
        check_logged_images(records)  # the images must still be those the engine sampled from
        pairs, stats = build_pairs(records, max_pairs_per_prompt=stage.mpo.max_pairs_per_prompt, seed=ctx.cfg.seed)
    if not pairs:
        raise RuntimeError(f"stage `{stage.name}`: no preference pairs from {source} "
                           f"({json.dumps(stats.as_dict())}): {no_pairs_hint(stats, source)}")
    enc = ctx.require_encoder()
    fill_token_ids(pairs, encode_prompt=enc.prompt, encode_response=enc.response)  # imported logs, pair files
    t0 = time.perf_counter()
    for i in range(0, len(pairs), REF_BATCH):  # reference log-probs with the frozen start policy
        part = pairs[i : i + REF_BATCH]
        chosen, rejected = ctx.learners.compute_pair_logps(pair_batch(part))
        for p, c, r in zip(part, chosen, rejected, strict=True):
            p.ref_chosen_logp, p.ref_rejected_logp = float(c), float(r)
    write_pairs(pairs, path)
    ctx.tracker.log_text(json.dumps(stats.as_dict(), indent=1), f"pairs/{stage.name}_stats.json")
    ctx.log({**{f"pairs/{k}": float(v) for k, v in stats.as_dict().items() if isinstance(v, (int, float))},
             "perf/ref_logprobs_s": time.perf_counter() - t0})
    return pairs


def run_mpo(ctx: RunContext, stage: StageConfig, index: int) -> None:
    mpo = stage.mpo
    pairs = prepare_pairs(ctx, stage, index)
    terms = [(t.loss, t.weight) for t in mpo.terms]
    total = num_batches(len(pairs), mpo.batch_size, mpo.epochs)
    ctx.start_schedule(stage.lr or ctx.cfg.learner.lr, total)
    bar = tqdm(total=total, initial=ctx.state.stage_step, desc=f"[{stage.name}] mpo", unit="step")
    for step, idx in take_batches(len(pairs), mpo.batch_size, ctx.cfg.seed, mpo.epochs, ctx.state.stage_step):
        t0 = time.perf_counter()
        metrics = ctx.learners.train_mpo(pair_batch([pairs[i] for i in idx]), terms=terms, beta=mpo.beta,
                                         num_global_pairs=len(idx))
        ctx.end_train_step(stage, step, total, metrics, time.perf_counter() - t0, bar)
    bar.close()
