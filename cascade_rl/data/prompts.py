"""Prompt sets: any local JSONL/parquet file read through ``datasets``, or a synthetic task generated on demand.

``load_prompts`` turns rows into ``PromptItem``s with chat ``messages``. Column names are configurable
(``data.id_key``, ``data.prompt_key``, ``data.answer_key``, ``data.image_key``). A string prompt becomes a user
message (after a system message if ``system_prompt`` is set); a list of ``{role, content}`` messages is kept
(the system prompt is prepended only where it has no system message). With images, a string prompt's user
message is ``[{"type": "image"}, …, {"type": "text", "text": prompt}]``; ``<image>`` placeholders in the
prompt, if any, mark where each image goes instead. Image paths are resolved against the data file's folder.

Every problem is reported with the file, the row and the key to set; all row problems are gathered before
raising, so one run of ``cascade-rl validate`` shows them all.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from .images import image_cell_paths, resolve_placeholders
from .tasks import TASKS, TASKS_VERSION, write_task

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
IMAGE_PLACEHOLDER = "<image>"
MAX_LISTED_PROBLEMS = 10


class PromptDataError(ValueError):
    """A prompt file that cannot be used as is; the message names the file, the rows and the fix."""


@dataclass
class PromptItem:
    """One prompt: chat messages, the ground-truth answer (None if not checkable) and absolute image paths."""

    id: str
    messages: list[dict[str, Any]]
    answer: str | None = None
    images: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, Any]], Any]:
    """Load a local file with ``datasets`` (offline); return column names, rows and the dataset."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    builder = FORMATS.get(path.suffix)
    if builder is None:
        raise PromptDataError(f"{path}: unsupported extension {path.suffix!r}; use one of {', '.join(FORMATS)}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - pyarrow/datasets raise many types for a malformed file
        raise PromptDataError(f"{path}: cannot be read as {builder}: {type(exc).__name__}: {exc}. A common cause is "
                              "a column whose rows mix types (numbers and strings in `answer`, say): "
                              "write every value of a column with the same type") from exc
    return list(ds.column_names), ds.to_list(), ds


def _check_columns(path: Path, columns: list[str], keys: dict[str, str]) -> None:
    missing = [f"`{col}` (set data.{key} to the right column)" for key, col in keys.items() if col not in columns]
    if missing:
        raise PromptDataError(f"{path}: missing column(s) {'; '.join(missing)}. "
                              f"Columns present: {', '.join(columns) or 'none'}")


def _convert_answer(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise TypeError("a boolean")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    raise TypeError(f"a {type(value).__name__}")


def _image_paths(value: Any, base: Path) -> tuple[list[str], list[str]]:
    """(absolute paths, the ones that are missing) for an image cell (``images.image_cell_paths``)."""
    return image_cell_paths(value, base)


def _unreadable_image(path: str) -> str | None:
    """Why ``path`` is not a usable image (header and chunk checks, no full decode), or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a broken file
        return f"{path} ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def _user_content(prompt: str, num_images: int) -> str | list[dict[str, Any]]:
    """A string prompt as user content; images go at the ``<image>`` placeholders, else before the text."""
    if not num_images:
        return prompt
    if IMAGE_PLACEHOLDER not in prompt:
        return [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
    parts: list[dict[str, Any]] = []
    for i, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if chunk.strip():
            parts.append({"type": "text", "text": chunk.strip("\n")})
    return parts


def _num_image_parts(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") != "text")


def _messages(prompt: Any, num_images: int, system_prompt: str | None) -> list[dict[str, Any]]:
    """Chat messages for a prompt cell; raises ValueError with the reason for a bad cell."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt")
        placeholders = prompt.count(IMAGE_PLACEHOLDER)
        if placeholders and placeholders != num_images:
            raise ValueError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) (if the "
                             "images are in another column, set data.image_key)")
        messages = [{"role": "user", "content": _user_content(prompt, num_images)}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in prompt):
        messages = [dict(m) for m in prompt]
        if not any(m["content"] for m in messages):
            raise ValueError("empty prompt (every message has empty content)")
        image_parts = _num_image_parts(messages)
        if image_parts and image_parts != num_images:
            raise ValueError(f"{image_parts} image part(s) in the messages but {num_images} image(s)")
        if num_images and not image_parts:
            user = next((m for m in messages if m["role"] == "user"), None)
            if user is None or not isinstance(user["content"], str):
                raise ValueError("images given but no user message with string content to attach them to")
            user["content"] = _user_content(user["content"], num_images)
    else:
        raise ValueError(f"prompt must be a non-empty string or a list of {{role, content}} messages, "
                         f"got {type(prompt).__name__}: {str(prompt)[:80]!r}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _row_item(row: dict[str, Any], keys: dict[str, str], base: Path, system_prompt: str | None) -> PromptItem:
    """One row as a ``PromptItem``; raises ValueError with a reason naming the recipe key to fix."""
    id_key, prompt_key, answer_key, image_key = (keys[k] for k in ("id_key", "prompt_key", "answer_key",
                                                                    "image_key"))
    if row[id_key] is None or str(row[id_key]).strip() == "":
        raise ValueError(f"empty id in column `{id_key}` (data.id_key)")
    try:
        answer = _convert_answer(row[answer_key])
    except TypeError as exc:
        raise ValueError(f"answer in column `{answer_key}` (data.answer_key) is {exc}, not a string or number: "
                         f"{row[answer_key]!r}") from None
    try:
        images, missing = _image_paths(row.get(image_key), base)
    except ValueError as exc:
        raise ValueError(f"{exc} (column `{image_key}`, data.image_key)") from None
    if missing:
        raise ValueError(f"image file(s) not found: {', '.join(missing)} (paths in column `{image_key}`, "
                         f"data.image_key, are resolved against {base})")
    broken = [why for why in map(_unreadable_image, images) if why]
    if broken:
        raise ValueError(f"unreadable image file(s): {', '.join(broken)}; re-save them as PNG/JPEG or drop the row")
    try:
        prompt, images = resolve_placeholders(row[prompt_key], images)  # <image_N> order, placeholder counts
        messages = _messages(prompt, len(images), system_prompt)
    except ValueError as exc:
        raise ValueError(f"{exc} in column `{prompt_key}` (data.prompt_key)") from None
    metadata = {k: v for k, v in row.items() if k not in (id_key, prompt_key, answer_key, image_key)}
    return PromptItem(id=str(row[id_key]), messages=messages, answer=answer, images=images, metadata=metadata)


def count_prompt_tokens(messages: list[dict[str, Any]], tokenizer: Any) -> int:
    """Tokens of a prompt after the chat template, as the rollout worker renders it; image parts are left out, so
    for a VLM prompt this is a lower bound (its image tokens come on top)."""
    flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else
             " ".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))} for m in messages]
    text = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _too_long(item: PromptItem, tokenizer: Any, max_prompt_tokens: int | None) -> str | None:
    if tokenizer is None or max_prompt_tokens is None:
        return None
    n = count_prompt_tokens(item.messages, tokenizer)
    if n <= max_prompt_tokens:
        return None
    return (f"prompt is {n} tokens after the chat template, over model.max_prompt_tokens={max_prompt_tokens}; "
            "shorten or drop the row, or raise model.max_prompt_tokens")


