"""A corpus of bad inputs: each must fail with a clear error naming the key / file / row and the fix, or be skipped
and counted where that is allowed. Never a bare stack trace, never a silent drop.

- Recipes go through the real CLI (`cascade-rl validate`), which must exit non-zero without a traceback.
- Prompt files go through ``load_prompts`` (what the driver calls) and the rollout worker's own checks.
- Rollout logs get a truncated parquet shard.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from cascade_rl.cli import main
from cascade_rl.data.prompts import PromptDataError, load_prompts

# ------------------------------------------------------------------------------------------------ recipes

RECIPES = {  # name: (recipe YAML, extra CLI args, fragments the error must contain)
    "unknown key": ("stages: [{kind: sft}]\nrollout: {group_sise: 4}\n", [],
                    ["unknown key `rollout.group_sise`", "Did you mean `rollout.group_size`?"]),
    "unknown override": ("stages: [{kind: sft}]\n", ["learner.zero_stag=3"],
                         ["command-line override `learner.zero_stag=3`", "Did you mean `learner.zero_stage`?"]),
    "wrong type": ("stages: [{kind: sft}]\nrollout: {group_size: four}\n", [],
                   ["wrong type for `rollout.group_size`", "int"]),
    "missing data file": ("stages: [{kind: sft}]\ndata: {train: missing/train.jsonl}\n", [],
                          ["data.train: prompt file not found: 'missing/train.jsonl'", "synthetic:TASK"]),
    "unknown reward": ("stages: [{kind: sft}]\nreward: {terms: [{name: math_verfy}]}\n", [],
                       ["reward.terms.0.name", "unknown reward 'math_verfy'", "Did you mean 'math_verify'?"]),
    "reward from a file path": ("stages: [{kind: sft}]\nreward: {terms: [{name: ./my_reward.py}]}\n", [],
                                ["reward.terms.0.name='./my_reward.py'", "pkg.module:function"]),
    "negative group size": ("stages: [{kind: sft}]\nrollout: {group_size: -2}\n", [],
                            ["rollout.group_size=-2: must be >= 1"]),
    "clip_low above 1": ("stages: [{kind: gspo, gspo: {clip_low: 1.5}}]\n", [],
                         ["stages.0.gspo.clip_low=1.5: must be in [0, 1)"]),
    "zero KV cache": ("stages: [{kind: sft}]\nrollout: {kv_cache_gib: 0}\n", [],
                      ["rollout.kv_cache_gib=0: must be >= 1", "override `rollout.kv_cache_gib=…`"]),
    "GPU share above 1": ("stages: [{kind: sft}]\nrollout: {gpu_memory_utilization: 1.5}\n", [],
                          ["rollout.gpu_memory_utilization=1.5: must be in (0, 1]"]),
    "zero batch size": ("stages: [{kind: sft, sft: {batch_size: 0}}]\n", [],
                        ["stages.0.sft.batch_size=0: must be >= 1"]),
    "NaN reward weight": ("stages: [{kind: sft}]\nreward: {terms: [{name: math_verify, weight: .nan}]}\n", [],
                          ["reward.terms.0.weight=nan: must be a finite number"]),
    "negative learning rate": ("stages: [{kind: sft}]\nlearner: {lr: -0.001}\n", [],
                               ["learner.lr=-0.001: must be > 0"]),
    "tiny object store": ("stages: [{kind: sft}]\nray: {object_store_mb: 10}\n", [],
                          ["ray.object_store_mb=10: must be >= 75"]),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_bad_recipe_fails_validate_naming_key_and_fix(name: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    text, extra, fragments = RECIPES[name]
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: bad\nrun_dir: {tmp_path / 'run'}\n{text}")
    monkeypatch.chdir(tmp_path)  # relative data paths resolve here, where they do not exist
    code = main(["validate", str(path), *extra])
    err = capsys.readouterr().err
    assert code != 0, err
    assert str(path) in err or extra  # an override's error names the override instead of the file
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} missing from:\n{err}"
    assert "Traceback" not in err


def test_recipe_problems_are_gathered_into_one_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("stages: [{kind: gspo, gspo: {clip_low: 2.0}}]\nrollout: {group_size: 0, kv_cache_gib: 0}\n"
                    "learner: {warmup_steps: -1}\neval: {num_prompts: 0}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "5 problem(s)" in err or err.count("\n  - ") >= 5, err
    for key in ("stages.0.gspo.clip_low=2.0", "rollout.group_size=0", "rollout.kv_cache_gib=0",
                "learner.warmup_steps=-1", "eval.num_prompts=0"):
        assert key in err


def test_a_good_recipe_still_validates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("stages: [{kind: sft}, {kind: gspo, gspo: {clip_low: 0.2, clip_high: 0.2}}]\n")
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ prompt files


def _png(path: Path) -> Path:
    from PIL import Image

    Image.effect_noise((32, 32), 40).convert("RGB").save(path)
    return path


def _truncated_png(path: Path) -> Path:
    data = _png(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


GOOD = {"id": "0", "prompt": "What is 1 + 1?", "answer": "2"}
HUGE_PROMPT = " ".join(f"{i % 97}" for i in range(36_000))  # ~2.9 tokens a number: over 100k tokens

DATASETS = {  # name: (bad row, files to make {name: maker}, load_prompts kwargs, regex the error must match)
    "empty prompt": ({"id": "x", "prompt": "  ", "answer": "1"}, {}, {},
                     r"row 1 \(id 'x'\): empty prompt in column `prompt` \(data\.prompt_key\)"),
    "empty message list": ({"id": "x", "prompt": [{"role": "user", "content": ""}], "answer": "1"}, {}, {},
                           r"row 1 \(id 'x'\): empty prompt \(every message has empty content\)"),
    "answer is a list": ({"id": "x", "prompt": "q", "answer": ["1", "2"]}, {}, {},
                         r"row 1 \(id 'x'\): answer in column `answer` \(data\.answer_key\) is a list, not a string"),
    "answer is a boolean": ({"id": "x", "prompt": "q", "answer": True}, {}, {},
                            r"row 1 \(id 'x'\): answer .* is a boolean, not a string or number"),
    "duplicate id": ({"id": "0", "prompt": "q", "answer": "1"}, {}, {},
                     r"row 1: duplicate id '0' \(also row 0\); ids in column `id` \(data\.id_key\) must be unique"),
    "empty id": ({"id": "", "prompt": "q", "answer": "1"}, {}, {}, r"row 1 \(id ''\): empty id in column `id`"),
    "missing image": ({"id": "x", "prompt": "q", "answer": "1", "images": ["gone.png"]}, {}, {},
                      r"row 1 \(id 'x'\): image file\(s\) not found: .*gone\.png .*data\.image_key"),
    "garbage image": ({"id": "x", "prompt": "q", "answer": "1", "images": ["broken.png"]},
                      {"broken.png": lambda p: p.write_bytes(b"this is not a png")}, {},
                      r"row 1 \(id 'x'\): unreadable image file\(s\): .*broken\.png \(UnidentifiedImageError.*"
                      r"re-save them as PNG/JPEG or drop the row"),
    "truncated image": ({"id": "x", "prompt": "q", "answer": "1", "images": ["half.png"]},
                        {"half.png": _truncated_png}, {},
                        r"row 1 \(id 'x'\): unreadable image file\(s\): .*half\.png \(OSError: Truncated"),
    "image placeholder without image": ({"id": "x", "prompt": "<image> how many?", "answer": "1"}, {}, {},
                                        r"row 1 \(id 'x'\): 1 <image> placeholder\(s\) but 0 image"),
    "100k-token prompt": ({"id": "x", "prompt": HUGE_PROMPT, "answer": "1"}, {}, {"max_prompt_tokens": 256},
                          r"row 1 \(id 'x'\): prompt is \d{6,} tokens after the chat template, over "
                          r"model\.max_prompt_tokens=256; shorten or drop the row"),
}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_bad_prompt_row_names_file_row_and_fix(name: str, tmp_path: Path, tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    row, files, kwargs, pattern = DATASETS[name]
    for file, make in files.items():
        make(tmp_path / file)
    path = _write_jsonl(tmp_path / "prompts.jsonl", [{**GOOD, "images": None}, {"images": None, **row}])
    if "max_prompt_tokens" in kwargs:
        kwargs = {**kwargs, "tokenizer": AutoTokenizer.from_pretrained(tiny_lm)}
    with pytest.raises(PromptDataError, match=r"prompts\.jsonl: 1 bad row\(s\):\n  " + pattern):
        load_prompts(path, **kwargs)


@pytest.mark.parametrize("name,write,pattern", [
    ("missing column", lambda p: _write_jsonl(p, [{"id": "1", "question": "q", "answer": "1"}]),
     r"prompts\.jsonl: missing column\(s\) `prompt` \(set data\.prompt_key to the right column\)\. "
     r"Columns present: id, question, answer"),
    ("not JSON", lambda p: p.write_text('{"id": "1", "prompt": "q", "answer": "1"}\n{"id": 2, "prompt": \n'),
     r"prompts\.jsonl: line 2 is not valid JSON \(Expecting value at column 20\)"),
    ("mixed answer types", lambda p: _write_jsonl(p, [{"id": "1", "prompt": "q", "answer": 1},
                                                      {"id": "2", "prompt": "q", "answer": {"a": 1}}]),
     r"(?s)row 1 \(id '2'\): answer .* is a dict"),
])
def test_bad_prompt_file_names_the_file_and_fix(name: str, write: Any, pattern: str, tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    write(path)
    with pytest.raises(PromptDataError, match=pattern):
        load_prompts(path)


def test_every_bad_row_is_reported_at_once(tmp_path: Path) -> None:
    rows = [GOOD, {"id": "a", "prompt": "", "answer": "1"}, {"id": "b", "prompt": "q", "answer": [1]},
            {"id": "0", "prompt": "q", "answer": "1"}, {"id": "c", "prompt": "fine", "answer": 3.0}]
    with pytest.raises(PromptDataError) as info:
        load_prompts(_write_jsonl(tmp_path / "p.jsonl", rows))
    msg = str(info.value)
    assert "3 bad row(s)" in msg and all(f"row {i}" in msg for i in (1, 2, 3)) and "row 4" not in msg


def test_a_misnamed_image_column_is_not_dropped_silently(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    path = _write_jsonl(tmp_path / "p.jsonl", [{**GOOD, "image_paths": ["x.png"]}])
    with pytest.warns(UserWarning, match=r"no column `images` \(data\.image_key\).*image_paths.*set data\.image_key"):
        items = load_prompts(path)
    assert items[0].images == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named right: no warning, and the image is there
        assert load_prompts(path, image_key="image_paths")[0].images == [str(tmp_path / "x.png")]


def test_rollout_worker_checks_name_the_prompt_and_the_image(tmp_path: Path, tiny_lm: Path) -> None:
    """What a worker says when a bad prompt reaches it anyway (a prompt list built in code, a file changed later)."""
    from cascade_rl.actors.rollout import load_images, render_prompts

    from cascade_rl.hf import PromptRenderer

    renderer = PromptRenderer(str(tiny_lm))
    prompts = [([{"role": "user", "content": "short"}], []), ([{"role": "user", "content": HUGE_PROMPT}], [])]
    with pytest.raises(ValueError, match=r"1 prompt\(s\) exceed model\.max_prompt_tokens=256: #1 \(\d{6,} tokens, "
                                         r"'0 1 2 3 .*raise model\.max_prompt_tokens"):
        render_prompts(prompts, renderer, 256)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"prompt image '.*broken\.png' is not a readable image .*re-save it"):
        load_images([str(broken)])


# ------------------------------------------------------------------------------------------------ rollout logs


def test_truncated_log_shard_is_named_or_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cascade_rl.data.rollout_log import (
        CorruptShardError,
        RolloutLogWriter,
        read_rollout_log,
        summarize_rollout_log,
    )
    from cascade_rl.types import RolloutRecord

    def rec(i: int) -> RolloutRecord:
        return RolloutRecord(
            record_id=f"r/{i}", run_id="r", stage="rollout", step=0, policy_version=1, prompt_id=f"p{i}",
            prompt=json.dumps([{"role": "user", "content": "q"}]), images=[], ground_truth="1", response="1",
            prompt_token_ids=[1], response_token_ids=[2], behaviour_logprobs=[-0.5], rewards="{}", reward=1.0,
            correct=True, finish_reason="stop", num_prompt_tokens=1, num_response_tokens=1, generate_s=0.1)

    log = tmp_path / "log"
    writer = RolloutLogWriter(log)
    writer.append([rec(0), rec(1)])
    second = writer.append([rec(2), rec(3)])
    second.write_bytes(second.read_bytes()[:200])  # an interrupted copy: no parquet footer

    with pytest.raises(CorruptShardError, match=r"shard-000001\.parquet is not readable parquet.*Move it out of the "
                                                 r"folder.*--skip-corrupt"):
        read_rollout_log(log)
    with pytest.raises(CorruptShardError, match="shard-000001"):  # a resumed writer refuses to guess its ids
        RolloutLogWriter(log)
    with pytest.warns(UserWarning, match=r"skipped 1 corrupt shard\(s\): shard-000001\.parquet"):
        assert [r.record_id for r in read_rollout_log(log, skip_corrupt=True)] == ["r/0", "r/1"]
    with pytest.warns(UserWarning):
        stats = summarize_rollout_log(log, skip_corrupt=True)
    assert stats["num_records"] == 2 and stats["num_corrupt_shards_skipped"] == 1 and stats["num_shards"] == 2

    assert main(["logs", "stats", str(log)]) == 2  # the CLI: a one-line error, no traceback
    err = capsys.readouterr().err
    assert err.startswith("error: rollout log shard") and "Traceback" not in err
    with pytest.warns(UserWarning):
        assert main(["logs", "stats", str(log), "--skip-corrupt"]) == 0
    assert json.loads(capsys.readouterr().out)["num_corrupt_shards_skipped"] == 1
