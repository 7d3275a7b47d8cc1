"""Safe scoring: time limits, crash isolation, ordering, weighting — with real worker processes."""

from __future__ import annotations

import math
import threading
import time

import pytest
from cascade_rl.rewards import RewardScorer, Verdict, call_reward, check_output

from cascade_rl.types import RewardTermConfig, Sample

ADVERSARIAL = {
    "power tower": "\\boxed{9^{9^{9^{9}}}}",
    "huge factorial": "\\boxed{99999999999!}",
    "huge power": "\\boxed{123456789^{987654}}",
    "nested braces": "\\boxed{" + "{" * 50_000 + "1" + "}" * 50_001,
    "1 MB of text": "blah " * 200_000 + "\\boxed{",
    "empty": "",
    "non-UTF-8 bytes": b"\xff\xfe\x00\x81",
    "lone surrogate": "\udcff",
    "None": None,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_inputs_return_within_the_limit(math_pool: RewardScorer, name: str) -> None:
    sample = Sample(prompt=[], response=ADVERSARIAL[name], ground_truth="1")  # type: ignore[arg-type]
    t0 = time.monotonic()
    (res,) = math_pool.score([sample])
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0 + 0.5 + 0.5, f"{name}: {elapsed:.2f} s (limit 1 s + grace 0.5 s + slack)"
    assert res.total == 0.0 and res.components["math_verify"] == 0.0 and res.correct is False
    assert res.errors["math_verify"]  # why it scored 0 is recorded


def test_thousand_samples_survive_raise_hang_nan_crash_in_order() -> None:
    modes = {3: "raise", 100: "sleep", 250: "nan", 400: "wrong_type", 500: "exit", 700: "deaf_hang", 998: "sleep"}
    samples = [Sample(prompt=[], response=f"\\boxed{{{i}}}", ground_truth=str(i),
                      metadata={"index": i, "mode": modes.get(i)}) for i in range(1000)]
    t0 = time.monotonic()
    with RewardScorer([RewardTermConfig("my_ext_reward:index_echo", 1.0, {}), RewardTermConfig("math_verify", 0.5, {})],
                      timeout_s=0.5, num_workers=2, grace_s=0.5) as scorer:
        results = scorer.score(samples)
        restarts = scorer._pool.num_restarts  # type: ignore[union-attr]
    assert time.monotonic() - t0 < 20
    assert len(results) == 1000
    for i, res in enumerate(results):
        assert res.components["math_verify"] == 1.0  # the other term of a failing sample still counts
        if i in modes:
            assert res.components["index_echo"] == 0.0 and "index_echo/index" not in res.components
            assert res.total == 0.5 and res.correct is False and res.errors["index_echo"]
        else:
            assert res.components["index_echo/index"] == i, "results must come back in input order"
            assert res.total == 1.5 and res.correct is True and not res.errors  # 1.0 * 1 + 0.5 * 1
    errors = {i: results[i].errors["index_echo"] for i in modes}
    assert "RuntimeError: boom on purpose" in errors[3]
    assert "timed out after 0.5 s" in errors[100] and "timed out after 0.5 s" in errors[998]
    assert "nan" in errors[250] and "expected a float" in errors[400]
    assert "died (exit code 3)" in errors[500]
    assert "worker process killed" in errors[700]  # hard deadline: the soft alarm was blocked
    assert restarts >= 2  # the os._exit and the deaf hang (plain hangs are stopped by the soft limit, no restart)


def test_batched_terms_and_wrong_lengths() -> None:
    samples = [Sample(prompt=[], response="x" * n) for n in range(5)]
    with RewardScorer([RewardTermConfig("my_ext_reward:batched_len", 0.5, {}), RewardTermConfig("my_ext_reward:batched_wrong_length", 1.0, {})],
                      num_workers=1, chunk_size=2) as scorer:
        results = scorer.score(samples)
    assert [r.components["batched_len"] for r in results] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [r.total for r in results] == [0.0, 0.5, 1.0, 1.5, 2.0]  # 0.5 * len; the broken term scores 0
    assert all("returned 1 values for 2 samples" in r.errors["batched_wrong_length"] for r in results[:4])
    assert results[0].correct is False and results[1].correct is True  # first term > 0.5


def test_in_process_mode_catches_errors_and_times_out_on_the_main_thread() -> None:
    samples = [Sample(prompt=[], response="A", metadata={"index": 0, "mode": m}) for m in (None, "raise", "sleep")]
    with RewardScorer([RewardTermConfig("my_ext_reward:index_echo", 1.0, {})], timeout_s=0.3, num_workers=0) as scorer:
        t0 = time.monotonic()
        ok, raised, slept = scorer.score(samples)
        assert time.monotonic() - t0 < 1.5
    assert ok.total == 1.0 and "RuntimeError" in raised.errors["index_echo"]
    assert "timed out after 0.3 s" in slept.errors["index_echo"]


def test_none_means_not_applicable_and_verdict_reasons_are_kept() -> None:
    with RewardScorer([RewardTermConfig("math_verify", 1.0, {}), RewardTermConfig("format", 0.25, {})], num_workers=0) as scorer:
        no_gold, bad = scorer.score([Sample(prompt=[], response="<think>a</think>\\boxed{2}"),
                                     Sample(prompt=[], response="nothing", ground_truth="2")])
    assert no_gold.components == {"format": 1.0} and no_gold.total == 0.25 and no_gold.correct is None
    assert bad.components == {"math_verify": 0.0, "format": 0.0} and bad.correct is False
    assert "no answer found" in bad.errors["math_verify"] and "<think>" in bad.errors["format"]


def test_non_sample_inputs_cost_only_themselves() -> None:
    with RewardScorer([RewardTermConfig("contains_answer", 1.0, {})], num_workers=0) as scorer:
        good, bad = scorer.score([Sample(prompt=[], response="it is 42", ground_truth="42"), {"response": "42"}])
    assert good.total == 1.0 and bad.total == 0.0 and "expected a cascade_rl.types.Sample" in bad.errors["contains_answer"]


def test_check_output_validates_values() -> None:
    assert check_output("r", 1) == (1.0, {}, None)
    assert check_output("r", True) == (1.0, {}, None)
    assert check_output("r", None) == (None, {}, None)
    assert check_output("r", Verdict(0.0, "why")) == (0.0, {}, "why")
    assert check_output("r", {"a": 1.0, "b": 2.0}) == (3.0, {"r/a": 1.0, "r/b": 2.0}, None)  # no "score": sum
    assert check_output("r", {"score": 0.5, "n": 9})[0] == 0.5
    score, _, err = check_output("r", {"score": math.inf})
    assert score == 0.0 and "inf" in err
    assert check_output("r", [1.0])[2] == "r returned list '[1.0]'; expected a float"


def test_soft_limit_is_skipped_off_the_main_thread() -> None:
    out: list[tuple[object, str | None]] = []
    thread = threading.Thread(target=lambda: out.append(call_reward(time.sleep, 0.2, {}, 0.05)))
    thread.start()
    thread.join()
    assert out == [(None, None)]  # ran to the end: only a pool worker (a main thread) can stop it


def test_scorer_argument_errors_and_closed_scorer() -> None:
    with pytest.raises(ValueError, match="reward.terms is empty"):
        RewardScorer([], num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardScorer([RewardTermConfig("format", 1.0, {})], timeout_s=0, num_workers=0)
    scorer = RewardScorer([RewardTermConfig("format", 1.0, {})], num_workers=1)
    scorer.close()
    scorer.close()
    with pytest.raises(RuntimeError, match="after close"):
        scorer.score([Sample(prompt=[], response="x")])
