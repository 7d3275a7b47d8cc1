"""docs/data.md "bring your own data": every fixture layout loads with recipe keys alone (no preprocessing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade_rl.config import ConfigError, RecipeConfig, load_recipe
from cascade_rl.data.pair_files import load_pair_file
from cascade_rl.data.prompts import load_prompts, prompt_options

ROOT = Path(__file__).resolve().parents[2]
FIX = Path(__file__).parent / "fixtures" / "byod"
RECIPE = ROOT / "recipes" / "tiny_cascade.yaml"


def _recipe(*overrides: str) -> RecipeConfig:
    return load_recipe(RECIPE, list(overrides))


def _train(cfg: RecipeConfig) -> list:
    return load_prompts(cfg.data.train, **prompt_options(cfg.data))


def test_verl_parquet_nested_keys_and_sft_target() -> None:
    cfg = _recipe(f"data.train={FIX / 'verl_gsm8k.parquet'}", "data.answer_key=reward_model.ground_truth",
                  "data.id_key=extra_info.index", "data.sft_target_key=extra_info.answer")
    items = _train(cfg)
    assert [it.id for it in items] == ["0", "1", "2"]
    assert items[1].answer == "42" and items[1].sft_target == "Compute it. #### 42"
    assert items[1].messages == [{"role": "user", "content": "What is 7*6? Put the final answer after ####."}]
    assert items[1].metadata["data_source"] == "openai/gsm8k"


def test_openrlhf_input_label_with_derived_ids() -> None:
    cfg = _recipe(f"data.train={FIX / 'openrlhf_prompts.jsonl'}", "data.prompt_key=input", "data.answer_key=label")
    items = _train(cfg)
    assert [it.answer for it in items] == ["2", "9"]
    assert all(it.id.startswith("p-") and len(it.id) == 18 for it in items) and items[0].id != items[1].id
    assert _train(cfg)[0].id == items[0].id  # stable across loads
    assert items[0].sft_target == "2"  # no solution column: the answer cell


def test_gsm8k_answers_after_hashes() -> None:
    cfg = _recipe(f"data.train={FIX / 'gsm8k.jsonl'}", "data.prompt_key=question", "data.answer_format=gsm8k")
    items = _train(cfg)
    assert [it.answer for it in items] == ["7", "750"]  # 1,000 - 250 = 750: commas dropped
    assert items[0].sft_target.endswith("#### 7")  # sft trains on the worked solution, the reward checks 7


def test_datasets_save_to_disk_folder(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "gsm8k_ds"
    datasets.load_dataset("json", data_files=str(FIX / "gsm8k.jsonl"), split="train").save_to_disk(str(folder))
    cfg = _recipe(f"data.train={folder}", "data.prompt_key=question", "data.answer_format=gsm8k")
    assert [it.answer for it in _train(cfg)] == ["7", "750"]


@pytest.mark.parametrize("fixture,extra,expected", [
    ("pairs_standard.jsonl", [], ("What is 2+2?", "2+2 = 4. The answer is 4.", "The answer is 5.")),
    ("pairs_conversational.jsonl", [], ("What is 2+2?", "4", "5")),
    ("pairs_implicit.jsonl", ["stages.0.mpo.pairs_prompt_key=null"], ("Capital of France?", "Paris", "Lyon")),
])
def test_pairs_files_need_no_rollout_stage(fixture: str, extra: list[str], expected: tuple) -> None:
    cfg = _recipe("stages=[{kind: mpo}]", f"stages.0.mpo.pairs={FIX / fixture}", *extra)
    pairs, stats = load_pair_file(cfg.stages[0].mpo, key="stages.0.mpo")
    import json

    first = pairs[0]
    user = [m["content"] for m in json.loads(first.prompt) if m["role"] == "user"]
    assert (user[0], first.chosen, first.rejected) == expected
    assert first.method == "file" and first.prompt_token_ids == [] and stats.num_pairs == len(pairs)
    assert len({p.pair_id for p in pairs}) == len(pairs)


def test_mmpr_meta_json_carries_images() -> None:
    cfg = _recipe("stages=[{kind: mpo}]", f"stages.0.mpo.pairs={FIX / 'mmpr' / 'meta.json'}",
                  "stages.0.mpo.pairs_prompt_key=question", "stages.0.mpo.pairs_image_key=image")
    pairs, _ = load_pair_file(cfg.stages[0].mpo)
    assert [Path(p.images[0]).name for p in pairs] == ["red.png", "blue.png"]
    assert all(Path(p.images[0]).is_file() for p in pairs)
    import json

    assert json.loads(pairs[0].prompt) == [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]
    assert (pairs[0].chosen, pairs[0].rejected, pairs[0].source_ids) == ("Red.", "Blue.", ["geo_mini.jsonl:0"])


def test_mpo_without_pairs_or_rollout_is_refused_and_both_sources_too() -> None:
    with pytest.raises(ConfigError, match=r"mpo needs a rollout stage before it.*mpo\.pairs"):
        _recipe("stages=[{kind: mpo}]")
    with pytest.raises(ConfigError, match="set either `pairs`.*or `logs`"):
        _recipe("stages=[{kind: mpo, mpo: {pairs: a.jsonl, logs: b}}]")
