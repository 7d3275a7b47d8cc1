"""Rollout logs: atomic shards, resume without duplicates, corrupt shards, datasets, JSONL import, `logs` CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cascade_rl.data.convert import convert_jsonl
from cascade_rl.data.rollout_log import (
    CorruptShardError,
    RolloutLogWriter,
    count_records,
    list_shards,
    load_rollout_dataset,
    read_rollout_log,
    summarize_rollout_log,
)
from cascade_rl.pairs_cli import add_logs_parser
from cascade_rl.types import RolloutRecord


def rec(i: int, *, prompt_id: str = "p0", correct: bool | None = True, run: str = "r") -> RolloutRecord:
    """A record whose float values are exact in float32 (multiples of 1/4), so round trips compare equal."""
    return RolloutRecord(
        record_id=f"{run}/{prompt_id}/{i}", run_id=run, stage="rollout", step=i // 4, policy_version=1,
        prompt_id=prompt_id, prompt=json.dumps([{"role": "user", "content": f"q {prompt_id}"}]), images=["a.png"],
        ground_truth="7", response=f"resp {i} \\boxed{{7}}", prompt_token_ids=[1, 2, 3],
        response_token_ids=[100 + i, 151_000], behaviour_logprobs=[-0.25, -1.5], rewards=json.dumps({"acc": 1.0}),
        reward=1.0, correct=correct, finish_reason="stop", num_prompt_tokens=3, num_response_tokens=2,
        generate_s=0.5, error=None if correct is not None else '{"acc": "timeout"}')


def test_round_trip_keeps_every_field_and_the_schema(tmp_path: Path) -> None:
    records = [rec(0), rec(1, correct=False), rec(2, correct=None)]
    path = RolloutLogWriter(tmp_path).append(records)
    assert path == tmp_path / "shard-000000.parquet"
    assert read_rollout_log(tmp_path) == records
    schema = pq.read_schema(path)
    assert schema.field("response_token_ids").type == pa.list_(pa.int32())
    assert schema.field("behaviour_logprobs").type == pa.list_(pa.float32())
    assert schema.field("prompt").type == pa.string()  # JSON of the messages
    assert read_rollout_log(tmp_path)[2].messages == [{"role": "user", "content": "q p0"}]


def test_one_shard_per_append_and_empty_appends_write_nothing(tmp_path: Path) -> None:
    w = RolloutLogWriter(tmp_path)
    w.append([rec(0), rec(1)])
    w.append([rec(2)])
    assert w.append([]) is None
    assert w.append([rec(1)]) is None  # already logged
    assert [p.name for p in list_shards(tmp_path)] == ["shard-000000.parquet", "shard-000001.parquet"]
    assert count_records(tmp_path) == 3  # 2 + 1


def test_resume_appends_without_duplicates(tmp_path: Path) -> None:
    RolloutLogWriter(tmp_path).append([rec(i) for i in range(5)])  # ids 0..4
    w = RolloutLogWriter(tmp_path)  # a resumed run reopens the folder
    assert w.record_ids == {f"r/p0/{i}" for i in range(5)}
    path = w.append([rec(i) for i in range(3, 8)] + [rec(7)])  # ids 3..7, 7 twice
    assert path is not None and path.name == "shard-000001.parquet"  # numbering continues
    # new ids: {5, 6, 7} = 5 offered - 2 overlapping (3, 4), the repeated 7 once
    assert pq.read_metadata(path).num_rows == 3
    assert count_records(tmp_path) == 8  # 5 + 3 = unique ids 0..7
    ids = [r.record_id for r in read_rollout_log(tmp_path)]
    assert ids == [f"r/p0/{i}" for i in range(8)] and len(set(ids)) == len(ids)


def test_shard_prefix_keeps_its_own_numbering(tmp_path: Path) -> None:
    RolloutLogWriter(tmp_path).append([rec(0)])
    w = RolloutLogWriter(tmp_path, shard_prefix="worker1")
    assert w.append([rec(0), rec(1)]).name == "worker1-000000.parquet"  # rec(0) is known from shard-000000
    assert count_records(tmp_path) == 2


def _truncated_copy(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])  # half a file: no parquet footer


def test_crash_leftovers_are_ignored_by_readers_and_cleaned_by_the_writer(tmp_path: Path) -> None:
    good = RolloutLogWriter(tmp_path).append([rec(0), rec(1)])
    _truncated_copy(good, tmp_path / ".tmp-0123abcd.parquet")  # a write a crash interrupted
    (tmp_path / ".tmp-empty.parquet").write_bytes(b"")
    assert count_records(tmp_path) == 2 and len(read_rollout_log(tmp_path)) == 2
    assert len(load_rollout_dataset(tmp_path, cache_dir=tmp_path.parent / "hf")) == 2
    w = RolloutLogWriter(tmp_path)
    assert w.num_temp_files_removed == 2 and not list(tmp_path.glob(".tmp-*"))


def test_failed_write_leaves_no_shard_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = RolloutLogWriter(tmp_path)

    def crash(table: pa.Table, where, **kwargs) -> None:
        where.write(b"PAR1 half a shard")
        raise OSError("No space left on device")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError, match="No space"):
        w.append([rec(0)])
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert w.record_ids == set()  # not marked logged, so the retry writes it
    assert w.append([rec(0)]).name == "shard-000000.parquet"
    assert count_records(tmp_path) == 1


def test_truncated_shard_raises_a_clear_error_or_is_skipped(tmp_path: Path) -> None:
    good = RolloutLogWriter(tmp_path).append([rec(0), rec(1)])
    _truncated_copy(good, tmp_path / "shard-000001.parquet")
    for fn in (read_rollout_log, count_records, load_rollout_dataset, RolloutLogWriter):
        with pytest.raises(CorruptShardError) as info:
            fn(tmp_path)
        msg = str(info.value)
        assert "shard-000001.parquet" in msg and "Move it" in msg and "skip_corrupt=True" in msg
    with pytest.warns(UserWarning, match=r"skipped 1 corrupt shard\(s\): shard-000001.parquet"):
        assert [r.record_id for r in read_rollout_log(tmp_path, skip_corrupt=True)] == ["r/p0/0", "r/p0/1"]
    with pytest.warns(UserWarning, match="shard-000001"):
        assert count_records(tmp_path, skip_corrupt=True) == 2


def test_read_back_through_datasets(tmp_path: Path) -> None:
    RolloutLogWriter(tmp_path).append([rec(i) for i in range(3)])
    RolloutLogWriter(tmp_path).append([rec(3, correct=None)])
    ds = load_rollout_dataset(tmp_path, cache_dir=tmp_path.parent / "hf")
    assert len(ds) == 4  # 3 + 1 over two shards
    assert ds.features["response_token_ids"].feature.dtype == "int32"
    assert ds[3]["response_token_ids"] == [103, 151_000] and ds[3]["correct"] is None
    assert ds[0]["behaviour_logprobs"] == [-0.25, -1.5]


def test_bad_values_name_the_record_and_missing_folders_say_so(tmp_path: Path) -> None:
    bad = rec(9)
    bad.response_token_ids = [2**40]  # does not fit int32
    with pytest.raises(ValueError, match="r/p0/9"):
        RolloutLogWriter(tmp_path).append([rec(0), bad])
    assert list_shards(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_rollout_log(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------ JSONL import


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_convert_jsonl_with_renamed_columns(tmp_path: Path) -> None:
    rows = [{"question": "1+1?", "output": "\\boxed{2}", "gt": 2, "is_correct": 1},
            {"question": "1+1?", "output": "\\boxed{3}", "gt": 2, "is_correct": "false", "image": "x.png"},
            {"question": "1+1?", "output": "\\boxed{3}", "gt": 2, "is_correct": 0},  # same text again
            {"question": "Describe.", "output": "A cat.", "rewards": {"prm": 0.75}}]
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    kw = dict(prompt_key="question", response_key="output", answer_key="gt", correct_key="is_correct",
              images_key="image")
    assert convert_jsonl(src, tmp_path / "log", **kw) == 4
    assert convert_jsonl(src, tmp_path / "log", **kw) == 0  # same ids the second time: nothing new
    recs = read_rollout_log(tmp_path / "log")
    assert [r.correct for r in recs] == [True, False, False, None]
    assert [r.reward for r in recs] == [1.0, 0.0, 0.0, 0.0]  # no reward column: 1.0 if correct else 0.0
    assert recs[0].ground_truth == "2" and recs[3].ground_truth is None
    assert recs[0].messages == [{"role": "user", "content": "1+1?"}] and recs[0].response_token_ids == []
    assert recs[0].prompt_id == recs[2].prompt_id != recs[1].prompt_id  # row 2 has an image: another prompt
    assert recs[1].images == ["x.png"] and recs[3].reward_components == {"prm": 0.75}
    assert recs[2].record_id.endswith("-0") and len({r.record_id for r in recs}) == 4


def test_convert_jsonl_reads_nested_columns_by_dotted_keys(tmp_path: Path) -> None:
    """verl-style dumps nest the question and the ground truth; `logs import` names them as the recipe keys do."""
    rows = [{"extra_info": {"question": "2+3?", "index": 7}, "response": "5",
             "reward_model": {"ground_truth": 5}, "eval": {"correct": True, "score": 1.0}},
            {"extra_info": {"question": "2+3?", "index": 7}, "response": "6",
             "reward_model": {"ground_truth": 5}, "eval": {"correct": False, "score": 0.25}}]
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    kw = dict(prompt_key="extra_info.question", answer_key="reward_model.ground_truth", correct_key="eval.correct",
              reward_key="eval.score", id_key="extra_info.index")
    assert convert_jsonl(src, tmp_path / "log", **kw) == 2
    recs = read_rollout_log(tmp_path / "log")
    assert [(r.prompt_id, r.ground_truth, r.correct, r.reward) for r in recs] == [("7", "5", True, 1.0),
                                                                                 ("7", "5", False, 0.25)]
    assert recs[0].messages == [{"role": "user", "content": "2+3?"}]
    with pytest.raises(ValueError, match=r"'extra_info.prompt' is missing or null in 2 of 2 rows"):
        convert_jsonl(src, tmp_path / "log2", **{**kw, "prompt_key": "extra_info.prompt"})


def test_convert_jsonl_missing_column_names_the_rows(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "response": "x"}, {"prompt": "b"}, {"prompt": "c", "response": "z"}, {"prompt": "d"}]
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(ValueError, match=r"'response' is missing or null in 2 of 4 rows \(lines 2, 4\).*--response-key"):
        convert_jsonl(src, tmp_path / "log")
    assert not (tmp_path / "log").exists()  # validated before anything is written
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        convert_jsonl(tmp_path / "bad.jsonl", tmp_path / "log")


def _run_logs(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cascade-rl")
    add_logs_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_logs_cli_import_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [{"q": "2+2?", "r": "\\boxed{4}", "answer": "4", "correct": True, "finish_reason": "stop"},
            {"q": "2+2?", "r": "\\boxed{5}", "answer": "4", "correct": None, "finish_reason": "length"},
            {"q": "3+3?", "r": "\\boxed{6}", "answer": "6", "correct": False, "finish_reason": "stop"}]
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    assert _run_logs(["logs", "import", str(src), "-o", str(tmp_path / "log"), "--prompt-key", "q",
                      "--response-key", "r"]) == 0
    assert json.loads(capsys.readouterr().out)["new_records"] == 3
    assert _run_logs(["logs", "stats", str(tmp_path / "log")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["num_records"] == 3 and stats["num_prompts"] == 2 and stats["num_shards"] == 1
    assert stats["accuracy"] == 0.5  # 1 right of 2 with a verdict
    assert stats["accuracy_all"] == pytest.approx(1 / 3)  # None counts as wrong: 1 of 3
    assert stats["finish_reasons"] == {"length": 1, "stop": 2}
    assert summarize_rollout_log(tmp_path / "log")["num_records"] == 3
    assert _run_logs(["logs", "stats", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compaction_merges_shards_below_the_boundary_keeping_records_order_and_numbering(tmp_path: Path) -> None:
    from cascade_rl.data.rollout_log import compact_rollout_log, list_shards, next_shard_index

    writer = RolloutLogWriter(tmp_path)
    for i in range(50):  # 50 small appends: shards 0..49
        writer.append([rec(2 * i), rec(2 * i + 1)])
    before = [r.record_id for r in read_rollout_log(tmp_path)]
    # 30 shards below the boundary, fanout 4: 0..15 become 1 level-2 shard (via four level-1 ones), 16..27 three
    # level-1 shards, 28 and 29 stay (2 < fanout); 30..49 are not touched
    assert compact_rollout_log(tmp_path, below=30, fanout=4) == 30 - 6
    names = [p.name for p in list_shards(tmp_path)]
    assert names[:4] == ["shard-000000-000015.parquet", "shard-000016-000019.parquet", "shard-000020-000023.parquet",
                         "shard-000024-000027.parquet"]
    assert names[4:7] == ["shard-000028.parquet", "shard-000029.parquet", "shard-000030.parquet"] and len(names) == 26
    assert compact_rollout_log(tmp_path, below=30, fanout=4, target_rows=7) == 0  # 8 rows per merge: over the cap
    assert [r.record_id for r in read_rollout_log(tmp_path)] == before and count_records(tmp_path) == 100
    assert next_shard_index(tmp_path) == 50
    reopened = RolloutLogWriter(tmp_path)  # resume: same ids, numbering continues after 49
    assert reopened.record_ids == set(before) and reopened.append([rec(7), rec(100)]).name == "shard-000050.parquet"


def test_a_compaction_interrupted_after_its_rename_never_duplicates(tmp_path: Path) -> None:
    """The merged shard is in place but the shards it replaces were not deleted yet (a crash in between)."""
    from cascade_rl.data.rollout_log import list_shards, read_rollout_table, write_table_atomic

    writer = RolloutLogWriter(tmp_path)
    for i in range(4):
        writer.append([rec(i)])
    merged = read_rollout_table(tmp_path)
    write_table_atomic(merged.slice(0, 3), tmp_path / "shard-000000-000002.parquet")
    assert [p.name for p in list_shards(tmp_path)] == ["shard-000000-000002.parquet", "shard-000003.parquet"]
    assert [r.record_id for r in read_rollout_log(tmp_path)] == [rec(i).record_id for i in range(4)]
    RolloutLogWriter(tmp_path)  # the next writer deletes the leftovers
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["shard-000000-000002.parquet", "shard-000003.parquet"]
