"""Rule-based verifiers: math_verify, choice, exact_match, format, length_penalty (called directly)."""

from __future__ import annotations

import pytest
from cascade_rl.rewards import get_reward
from cascade_rl.rewards.length import overlong_penalty
from cascade_rl.rewards.math_verify_reward import extract_answer, last_boxed

from cascade_rl.types import Sample


def _s(response: object, gold: str | None = None, **metadata: object) -> Sample:
    return Sample(prompt=[{"role": "user", "content": "q"}], response=response, ground_truth=gold,  # type: ignore[arg-type]
                  metadata=dict(metadata))


@pytest.mark.parametrize("response", ["0.5", "\\boxed{\\frac12}", "1/2", "\\dfrac{2}{4}", "\\boxed{\\dfrac{2}{4}}",
                                      "so the answer is 0.5.", "The answer is $\\boxed{0.50}$"])
def test_math_accepts_equivalent_forms(response: str) -> None:
    assert get_reward("math_verify")(_s(response, "\\frac{1}{2}")) == 1.0


@pytest.mark.parametrize("response", ["0.6", "\\boxed{\\frac13}", "2/3", "\\boxed{-\\frac{1}{2}}",
                                      "I get 1/2 first, but finally \\boxed{2}"])
def test_math_rejects_wrong_values(response: str) -> None:
    assert get_reward("math_verify")(_s(response, "\\frac{1}{2}")) == 0.0


@pytest.mark.parametrize("response, gold", [("\\boxed{[1, 2)}", "[1,2)"), ("\\boxed{\\{1,2\\}}", "\\{2, 1\\}"),
                                            ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"), ("x = \\boxed{3}", "3"),
                                            ("1,024 apples", "1024")])
def test_math_intervals_sets_radicals(response: str, gold: str) -> None:
    assert get_reward("math_verify")(_s(response, gold)) == 1.0


def test_math_unparseable_is_zero_with_reason_and_no_gold_is_none() -> None:
    fn = get_reward("math_verify")
    for response in ["", "no digits here", None, b"\xff\xfe"]:
        out = fn(_s(response, "2"))
        assert out == 0.0 and out.reason
    assert fn(_s("\\boxed{3}", None)) is None  # not applicable without a ground truth
    out = fn(_s("\\boxed{9^{9^{9^{9}}}}", "1"))
    assert out == 0.0 and "power tower" in out.reason
    with pytest.raises(ValueError, match="kwargs.mode"):
        fn(_s("1", "1"), mode="last")
    assert fn(_s("1 and then 2", "1"), mode="boxed").reason.startswith("no \\boxed{}")


def test_answer_extraction() -> None:
    assert last_boxed("a \\boxed{x} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert extract_answer("it was 3, then -4.5 and finally 7/8.") == "7/8"
    assert extract_answer("total 1,234,567") == "1234567"


@pytest.mark.parametrize("response, gold, meta, want", [
    ("The answer is (B).", "B", {}, 1.0),
    ("Answer: c", "(C)", {}, 1.0),
    ("\\boxed{A}", "B", {}, 0.0),
    ("I pick Paris, clearly.", "B", {"options": ["London", "Paris", "Rome"]}, 1.0),
    ("I pick Paris, clearly.", "Paris", {"options": ["London", "Paris", "Rome"]}, 1.0),
    ("London? No wait, it is B", "B. Paris", {"options": {"A": "London", "B": "Paris"}}, 1.0),
    ("A cat sat. Final: (D)", "A", {}, 0.0),
])
def test_choice(response: str, gold: str, meta: dict, want: float) -> None:
    assert get_reward("choice")(_s(response, gold, **meta)) == want


def test_choice_without_a_choice_has_reason() -> None:
    out = get_reward("choice")(_s("no idea", "B"))
    assert out == 0.0 and "no choice" in out.reason


@pytest.mark.parametrize("response, gold, want", [
    ("Answer: The Eiffel Tower!", "eiffel tower", 1.0),
    ("blah\n\\boxed{\\text{Blue Whale}}", "blue whale", 1.0),
    ("so...\nParis.", "Paris", 1.0),
    ("Answer: Lyon", "Paris", 0.0),
])
def test_exact_match(response: str, gold: str, want: float) -> None:
    assert get_reward("exact_match")(_s(response, gold)) == want


def test_exact_match_alternatives_and_case() -> None:
    fn = get_reward("exact_match")
    assert fn(_s("Answer: NYC", "New York", answers=["NYC"])) == 1.0
    assert fn(_s("Answer: paris", "Paris"), case_sensitive=True) == 0.0


@pytest.mark.parametrize("response, kwargs, want", [
    ("<think>2+2 is 4</think>The answer is 4.", {}, 1.0),
    ("  <think>x</think>\n\\boxed{4}", {"boxed": True}, 1.0),
    ("<think>x</think> 4", {"boxed": True}, 0.0),
    ("The answer is 4.", {}, 0.0),
    ("<think></think>4", {}, 0.0),
    ("<think>a</think><think>b</think>4", {}, 0.0),
    ("<think>never closed 4", {}, 0.0),
    ("<think>x</think>", {}, 0.0),
    ("just \\boxed{4}", {"think": False, "boxed": True}, 1.0),
])
def test_think_format(response: str, kwargs: dict, want: float) -> None:
    assert get_reward("format")(_s(response), **kwargs) == want


def test_boxed_format_looks_after_think() -> None:
    fn = get_reward("boxed_format")
    assert fn(_s("<think>\\boxed{1}</think> so 1")) == 0.0
    assert fn(_s("<think>hm</think> \\boxed{1}")) == 1.0


def test_dapo_overlong_penalty() -> None:
    # L_max = 100, L_cache = 20: 0 up to 80, then (80 - L) / 20, -1 beyond 100
    assert [overlong_penalty(L, 100, 20) for L in (50, 80, 90, 100, 101)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    fn = get_reward("length_penalty")
    assert fn(_s("x" * 90), max_length=100, cache_length=20) == -0.5  # characters when no token count
    assert fn(_s("x", num_response_tokens=95), max_length=100, cache_length=20) == -0.75  # tokens win
    with pytest.raises(ValueError, match="cache_length"):
        fn(_s("x"), max_length=10, cache_length=20)


def test_extraction_prefers_math_spans_and_bare_latex_lines() -> None:
    assert extract_answer("first $1$ then $\\frac{3}{4}$, done 5") == "\\frac{3}{4}"
    assert extract_answer("Thus\nx = \\dfrac{2}{4}.") == "x = \\dfrac{2}{4}"
    assert extract_answer("we get \\frac{1}{2} then 3") == "3"  # prose with math: the last number
    assert extract_answer("It costs $5. In total she pays $12") == "12"  # dollar amounts are not math spans