def _warn_unused_image_column(path: Path, columns: list[str], image_key: str) -> None:
    """The image column is optional, so a misnamed one would silently drop every image: say so."""
    if image_key not in columns:
        maybe = [c for c in columns if "image" in c.lower() or "img" in c.lower()]
        if maybe:
            warnings.warn(f"{path}: no column `{image_key}` (data.image_key), so prompts get no images, but column(s) "
                          f"{', '.join(maybe)} look like images; set data.image_key if they are", stacklevel=3)


def load_prompts(path: str | Path, *, id_key: str = "id", prompt_key: str = "prompt", answer_key: str = "answer",
                 image_key: str = "images", system_prompt: str | None = None, limit: int | None = None,
                 tokenizer: Any = None, max_prompt_tokens: int | None = None,
                 skip_bad_rows: bool = False) -> list[PromptItem]:
    """Read a JSONL/parquet prompt file (``datasets``, offline) into ``PromptItem``s, checking every row.

    ``id_key``, ``prompt_key`` and ``answer_key`` columns are required (an answer cell may be null); the
    ``image_key`` column is optional. Numeric answers become strings (``7.0`` -> ``"7"``). ``limit`` keeps the
    first rows. With ``tokenizer`` and ``max_prompt_tokens``, a prompt longer than that after the chat template is
    a bad row too (found here, by row, rather than by a rollout worker mid-run). Raises ``PromptDataError``
    listing every bad row (up to 10) and ``FileNotFoundError``; with ``skip_bad_rows`` (``data.skip_bad_rows``)
    bad rows are left out and counted in a warning instead (an error still if no row is left).
    """
    path = Path(path).expanduser().resolve()
    columns, rows, _ = _read_rows(path)
    keys = {"id_key": id_key, "prompt_key": prompt_key, "answer_key": answer_key, "image_key": image_key}
    _check_columns(path, columns, {k: v for k, v in keys.items() if k != "image_key"})
    _warn_unused_image_column(path, columns, image_key)
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise PromptDataError(f"{path}: no rows; point data.train / data.eval at a file with prompts")
    items, problems, seen = [], [], {}
    for i, row in enumerate(rows):
        try:
            item = _row_item(row, keys, path.parent, system_prompt)
        except ValueError as exc:
            problems.append(f"row {i} (id {row.get(id_key)!r}): {exc}")
            continue
        too_long = _too_long(item, tokenizer, max_prompt_tokens)
        if too_long:
            problems.append(f"row {i} (id {item.id!r}): {too_long}")
            continue
        if item.id in seen:
            problems.append(f"row {i}: duplicate id {item.id!r} (also row {seen[item.id]}); ids in column "
                            f"`{id_key}` (data.id_key) must be unique")
        seen.setdefault(item.id, i)
        items.append(item)
    if problems:
        more = f"\n  … and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        if skip_bad_rows and items:
            warnings.warn(f"{path}: skipped {len(problems)} bad row(s) of {len(rows)} (data.skip_bad_rows=true):\n  "
                          + "\n  ".join(problems[:MAX_LISTED_PROBLEMS]) + more, stacklevel=2)
            return items
        raise PromptDataError(f"{path}: {len(problems)} bad row(s):\n  " +
                              "\n  ".join(problems[:MAX_LISTED_PROBLEMS]) + more)
    return items


