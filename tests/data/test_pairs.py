"""Preference pairs: MMPR correctness pairing, the substring and cap rules, PRM margin, DropoutNTP, files, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cascade_rl.data.pairs import (
    answer_entails,
    build_dropout_ntp_requests,
    build_pairs,
    extract_answer,
    fill_token_ids,
    finish_dropout_ntp,
    read_pairs,
    write_pairs,
)
from cascade_rl.data.rollout_log import RolloutLogWriter
from cascade_rl.pairs_cli import add_pairs_parser
from cascade_rl.types import Generation, RolloutRecord

IMAGE_PROMPT = json.dumps([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}])


def rec(pid: str, i: int, correct: bool | None, response: str, *, gt: str | None = "7", reward: float = 0.0,
        rewards: dict | None = None, error: str | None = None, finish: str = "stop",
        token_ids: list[int] | None = None, prompt: str | None = None) -> RolloutRecord:
    return RolloutRecord(
        record_id=f"run/{pid}/{i}", run_id="run", stage="rollout", step=0, policy_version=0, prompt_id=pid,
        prompt=prompt or json.dumps([{"role": "user", "content": f"question {pid}"}]), images=[],
        ground_truth=gt, response=response, prompt_token_ids=[1, 2], response_token_ids=token_ids or [10 + i],
        behaviour_logprobs=[], rewards=json.dumps(rewards or {}), reward=reward, correct=correct,
        finish_reason=finish, num_prompt_tokens=2, num_response_tokens=1, generate_s=0.0, error=error)


def right(pid: str, i: int, text: str = "7") -> RolloutRecord:
    return rec(pid, i, True, f"work {i}. The answer is \\boxed{{{text}}}.")


def wrong(pid: str, i: int, text: str) -> RolloutRecord:
    return rec(pid, i, False, f"work {i}. The answer is \\boxed{{{text}}}.")


def test_all_correct_all_wrong_and_no_answer_prompts_yield_no_pairs() -> None:
    records = ([right("a", i) for i in range(3)] + [wrong("b", i, "8") for i in range(3)]
               + [rec("c", 0, None, "free text", gt=None)])
    pairs, stats = build_pairs(records)
    assert pairs == []
    d = stats.as_dict()
    assert (d["num_records"], d["num_prompts"], d["num_prompts_with_pairs"], d["num_pairs"]) == (7, 3, 0, 0)
    assert (d["dropped_all_correct"], d["dropped_all_wrong"], d["dropped_no_answer"]) == (1, 1, 1)


def test_every_correct_pairs_with_every_wrong() -> None:
    records = [right("p", 0), right("p", 1)] + [wrong("p", i, str(i)) for i in (2, 3, 4)]
    pairs, stats = build_pairs(records)
    assert len(pairs) == 6 and stats.num_pairs == 6  # 2 correct x 3 wrong
    assert {tuple(p.source_ids) for p in pairs} == {(f"run/p/{c}", f"run/p/{w}") for c in (0, 1) for w in (2, 3, 4)}
    p = next(p for p in pairs if p.source_ids == ["run/p/1", "run/p/3"])
    assert p.chosen == records[1].response and p.rejected == records[3].response and p.method == "correctness"
    assert (p.prompt_token_ids, p.chosen_token_ids, p.rejected_token_ids) == ([1, 2], [11], [13])
    assert len({p.pair_id for p in pairs}) == 6
    assert [p.pair_id for p in build_pairs(records[::-1])[0]] == [p.pair_id for p in pairs]  # order-independent


def test_unparseable_and_errored_responses_are_negatives() -> None:
    records = [right("p", 0), rec("p", 1, None, "I cannot tell."), rec("p", 2, None, "", error='{"acc": "timeout"}')]
    pairs, stats = build_pairs(records)
    assert sorted(p.rejected for p in pairs) == ["", "I cannot tell."]  # 1 correct x 2 None negatives
    assert stats.num_unparseable_negatives == 2


def test_substring_rule_compares_extracted_answers() -> None:
    # chosen answer "A": wrong "A and B" contains it -> skipped; wrong "C" -> kept
    pairs, stats = build_pairs([right("p", 0, "A"), wrong("p", 1, "A and B"), wrong("p", 2, "C")])
    assert [p.source_ids[1] for p in pairs] == ["run/p/2"] and stats.dropped["substring"] == 1
    # numbers compare as numbers: wrong "11" is kept for a correct "1", wrong "1.0" (== 1) is skipped
    pairs, stats = build_pairs([right("q", 0, "1"), wrong("q", 1, "11"), wrong("q", 2, "1.0")])
    assert [p.source_ids[1] for p in pairs] == ["run/q/1"] and stats.dropped["substring"] == 1
    # an unextractable chosen answer falls back to the ground truth "7"; "77" vs "7" differ as numbers
    records = [rec("r", 0, True, "seven, I think"), wrong("r", 1, "7"), wrong("r", 2, "77")]
    assert [p.source_ids[1] for p in build_pairs(records)[0]] == ["run/r/2"]
    assert extract_answer("Answer: B.") == "B" and extract_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert extract_answer("no answer here") is None and not answer_entails("7", None)


def test_cap_keeps_exact_counts_and_is_deterministic() -> None:
    records = [right("p", i) for i in range(5)] + [wrong("p", 5 + i, str(20 + i)) for i in range(4)]
    pairs, stats = build_pairs(records)  # default cap 15
    assert len(pairs) == 15 and stats.dropped["capped"] == 5  # 5 x 4 = 20 candidates, 20 - 15 = 5
    pairs3, stats3 = build_pairs(records, max_pairs_per_prompt=3)
    assert len(pairs3) == 3 and stats3.dropped["capped"] == 17  # 20 - 3
    again = build_pairs(records[::-1], max_pairs_per_prompt=3)[0]
    assert [p.pair_id for p in again] == [p.pair_id for p in pairs3]  # same seed: same sample
    other = build_pairs(records, max_pairs_per_prompt=3, seed=1)[0]
    assert {p.pair_id for p in other} != {p.pair_id for p in pairs3}
    assert {p.pair_id for p in pairs3} <= {p.pair_id for p in build_pairs(records, max_pairs_per_prompt=20)[0]}


def test_identical_pairs_are_deduplicated_before_the_cap() -> None:
    twin = rec("p", 1, True, right("p", 0).response)  # same text as record 0, another id
    flip = rec("p", 3, False, right("p", 0).response)  # same text judged wrong (a flaky check)
    records = [right("p", 0), twin, wrong("p", 2, "9"), flip]
    pairs, stats = build_pairs(records, max_pairs_per_prompt=1)
    # 2 correct x 2 wrong = 4 candidates: (0,3), (1,3) share the answer "7" -> substring rule;
    # (1,2) repeats the texts of (0,2) -> duplicate; 1 distinct pair left, so the cap of 1 drops nothing
    assert [p.source_ids for p in pairs] == [["run/p/0", "run/p/2"]]
    assert (stats.dropped["substring"], stats.dropped["duplicate"], stats.dropped["capped"]) == (2, 1, 0)


def test_prm_margin_pairs_highest_with_lowest() -> None:
    records = [rec("a", i, None, f"resp {i}", gt=None, rewards={"prm": s}) for i, s in enumerate([0.5, 0.9, 0.2])]
    records += [rec("b", i, None, f"resp {i}", gt=None, rewards={"prm": s}) for i, s in enumerate([0.55, 0.5])]
    records += [rec("c", 0, None, "x", gt=None), rec("c", 1, None, "y", gt=None)]
    pairs, stats = build_pairs(records, method="prm_margin", min_prm_margin=0.3)
    assert [(p.prompt_id, p.chosen, p.rejected, p.method) for p in pairs] == [("a", "resp 1", "resp 2", "prm_margin")]
    assert stats.dropped["small_margin"] == 1 and stats.dropped["no_prm"] == 1  # b: 0.05 < 0.3; c: no scores
    # auto: correctness where there is a ground truth, PRM where there is none
    mixed = records + [right("d", 0), wrong("d", 1, "8")]
    methods = sorted(p.method for p in build_pairs(mixed, method="auto", min_prm_margin=0.3)[0])
    assert methods == ["correctness", "prm_margin"]
    assert build_pairs(mixed, min_prm_margin=0.3)[1].dropped["no_answer"] == 3  # correctness: a, b, c have no truth
    with pytest.raises(ValueError, match="valid: correctness, prm_margin, auto"):
        build_pairs(records, method="prm")


def test_dropout_ntp_round_trip() -> None:
    best = rec("img", 0, None, "t10 t11 t12 t13 t14 t15 t16 t17", gt=None, reward=0.9,
               token_ids=list(range(10, 18)), prompt=IMAGE_PROMPT)
    best.images = ["cat.png"]
    cut_off = rec("img", 1, None, "long", gt=None, reward=5.0, finish="length", prompt=IMAGE_PROMPT)
    worse = rec("img", 2, None, "meh", gt=None, reward=0.1, prompt=IMAGE_PROMPT)
    records = [best, cut_off, worse, right("math", 0)]  # the math prompt has a truth: no request
    decode = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    reqs = build_dropout_ntp_requests(records, decode=decode)
    assert len(reqs) == 1 and reqs[0].source is best  # highest reward among responses that finished normally
    assert reqs[0].prefix_token_ids == [10, 11, 12, 13] and reqs[0].prefix == "t10 t11 t12 t13"  # 8 tokens // 2
    assert reqs[0].messages == [{"role": "user", "content": [{"type": "text", "text": "Describe."}]}]  # no image
    gen = Generation(prompt_index=0, sample_index=0, text=" t90 t91", token_ids=[90, 91], logprobs=[0.0, 0.0],
                     finish_reason="stop", num_prompt_tokens=5)
    (pair,) = finish_dropout_ntp(reqs, [gen])
    assert pair.chosen == best.response and pair.rejected == "t10 t11 t12 t13 t90 t91"
    assert pair.rejected_token_ids == [10, 11, 12, 13, 90, 91] and pair.chosen_token_ids == list(range(10, 18))
    assert pair.images == ["cat.png"] and pair.method == "dropout_ntp" and pair.source_ids == ["run/img/0"]
    assert finish_dropout_ntp(reqs, [" t14 t15 t16 t17"]) == []  # reproduced the original: no pair
    # without a decoder the cut is by words: 5 words -> int(2.5) = 2 kept; token ids left for the caller
    (req,) = build_dropout_ntp_requests([rec("w", 0, None, "a b c d e", gt=None)])
    assert (req.prefix, req.prefix_token_ids) == ("a b", [])
    (p2,) = finish_dropout_ntp([req], [" x"])
    assert (p2.rejected, p2.rejected_token_ids) == ("a b x", [])
    with pytest.raises(ValueError, match="one continuation per request"):
        finish_dropout_ntp(reqs, [])


def test_pairs_file_round_trip_and_fill_token_ids(tmp_path: Path) -> None:
    pairs, _ = build_pairs([right("p", 0), wrong("p", 1, "8")])
    pairs[0].ref_chosen_logp, pairs[0].ref_rejected_logp = -1.25, -3.5
    path = write_pairs(pairs, tmp_path / "sub" / "pairs.parquet")
    assert read_pairs(path) == pairs and [p.name for p in path.parent.iterdir()] == ["pairs.parquet"]
    pairs[0].prompt_token_ids, pairs[0].rejected_token_ids = [], []
    n = fill_token_ids(pairs, encode_prompt=lambda m, images: [len(m)], encode_response=lambda t: [len(t)])
    assert n == 2 and pairs[0].prompt_token_ids == [1] and pairs[0].rejected_token_ids == [len(pairs[0].rejected)]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(ValueError, match="bad.parquet is not readable parquet"):
        read_pairs(tmp_path / "bad.parquet")


def test_pairs_cli_writes_pairs_and_prints_stats(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    RolloutLogWriter(tmp_path / "log").append([right("p", i) for i in range(3)] + [wrong("p", 3 + i, "9")
                                                                                   for i in range(2)])
    parser = argparse.ArgumentParser(prog="cascade-rl")
    add_pairs_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pairs", str(tmp_path / "log"), "-o", str(tmp_path / "pairs.parquet"),
                              "--max-pairs-per-prompt", "4", "--seed", "3"])
    assert args.func(args) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["num_pairs"] == 4 and stats["dropped_capped"] == 2  # 3 x 2 = 6 candidates, cap 4
    assert len(read_pairs(tmp_path / "pairs.parquet")) == 4
    RolloutLogWriter(tmp_path / "all_right").append([right("p", 0)])
    args = parser.parse_args(["pairs", str(tmp_path / "all_right"), "-o", str(tmp_path / "none.parquet")])
    assert args.func(args) == 1 and not (tmp_path / "none.parquet").exists()
