"""Benchmark: rollout log write, resume reopen and full read, one shard per append vs compacted shards.

    python bench/bench_rollout_log.py                                  # 1M records, 100 per append (10,000 appends)
    python bench/bench_rollout_log.py --num-records 20000 --per-append 10   # a quick look

Both layouts get the same records in the same appends, through ``RolloutLogWriter`` (temp name + fsync + rename):
- ``old``: one shard per append, never compacted (the layout before compaction);
- ``new``: the same appends, plus ``compact_rollout_log`` every ``--checkpoint-every`` appends with the previous
  checkpoint's ``next_shard_index`` as the boundary, exactly as the driver's checkpoints do.
Then, for each: ``reopen_s`` (``RolloutLogWriter`` on the existing folder, as a resumed run does: it loads every
record id), ``read_s`` (``read_rollout_table``: every column of every record) and ``stats_s``
(``summarize_rollout_log``, i.e. ``cascade-rl logs stats``). Records carry ``--response-tokens`` token ids and
log-probs each. Writes ``bench/results/rollout_log_cpu.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade_rl.data.rollout_log import (  # noqa: E402
    RolloutLogWriter,
    compact_rollout_log,
    list_shards,
    next_shard_index,
    read_rollout_table,
    summarize_rollout_log,
)
from cascade_rl.types import RolloutRecord  # noqa: E402


def make_records(start: int, n: int, tokens: int) -> list[RolloutRecord]:
    return [RolloutRecord(record_id=f"bench/{i}", run_id="bench", stage="gspo", step=i // 64, policy_version=1,
                          prompt_id=f"p{i // 8}", prompt='[{"role": "user", "content": "What is 12 + 30?"}]',
                          images=[], ground_truth="42", response=f"The answer is {i % 50}.",
                          prompt_token_ids=list(range(16)), response_token_ids=[(i + t) % 1000 for t in range(tokens)],
                          behaviour_logprobs=[-0.1 * (t % 7) for t in range(tokens)], rewards='{"math_verify": 1.0}',
                          reward=float(i % 2), correct=bool(i % 2), finish_reason="stop", num_prompt_tokens=16,
                          num_response_tokens=tokens, generate_s=0.01, error=None)
            for i in range(start, start + n)]


def run_layout(folder: Path, args: argparse.Namespace, compact: bool) -> dict[str, float]:
    writer = RolloutLogWriter(folder)
    boundary, t_write, t_compact = 0, 0.0, 0.0
    for k, start in enumerate(range(0, args.num_records, args.per_append)):
        batch = make_records(start, min(args.per_append, args.num_records - start), args.response_tokens)
        t0 = time.perf_counter()
        writer.append(batch)
        t_write += time.perf_counter() - t0
        if compact and (k + 1) % args.checkpoint_every == 0:  # a checkpoint
            t0 = time.perf_counter()
            compact_rollout_log(folder, below=boundary)
            boundary = next_shard_index(folder)
            t_compact += time.perf_counter() - t0
    t0 = time.perf_counter()
    reopened = RolloutLogWriter(folder)
    reopen_s = time.perf_counter() - t0
    assert len(reopened) == args.num_records
    t0 = time.perf_counter()
    table = read_rollout_table(folder)
    read_s = time.perf_counter() - t0
    assert table.num_rows == args.num_records and table.column("record_id")[-1].as_py() == f"bench/{args.num_records - 1}"
    t0 = time.perf_counter()
    stats = summarize_rollout_log(folder)
    stats_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in folder.glob("*.parquet"))
    return {"write_s": t_write, "compact_s": t_compact, "reopen_s": reopen_s, "read_s": read_s, "stats_s": stats_s,
            "num_files": len(list_shards(folder)), "num_records": int(stats["num_records"]), "bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-records", type=int, default=1_000_000)
    ap.add_argument("--per-append", type=int, default=100, help="records per append (one rollout step's worth)")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="appends between checkpoints (new layout)")
    ap.add_argument("--response-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rollout_log_cpu.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-rollout-log-"))
    try:
        layouts = {name: run_layout(root / name, args, compact) for name, compact in (("old", False), ("new", True))}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    old, new = layouts["old"], layouts["new"]
    result = {"benchmark": "rollout_log", "device": f"cpu: {platform.processor() or platform.machine()}, "
                                                    f"{os.cpu_count()} cores", "python": platform.python_version(),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "load_avg_1m": os.getloadavg()[0], "old": old, "new": new,
              "speedup": {k: old[k] / max(new[k], 1e-9) for k in ("reopen_s", "read_s", "stats_s")},
              "write_overhead": (new["write_s"] + new["compact_s"]) / max(old["write_s"], 1e-9)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
