"""Rollout logs from elsewhere: convert a JSONL file of (prompt, response, answer, correctness) rows to a log.

One JSON object per line. Column names are arguments (dotted for nested columns: ``extra_info.question``,
``reward_model.ground_truth``, as in the prompt tables), so MMPR-style files (``question``/``response``/``answer``/
``is_correct``) or another framework's dumps load without editing:

- ``prompt_key`` (required): a string (becomes one user message) or a list of chat messages.
- ``response_key`` (required): the response text.
- ``answer_key``: the ground truth (``None``/absent = no checkable answer); numbers become strings.
- ``correct_key``: true/false, 1/0, "true"/"false"/"yes"/"no", or null (= unparsed, a negative for pairing).
- ``reward_key``: a number; when absent, 1.0 if correct else 0.0.
- ``images_key``: an image path or a list of paths. A ``rewards`` object (``{component: score}``, e.g. ``prm``)
  and ``finish_reason`` are copied when present.
- ``id_key``: the column naming the *prompt* (rows with the same id are samples of one prompt). Without it the
  prompt id is a hash of the prompt messages and images, so identical prompts group together.

Token ids are left empty (tokenise later with the policy's tokenizer, ``pairs.fill_token_ids``). Record ids are
``<run_id>/<prompt_id>/<hash of response>-<k>`` (k counts identical responses), so importing a file twice adds
nothing the second time.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from ..types import RolloutRecord
from .rollout_log import RolloutLogWriter
from .table import get_key

_TRUE = {"true", "1", "yes", "correct"}
_FALSE = {"false", "0", "no", "wrong", "incorrect"}


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: a JSON {type(row).__name__}, expected an object per line")
            rows.append((line_no, row))
    return rows


def _check_columns(path: Path, rows: list[tuple[int, dict[str, Any]]], required: dict[str, str],
                   optional: dict[str, str]) -> None:
    """Required columns must be in every row (the error lists line numbers); optional ones warn if in none."""
    seen = sorted(set().union(*(r.keys() for _, r in rows))) if rows else []
    for key, flag in required.items():
        lines = [n for n, r in rows if get_key(r, key, None) is None]
        if lines:
            shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
            raise ValueError(f"{path}: column {key!r} is missing or null in {len(lines)} of {len(rows)} rows "
                             f"(lines {shown}); point {flag} at the column that holds it (columns seen: {seen})")
    for key, flag in optional.items():
        if rows and all(get_key(r, key, None) is None for _, r in rows):
            warnings.warn(f"{path}: no row has column {key!r}; if your file names it differently set {flag} "
                          f"(columns seen: {seen})", stacklevel=3)


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    raise ValueError(f"{where}: the prompt must be a string or a list of {{role, content}} messages, "
                     f"got {type(value).__name__}")


def _correct(value: Any, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{where}: correctness {value!r} is not true/false/1/0/null")


def _images(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{where}: images must be a path or a list of paths, got {value!r}")


def _reward(value: Any, correct: bool | None, where: str) -> float:
    if value is None:
        return 1.0 if correct else 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: reward {value!r} is not a number")
    return float(value)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def _to_record(row: dict[str, Any], keys: dict[str, str | None], run_id: str, stage: str, where: str,
               occurrences: Counter) -> RolloutRecord:
    def cell(name: str) -> Any:  # dotted keys reach nested columns (`extra_info.question`)
        key = keys[name]
        return None if key is None else get_key(row, key, None)

    messages = _messages(cell("prompt"), where)
    images = _images(cell("images"), where)
    prompt = json.dumps(messages, ensure_ascii=False)
    prompt_id = str(cell("id")) if keys["id"] else "p-" + _digest(prompt, *images)
    response = str(cell("response"))
    answer = cell("answer")
    correct = _correct(cell("correct"), where)
    components = row.get("rewards") if isinstance(row.get("rewards"), dict) else {}
    occurrences[(prompt_id, response)] += 1
    return RolloutRecord(
        record_id=f"{run_id}/{prompt_id}/{_digest(response)[:12]}-{occurrences[(prompt_id, response)] - 1}",
        run_id=run_id, stage=stage, step=0, policy_version=0, prompt_id=prompt_id, prompt=prompt,
        images=images, ground_truth=None if answer is None else str(answer), response=response,
        prompt_token_ids=[], response_token_ids=[], behaviour_logprobs=[], rewards=json.dumps(components),
        reward=_reward(cell("reward"), correct, where), correct=correct,
        finish_reason=str(row.get("finish_reason") or "unknown"), num_prompt_tokens=0, num_response_tokens=0,
        generate_s=0.0, error=None)


def convert_jsonl(jsonl_path: str | Path, out_folder: str | Path, *, prompt_key: str = "prompt",
                  response_key: str = "response", answer_key: str = "answer", correct_key: str = "correct",
                  reward_key: str = "reward", id_key: str | None = None, images_key: str = "images",
                  run_id: str = "imported", stage: str = "imported", shard_size: int = 50_000) -> int:
    """Append the rows of a JSONL file to the rollout log in ``out_folder``; return how many records were new.

    All rows are validated before anything is written, so a bad file leaves the log untouched.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be >= 1 (records per shard)")
    path = Path(jsonl_path)
    rows = _read_jsonl(path)
    required = {prompt_key: "--prompt-key", response_key: "--response-key"}
    if id_key:
        required[id_key] = "--id-key"
    _check_columns(path, rows, required, {answer_key: "--answer-key", correct_key: "--correct-key"})
    keys = {"prompt": prompt_key, "response": response_key, "answer": answer_key, "correct": correct_key,
            "reward": reward_key, "id": id_key, "images": images_key}
    occurrences: Counter = Counter()
    records = [_to_record(row, keys, run_id, stage, f"{path}:{n}", occurrences) for n, row in rows]
    writer = RolloutLogWriter(out_folder)
    before = len(writer)
    for i in range(0, len(records), shard_size):
        writer.append(records[i : i + shard_size])
    return len(writer) - before
