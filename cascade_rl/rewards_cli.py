"""``cascade-rl rewards``: list the registered rewards, and check one against examples.

    cascade-rl rewards list
    cascade-rl rewards check math_verify --examples tests/rewards/fixtures/math_examples.jsonl
    cascade-rl rewards check my_pkg.my_module:fn --examples ex.jsonl --kwargs '{"bonus": 0.5}' --timeout 2

Each JSONL row holds ``prompt`` (a string or chat messages), ``response``, ``answer`` (or ``ground_truth``),
optionally ``metadata``, ``images`` and ``expected`` (the reward's expected score, ``null`` for "not
applicable"). ``check`` prints every example's components, total and errors, then a summary, and exits 1 when an
``expected`` value differs by more than 1e-6 (2 when the input cannot be read).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cascade_rl.types import RewardResult, RewardTermConfig, Sample

TOLERANCE = 1e-6
_MISSING = object()


def add_rewards_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``rewards list`` and ``rewards check`` to an argparse subparsers object; returns the ``rewards`` parser."""
    p = subparsers.add_parser("rewards", help="list reward functions, or check one against JSONL examples")
    sub = p.add_subparsers(dest="rewards_command", required=True, metavar="{list,check}")
    ls = sub.add_parser("list", help="registered rewards: name, batched flag, first doc line")
    ls.set_defaults(func=cmd_rewards_list)
    ck = sub.add_parser("check", help="score JSONL examples with one reward and compare with `expected`")
    ck.add_argument("reward", help="registered name or pkg.module:function")
    ck.add_argument("--examples", required=True, type=Path, help="JSONL file: prompt, response, answer, expected")
    ck.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the reward")
    ck.add_argument("--timeout", type=float, default=5.0, help="time limit per reward call (seconds)")
    ck.add_argument("--workers", type=int, default=1, help="worker processes (0 = score in this process)")
    ck.set_defaults(func=cmd_rewards_check)
    return p


def cmd_rewards_list(args: argparse.Namespace) -> int:
    from cascade_rl.rewards import list_rewards

    rows = list_rewards()
    width = max((len(n) for n in rows), default=4)
    print(f"{'name':<{width}}  batched  description")
    for name, (_, doc, batched) in rows.items():
        print(f"{name:<{width}}  {'yes' if batched else 'no ':<7}  {doc}")
    return 0


def _sample(row: dict[str, Any], where: str) -> Sample:
    prompt = row.get("prompt", [])
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise ValueError(f"{where}: `prompt` must be a string or a list of chat messages")
    if "response" not in row:
        raise ValueError(f"{where}: missing `response`")
    gold = row.get("answer", row.get("ground_truth"))
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: `metadata` must be a JSON object")
    return Sample(prompt=prompt, response=row["response"], ground_truth=None if gold is None else str(gold),
                  metadata=metadata, images=list(row.get("images") or []))


def read_examples(path: Path) -> tuple[list[Sample], list[Any]]:
    """Samples and their ``expected`` values (``_MISSING`` where absent) from a JSONL file."""
    samples, expected = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: each line must be a JSON object")
        samples.append(_sample(row, where))
        expected.append(row.get("expected", _MISSING))
    return samples, expected


def _mismatch(result: RewardResult, label: str, want: Any) -> str | None:
    got = result.components.get(label)
    if want is _MISSING:
        return None
    if want is None:
        return None if got is None else f"expected not applicable (null), got {got:g}"
    if got is None:
        return f"expected {want}, got not applicable (None)"
    return None if abs(got - float(want)) <= TOLERANCE else f"expected {want}, got {got:g}"


def cmd_rewards_check(args: argparse.Namespace) -> int:
    from cascade_rl.rewards import RewardScorer

    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("--kwargs must be a JSON object, e.g. '{\"mode\": \"boxed\"}'")
        samples, expected = read_examples(args.examples)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        scorer = RewardScorer([RewardTermConfig(args.reward, 1.0, kwargs)], timeout_s=args.timeout, num_workers=args.workers)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with scorer:
        results = scorer.score(samples)
    label = scorer.labels[0]
    mismatches = 0
    for i, (result, want) in enumerate(zip(results, expected, strict=True)):
        problem = _mismatch(result, label, want)
        mismatches += problem is not None
        status = "" if want is _MISSING else ("  MISMATCH: " + problem if problem else "  ok")
        comps = ", ".join(f"{k}={v:g}" for k, v in result.components.items()) or "(not applicable)"
        print(f"#{i}: {comps}; total={result.total:g}{status}")
        for key, err in result.errors.items():
            print(f"    error[{key}]: {err}")
    checked = sum(w is not _MISSING for w in expected)
    with_errors = sum(bool(r.errors) for r in results)
    print(f"{len(samples)} examples, {checked} with `expected`, {mismatches} mismatch(es), "
          f"{with_errors} with errors/reasons")
    return 1 if mismatches else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m cascade_rl.rewards_cli rewards list``."""
    parser = argparse.ArgumentParser(prog="cascade-rl")
    add_rewards_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
