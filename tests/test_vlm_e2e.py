"""The VLM recipe end to end through the real CLI (HF backend on CPU): sft -> rollout -> mpo -> gspo.

Before one renderer served every stage, this run stopped in sft (unexpanded image placeholders in the learner's
prompts) and, without sft, in mpo (a pair's rejected sequence had no images listed) — the failures of issue 12.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_cli import ROOT, read_run, run_cli

pytestmark = pytest.mark.slow

SMALL_VLM = ["stages.0.sft.batch_size=32", "stages.1.num_prompts=32", "stages.3.gspo.num_steps=2",
             "stages.3.gspo.prompts_per_step=8", "eval.num_prompts=16", "eval.sampled_n=0", "eval.every_steps=0",
             "checkpoint.every_steps=0", "rollout.backend=hf"]


def test_tiny_vlm_runs_every_stage_on_the_same_image_tokens(tmp_path: Path) -> None:
    from cascade_rl.data.rollout_log import read_rollout_log

    run_dir, log = tmp_path / "run", tmp_path / "cli.log"
    rc = run_cli(run_dir, SMALL_VLM, log=log, recipe=ROOT / "recipes" / "tiny_vlm.yaml")
    assert rc == 0, log.read_text()[-4000:]
    facts = read_run(run_dir)
    assert set(facts.stage_results) == {"start", "sft", "mpo", "gspo"}
    assert facts.stage_results["sft"]["eval/accuracy"] > facts.stage_results["start"]["eval/accuracy"]
    records = read_rollout_log(run_dir / "rollouts" / "rollout")
    assert all(len(r.images) == len(r.image_sha256) == len(r.image_tiles) >= 1 for r in records)
    assert facts.pairs and all(p.images and p.prompt_token_ids for p in facts.pairs)
