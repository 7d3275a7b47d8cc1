"""``exact_match``: normalised string equality of the final answer and the gold answer (or any alternative).

Normalisation (SQuAD-style): lower case (unless ``case_sensitive``), punctuation and the articles a/an/the
removed (unless ``strip_punctuation=False``), whitespace collapsed. The final answer is, with ``extract="auto"``,
the last ``\\boxed{}``, else the text after the last "answer:" / "answer is", else the last non-empty line; with
``extract="none"``, the whole response. Alternatives may be listed in ``sample.metadata["answers"]``.
"""

from __future__ import annotations

import re
import string

from cascade_rl.types import Sample

from .math_verify_reward import last_boxed, text_of
from .registry import Verdict, register_reward

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_text(text: str, *, case_sensitive: bool = False, strip_punctuation: bool = True) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (as configured)."""
    if not case_sensitive:
        text = text.lower()
    if strip_punctuation:
        text = _PUNCT.sub(" ", text)
        text = re.sub(r"\b(a|an|the)\b", " ", text, flags=re.I)
    return " ".join(text.split())


def final_answer(response: str, extract: str = "auto") -> str:
    """The part of the response compared with the gold answer (see the module docstring)."""
    if extract == "none":
        return response
    boxed = last_boxed(response)
    if boxed is not None:
        return re.sub(r"^\\text\{(.*)\}$", r"\1", boxed, flags=re.S)
    tail = response[-4000:]
    marks = list(re.finditer(r"answer(?:\s+is|:)\s*:?", tail, flags=re.I))
    if marks:
        return tail[marks[-1].end():].strip().splitlines()[0] if tail[marks[-1].end():].strip() else ""
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@register_reward("exact_match")
def exact_match_reward(sample: Sample, *, extract: str = "auto", case_sensitive: bool = False,
                       strip_punctuation: bool = True) -> float | None:
    """Normalised exact string match of the final answer against the gold answer(s) -> 1.0 / 0.0."""
    if extract not in ("auto", "none"):
        raise ValueError(f"exact_match: kwargs.extract={extract!r}; valid: 'auto', 'none'")
    given = [text_of(sample.ground_truth)] + [text_of(a) for a in (sample.metadata or {}).get("answers", [])]
    golds = [g for g in given if g is not None and g.strip()]
    if not golds:
        return None
    response = text_of(sample.response)
    if response is None:
        return Verdict(0.0, "response is None")
    opts = {"case_sensitive": case_sensitive, "strip_punctuation": strip_punctuation}
    got = normalize_text(final_answer(response, extract), **opts)
    if not got:
        return Verdict(0.0, "empty answer")
    return Verdict(1.0 if any(got == normalize_text(g, **opts) for g in golds) else 0.0)
