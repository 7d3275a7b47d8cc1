"""``cascade-rl pairs`` and ``cascade-rl logs``: build preference pairs, import and inspect rollout logs.

    cascade-rl pairs LOGS -o PAIRS.parquet [--max-pairs-per-prompt 15] [--seed 0] [--method correctness]
    cascade-rl logs import FILE.jsonl -o FOLDER [--prompt-key question --correct-key is_correct ...]
    cascade-rl logs stats FOLDER

Each command prints JSON on stdout (stats), messages on stderr; exit 0 on success, 1 when no pairs could be
built, 2 on bad input. ``add_pairs_parser`` / ``add_logs_parser`` take the ``add_subparsers()`` object of the
main parser and set ``func`` on the parsed namespace.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .data.convert import convert_jsonl
from .data.pairs import METHODS, build_pairs, no_pairs_hint, write_pairs
from .data.rollout_log import count_records, read_rollout_log, summarize_rollout_log


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad paths and bad data end with ``error: ...`` and exit code 2 instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def cmd_pairs(args: argparse.Namespace) -> int:
    """Read a rollout log, build preference pairs, write them as parquet and print the pairing stats as JSON."""
    records = read_rollout_log(args.logs, skip_corrupt=args.skip_corrupt)
    pairs, stats = build_pairs(records, max_pairs_per_prompt=args.max_pairs_per_prompt, seed=args.seed,
                               method=args.method, prm_component=args.prm_component,
                               min_prm_margin=args.min_prm_margin)
    print(json.dumps(stats.as_dict(), indent=1))
    if not pairs:
        print(f"no pairs built from {len(records)} records in {args.logs}: {no_pairs_hint(stats, str(args.logs))}. "
              "Nothing written.", file=sys.stderr)
        return 1
    write_pairs(pairs, args.output)
    print(f"wrote {len(pairs)} pairs to {args.output}", file=sys.stderr)
    return 0


def add_pairs_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pairs LOGS -o PAIRS`` to the main parser's subparsers."""
    p = subparsers.add_parser("pairs", help="build MPO preference pairs (MMPR correctness pairing) from a rollout log",
                              description=cmd_pairs.__doc__)
    p.add_argument("logs", type=Path, help="rollout log folder (parquet shards)")
    p.add_argument("-o", "--output", type=Path, required=True, help="pairs parquet file to write")
    p.add_argument("--max-pairs-per-prompt", type=int, default=15, help="cap on pairs per prompt (MMPR: 15)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling pairs under the cap")
    p.add_argument("--method", choices=METHODS, default="correctness",
                   help="correctness (MMPR), prm_margin, or auto (correctness where an answer exists, else PRM)")
    p.add_argument("--prm-component", default="prm", help="reward component holding the PRM score")
    p.add_argument("--min-prm-margin", type=float, default=0.1, help="least PRM score gap for a prm_margin pair")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable shards (with a warning)")
    p.set_defaults(func=_guarded(cmd_pairs))
    return p


def cmd_logs_import(args: argparse.Namespace) -> int:
    """Append a JSONL file's rows to a rollout log folder; print how many records were new."""
    new = convert_jsonl(args.jsonl, args.output, prompt_key=args.prompt_key, response_key=args.response_key,
                        answer_key=args.answer_key, correct_key=args.correct_key, reward_key=args.reward_key,
                        id_key=args.id_key, images_key=args.images_key, run_id=args.run_id, stage=args.stage)
    print(json.dumps({"new_records": new, "num_records": count_records(args.output), "folder": str(args.output)}))
    return 0


def cmd_logs_stats(args: argparse.Namespace) -> int:
    """Print a log's counts (records, prompts, accuracy, finish reasons) as JSON."""
    print(json.dumps(summarize_rollout_log(args.folder, skip_corrupt=args.skip_corrupt), indent=1))
    return 0


def add_logs_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``logs import JSONL -o FOLDER`` and ``logs stats FOLDER`` to the main parser's subparsers."""
    p = subparsers.add_parser("logs", help="import rollout logs from JSONL, or summarise a log")
    sub = p.add_subparsers(dest="logs_command", required=True)
    imp = sub.add_parser("import", help="append a JSONL file of (prompt, response, answer, correct) rows to a log")
    imp.add_argument("jsonl", type=Path, help="one JSON object per line")
    imp.add_argument("-o", "--output", type=Path, required=True, help="rollout log folder (created or appended)")
    for name, default, what in (("prompt", "prompt", "the prompt (string or chat messages)"),
                                ("response", "response", "the response text"),
                                ("answer", "answer", "the ground truth"),
                                ("correct", "correct", "the correctness flag"),
                                ("reward", "reward", "the reward"),
                                ("images", "images", "image path(s)")):
        imp.add_argument(f"--{name}-key", default=default,
                         help=f"column holding {what} (default {default!r}; dotted keys reach nested columns)")
    imp.add_argument("--id-key", default=None, help="column naming the prompt (default: hash of prompt + images)")
    imp.add_argument("--run-id", default="imported", help="run id stored on every record")
    imp.add_argument("--stage", default="imported", help="stage name stored on every record")
    imp.set_defaults(func=_guarded(cmd_logs_import))
    st = sub.add_parser("stats", help="records, prompts, accuracy, rewards and finish reasons of a log")
    st.add_argument("folder", type=Path, help="rollout log folder")
    st.add_argument("--skip-corrupt", action="store_true", help="skip unreadable shards (with a warning)")
    st.set_defaults(func=_guarded(cmd_logs_stats))
    return p
