"""Image cells and image placeholders of prompt rows, as VLM data sets write them (MMPR, InternVL's RL data).

- An image cell is a path, a list of paths, a ``{"path": ...}`` dict or a list of them (MMPR-Tiny parquet:
  ``images: [{"path": "images/x.jpg", "bytes": null}]``, as ``datasets.Image`` stores files). Relative paths are
  resolved against the data file's folder. Images stored only as bytes are refused with the fix (write files).
- Placeholders: ``<image>`` marks where the next image goes; ``<image_N>`` (1-based, InternVL/MMPR multi-image
  prompts) where image N goes. Numbered placeholders are turned into ``<image>`` with the images reordered to
  match, so image parts stay positional (the k-th image part is the k-th file). Their count must equal the number
  of images; a mismatch is an error saying both numbers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

NUMBERED = re.compile(r"<image_(\d+)>")
PLACEHOLDER = "<image>"


def image_cell_paths(value: Any, base: Path) -> tuple[list[str], list[str]]:
    """(absolute paths, the missing ones) for an image cell; raises ValueError for a cell of the wrong shape."""
    if value is None:
        return [], []
    raw = [value] if isinstance(value, str | dict) else list(value)
    paths = []
    for i, item in enumerate(raw):
        if isinstance(item, dict):
            if not item.get("path"):
                what = "bytes only" if item.get("bytes") else f"keys {sorted(item)}"
                raise ValueError(f"image {i} of the row has no `path` ({what}); write the images to files and put "
                                 "their paths in the image column (data.image_key)")
            item = item["path"]
        if not isinstance(item, str) or not item:
            raise ValueError(f"image {i} of the row is {item!r}, not a file path")
        paths.append(str(Path(item) if Path(item).is_absolute() else (base / item).resolve()))
    return paths, [p for p in paths if not Path(p).is_file()]


def _texts(prompt: Any) -> list[str]:
    """The string parts of a prompt cell (a string, or the string contents / text parts of chat messages)."""
    if isinstance(prompt, str):
        return [prompt]
    out = []
    for m in prompt if isinstance(prompt, list) else []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return out


def _replace(prompt: Any, fn: Any) -> Any:
    if isinstance(prompt, str):
        return fn(prompt)
    out = []
    for m in prompt:
        m = dict(m)
        if isinstance(m.get("content"), str):
            m["content"] = fn(m["content"])
        elif isinstance(m.get("content"), list):
            m["content"] = [{**p, "text": fn(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str)
                            else p for p in m["content"]]
        out.append(m)
    return out


def resolve_placeholders(prompt: Any, images: list[str]) -> tuple[Any, list[str]]:
    """``<image_N>`` -> ``<image>`` with the images reordered to the placeholders' order; checks the counts of
    ``<image>`` placeholders in string content (image parts in messages are checked where messages are built)."""
    texts = _texts(prompt)
    numbers = [int(n) for t in texts for n in NUMBERED.findall(t)]
    plain = sum(t.count(PLACEHOLDER) for t in texts)
    if numbers:
        if plain:
            raise ValueError(f"the prompt mixes {plain} `<image>` and {len(numbers)} `<image_N>` placeholder(s); "
                             "use one style per row")
        if sorted(numbers) != list(range(1, len(images) + 1)):
            raise ValueError(f"placeholders <image_N> with N = {numbers} but {len(images)} image(s): each of "
                             f"<image_1> … <image_{len(images)}> must appear exactly once (fix the row, or its "
                             "image list in data.image_key)")
        return _replace(prompt, lambda t: NUMBERED.sub(PLACEHOLDER, t)), [images[n - 1] for n in numbers]
    if plain and plain != len(images):
        raise ValueError(f"{plain} {PLACEHOLDER} placeholder(s) but {len(images)} image(s) (if the images are in "
                         "another column, set data.image_key)")
    return prompt, images
