"""Format rewards: InternVL's thinking-mode protocol and a boxed-answer check.

``format`` (thinking mode): the response is ``<think>reasoning</think>`` followed by a non-empty answer, with
exactly one think block, opened first (leading whitespace aside) and non-empty. With ``boxed=True`` the answer
part must also contain a closed ``\\boxed{...}``; with ``think=False`` only the boxed check applies.
``boxed_format``: the response contains a closed ``\\boxed{...}`` (after the think block, if there is one).
Scores 1.0 / 0.0; a 0.0 carries the first violated rule as its reason.
"""

from __future__ import annotations

from cascade_rl.types import Sample

from .math_verify_reward import last_boxed, text_of
from .registry import Verdict, register_reward


def check_think(response: str, open_tag: str = "<think>", close_tag: str = "</think>") -> tuple[str | None, str]:
    """``(answer part, "")`` when the think protocol holds, else ``(None, reason)``."""
    text = response.lstrip()
    if not text.startswith(open_tag):
        return None, f"response does not start with {open_tag}"
    if response.count(open_tag) != 1 or response.count(close_tag) != 1:
        return None, f"expected exactly one {open_tag}...{close_tag} block"
    thought, _, answer = text[len(open_tag):].partition(close_tag)
    if not thought.strip():
        return None, "the think block is empty"
    if not answer.strip():
        return None, f"no answer after {close_tag}"
    return answer, ""


@register_reward("format")
def format_reward(sample: Sample, *, think: bool = True, boxed: bool = False, open_tag: str = "<think>",
                  close_tag: str = "</think>") -> float:
    """Thinking-mode format: <think>...</think> then an answer (optionally with \\boxed{}) -> 1.0 / 0.0."""
    response = text_of(sample.response)
    if response is None:
        return Verdict(0.0, "response is None")
    answer = response
    if think:
        part, reason = check_think(response, open_tag, close_tag)
        if part is None:
            return Verdict(0.0, reason)
        answer = part
    if boxed and last_boxed(answer) is None:
        return Verdict(0.0, "no closed \\boxed{...} in the answer")
    return Verdict(1.0)


@register_reward("boxed_format")
def boxed_format_reward(sample: Sample, *, close_tag: str = "</think>") -> float:
    """Boxed format: a closed \\boxed{...} in the answer (after </think> when present) -> 1.0 / 0.0."""
    response = text_of(sample.response)
    if response is None:
        return Verdict(0.0, "response is None")
    answer = response.rpartition(close_tag)[2] if close_tag in response else response
    return Verdict(1.0) if last_boxed(answer) is not None else Verdict(0.0, "no closed \\boxed{...} in the answer")
