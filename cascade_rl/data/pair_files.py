"""Preference pairs from a file: the one import path for ready-made (prompt, chosen, rejected) data into ``mpo``.

``stages.N.mpo.pairs`` names the source; the ``pairs_*_key`` fields name its columns (dotted keys reach nested
ones). Layouts, all read by ``read_pair_file``:

- standard (TRL/OpenRLHF): ``prompt``, ``chosen``, ``rejected`` strings;
- conversational: ``prompt`` a list of ``{role, content}`` messages, ``chosen``/``rejected`` lists ending in
  the assistant's message (TRL); with ``pairs_prompt_key: null`` the prompt is the messages that ``chosen`` and
  ``rejected`` share before their final assistant message (TRL's implicit prompt, OpenRLHF's full chats);
- MMPR (InternVL): a ``meta.json`` mapping each source to ``{root, annotation, repeat_time?}``, where
  ``annotation`` is a JSONL file of ``image, question, chosen, rejected`` rows and ``root`` the folder its image
  paths are relative to (both relative to ``meta.json`` unless absolute). Set ``pairs_prompt_key: question``
  and ``pairs_image_key: image``. ``repeat_time`` < 1 keeps that leading fraction of a source, an integer > 1
  repeats it.

Files are JSONL / JSON / parquet or a ``datasets`` ``save_to_disk`` folder (``table.py``). Image paths become
the pair's ``images`` (absolute; a URL or a missing file is a bad row) and image parts of the prompt messages
(``<image>`` placeholders, as in prompt files). Token ids are left empty: the mpo stage tokenises with the
policy's tokenizer. Pairs whose chosen and rejected texts are identical are dropped (``dropped_duplicate``).
Every bad row is reported (up to 10) with its file and row before anything trains.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..types import PreferencePair
from .pairs import PairStats
from .prompts import MAX_LISTED_PROBLEMS, _image_paths, _messages
from .table import DataFileError, get_key, read_table, top_column

METHOD = "file"


def _response(value: Any, side: str, key: str) -> tuple[list[dict[str, Any]], str]:
    """(messages before the response, response text) of a chosen/rejected cell."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"empty {side} response in column `{key}`")
        return [], value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        last = value[-1]
        if last["role"] != "assistant":
            raise ValueError(f"{side} messages in column `{key}` must end with the assistant's message, not "
                             f"{last['role']!r}")
        content = last.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"empty {side} response in column `{key}`")
        return [dict(m) for m in value[:-1]], content
    raise ValueError(f"{side} in column `{key}` must be a string or a list of {{role, content}} messages, got "
                     f"{type(value).__name__}: {str(value)[:60]!r}")


def _prompt(row: dict[str, Any], keys: dict[str, Any], prefix: list[dict[str, Any]],
            other_prefix: list[dict[str, Any]], num_images: int) -> list[dict[str, Any]]:
    key = keys["prompt"]
    if key is None:  # implicit prompt: the shared conversation before the two responses
        if not prefix or prefix != other_prefix:
            raise ValueError("with pairs_prompt_key: null, chosen and rejected must be message lists sharing the "
                             "same messages before their final assistant message")
        return _messages(prefix, num_images, None)
    prompt = get_key(row, key)
    if prefix == prompt:  # full chats (OpenRLHF) whose prompt column repeats the shared messages
        prefix = []
    try:
        return _messages(prompt, num_images, None) + prefix
    except ValueError as exc:
        raise ValueError(f"{exc} in column `{key}`") from None


def _row_pair(row: dict[str, Any], keys: dict[str, Any], base: Path, where: str) -> PreferencePair:
    images, missing = _image_paths(get_key(row, keys["images"], None), base)
    if missing:
        raise ValueError(f"image file(s) not found: {', '.join(missing[:3])} (column `{keys['images']}`, "
                         f"resolved against {base})")
    chosen_prefix, chosen = _response(get_key(row, keys["chosen"]), "chosen", keys["chosen"])
    rejected_prefix, rejected = _response(get_key(row, keys["rejected"]), "rejected", keys["rejected"])
    messages = _prompt(row, keys, chosen_prefix, rejected_prefix, len(images))
    prompt = json.dumps(messages, ensure_ascii=False)
    prompt_id = "p-" + hashlib.sha256("\x1f".join([prompt, *images]).encode()).hexdigest()[:16]
    return PreferencePair(pair_id="", prompt_id=prompt_id, prompt=prompt, images=images, chosen=chosen,
                          rejected=rejected, prompt_token_ids=[], chosen_token_ids=[], rejected_token_ids=[],
                          method=METHOD, source_ids=[where])


