"""Prompt sets: a local JSONL/parquet file or ``datasets`` folder (``table.py``), or a synthetic task made on demand.

``load_prompts`` turns rows into ``PromptItem``s with chat ``messages``. Column names are configurable and may
be dotted for nested columns (``data.id_key``, ``data.prompt_key``, ``data.answer_key``, ``data.image_key``,
``data.sft_target_key``); without an id column a row's id is a hash of its prompt. ``data.answer_format``
extracts the ground truth from an answer cell (``gsm8k``: after ``####``; ``boxed``: the last ``\\boxed{}``). A string prompt becomes a user
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
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from .images import image_cell_paths, resolve_placeholders
from .table import FORMATS, DataFileError, get_key, is_dataset_folder, read_table, top_column
from .tasks import TASKS, TASKS_VERSION, write_task

IMAGE_PLACEHOLDER = "<image>"
MAX_LISTED_PROBLEMS = 10
ANSWER_FORMATS = ("raw", "gsm8k", "boxed")
DEFAULT_ID_COLUMN, DEFAULT_SFT_TARGET_COLUMN = "id", "solution"


class PromptDataError(DataFileError):
    """A prompt file that cannot be used as is; the message names the file, the rows and the fix."""


@dataclass
class PromptItem:
    """One prompt: chat messages, the ground-truth answer (None if not checkable), absolute image paths, and the
    reference response the sft stage trains on (None: the answer)."""

    id: str
    messages: list[dict[str, Any]]
    answer: str | None = None
    images: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    sft_target: str | None = None


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        return read_table(path, "prompt")
    except DataFileError as exc:
        raise PromptDataError(str(exc)) from None


def _check_columns(path: Path, columns: list[str], keys: dict[str, str]) -> None:
    missing = [f"`{col}` (set data.{key} to the right column)" for key, col in keys.items()
               if top_column(col, columns) not in columns]
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


def extract_reference_answer(text: str | None, answer_format: str) -> str | None:
    """The ground truth in an answer cell: ``raw`` keeps it; ``gsm8k`` takes what follows the last ``####``
    (``… #### 1,234`` -> ``1234``); ``boxed`` takes the last ``\\boxed{…}`` (MATH solutions). Raises ValueError
    when the cell lacks the marker."""
    if text is None or answer_format == "raw":
        return text
    if answer_format == "gsm8k":
        answer = text.rsplit("####", 1)[1].strip().replace(",", "").rstrip(".") if "####" in text else ""
        if not answer:
            raise ValueError(f"no `#### <answer>` in {text[-60:]!r} (data.answer_format=gsm8k)")
        return answer
    if answer_format == "boxed":
        from .pairs import last_boxed

        boxed = last_boxed(text)
        if boxed is None or not boxed.strip():
            raise ValueError(f"no \\boxed{{…}} in {text[-60:]!r} (data.answer_format=boxed)")
        return boxed.strip()
    raise ValueError(f"data.answer_format={answer_format!r} is unknown; valid: {', '.join(ANSWER_FORMATS)}")


def _image_paths(value: Any, base: Path) -> tuple[list[str], list[str]]:
    """(absolute paths, the ones that are missing) for an image cell (``images.image_cell_paths``: None, a path,
    ``{path: ...}``, or a list of those); a URL is refused (nothing is downloaded)."""
    if value is None:
        return [], []
    raw = [value] if isinstance(value, str | dict) else list(value)
    urls = [p for p in raw if isinstance(p, str) and re.match(r"^[a-zA-Z][\w+.-]*://", p)]
    if urls:
        raise ValueError(f"image(s) given as URL: {', '.join(urls[:3])}; images are read from local files only "
                         "(nothing is downloaded): download them and put the local paths in the column")
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


def derived_id(prompt: Any, images: Any) -> str:
    """A stable id for a row without an id column: a hash of its prompt cell and image cell."""
    blob = json.dumps([prompt, images], sort_keys=True, ensure_ascii=False, default=str)
    return "p-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cell(row: dict[str, Any], key: str, flag: str) -> Any:
    try:
        return get_key(row, key)
    except KeyError as exc:
        raise ValueError(f"column `{key}` (data.{flag}): {exc.args[0]}") from None


def _answer_and_target(row: dict[str, Any], keys: dict[str, Any]) -> tuple[str | None, str | None]:
    answer_key = keys["answer_key"]
    try:
        text = _convert_answer(_cell(row, answer_key, "answer_key"))
    except TypeError as exc:
        raise ValueError(f"answer in column `{answer_key}` (data.answer_key) is {exc}, not a string or number: "
                         f"{get_key(row, answer_key)!r}") from None
    answer = extract_reference_answer(text, keys["answer_format"])
    target_key = keys["sft_target_key"]
    if target_key is None:  # the `solution` column where there is one, else the whole answer cell
        target = get_key(row, DEFAULT_SFT_TARGET_COLUMN, None)
        return answer, str(target) if target is not None else text
    target = _cell(row, target_key, "sft_target_key")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"sft target in column `{target_key}` (data.sft_target_key) is {target!r}, not a "
                         "non-empty string")
    return answer, target


def _row_item(row: dict[str, Any], keys: dict[str, Any], base: Path, system_prompt: str | None) -> PromptItem:
    """One row as a ``PromptItem``; raises ValueError with a reason naming the recipe key to fix."""
    id_key, prompt_key, image_key = keys["id_key"], keys["prompt_key"], keys["image_key"]
    prompt = _cell(row, prompt_key, "prompt_key")
    if id_key is None:
        row_id = derived_id(prompt, get_key(row, image_key, None))
    else:
        row_id = _cell(row, id_key, "id_key")
        if row_id is None or str(row_id).strip() == "":
            raise ValueError(f"empty id in column `{id_key}` (data.id_key)")
    answer, target = _answer_and_target(row, keys)
    try:
        images, missing = _image_paths(get_key(row, image_key, None), base)
    except ValueError as exc:
        raise ValueError(f"{exc} (column `{image_key}`, data.image_key)") from None
    if missing:
        raise ValueError(f"image file(s) not found: {', '.join(missing)} (paths in column `{image_key}`, "
                         f"data.image_key, are resolved against {base})")
    broken = [why for why in map(_unreadable_image, images) if why]
    if broken:
        raise ValueError(f"unreadable image file(s): {', '.join(broken)}; re-save them as PNG/JPEG or drop the row")
    try:
        prompt, images = resolve_placeholders(prompt, images)  # <image_N> order, placeholder counts
        messages = _messages(prompt, len(images), system_prompt)
    except ValueError as exc:
        raise ValueError(f"{exc} in column `{prompt_key}` (data.prompt_key)") from None
    used = {keys[k] for k in ("id_key", "prompt_key", "answer_key", "image_key")}
    metadata = {k: v for k, v in row.items() if k not in used}
    return PromptItem(id=str(row_id), messages=messages, answer=answer, images=images, metadata=metadata,
                      sft_target=target)


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


def _keys(id_key: str | None, prompt_key: str, answer_key: str, image_key: str, sft_target_key: str | None,
          answer_format: str, columns: list[str]) -> dict[str, Any]:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"data.answer_format={answer_format!r} is unknown; valid: {', '.join(ANSWER_FORMATS)}")
    if id_key is None and DEFAULT_ID_COLUMN in columns:
        id_key = DEFAULT_ID_COLUMN
    return {"id_key": id_key, "prompt_key": prompt_key, "answer_key": answer_key, "image_key": image_key,
            "sft_target_key": sft_target_key, "answer_format": answer_format}


def _problem_report(path: Path, problems: list[str]) -> PromptDataError:
    more = f"\n  … and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    return PromptDataError(f"{path}: {len(problems)} bad row(s):\n  " + "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
                           + more)


def load_prompts(path: str | Path, *, id_key: str | None = None, prompt_key: str = "prompt",
                 answer_key: str = "answer", image_key: str = "images", sft_target_key: str | None = None,
                 answer_format: str = "raw", system_prompt: str | None = None, limit: int | None = None,
                 tokenizer: Any = None, max_prompt_tokens: int | None = None,
                 skip_bad_rows: bool = False) -> list[PromptItem]:
    """Read a JSONL/parquet file or ``save_to_disk`` folder (``datasets``, offline) into ``PromptItem``s, checking
    every row.

    Keys may be dotted (``reward_model.ground_truth``) to reach nested columns. ``prompt_key`` and ``answer_key``
    are required (an answer cell may be null); ``id_key=None`` uses an ``id`` column where there is one, else
    ``derived_id`` (a hash of the prompt and images, so identical prompts are reported as duplicates). The
    ``image_key`` column is optional. Numeric answers become strings (``7.0`` -> ``"7"``); ``answer_format``
    extracts the ground truth from the answer cell (``extract_reference_answer``). The sft target is the
    ``sft_target_key`` column, else a ``solution`` column, else the whole answer cell. ``limit`` keeps the first
    rows. With ``tokenizer`` and ``max_prompt_tokens``, a prompt longer than that after the chat template is a bad
    row too. Raises ``PromptDataError`` listing every bad row (up to 10) and ``FileNotFoundError``; with
    ``skip_bad_rows`` (``data.skip_bad_rows``) bad rows are left out and counted in a warning instead (still an
    error if no row is left).
    """
    path = Path(path).expanduser().resolve()
    columns, rows = _read_rows(path)
    keys = _keys(id_key, prompt_key, answer_key, image_key, sft_target_key, answer_format, columns)
    _check_columns(path, columns, {k: v for k, v in keys.items() if k.endswith("_key") and k != "image_key" and v})
    _warn_unused_image_column(path, columns, top_column(image_key, columns))
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise PromptDataError(f"{path}: no rows; point data.train / data.eval at a file with prompts")
    items, problems, seen = [], [], {}
    id_flag = f"in column `{keys['id_key']}` (data.id_key)" if keys["id_key"] else \
        "derived from the prompt (no id column, so ids hash prompt and images; set data.id_key to keep both rows)"
    for i, row in enumerate(rows):
        try:
            item = _row_item(row, keys, path.parent, system_prompt)
        except ValueError as exc:
            shown = get_key(row, keys["id_key"], None) if keys["id_key"] else None
            problems.append(f"row {i}" + (f" (id {shown!r})" if keys["id_key"] else "") + f": {exc}")
            continue
        too_long = _too_long(item, tokenizer, max_prompt_tokens)
        if too_long:
            problems.append(f"row {i} (id {item.id!r}): {too_long}")
            continue
        if item.id in seen:
            problems.append(f"row {i}: duplicate id {item.id!r} (also row {seen[item.id]}); ids {id_flag} "
                            "must be unique")
        seen.setdefault(item.id, i)
        items.append(item)
    if problems and skip_bad_rows and items:
        more = f"\n  … and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        warnings.warn(f"{path}: skipped {len(problems)} bad row(s) of {len(rows)} (data.skip_bad_rows=true):\n  "
                      + "\n  ".join(problems[:MAX_LISTED_PROBLEMS]) + more, stacklevel=2)
    elif problems:
        raise _problem_report(path, problems)
    return items


def prompt_options(data: Any, *, tokenizer: Any = None, max_prompt_tokens: int | None = None) -> dict[str, Any]:
    """``load_prompts`` keyword arguments from a recipe's ``data`` block (the one place they are mapped)."""
    return dict(id_key=data.id_key, prompt_key=data.prompt_key, answer_key=data.answer_key,
                image_key=data.image_key, sft_target_key=data.sft_target_key, answer_format=data.answer_format,
                system_prompt=data.system_prompt, skip_bad_rows=data.skip_bad_rows, tokenizer=tokenizer,
                max_prompt_tokens=max_prompt_tokens)


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
    JSONL/parquet file or ``save_to_disk`` folder, which must exist. With ``check_only`` the spec is checked and nothing is generated.

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
    if is_dataset_folder(path):
        return path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {spec!r}; set it to a local .jsonl/.parquet file, a "
                                f"datasets save_to_disk folder, or synthetic:TASK?n=…&seed=… "
                                f"(tasks: {', '.join(TASKS)})")
    if path.suffix not in FORMATS:
        raise ValueError(f"{spec!r}: unsupported extension {path.suffix!r}; use one of {', '.join(FORMATS)}")
    return path.resolve()


def first_prompt(spec: str, options: dict[str, Any], scratch_dir: Path) -> PromptItem:
    """The first prompt of ``data.train``-style ``spec`` without generating the full set: a synthetic task is
    generated with one row into ``scratch_dir``; a file is read with ``limit=1``. ``options``: ``prompt_options``."""
    if spec.startswith("synthetic:"):
        task, _, query = spec[len("synthetic:"):].partition("?")
        if task not in TASKS:
            raise ValueError(f"{spec!r}: unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
        task_options = _task_options(task, spec, query)
        task_options.pop("n", None)
        seed = task_options.pop("seed", 0)
        path = ensure_task_data(task, Path(scratch_dir) / f"{task}.jsonl", 1, seed, **task_options)
    else:
        path = resolve_data_path(spec, scratch_dir)
    return load_prompts(path, **{**options, "tokenizer": None}, limit=1)[0]
