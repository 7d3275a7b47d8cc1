"""The driver: one controller that runs a recipe's stages in order on Ray and owns checkpoints and tracking.

    for each stage:  resume point? → run the stage → checkpoint (COMPLETE last) → evaluate → record the result

Each stage starts from the policy the previous one left in the learners (and, after a restart, from the newest
complete checkpoint). ``resume=auto`` reopens the same MLflow run.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..config import RecipeConfig, StageConfig, flatten
from ..data.prompts import load_prompts, prompt_options, resolve_data_path
from ..data.tiny_models import resolve_model_path
from ..security import make_private_dir, redact, redact_text, tighten_ray_token
from ..tracking import Tracker
from .batching import Encoder
from .console import GracefulStop, StopRun, phase, setup_logging, use_step_lines
from .context import RunContext
from .gspo import run_gspo
from .mpo import run_mpo
from .rollout import run_rollout
from .sft import run_sft
from .state import DriverState, RunState, latest_checkpoint, read_driver_state
from .storage import translate_storage_errors
from .workers import build_groups, init_ray

StageFn = Callable[[RunContext, StageConfig, int], None]
STAGES: dict[str, StageFn] = {"sft": run_sft, "rollout": run_rollout, "mpo": run_mpo, "gspo": run_gspo}


class RunStopped(Exception):  # noqa: N818 - the run was asked to stop, and did
    """Ctrl-C / SIGTERM: the run stopped (at a step boundary, with a checkpoint, unless asked twice)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run(cfg: RecipeConfig, recipe_path: str | os.PathLike | None = None, overrides: list[str] | None = None,
        verbose: bool = False) -> dict[str, dict[str, float]]:
    with translate_storage_errors(Path(cfg.run_dir).resolve()):  # disk full, read-only run_dir, bad mlflow.db...
        return _run(cfg, recipe_path, overrides, verbose)


