"""``choice``: multiple-choice answers, by option letter or by option text.

The gold answer is a letter (``B``, ``(B)``, ``B. Paris``) or an option's text. Options, when known, come from
``sample.metadata["options"]`` (a list, lettered A, B, ... in order, or a ``{letter: text}`` mapping). The
response's choice is read, in order of preference, from ``\\boxed{X}``, "answer is (X)" / "Answer: X", the last
``(X)``, or a standalone capital letter on the last line; failing that, the option whose text the response ends
up naming (the last one mentioned). Scores 1.0 / 0.0; no readable choice is ``Verdict(0.0, reason)``.
"""

from __future__ import annotations

import re
import string
from typing import Any

from cascade_rl.types import Sample

from .math_verify_reward import last_boxed, text_of
from .registry import Verdict, register_reward

_GOLD_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)]\s*.*)?$", re.S)


def options_of(metadata: dict[str, Any]) -> dict[str, str]:
    """``{letter: option text}`` from ``metadata["options"]`` (or ``"choices"``); empty when absent."""
    raw = metadata.get("options", metadata.get("choices"))
    if isinstance(raw, dict):
        return {str(k).strip().upper(): str(v) for k, v in raw.items()}
    if isinstance(raw, (list, tuple)):
        return {string.ascii_uppercase[i]: str(v) for i, v in enumerate(raw[:26])}
    return {}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def gold_letter(gold: str, options: dict[str, str]) -> str | None:
    """The gold answer as a letter (via the options when it is an option's text)."""
    m = _GOLD_LETTER.match(gold.strip())
    if m and (not options or m.group(1).upper() in options):
        return m.group(1).upper()
    for letter, text in options.items():
        if _norm(text) == _norm(gold):
            return letter
    return None


def response_letter(response: str, letters: str) -> str | None:
    """The letter a response picks (see the module docstring for the order of patterns)."""
    cls = f"[{letters}]"
    boxed = last_boxed(response)
    if boxed is not None:
        m = re.fullmatch(rf"\s*(?:\\text\{{)?\(?({cls})\)?(?:\}})?(?:[.:)].*)?\s*", boxed, re.S)
        if m:
            return m.group(1)
    tail = response[-2000:]
    patterns = [rf"answer(?: is|:)\s*:?\s*\**\(?({cls})\b\)?", rf"\(({cls})\)"]
    for pat in patterns:
        found = re.findall(pat, tail, flags=re.I if pat.startswith("answer") else 0)
        if found:
            return found[-1].upper()
    last_line = tail.strip().splitlines()[-1] if tail.strip() else ""
    found = re.findall(rf"(?<![\w']){cls}(?![\w'])", last_line)
    return found[-1] if found else None


def _by_text(response: str, options: dict[str, str]) -> str | None:
    norm = f" {_norm(response[-4000:])} "
    best, where = None, -1
    for letter, text in options.items():
        pos = norm.rfind(f" {_norm(text)} ") if _norm(text) else -1
        if pos > where:
            best, where = letter, pos
    return best


@register_reward("choice")
def choice_reward(sample: Sample, *, letters: str = "ABCDEFGHIJ") -> float | None:
    """Multiple choice: the picked letter (or option text) equals the gold option -> 1.0 / 0.0."""
    gold = text_of(sample.ground_truth)
    if gold is None or not gold.strip():
        return None
    response = text_of(sample.response)
    if response is None:
        return Verdict(0.0, "response is None")
    options = options_of(sample.metadata or {})
    valid = "".join(options) if options else letters
    want = gold_letter(gold, options)
    got = response_letter(response, valid) or (_by_text(response, options) if options else None)
    if want is None:  # free-text gold without options: compare texts
        return Verdict(1.0 if _norm(gold) and _norm(gold) in _norm(response[-4000:]) else 0.0)
    if got is None:
        return Verdict(0.0, f"no choice ({', '.join(valid)}) found in the response")
    return Verdict(1.0 if got == want else 0.0)
