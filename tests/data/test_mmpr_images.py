"""Image rows as InternVL's RL data has them (MMPR-Tiny parquet): ``images[].path`` cells, ``<image>`` and
``<image_N>`` placeholders, and bad rows (missing file, placeholder count != image count, unreadable image) as
errors naming file, row and fix, or skipped and counted with ``skip_bad_rows``. Images are generated with PIL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cascade_rl.data.images import image_cell_paths, resolve_placeholders
from cascade_rl.data.prompts import PromptDataError, load_prompts


def _images(folder: Path) -> dict[str, str]:
    (folder / "images").mkdir(parents=True)
    names = {"red": (64, 64, (220, 20, 20)), "blue": (96, 48, (20, 20, 220)), "green": (48, 96, (20, 200, 20))}
    for name, (w, h, colour) in names.items():
        Image.new("RGB", (w, h), colour).save(folder / "images" / f"{name}.png")
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return {n: f"images/{n}.png" for n in [*names, "broken"]}


def _mmpr_tiny(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A parquet in MMPR-Tiny's layout: chat ``prompt``, ``images`` as [{bytes, path}] structs,
    ``reward_model.ground_truth``, ``extra_info.question``; plus flat ``id``/``answer`` columns."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([
        ("id", pa.string()), ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(image)), ("answer", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("question", pa.string()), ("index", pa.int64())])),
    ])
    table = pa.Table.from_pylist([{
        "id": r["id"], "data_source": "mmpr-tiny-fixture",
        "prompt": [{"role": "user", "content": r["question"]}],
        "images": [{"bytes": None, "path": p} for p in r["images"]], "answer": r["answer"],
        "reward_model": {"ground_truth": r["answer"], "style": "rule"},
        "extra_info": {"question": r["question"], "index": i}} for i, r in enumerate(rows)], schema=schema)
    pq.write_table(table, path)
    return path


def test_mmpr_tiny_rows_become_prompts_with_ordered_images(tmp_path: Path) -> None:
    img = _images(tmp_path)
    path = _mmpr_tiny(tmp_path / "mmpr_tiny.parquet", [
        {"id": "one", "question": "<image>\nWhat colour is it?", "answer": "red", "images": [img["red"]]},
        {"id": "two", "question": "Is <image_2> wider than <image_1>?", "answer": "yes",
         "images": [img["green"], img["blue"]]},
        {"id": "text", "question": "What is 2 + 2?", "answer": "4", "images": []}])
    one, two, text = load_prompts(path)
    assert one.images == [str(tmp_path / img["red"])]
    assert one.messages == [{"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": "What colour is it?"}]}]
    # <image_2> comes first in the text, so the second file is the first image part
    assert two.images == [str(tmp_path / img["blue"]), str(tmp_path / img["green"])]
    assert [p["type"] for p in two.messages[0]["content"]] == ["text", "image", "text", "image", "text"]
    assert text.images == [] and text.messages == [{"role": "user", "content": "What is 2 + 2?"}]
    assert one.metadata["reward_model"]["ground_truth"] == "red"


@pytest.mark.parametrize(("row", "said"), [
    ({"question": "<image>\nColour?", "images": ["images/missing.png"]}, r"missing\.png.*data\.image_key"),
    ({"question": "<image> and <image>?", "images": ["images/red.png"]},
     r"2 <image> placeholder\(s\) but 1 image\(s\)"),
    ({"question": "<image_1> vs <image_3>", "images": ["images/red.png", "images/blue.png"]},
     r"N = \[1, 3\] but 2 image\(s\)"),
    ({"question": "<image>\nColour?", "images": ["images/broken.png"]}, r"broken\.png.*re-save"),
])
def test_bad_image_rows_name_file_row_and_fix_or_are_skipped(tmp_path: Path, row: dict[str, Any], said: str) -> None:
    _images(tmp_path)
    good = {"id": "good", "question": "<image>\nColour?", "answer": "red", "images": ["images/red.png"]}
    path = _mmpr_tiny(tmp_path / "bad.parquet", [good, {"id": "bad", "answer": "x", **row}])
    with pytest.raises(PromptDataError, match=rf"bad\.parquet: 1 bad row\(s\):\n  row 1 \(id 'bad'\): .*{said}"):
        load_prompts(path)
    with pytest.warns(UserWarning, match=r"skipped 1 bad row\(s\) of 2 \(data.skip_bad_rows=true\)"):
        items = load_prompts(path, skip_bad_rows=True)
    assert [it.id for it in items] == ["good"]


def test_image_cells_and_placeholders() -> None:
    base = Path("/data")
    assert image_cell_paths([{"path": "a.png"}, "/x/b.png"], base)[0] == ["/data/a.png", "/x/b.png"]
    assert image_cell_paths({"path": "a.png", "bytes": None}, base)[0] == ["/data/a.png"]
    with pytest.raises(ValueError, match="no `path` .bytes only.; write the images to files"):
        image_cell_paths([{"bytes": b"\x89PNG", "path": None}], base)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "<image_2> then <image_1>"}]}]
    prompt, images = resolve_placeholders(msgs, ["a", "b"])
    assert prompt[0]["content"][0]["text"] == "<image> then <image>" and images == ["b", "a"]
    with pytest.raises(ValueError, match="mixes 1 `<image>` and 1 `<image_N>`"):
        resolve_placeholders("<image> and <image_1>", ["a"])
