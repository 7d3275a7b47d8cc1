"""``cascade-rl``: run and validate recipes, check rewards, build pairs, inspect logs, plot reports."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError, RecipeConfig, load_recipe
from .security import redact_text


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 stages.2.gspo.num_steps=5")


def cmd_run(args: argparse.Namespace) -> int:
    from .stages.driver import RunStopped, run

    cfg = load_recipe(args.recipe, args.overrides)
    problems = check_resources(cfg, read_prompt_rows=False)  # the driver reads and checks every row itself
    if problems:
        raise ConfigError(f"{args.recipe}: " + "; ".join(problems))
    try:
        run(cfg, recipe_path=args.recipe, overrides=args.overrides, verbose=args.verbose)
    except RunStopped as stopped:  # Ctrl-C / SIGTERM: no traceback, just how to go on
        print(str(stopped), file=sys.stderr, flush=True)
        return stopped.exit_code
    return 0


def check_resources(cfg: RecipeConfig, *, read_prompt_rows: bool = True) -> list[str]:
    """What ``validate`` checks beyond the recipe itself (``recipe_checks``): datasets (with ``read_prompt_rows``,
    every row of a local prompt file), rewards called once on a real row, model config, mpo sources."""
    from .recipe_checks import check_resources as check

    return check(cfg, read_prompt_rows=read_prompt_rows)


def _cluster(args: argparse.Namespace) -> tuple[list[int], str] | None:
    """GPUs per node of the cluster ``validate`` checks against (``--gpus`` / ``--ray-address``), None: none."""
    from .actors.gpu_layout import nodes_from_total
    from .recipe_checks import ray_node_gpus

    if args.gpus is not None and args.ray_address:
        raise ConfigError("validate: give either --gpus (and --gpus-per-node) or --ray-address, not both")
    if args.gpus_per_node is not None and args.gpus is None:
        raise ConfigError("validate: --gpus-per-node needs --gpus N (the cluster's GPUs in all)")
    if args.gpus is not None:
        try:
            nodes = nodes_from_total(args.gpus, args.gpus_per_node)
        except ValueError as exc:
            raise ConfigError(f"validate --gpus/--gpus-per-node: {exc}") from None
        per_node = f" --gpus-per-node {args.gpus_per_node}" if args.gpus_per_node else ""
        return nodes, f"the cluster (--gpus {args.gpus}{per_node})"
    if args.ray_address:
        nodes = ray_node_gpus(args.ray_address)
        return nodes, f"the Ray cluster at {args.ray_address} (GPUs per node: {nodes})"
    return None


def cmd_validate(args: argparse.Namespace) -> int:
    from .recipe_checks import check_gpus, gpu_summary

    cfg = load_recipe(args.recipe, args.overrides)
    cluster = _cluster(args)
    problems = check_resources(cfg) + (check_gpus(cfg, *cluster) if cluster else [])
    if problems:
        print(f"{args.recipe}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    kinds = " -> ".join(f"{s.name}({s.kind})" for s in cfg.stages)
    print(f"{args.recipe}: OK — stages {kinds}; model {cfg.model.path}; rewards "
          f"{', '.join(t.name for t in cfg.reward.terms)}; {gpu_summary(cfg)}"
          + (f", fits {cluster[1]}" if cluster else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import make_report

    try:
        report = make_report(args.run_dir, args.output, run_id=args.run_id, tracking_uri=args.tracking_uri)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade-rl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a recipe's stages (sft, rollout, mpo, gspo) in order")
    _add_recipe_args(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show library logs and Ray workers' output (default: RUN_DIR/logs/driver.log only)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="resolve and check a recipe without training")
    _add_recipe_args(p)
    p.add_argument("--gpus", type=int, default=None,
                   help="also check the recipe's GPU arithmetic against a cluster of N GPUs")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs of each node of that cluster (default: all N on one node)")
    p.add_argument("--ray-address", default=None,
                   help="check the GPU arithmetic against the nodes of this running Ray cluster (auto: the head "
                        "on this machine; host:port)")
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
    if not sys.stdout.isatty():  # piped or a Ray job's log: one line per step instead of progress bars
        os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it once, when first imported
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the run's own handlers are installed (start-up): nothing to save yet
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc  # a worker's error arrives wrapped in Ray's RayTaskError
        if type(cause).__name__ not in USER_FACING_ERRORS:
            raise
        # the message already names the row / worker / checkpoint and the fix; a traceback adds nothing
        print(f"error ({type(cause).__name__}): {redact_text(str(cause))}", file=sys.stderr)
        return 1


# Errors whose message is the whole story (bad data rows, a corrupt log shard, workers that keep dying, a
# learner rank lost, an engine that cannot start): matched by name so the CLI never imports Ray or vLLM to check.
USER_FACING_ERRORS = {"PromptDataError", "DataFileError", "CorruptShardError", "LearnerFailedError",
                      "WorkersKeepDyingError", "RolloutEngineError", "StorageError"}


if __name__ == "__main__":
    sys.exit(main())
