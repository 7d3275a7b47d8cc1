"""The driver: one controller that runs a recipe's stages in order on Ray and owns checkpoints and tracking.

    for each stage:  resume point? → run the stage → checkpoint (COMPLETE last) → evaluate → record the result

Each stage starts from the policy the previous one left in the learners (and, after a restart, from the newest
complete checkpoint). ``resume=auto`` reopens the same MLflow run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from ..config import RecipeConfig, StageConfig, flatten
from ..data.prompts import load_prompts, resolve_data_path
from ..data.tiny_models import resolve_model_path
from ..security import redact, redact_text
from ..tracking import Tracker
from .batching import Encoder
from .context import RunContext
from .gspo import run_gspo
from .mpo import run_mpo
from .rollout import run_rollout
from .sft import run_sft
from .state import DriverState, RunState, latest_checkpoint, read_driver_state
from .workers import build_groups, init_ray

STAGES = {
    "sft": lambda ctx, stage, i, enc: run_sft(ctx, stage, enc),
    "rollout": lambda ctx, stage, i, enc: run_rollout(ctx, stage),
    "mpo": lambda ctx, stage, i, enc: run_mpo(ctx, stage, i, enc),
    "gspo": lambda ctx, stage, i, enc: run_gspo(ctx, stage, i),
}


def run(cfg: RecipeConfig, recipe_path: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = _start(cfg, run_dir)
    enc = Encoder(ctx.model_path, max_tiles=cfg.model.max_tiles)
    status = "FAILED"
    try:
        if "start" not in ctx.run_state.stage_results:
            ctx.run_state.stage_results["start"] = ctx.evaluate("start")
            ctx.run_state.save(run_dir)
        for i, stage in enumerate(cfg.stages):
            if i < ctx.state.stage_index:
                _evaluate_if_missing(ctx, stage, i)
                continue
            if i > ctx.state.stage_index:  # a fresh stage
                ctx.state.stage_index, ctx.state.stage_step = i, 0
            print(f"== stage {i}: {stage.name} ({stage.kind})", flush=True)
            t0 = time.perf_counter()
            if cfg.rollout.sleep_when_idle and stage.kind in ("sft", "mpo"):
                ctx.rollout.sleep()  # learner-only stage: give the GPU memory to the learners
            STAGES[stage.kind](ctx, stage, i, enc)
            ctx.log({f"perf/stage_{stage.name}_s": time.perf_counter() - t0})
            if stage.kind != "rollout":
                ctx.sync_weights()
            ctx.checkpoint(stage, stage_done=True)
            ctx.fault_point("done")
            if stage.kind != "rollout":  # a rollout stage leaves the policy as it was
                ctx.run_state.stage_results[stage.name] = ctx.evaluate(stage.name)
                ctx.run_state.save(run_dir)
            ctx.state.stage_index, ctx.state.stage_step = i + 1, 0
        if cfg.checkpoint.export_hf:
            ctx.learners.export_hf(str(run_dir / "final_hf"))
        status = "FINISHED"
    finally:
        ctx.tracker.end(status)
    print_results(ctx.run_state.stage_results, ctx.run_state.mlflow_run_id, ctx.tracker.uri)
    ctx.shutdown_workers()  # after a failure the actors die with the driver: a stuck one must not hang the exit
    return ctx.run_state.stage_results


def _start(cfg: RecipeConfig, run_dir: Path) -> RunContext:
    """Resolve data and model, reopen or start the MLflow run, start workers, restore the newest checkpoint."""
    # data and model first: a bad row fails here, before an MLflow run or any worker exists
    from transformers import AutoTokenizer

    model_path = str(resolve_model_path(cfg.model.path))
    d = cfg.data
    keys = dict(id_key=d.id_key, prompt_key=d.prompt_key, answer_key=d.answer_key, image_key=d.image_key,
                system_prompt=d.system_prompt, skip_bad_rows=d.skip_bad_rows,
                tokenizer=AutoTokenizer.from_pretrained(model_path),
                max_prompt_tokens=cfg.model.max_prompt_tokens)
    train = load_prompts(resolve_data_path(d.train, run_dir / "data"), **keys)
    evals = load_prompts(resolve_data_path(d.eval, run_dir / "data"), **keys)
    run_state = RunState.load(run_dir) if cfg.resume == "auto" else RunState()
    ckpt = latest_checkpoint(run_dir) if cfg.resume == "auto" else None
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, run_dir)
    tags = {"recipe": cfg.name, **cfg.tracking.tags}
    run_state.mlflow_run_id = tracker.start(cfg.tracking.run_name or cfg.name, tags, run_state.mlflow_run_id)
    run_state.save(run_dir)
    tracker.log_params(redact(flatten(cfg)))  # secrets never reach MLflow
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    tracker.log_text(OmegaConf.to_yaml(redact(resolved)), "recipe/resolved.yaml")
    init_ray(cfg)
    learners, rollout, rewards, is_vlm = build_groups(cfg, model_path)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, model_path=model_path, tracker=tracker, learners=learners,
                     rollout=rollout, rewards=rewards, train_prompts=train, eval_prompts=evals,
                     run_state=run_state, is_vlm=is_vlm)
    if ckpt is not None:
        ctx.state = read_driver_state(ckpt)
        ctx.state.restore_rng()
        learners.load_checkpoint(str(ckpt / "learner"))
        if ctx.state.stage_done:
            ctx.state.stage_index, ctx.state.stage_step = ctx.state.stage_index + 1, 0
        ctx.state.policy_version -= 1  # sync_weights bumps it back to the checkpoint's version
        ctx.sync_weights()
        print(f"resumed from {ckpt} (stage {ctx.state.stage_index}, step {ctx.state.stage_step})", flush=True)
    else:
        ctx.state = DriverState()
    return ctx


def _evaluate_if_missing(ctx: RunContext, stage: StageConfig, index: int) -> None:
    """A run stopped after a stage's final checkpoint but before its evaluation resumes from that checkpoint: the
    learners hold exactly that stage's policy, so evaluate it now instead of leaving a hole in the results."""
    if index == ctx.state.stage_index - 1 and stage.kind != "rollout" and stage.name not in ctx.run_state.stage_results:
        ctx.run_state.stage_results[stage.name] = ctx.evaluate(stage.name)
        ctx.run_state.save(ctx.run_dir)


def print_results(results: dict[str, dict[str, float]], run_id: str | None, uri: str) -> None:
    """The held-out table: greedy accuracy, and avg@k accuracy over k samples at the rollout temperature
    (``eval.sampled_n``; what the RL stages optimise), mean reward and response length per stage."""
    nan = float("nan")
    print("\nheld-out accuracy after each stage", file=sys.stdout)
    print(f"{'stage':<16}{'greedy acc':>12}{'sampled acc':>13}{'mean reward':>13}{'resp tokens':>13}")
    for name, m in results.items():
        print(f"{name:<16}{m.get('eval/accuracy', nan):>12.3f}{m.get('eval/sampled/accuracy', nan):>13.3f}"
              f"{m.get('eval/mean_reward', nan):>13.3f}{m.get('eval/response_tokens', nan):>13.1f}")
    print(f"MLflow run {run_id} in {redact_text(uri)}", flush=True)
