"""Pairs files into the mpo stage, labelled logs without a ground truth, and the errors of bad pair rows."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cascade_rl.config import load_recipe
from cascade_rl.data.pair_files import read_pair_file
from cascade_rl.data.pairs import build_pairs, no_pairs_hint
from cascade_rl.data.table import DataFileError
from cascade_rl.types import RolloutRecord

ROOT = Path(__file__).resolve().parents[2]


def rec(pid: str, i: int, correct: bool | None, response: str, *, gt: str | None) -> RolloutRecord:
    return RolloutRecord(
        record_id=f"run/{pid}/{i}", run_id="run", stage="imported", step=0, policy_version=0, prompt_id=pid,
        prompt=json.dumps([{"role": "user", "content": f"question {pid}"}]), images=[], ground_truth=gt,
        response=response, prompt_token_ids=[], response_token_ids=[], behaviour_logprobs=[], rewards="{}",
        reward=float(bool(correct)), correct=correct, finish_reason="stop", num_prompt_tokens=0,
        num_response_tokens=0, generate_s=0.0, error=None)
FIX = Path(__file__).parent / "fixtures" / "byod"


def test_labelled_responses_without_a_ground_truth_make_pairs() -> None:
    records = [rec("a", 0, True, "good", gt=None), rec("a", 1, False, "bad", gt=None)]
    pairs, stats = build_pairs(records)
    assert [(p.chosen, p.rejected) for p in pairs] == [("good", "bad")] and stats.dropped["no_answer"] == 0


def test_unlabelled_log_without_ground_truth_gets_the_right_hint() -> None:
    records = [rec("a", 0, None, "x", gt=None), rec("a", 1, None, "y", gt=None)]
    pairs, stats = build_pairs(records)
    hint = no_pairs_hint(stats, "logs/")
    assert pairs == [] and "has a ground truth or correctness labels" in hint and "mpo.pairs" in hint
    assert "group_size" not in hint  # sampling more would not help


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_pair_rows_are_all_named(tmp_path: Path) -> None:
    a = [{"role": "user", "content": "q"}]
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "images": ["http://x.org/i.png"]},
        {"prompt": "q", "chosen": "a", "rejected": "b", "images": ["nope.png"]},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
    ])
    with pytest.raises(DataFileError) as info:
        read_pair_file(path, flag="stages.2.mpo")
    msg = str(info.value)
    assert "3 bad pair row(s) (stages.2.mpo.pairs_*_key name the columns)" in msg
    assert "p.jsonl row 1: chosen messages in column `chosen` must end with the assistant's message" in msg
    assert "p.jsonl row 2: image(s) given as URL: http://x.org/i.png" in msg
    assert "p.jsonl row 3: image file(s) not found" in msg
    implicit = _write(tmp_path / "i.jsonl", [{"chosen": a + [{"role": "assistant", "content": "x"}],
                                              "rejected": [{"role": "user", "content": "other"},
                                                           {"role": "assistant", "content": "y"}]}])
    with pytest.raises(DataFileError, match="must be message lists sharing the same messages"):
        read_pair_file(implicit, prompt_key=None)


def test_identical_responses_are_dropped_and_counted(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                         {"prompt": "q", "chosen": "s", "rejected": "s"}])
    pairs, stats = read_pair_file(path)
    assert len(pairs) == 1 and stats.as_dict()["dropped_duplicate"] == 1 and stats.as_dict()["pairs_file"] == 1


def test_mpo_stage_trains_on_a_pairs_file_without_a_rollout_stage(tmp_path: Path, tiny_lm: Path) -> None:
    from cascade_rl.stages.batching import Encoder
    from cascade_rl.stages.mpo import prepare_pairs

    cfg = load_recipe(ROOT / "recipes" / "tiny_cascade.yaml",
                      [f"run_dir={tmp_path}", "stages=[{kind: mpo}]", f"stages.0.mpo.pairs={FIX / 'pairs_standard.jsonl'}"])
    seen: list[int] = []

    def ref_logps(batch: Any) -> tuple[list[float], list[float]]:
        seen.append(len(batch.chosen_token_ids))
        return [-1.0] * len(batch.chosen_token_ids), [-2.0] * len(batch.chosen_token_ids)

    ctx = SimpleNamespace(cfg=cfg, run_dir=tmp_path, learners=SimpleNamespace(compute_pair_logps=ref_logps),
                          tracker=SimpleNamespace(log_text=lambda *a: None), log=lambda m: None)
    enc = Encoder(str(tiny_lm))
    ctx.require_encoder = lambda: enc
    pairs = prepare_pairs(ctx, cfg.stages[0], 0)  # type: ignore[arg-type]
    assert len(pairs) == 2 and seen == [2]
    assert pairs[0].chosen_token_ids == enc.response(pairs[0].chosen) and pairs[0].prompt_token_ids
    assert (pairs[0].ref_chosen_logp, pairs[0].ref_rejected_logp) == (-1.0, -2.0)
    assert (tmp_path / "pairs" / "mpo.parquet").is_file()