def _parse_value(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def ensure_task_data(task: str, path: str | Path, n: int, seed: int, **options: Any) -> Path:
    """Generate synthetic task ``task`` into ``path`` (``.jsonl``/``.parquet``) unless it already exists.

    Image tasks save their PNGs beside it in ``<stem>_images/``. The file is written last and atomically, so
    its presence means the set is complete.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    path = Path(path)
    if path.is_file():
        return path
    make = TASKS[task]
    params = inspect.signature(make).parameters
    if "out_dir" in params:
        options = {"out_dir": path.parent, "image_subdir": f"{path.stem}_images", **options}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_task(make(n, seed, **options), path)


def _task_options(task: str, spec: str, query: str) -> dict[str, Any]:
    """Parse and check ``n=…&seed=…&split=…&<task option>=…`` against the task function's signature."""
    options = {k: _parse_value(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    valid = ["n", "seed", *(p for p in inspect.signature(TASKS[task]).parameters
                            if p not in ("n", "seed", "out_dir", "image_subdir"))]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{spec!r}: unknown option(s) {', '.join(unknown)} for synthetic:{task}; valid: "
                         f"{', '.join(valid)}")
    for key, low, what in (("n", 1, "a positive"), ("seed", 0, "a non-negative")):
        value = options.get(key, low)
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{spec!r}: {key} must be {what} integer, got {value!r}")
    if options.get("split", None) not in (None, "train", "test"):
        raise ValueError(f"{spec!r}: split must be train or test, got {options['split']!r}")
    return options


def resolve_data_path(spec: str, cache_dir: str | Path, *, check_only: bool = False) -> Path:
    """``synthetic:TASK?n=2000&seed=0&split=train`` -> the generated file under ``cache_dir``; else a local
    JSONL/parquet file, which must exist. With ``check_only`` the spec is checked and nothing is generated.

    Defaults: ``n=1000``, ``seed=0``, no split. Other options go to the task function (``difficulty=3``).
    """
    if spec.startswith("synthetic:"):
        task, _, query = spec[len("synthetic:"):].partition("?")
        if task not in TASKS:
            raise ValueError(f"{spec!r}: unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
        options = _task_options(task, spec, query)
        n, seed = options.pop("n", 1000), options.pop("seed", 0)
        key = json.dumps({"task": task, "n": n, "seed": seed, "options": options, "version": TASKS_VERSION},
                         sort_keys=True)
        name = f"{task}-n{n}-seed{seed}-{options.get('split') or 'all'}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        path = Path(cache_dir) / f"{name}.jsonl"
        return path if check_only else ensure_task_data(task, path, n, seed, **options)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {spec!r}; set it to a local .jsonl/.parquet file or to "
                                f"synthetic:TASK?n=…&seed=… (tasks: {', '.join(TASKS)})")
    if path.suffix not in FORMATS:
        raise ValueError(f"{spec!r}: unsupported extension {path.suffix!r}; use one of {', '.join(FORMATS)}")
    return path.resolve()
