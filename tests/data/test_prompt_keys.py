"""Prompt keys beyond plain columns: derived ids, dotted keys, the sft target, answer formats, bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cascade_rl.data.prompts import PromptDataError, extract_reference_answer, first_prompt, load_prompts


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_derived_ids_refuse_duplicate_prompts_naming_both_rows(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q1", "answer": "1"}, {"prompt": "q2", "answer": "2"},
                                         {"prompt": "q1", "answer": "1"}])
    with pytest.raises(PromptDataError, match=r"row 2: duplicate id 'p-[0-9a-f]{16}' \(also row 0\); ids derived "
                                              r"from the prompt \(no id column.*set data\.id_key"):
        load_prompts(path)


def test_explicit_id_key_must_exist_and_id_column_is_used_when_present(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "q", "answer": "1"}])
    assert load_prompts(path)[0].id == "a"
    with pytest.raises(PromptDataError, match=r"missing column\(s\) `qid` \(set data\.id_key"):
        load_prompts(path, id_key="qid")


def test_dotted_keys_name_the_missing_nested_part(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "reward_model": {"ground_truth": "3"}},
                                         {"prompt": "r", "reward_model": {"style": "rule"}}])
    with pytest.raises(PromptDataError, match=r"row 1: column `reward_model\.ground_truth` \(data\.answer_key\): "
                                              r"no `ground_truth` in reward_model \(it has: style\)"):
        load_prompts(path, answer_key="reward_model.ground_truth")


def test_sft_target_key_routes_the_sft_response(tmp_path: Path, tiny_lm: Path) -> None:
    from cascade_rl.stages.batching import Encoder, sft_batch

    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "answer": "7", "solution": "old", "response": "new 7"}])
    enc = Encoder(str(tiny_lm))
    default, routed = load_prompts(path), load_prompts(path, sft_target_key="response")
    assert sft_batch(default, enc).response_token_ids[0] == enc.response("old")  # a `solution` column by default
    assert sft_batch(routed, enc).response_token_ids[0] == enc.response("new 7")
    with pytest.raises(PromptDataError, match=r"missing column\(s\) `target` \(set data\.sft_target_key"):
        load_prompts(path, sft_target_key="target")


def test_answer_formats() -> None:
    assert extract_reference_answer("6 * 7 = 42\n#### 42", "gsm8k") == "42"
    assert extract_reference_answer("so \\boxed{\\frac{1}{2}}.", "boxed") == "\\frac{1}{2}"
    assert extract_reference_answer("#### 42", "raw") == "#### 42"
    with pytest.raises(ValueError, match=r"no `#### <answer>`.*data\.answer_format=gsm8k"):
        extract_reference_answer("just 42", "gsm8k")


def test_gsm8k_row_without_marker_is_named(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "r", "answer": "2"}])
    with pytest.raises(PromptDataError, match=r"1 bad row\(s\):\n  row 1: no `#### <answer>` in '2'"):
        load_prompts(path, prompt_key="question", answer_format="gsm8k")


def test_malformed_jsonl_line_is_named_by_number(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": "2"}\n{"prompt": "c", answer: 3}\n')
    with pytest.raises(PromptDataError, match=r"m\.jsonl: line 4 is not valid JSON \(Expecting property name"):
        load_prompts(path)


def test_image_url_is_named_as_a_url(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "u.jsonl", [{"prompt": "q", "answer": "1", "images": ["https://example.org/a.png"]}])
    with pytest.raises(PromptDataError, match=r"image\(s\) given as URL: https://example\.org/a\.png; images are "
                                              r"read from local files only"):
        load_prompts(path)


def test_dataset_dict_folder_with_two_splits_asks_for_one(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "q", "answer": "1"}])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(PromptDataError, match=r"DatasetDict with splits train, test; point the key at one split"):
        load_prompts(tmp_path / "dd")
    assert load_prompts(tmp_path / "dd" / "train")[0].answer == "1"


def test_first_prompt_generates_one_synthetic_row(tmp_path: Path) -> None:
    item = first_prompt("synthetic:arithmetic?n=5000&seed=3", {}, tmp_path)
    assert item.answer is not None and [p.name for p in tmp_path.iterdir()] == ["arithmetic.jsonl"]
    assert len((tmp_path / "arithmetic.jsonl").read_text().splitlines()) == 1
