"""``cascade-rl``: run and validate recipes, check rewards, build pairs, inspect logs, plot reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, RecipeConfig, load_recipe


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 stages.2.gspo.num_steps=5")


def cmd_run(args: argparse.Namespace) -> int:
    from .stages.driver import run

    cfg = load_recipe(args.recipe, args.overrides)
    problems = check_resources(cfg, read_prompt_rows=False)  # the driver reads and checks every row itself
    if problems:
        raise ConfigError(f"{args.recipe}: " + "; ".join(problems))
    run(cfg, recipe_path=args.recipe)
    return 0


def check_resources(cfg: RecipeConfig, *, read_prompt_rows: bool = True) -> list[str]:
    """What ``validate`` checks beyond the recipe itself: datasets (with ``read_prompt_rows``, every row of a local
    prompt file), rewards, model config."""
    from .data.prompts import load_prompts, resolve_data_path
    from .data.tiny_models import resolve_model_path
    from .rewards import get_reward
    from .security import check_reward_spec

    problems: list[str] = []
    d = cfg.data
    for key in ("train", "eval"):
        spec = getattr(d, key)
        try:
            path = resolve_data_path(spec, Path(cfg.run_dir) / "data", check_only=True)
            if read_prompt_rows and not spec.startswith("synthetic:"):  # a user's file: every row, now
                load_prompts(path, id_key=d.id_key, prompt_key=d.prompt_key, answer_key=d.answer_key,
                             image_key=d.image_key, system_prompt=d.system_prompt,
                             skip_bad_rows=d.skip_bad_rows)
        except (FileNotFoundError, ValueError) as exc:  # PromptDataError is a ValueError
            problems.append(f"data.{key}: {exc}")
    for i, term in enumerate(cfg.reward.terms):
        try:
            check_reward_spec(term.name, key=f"reward.terms.{i}.name")
        except ValueError as exc:
            problems.append(str(exc))
            continue
        try:
            get_reward(term.name)
        except (KeyError, ValueError, ImportError) as exc:
            problems.append(f"reward.terms.{i}.name: {exc}")
    if not cfg.model.path.startswith("tiny:"):
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(resolve_model_path(cfg.model.path))
        except Exception as exc:  # noqa: BLE001 - any load failure is reported with the key
            problems.append(f"model.path={cfg.model.path!r}: cannot load its config ({exc})")
    return problems


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    problems = check_resources(cfg)
    if problems:
        print(f"{args.recipe}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    kinds = " -> ".join(f"{s.name}({s.kind})" for s in cfg.stages)
    print(f"{args.recipe}: OK — stages {kinds}; model {cfg.model.path}; rewards "
          f"{', '.join(t.name for t in cfg.reward.terms)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import make_report

    try:
        report = make_report(args.run_dir, args.output, run_id=args.run_id, tracking_uri=args.tracking_uri)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade-rl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a recipe's stages (sft, rollout, mpo, gspo) in order")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="resolve and check a recipe without training")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("report", help="plot reward, accuracy and losses per stage from a run's MLflow store")
    p.add_argument("run_dir", type=Path, help="the run folder (recipe run_dir) holding mlflow.db")
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG path (default RUN_DIR/report.png)")
    p.add_argument("--run-id", default=None, help="MLflow run id (default: the newest run in the store)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default sqlite:///RUN_DIR/mlflow.db)")
    p.set_defaults(func=cmd_report)
    for module, adder in (("rewards_cli", "add_rewards_parser"), ("pairs_cli", "add_pairs_parser"),
                          ("pairs_cli", "add_logs_parser")):
        try:
            mod = __import__(f"cascade_rl.{module}", fromlist=[adder])
        except ImportError:
            continue
        getattr(mod, adder)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc  # a worker's error arrives wrapped in Ray's RayTaskError
        if type(cause).__name__ not in USER_FACING_ERRORS:
            raise
        # the message already names the row / worker / checkpoint and the fix; a traceback adds nothing
        print(f"error ({type(cause).__name__}): {cause}", file=sys.stderr)
        return 1


# Errors whose message is the whole story (bad data rows, a corrupt log shard, workers that keep dying, a
# learner rank lost, an engine that cannot start): matched by name so the CLI never imports Ray or vLLM to check.
USER_FACING_ERRORS = {"PromptDataError", "CorruptShardError", "LearnerFailedError", "WorkersKeepDyingError",
                      "RolloutEngineError"}


if __name__ == "__main__":
    sys.exit(main())
