"""``math_verify``: 1.0 when the response's final answer equals the ground truth mathematically, else 0.0.

Steps:
1. Extract the final answer: the last ``\\boxed{...}`` (or ``\\fbox{...}``) of the response; failing that (unless
   ``mode="boxed"``) the last ``$...$`` math span, or a last line that is a bare LaTeX expression, or the last
   number (``-3``, ``1,024``, ``0.5``, ``3/4``).
2. Parse answer and gold with math-verify (Hugging Face's ``math_verify.parse``; LaTeX and plain expressions:
   fractions, decimals, intervals, sets, ...) and compare with ``math_verify.verify``.
3. Where math-verify cannot parse one side, fall back to sympy on plain arithmetic (digits and ``+-*/^().``
   only: the text is never ``eval``-ed otherwise), then to a normalised string comparison.

math-verify's own time limits use ``signal.alarm`` (main thread only), so they are switched off here
(``parsing_timeout=None``, ``timeout_seconds=None``) and the scorer enforces the limit (``rewards/safe.py``).
Answers that would make sympy compute for ever (power towers like ``9^{9^{9^9}}``) or are very long are
refused up front with a reason. An unparseable or missing answer scores ``Verdict(0.0, reason)``.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy.parsing.sympy_parser import parse_expr

from cascade_rl.types import Sample

from .registry import Verdict, register_reward


class _NoTimeoutWarning(logging.Filter):
    """Drop math-verify's per-call "Timeout is disabled" warning: our scorer enforces the limit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_ARITH = re.compile(r"^[\d\s.+\-*/^()]+$")
_EXTRACT = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
MAX_ANSWER_CHARS = 512


def text_of(value: Any) -> str | None:
    """A response or gold as text: bytes are decoded (invalid UTF-8 replaced), None stays None."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces (None when absent or unclosed)."""
    matches = list(_BOXED.finditer(text))
    for m in reversed(matches[-3:]):  # bounded: 1 MB of unclosed "\\boxed{" must not cost O(n^2)
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def _is_prose(text: str) -> bool:
    """Words outside LaTeX commands: prose (or "$5 and $6" dollar amounts), not a math expression."""
    return bool(re.search(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", " ", text)))


def _math_only(line: str) -> bool:
    """A line that is a bare LaTeX expression (``x = \\dfrac{2}{4}``), not prose with some math in it."""
    return bool(re.search(r"\\[A-Za-z]+", line)) and len(line) <= 200 and not _is_prose(line)


def extract_answer(response: str, mode: str = "auto") -> str | None:
    """The final answer of a response: the last ``\\boxed{}``; else (``mode="auto"``) the last ``$...$`` /
    ``\\(...\\)`` / ``\\[...\\]`` span, or a last line that is a bare LaTeX expression, or the last number."""
    boxed = last_boxed(response)
    if boxed is not None or mode == "boxed":
        return boxed
    tail = response[-4096:]  # the final answer is at the end; keeps the regexes cheap on huge responses
    spans = [next(x for x in m if x).strip() for m in _MATH_SPAN.findall(tail)]
    spans = [x for x in spans if x and not _is_prose(x)]
    if spans:
        return spans[-1]
    lines = [ln.strip().rstrip(".") for ln in tail.splitlines() if ln.strip()]
    if lines and _math_only(lines[-1]):
        return lines[-1]
    numbers = _NUMBER.findall(tail)
    return numbers[-1].replace(",", "").replace(" ", "") if numbers else None


def too_costly(answer: str) -> str | None:
    """Why evaluating ``answer`` could run away (nested or huge exponents), or None."""
    for m in re.finditer(r"\^\s*(\{)?", answer):
        if m.group(1):
            depth, j = 1, m.end()
            while j < len(answer) and depth:
                depth += {"{": 1, "}": -1}.get(answer[j], 0)
                j += 1
            exponent = answer[m.end():j]
        else:
            exponent = answer[m.end():m.end() + 12]
        if "^" in exponent or "**" in exponent:
            return "nested exponent (power tower) is not evaluated"
        if re.search(r"\d{7,}", exponent):
            return "exponent too large to evaluate"
    return None


def _as_latex(text: str) -> str:
    return text if "$" in text else f"${text}$"


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list[Any]:
    boxed = last_boxed(gold)
    return parse(_as_latex(boxed if boxed is not None else gold), extraction_config=_EXTRACT, parsing_timeout=None)


def _norm_str(text: str) -> str:
    text = re.sub(r"\\(left|right|!|,|;|\s)|\\text\{([^{}]*)\}|\$", r"\2", text)
    return re.sub(r"\s+", "", text).rstrip(".").lower()


def _sympy_equal(a: str, b: str) -> bool | None:
    """Equality of two plain arithmetic expressions with sympy; None when either is not plain arithmetic."""
    if not (_ARITH.match(a) and _ARITH.match(b)):
        return None
    try:
        ea, eb = (parse_expr(s.replace("^", "**"), evaluate=True) for s in (a, b))
        return bool(sympy.simplify(ea - eb) == 0)
    except (SyntaxError, TypeError, ValueError, ZeroDivisionError, sympy.SympifyError):
        return None


def verify_answer(answer: str, gold: str, float_rounding: int = 6) -> Verdict:
    """Compare an extracted answer to the gold answer (math-verify, then sympy, then strings)."""
    for side, text in (("answer", answer), ("ground truth", gold)):
        if len(text) > MAX_ANSWER_CHARS:
            return Verdict(0.0, f"{side} longer than {MAX_ANSWER_CHARS} characters")
        why = too_costly(text)
        if why:
            return Verdict(0.0, f"{side} {text[:60]!r}: {why}")
    gold_parsed = _parse_gold(gold)
    pred_parsed = parse(_as_latex(answer), extraction_config=_EXTRACT, parsing_timeout=None)
    if gold_parsed and pred_parsed:
        ok = verify(gold_parsed, pred_parsed, float_rounding=float_rounding, timeout_seconds=None)
        return Verdict(1.0 if ok else 0.0)
    plain_gold = last_boxed(gold) or gold
    same = _sympy_equal(answer, plain_gold)
    if same is None:
        same = _norm_str(answer) == _norm_str(plain_gold)
    if same:
        return Verdict(1.0)
    side = "answer" if not pred_parsed else "ground truth"
    return Verdict(0.0, f"math-verify could not parse the {side} ({(answer if side == 'answer' else gold)[:60]!r})")


@register_reward("math_verify")
def math_verify_reward(sample: Sample, *, mode: str = "auto", float_rounding: int = 6) -> float | None:
    """Math answer check with math-verify: final \\boxed{} (else last number) vs ground truth -> 1.0 / 0.0."""
    if mode not in ("auto", "boxed"):
        raise ValueError(f"math_verify: kwargs.mode={mode!r}; valid: 'auto' (boxed, else last number), 'boxed'")
    gold = text_of(sample.ground_truth)
    if gold is None or not gold.strip():
        return None  # nothing to check against: not applicable
    response = text_of(sample.response)
    if response is None:
        return Verdict(0.0, "response is None")
    answer = extract_answer(response, mode)
    if not answer:
        return Verdict(0.0, "no \\boxed{} answer in the response" if mode == "boxed" else
                       "no answer found in the response (no \\boxed{} and no number)")
    return verify_answer(answer, gold.strip(), float_rounding)
