"""``rollout`` stage: sample G responses per prompt from the current policy, score them, append to the log.

Prompts go in fixed chunks; a chunk's records carry deterministic ids, and a resumed stage skips the chunks
whose records are already in the log, so nothing is generated, lost or written twice.
"""

from __future__ import annotations

import json
import time

from tqdm import tqdm

from ..config import StageConfig
from ..data.rollout_log import RolloutLogWriter
from ..types import RolloutRecord
from .context import RunContext, messages_json, reward_metrics, rollout_metrics

CHUNK_PROMPTS = 32


def make_records(ctx: RunContext, stage: StageConfig, step: int, prompts, out, results) -> list[RolloutRecord]:
    run_id = ctx.run_state.mlflow_run_id or "local"
    per_prompt_s = out.generate_s / max(len(out.generations), 1)
    return [
        RolloutRecord(
            record_id=f"{run_id}/{stage.name}/{step}/{prompts[g.prompt_index].id}/{g.sample_index}",
            run_id=run_id, stage=stage.name, step=step, policy_version=g.policy_version,
            prompt_id=prompts[g.prompt_index].id, prompt=messages_json(prompts[g.prompt_index]),
            images=list(prompts[g.prompt_index].images), ground_truth=prompts[g.prompt_index].answer,
            response=g.text, prompt_token_ids=list(g.prompt_token_ids), response_token_ids=list(g.token_ids),
            behaviour_logprobs=list(g.logprobs), rewards=json.dumps(r.components), reward=float(r.total),
            correct=r.correct, finish_reason=g.finish_reason, num_prompt_tokens=g.num_prompt_tokens,
            num_response_tokens=len(g.token_ids), generate_s=per_prompt_s,
            error=json.dumps(r.errors) if r.errors else None,
            image_sha256=list(g.image_sha256), image_tiles=list(g.image_tiles),
        )
        for g, r in zip(out.generations, results, strict=True)
    ]


def log_dir(ctx: RunContext, stage_name: str):
    return ctx.run_dir / "rollouts" / stage_name


def run_rollout(ctx: RunContext, stage: StageConfig, index: int) -> None:
    prompts = ctx.train_prompts[: stage.num_prompts]
    writer = RolloutLogWriter(log_dir(ctx, stage.name))
    chunks = [prompts[i : i + CHUNK_PROMPTS] for i in range(0, len(prompts), CHUNK_PROMPTS)]
    bar = tqdm(total=len(chunks), initial=ctx.state.stage_step, desc=f"[{stage.name}] rollout", unit="chunk")
    run_id = ctx.run_state.mlflow_run_id or "local"
    for step in range(ctx.state.stage_step, len(chunks)):
        chunk = chunks[step]
        if f"{run_id}/{stage.name}/{step}/{chunk[0].id}/0" in writer.record_ids:  # logged before a restart
            ctx.finish_step()  # a chunk's shard is written whole, so the chunk is done
            bar.update(1)
            continue
        out = ctx.rollout.generate(chunk, ctx.cfg.rollout.group_size, key=ctx.sample_key(step))
        t0 = time.perf_counter()
        results = ctx.score(chunk, out.generations)
        score_s = time.perf_counter() - t0
        writer.append(make_records(ctx, stage, step, chunk, out, results))
        ctx.finish_step({**rollout_metrics(out), **reward_metrics(results), "perf/score_s": score_s})
        bar.update(1)
    bar.close()