def _sources(path: Path) -> list[tuple[Path, Path, float]]:
    """(annotation file, image root, repeat_time) per source: one for a data file, one per entry of meta.json."""
    if path.name != "meta.json" and not (path.suffix == ".json" and _is_meta(path)):
        return [(path, path.parent, 1.0)]
    meta = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for name, entry in meta.items():
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise DataFileError(f"{path}: source {name!r} must be an object with `annotation` (a JSONL file) and "
                                f"`root` (its image folder), got {str(entry)[:80]!r}")
        annotation = path.parent / str(entry["annotation"])
        root = path.parent / str(entry.get("root") or ".")
        repeat = entry.get("repeat_time", 1)
        if not isinstance(repeat, int | float) or repeat <= 0 or (repeat > 1 and repeat != int(repeat)):
            raise DataFileError(f"{path}: source {name!r} repeat_time={repeat!r}: use a fraction in (0, 1] or an "
                                "integer >= 1")
        out.append((annotation, root, float(repeat)))
    return out


def _is_meta(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "annotation" in v
                                                         for v in data.values())


def _repeat(rows: list[dict[str, Any]], repeat: float) -> list[tuple[int, dict[str, Any]]]:
    indexed = list(enumerate(rows))
    if repeat < 1:
        return indexed[: max(1, int(len(rows) * repeat))]
    return indexed * int(repeat)


def _check_columns(path: Path, columns: list[str], keys: dict[str, Any], flag: str) -> None:
    missing = [f"`{col}` (set {flag}.pairs_{name}_key)" for name, col in keys.items()
               if col is not None and name != "images" and top_column(col, columns) not in columns]
    if missing:
        raise DataFileError(f"{path}: missing column(s) {'; '.join(missing)}. Columns present: "
                            f"{', '.join(columns) or 'none'}")


def read_pair_file(path: str | Path, *, prompt_key: str | None = "prompt", chosen_key: str = "chosen",
                   rejected_key: str = "rejected", image_key: str = "images",
                   flag: str = "stages.N.mpo") -> tuple[list[PreferencePair], PairStats]:
    """Pairs and their stats from a pairs file or MMPR ``meta.json`` (see the module docstring).

    ``flag`` is the recipe prefix named in errors. Raises ``FileNotFoundError`` and ``DataFileError`` (every bad
    row, with file and row).
    """
    path = Path(path).expanduser().resolve()
    keys = {"prompt": prompt_key, "chosen": chosen_key, "rejected": rejected_key, "images": image_key}
    pairs: list[PreferencePair] = []
    problems: list[str] = []
    stats = PairStats()
    seen: Counter = Counter()
    for source, root, repeat in _sources(path):
        columns, rows = read_table(source, "pairs")
        _check_columns(source, columns, keys, flag)
        for i, row in _repeat(rows, repeat):
            stats.num_records += 1
            try:
                pair = _row_pair(row, keys, root, f"{source.name}:{i}")
            except (KeyError, ValueError) as exc:
                problems.append(f"{source.name} row {i}: {exc.args[0] if exc.args else exc}")
                continue
            if pair.chosen == pair.rejected:
                stats.dropped["duplicate"] += 1
                continue
            content = "\x1f".join([pair.prompt, *pair.images, pair.chosen, pair.rejected])
            seen[content] += 1
            pair.pair_id = hashlib.sha256(f"{content}\x1f{seen[content]}".encode()).hexdigest()[:24]
            pairs.append(pair)
    if problems:
        more = f"\n  … and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise DataFileError(f"{path}: {len(problems)} bad pair row(s) ({flag}.pairs_*_key name the columns):\n  "
                            + "\n  ".join(problems[:MAX_LISTED_PROBLEMS]) + more)
    stats.num_prompts = len({p.prompt_id for p in pairs})
    stats.num_prompts_with_pairs, stats.num_pairs = stats.num_prompts, len(pairs)
    stats.pairs_by_method = {METHOD: len(pairs)}
    return pairs, stats


def load_pair_file(mpo: Any, key: str = "stages.N.mpo") -> tuple[list[PreferencePair], PairStats]:
    """``read_pair_file`` with the keys of a recipe's ``mpo`` block (``pairs``, ``pairs_*_key``)."""
    return read_pair_file(mpo.pairs, prompt_key=mpo.pairs_prompt_key, chosen_key=mpo.pairs_chosen_key,
                          rejected_key=mpo.pairs_rejected_key, image_key=mpo.pairs_image_key, flag=key)
