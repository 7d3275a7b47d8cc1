"""Does the cascade pay? Held-out accuracy of the tiny cascade vs GSPO alone, per seed, in one run.

    python bench/bench_cascade.py                   # seeds 0,1,2: about 25 min on 2 CPU cores
    python bench/bench_cascade.py --seeds 0 --recipes recipes/tiny_cascade.yaml   # one run (~4 min)

Each (recipe, seed) runs ``cascade-rl run RECIPE seed=S run_dir=...`` in its own process, exactly as a user would,
and reads the held-out results the driver keeps in ``run_state.json``: after every stage, greedy accuracy
(``eval/accuracy``) and avg@k (``eval/sampled/accuracy``: the share of correct answers over k samples per prompt at
the rollout temperature, what the RL stages optimise). The baseline (``recipes/tiny_gspo_only.yaml``) runs the same
sft, then GSPO alone with the cascade's generation budget (rollout + mpo + gspo samples). Writes
``bench/results/cascade_cpu.json``: per run the stage table and seconds; per recipe the mean over seeds of every
stage and of the final one, with the cascade's gain over the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cascade_rl.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("recipes/tiny_cascade.yaml", "recipes/tiny_gspo_only.yaml")
METRICS = {"greedy": "eval/accuracy", "avg_at_k": "eval/sampled/accuracy"}


def run_one(recipe: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """One run in a fresh process; its stage table (metric -> value per stage) and wall seconds."""
    cli = Path(sys.executable).with_name("cascade-rl")
    cmd = [str(cli) if cli.exists() else "cascade-rl", "run", recipe, f"seed={seed}", f"run_dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads((run_dir / "run_state.json").read_text())["stage_results"]  # keys sorted by name
    order = ["start", *(s.name for s in load_recipe(ROOT / recipe, []).stages if s.kind != "rollout")]
    stages = {name: {k: round(results[name][key], 4) for k, key in METRICS.items() if key in results[name]}
              for name in order}
    return {"seconds": round(seconds, 1), "stages": stages, "final": stages[order[-1]]}


def mean_of(tables: list[dict[str, float]]) -> dict[str, float]:
    """Per metric, the mean over runs (metrics every run has)."""
    return {k: round(statistics.mean(t[k] for t in tables), 4) for k in METRICS if all(k in t for t in tables)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated; the first is compared")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench_cascade"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cascade_cpu.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    for key, value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("CASCADE_RL_CACHE", str(ROOT / ".cache" / "cascade_rl")),
                       ("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))):
        os.environ.setdefault(key, value)  # as scripts/demo.sh sets them
    report: dict[str, Any] = {"bench": "cascade", "device": "cpu", "cpu": platform.processor() or platform.machine(),
                              "cpu_count": os.cpu_count(), "seeds": seeds, "runs": {}, "mean_by_stage": {},
                              "mean_final": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for recipe in recipes:
        name = Path(recipe).stem
        for seed in seeds:
            run_dir = Path(args.runs_dir) / f"{name}_seed{seed}"
            if run_dir.exists():  # a fresh run, not a resume of an older one
                shutil.rmtree(run_dir)
            report["runs"][f"{name}/seed{seed}"] = run_one(recipe, seed, run_dir)
            print(json.dumps({f"{name}/seed{seed}": report["runs"][f"{name}/seed{seed}"]}), flush=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        runs = [report["runs"][f"{name}/seed{s}"] for s in seeds]
        report["mean_by_stage"][name] = {stage: mean_of([r["stages"][stage] for r in runs])
                                         for stage in runs[0]["stages"]}
        report["mean_final"][name] = mean_of([r["final"] for r in runs])
    if len(recipes) > 1:
        first, base = (Path(r).stem for r in recipes[:2])
        report["gain_over_baseline"] = {k: round(v - report["mean_final"][base].get(k, float("nan")), 4)
                                        for k, v in report["mean_final"][first].items()}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
