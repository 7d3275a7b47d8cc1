"""Reading a user's data table: JSONL / JSON / parquet files and local ``datasets`` folders, with dotted column keys.

One reader for prompt files (``prompts.py``) and preference-pair files (``pair_files.py``):

- ``.jsonl`` / ``.json`` / ``.parquet`` files load through ``datasets`` offline. A JSONL file that ``datasets``
  cannot parse is scanned line by line, so a malformed line is named by its line number.
- A folder written by ``Dataset.save_to_disk`` loads with ``datasets.load_from_disk``; a ``DatasetDict`` folder
  must hold exactly one split, or be pointed at its split subfolder (``<folder>/train``).
- ``get_key(row, "reward_model.ground_truth")`` reads a nested column (verl's layout); a column literally named
  with a dot wins over the nested lookup.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_MISSING = object()


class DataFileError(ValueError):
    """A data file that cannot be used as is; the message names the file, the row or line and the fix."""


def is_dataset_folder(path: Path) -> bool:
    """A folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json",
                                                                 "dataset_dict.json"))


def _first_bad_jsonl_line(path: Path) -> str | None:
    """``line N: …`` for the first line of ``path`` that is not one JSON object, or None when every line is."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.strip())
            except json.JSONDecodeError as exc:
                return f"line {line_no} is not valid JSON ({exc.msg} at column {exc.colno}): {line.strip()[:80]!r}"
            if not isinstance(row, dict):
                return f"line {line_no} is a JSON {type(row).__name__}, not an object: {line.strip()[:80]!r}"
    return None


def _load_folder(path: Path) -> Any:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataFileError(f"{path}: a DatasetDict with splits {', '.join(ds)}; point the key at one split's "
                                f"folder, e.g. {path / next(iter(ds))}")
        ds = next(iter(ds.values()))
    return ds


def read_table(path: Path, what: str = "data") -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and rows of a local JSONL/JSON/parquet file or ``save_to_disk`` folder (offline).

    Raises ``FileNotFoundError`` for a missing path and ``DataFileError`` (naming the line of a malformed JSONL
    file, or the extensions supported) for one that cannot be read.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    if path.is_dir():
        if not is_dataset_folder(path):
            raise DataFileError(f"{path}: a folder, but not one written by datasets' save_to_disk (no "
                                f"dataset_info.json / dataset_dict.json); point at a file or such a folder")
        ds = _load_folder(path)
        return list(ds.column_names), ds.to_list()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    builder = FORMATS.get(path.suffix)
    if builder is None:
        raise DataFileError(f"{path}: unsupported extension {path.suffix!r}; use one of {', '.join(FORMATS)} "
                            "or a datasets save_to_disk folder")
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - pyarrow/datasets raise many types for a malformed file
        bad = _first_bad_jsonl_line(path) if path.suffix == ".jsonl" else None
        if bad:
            raise DataFileError(f"{path}: {bad}; fix or delete that line (each line must be one JSON object)") \
                from None
        raise DataFileError(f"{path}: cannot be read as {builder}: {type(exc).__name__}: {exc}. A common cause is "
                            "a column whose rows mix types (numbers and strings in `answer`, say): "
                            "write every value of a column with the same type") from exc
    return list(ds.column_names), ds.to_list()


def get_key(row: dict[str, Any], key: str, default: Any = _MISSING) -> Any:
    """``row[key]``, where ``a.b.c`` walks nested dicts unless a column is literally named ``a.b.c``.

    Raises ``KeyError`` naming the missing part when there is no such value and no ``default``.
    """
    if key in row:
        return row[key]
    node: Any = row
    for depth, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            if default is not _MISSING:
                return default
            where = ".".join(key.split(".")[:depth]) or "the row"
            has = ", ".join(map(str, node)) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"no `{part}` in {where} (it has: {has or 'nothing'})")
        node = node[part]
    return node


def top_column(key: str, columns: list[str]) -> str:
    """The top-level column a (possibly dotted) key reads."""
    return key if key in columns else key.split(".")[0]