def _run(cfg: RecipeConfig, recipe_path: str | os.PathLike | None, overrides: list[str] | None,
         verbose: bool) -> dict[str, dict[str, float]]:
    run_dir = Path(cfg.run_dir).resolve()
    make_private_dir(run_dir, cfg.run_dir_mode)  # 0700 unless the recipe widens it
    log_file = setup_logging(run_dir, verbose)
    print(f"run_dir {run_dir} (library logs: {log_file}; -v shows them)", flush=True)
    ctx = _start(cfg, run_dir, verbose, recipe_path)
    use_step_lines(ctx.tracker)
    ctx.encoder = Encoder(ctx.model_path, max_tiles=cfg.model.max_tiles)
    stop = ctx.stop = GracefulStop().install()  # after ray.init, which sets a SIGTERM handler of its own
    status, at_once = "FAILED", False
    try:
        _run_stages(ctx, cfg)
        status = "FINISHED"
    except StopRun:
        status = "KILLED"
        stage = cfg.stages[min(ctx.state.stage_index, len(cfg.stages) - 1)]
        ckpt = ctx.checkpoint(stage)  # at a step boundary: complete, resumes exactly here
        print(f"stopped ({stop.requested}) after step {ctx.state.stage_step} of stage `{stage.name}`; "
              f"checkpoint {ckpt}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        status, at_once = "KILLED", True
        ctx.tracker.flush_timeout_s = min(ctx.tracker.flush_timeout_s, 5.0)
    finally:
        stop.uninstall()
        ctx.tracker.end(status)
    if status == "KILLED":
        if not at_once:
            ctx.shutdown_workers()
        since = "the newest complete checkpoint" if at_once else "this checkpoint"
        raise RunStopped(f"MLflow run {ctx.run_state.mlflow_run_id} marked KILLED; resume from {since} with:\n"
                         f"  {resume_command(recipe_path, overrides)}", stop.exit_code)
    print_results(ordered_results(cfg, ctx.run_state.stage_results), ctx.run_state.mlflow_run_id, ctx.tracker.uri)
    ctx.shutdown_workers()  # after a failure the actors die with the driver: a stuck one must not hang the exit
    return ordered_results(cfg, ctx.run_state.stage_results)


def _run_stages(ctx: RunContext, cfg: RecipeConfig) -> None:
    run_dir = ctx.run_dir
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
        ctx.tracker.begin_stage(stage.name, i, stage.kind)
        t0 = time.perf_counter()
        if cfg.rollout.sleep_when_idle and stage.kind in ("sft", "mpo"):
            ctx.rollout.sleep()  # learner-only stage: give the GPU memory to the learners
        STAGES[stage.kind](ctx, stage, i)
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


def resume_command(recipe_path: str | os.PathLike | None, overrides: list[str] | None) -> str:
    """The command that continues this run from its newest complete checkpoint."""
    kept = [o for o in overrides or [] if not o.startswith("resume=")]
    args = [str(recipe_path or "RECIPE.yaml"), *kept, "resume=auto"]
    return "cascade-rl run " + " ".join(shlex.quote(a) for a in args)


def ordered_results(cfg: RecipeConfig, results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``start`` then the stages in recipe order, whatever order a resumed run's saved results came back in."""
    order = ["start", *(s.name for s in cfg.stages)]
    return {k: results[k] for k in sorted(results, key=lambda k: order.index(k) if k in order else len(order))}


def run_tags(cfg: RecipeConfig, recipe_path: str | os.PathLike | None) -> dict[str, str]:
    """MLflow tags: recipe name and hash (of the resolved recipe), git commit of the code that runs."""
    resolved = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    tags = {"recipe": cfg.name, "cascade_rl.recipe_hash": hashlib.sha256(resolved.encode()).hexdigest()[:16],
            **cfg.tracking.tags}
    if recipe_path:
        tags["cascade_rl.recipe_file"] = str(recipe_path)
    commit = os.environ.get("CASCADE_RL_GIT_COMMIT") or _git(["rev-parse", "HEAD"])
    if commit:  # MLflow's own tag: the UI shows it as the run's source version
        tags["mlflow.source.git.commit"] = commit
        if not os.environ.get("CASCADE_RL_GIT_COMMIT"):
            tags["cascade_rl.git_dirty"] = str(bool(_git(["status", "--porcelain", "--untracked-files=no"])))
    return tags


def _git(args: list[str]) -> str:
    """Output of a git command in the package's folder; empty where there is no git or no repository (a job's
    uploaded working dir: submit.sh passes CASCADE_RL_GIT_COMMIT instead)."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _start(cfg: RecipeConfig, run_dir: Path, verbose: bool = False,
           recipe_path: str | os.PathLike | None = None) -> RunContext:
    """Resolve data and model, reopen or start the MLflow run, start workers, restore the newest checkpoint."""
    # data and model first: a bad row fails here, before an MLflow run or any worker exists
    from transformers import AutoTokenizer

    with phase("model and prompts"):
        model_path = str(resolve_model_path(cfg.model.path))
        d = cfg.data
        keys = prompt_options(d, tokenizer=AutoTokenizer.from_pretrained(model_path),
                              max_prompt_tokens=cfg.model.max_prompt_tokens)
        train = load_prompts(resolve_data_path(d.train, run_dir / "data"), **keys)
        evals = load_prompts(resolve_data_path(d.eval, run_dir / "data"), **keys)
    run_state = RunState.load(run_dir) if cfg.resume == "auto" else RunState()
    ckpt = latest_checkpoint(run_dir) if cfg.resume == "auto" else None
    with phase(f"MLflow run in {redact_text(cfg.tracking.uri or 'run_dir/mlflow.db')}"):
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, run_dir)
        tags = redact(run_tags(cfg, recipe_path))  # secrets never reach MLflow, tags and name included
        run_name = redact_text(cfg.tracking.run_name or cfg.name)
        run_state.mlflow_run_id = tracker.start(run_name, tags, run_state.mlflow_run_id)
    try:  # from here on a failure must not leave the MLflow run RUNNING
        with phase("MLflow params"):
            tracker.set_tags(tags)  # a resumed run: the commit and recipe hash of this attempt
            run_state.save(run_dir)
            tracker.log_params(redact(flatten(cfg)))
            resolved: Any = OmegaConf.to_container(OmegaConf.structured(cfg))
            tracker.log_text(OmegaConf.to_yaml(redact(resolved)), "recipe/resolved.yaml")
            tracker.start_system_metrics(cfg.tracking.system_metrics_s)
        return _start_workers(cfg, run_dir, model_path, tracker, train, evals, run_state, ckpt, verbose)
    except BaseException:
        tracker.end("FAILED")
        raise


def _start_workers(cfg: RecipeConfig, run_dir: Path, model_path: str, tracker: Tracker, train: list, evals: list,
                   run_state: RunState, ckpt: Path | None, verbose: bool) -> RunContext:
    with phase("Ray"):
        init_ray(cfg, verbose=verbose)
        tighten_ray_token()  # Ray writes ~/.ray/auth_token 0644
    with phase("workers (learners, rollout engines, reward pool)"):
        learners, rollout, rewards, is_vlm = build_groups(cfg, model_path)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, model_path=model_path, tracker=tracker, learners=learners,
                     rollout=rollout, rewards=rewards, train_prompts=train, eval_prompts=evals,
                     run_state=run_state, is_vlm=is_vlm)
    if ckpt is not None:
        print(f"start-up: restoring {ckpt}", flush=True)
        ctx.state = read_driver_state(ckpt)
        ctx.state.restore_rng()
        try:
            learners.load_checkpoint(str(ckpt / "learner"))
        except Exception as exc:
            raise RuntimeError(f"resume: cannot load checkpoint {ckpt} ({type(exc).__name__}: {exc}). Move that "
                               f"folder out of {ckpt.parent} and run again with resume=auto to continue from the "
                               f"next older complete checkpoint.") from exc
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
