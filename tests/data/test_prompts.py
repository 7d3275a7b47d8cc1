"""Prompt loading through ``datasets``: renamed columns, messages, images, and an error for each bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cascade_rl.data.prompts import PromptDataError, load_prompts, resolve_data_path
from cascade_rl.data.tasks import draw_shapes, write_task


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_renamed_columns_system_prompt_and_numeric_answers(tmp_path: Path, suffix: str) -> None:
    rows = [{"qid": i, "question": f"What is {i}+1?", "gold": i + 1, "level": "easy"} for i in range(4)]
    path = write_task(rows, tmp_path / f"p{suffix}")
    items = load_prompts(path, id_key="qid", prompt_key="question", answer_key="gold", system_prompt="Be brief.",
                         limit=3)
    assert [it.id for it in items] == ["0", "1", "2"]
    assert items[1].messages == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What is 1+1?"}]
    assert items[1].answer == "2" and items[1].images == [] and items[1].metadata == {"level": "easy"}


def test_message_lists_are_kept_and_float_answers_normalised(tmp_path: Path) -> None:
    msgs = [{"role": "system", "content": "Own system."}, {"role": "user", "content": "Half of 1?"}]
    path = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": msgs, "answer": 0.5},
                                         {"id": "b", "prompt": msgs, "answer": 2.0},
                                         {"id": "c", "prompt": msgs, "answer": None}])
    items = load_prompts(path, system_prompt="ignored: the row has its own")
    assert items[0].messages == msgs
    assert [it.answer for it in items] == ["0.5", "2", None]


def test_images_resolve_against_the_file_and_become_message_parts(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    draw_shapes([], 64).save(tmp_path / "img" / "x.png")
    path = _jsonl(tmp_path / "p.jsonl", [
        {"id": "1", "prompt": "How many circles?", "answer": "0", "pics": ["img/x.png"]},
        {"id": "2", "prompt": "Left <image> right <image> same?", "answer": "yes", "pics": ["img/x.png"] * 2},
    ])
    one, two = load_prompts(path, image_key="pics")
    assert one.images == [str(tmp_path / "img" / "x.png")]
    assert one.messages == [{"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": "How many circles?"}]}]
    assert [p["type"] for p in two.messages[0]["content"]] == ["text", "image", "text", "image", "text"]


def test_missing_column_lists_columns_and_the_key_to_set(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"id": "1", "question": "q", "answer": "a"}])
    with pytest.raises(PromptDataError, match=r"p\.jsonl: missing column.*`prompt` \(set data\.prompt_key.*"
                                              r"Columns present: id, question, answer"):
        load_prompts(path)


@pytest.mark.parametrize("row,error", [
    ({"id": "x", "prompt": "   ", "answer": "1"}, r"row 1 \(id 'x'\): empty prompt in column `prompt` \(data.prompt_key\)"),
    ({"id": "x", "prompt": "q", "answer": ["1"]}, r"row 1 \(id 'x'\): answer .*is a list, not a string or number"),
    ({"id": "x", "prompt": "q", "answer": True}, r"row 1 \(id 'x'\): answer .*is a boolean"),
    ({"id": "0", "prompt": "q", "answer": "1"}, r"row 1: duplicate id '0' \(also row 0\).*data.id_key"),
    ({"id": "x", "prompt": "q", "answer": "1", "images": ["nope.png"]}, r"row 1 \(id 'x'\): image file\(s\) not found: .*nope.png"),
    ({"id": "x", "prompt": "<image> q", "answer": "1"}, r"row 1 \(id 'x'\): 1 <image> placeholder\(s\) but 0 image"),
])
def test_bad_rows_name_the_file_row_and_fix(tmp_path: Path, row: dict[str, Any], error: str) -> None:
    good = {"id": "0", "prompt": "q", "answer": "1", "images": None}
    path = _jsonl(tmp_path / "bad.jsonl", [good, {"images": None, **row}])
    with pytest.raises(PromptDataError, match=r"bad\.jsonl: 1 bad row\(s\):\n  " + error):
        load_prompts(path)


def test_unreadable_file_and_mixed_types(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_prompts(tmp_path / "none.jsonl")
    mixed = _jsonl(tmp_path / "m.jsonl", [{"id": "1", "prompt": "q", "answer": 1},
                                          {"id": "2", "prompt": "q", "answer": {"a": 1}}])
    with pytest.raises(PromptDataError, match=r"(?s)m\.jsonl: 1 bad row.*row 1 \(id '2'\): answer .* is a dict"):
        load_prompts(mixed)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"id": "1", "prompt": "q", "answer": "1"}\n{"id": 2, "prompt": \n')
    with pytest.raises(PromptDataError, match=r"b\.jsonl: line 2 is not valid JSON \(Expecting value at column 20\)"):
        load_prompts(broken)
    with pytest.raises(PromptDataError, match="no rows"):
        load_prompts(_jsonl(tmp_path / "p.jsonl", [{"id": "1", "prompt": "q", "answer": "1"}]), limit=0)


def test_synthetic_specs_generate_once(tmp_path: Path) -> None:
    spec = "synthetic:arithmetic?n=20&seed=3&split=test&difficulty=1"
    planned = resolve_data_path(spec, tmp_path, check_only=True)
    assert not planned.exists() and planned.name.startswith("arithmetic-n20-seed3-test-")
    path = resolve_data_path(spec, tmp_path)
    assert path == planned and len(load_prompts(path)) == 20
    mtime = path.stat().st_mtime_ns
    assert resolve_data_path(spec, tmp_path) == path and path.stat().st_mtime_ns == mtime
    assert resolve_data_path("synthetic:arithmetic?n=20&seed=4", tmp_path) != path
    shapes = load_prompts(resolve_data_path("synthetic:shapes?n=3&seed=0", tmp_path))
    assert all(Path(it.images[0]).is_file() and it.messages[0]["content"][0] == {"type": "image"} for it in shapes)
    assert shapes[0].metadata["solution"].endswith(f"\\boxed{{{shapes[0].answer}}}.")


@pytest.mark.parametrize("spec,error", [
    ("synthetic:algebra", r"unknown synthetic task 'algebra'; known: arithmetic, shapes"),
    ("synthetic:arithmetic?n=5&hard=1", r"unknown option\(s\) hard .*valid: n, seed, difficulty, split"),
    ("synthetic:arithmetic?n=many", r"n must be a positive integer"),
    ("synthetic:arithmetic?split=dev", r"split must be train or test"),
])
def test_bad_synthetic_specs(tmp_path: Path, spec: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        resolve_data_path(spec, tmp_path, check_only=True)


def test_local_paths_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"prompt file not found: 'nope.jsonl'.*synthetic:TASK"):
        resolve_data_path("nope.jsonl", tmp_path)
    (tmp_path / "p.csv").write_text("id,prompt\n")
    with pytest.raises(ValueError, match="unsupported extension '.csv'"):
        resolve_data_path(str(tmp_path / "p.csv"), tmp_path)
