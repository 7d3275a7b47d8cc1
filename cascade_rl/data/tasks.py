"""Synthetic verifiable tasks, generated from a seed: arithmetic word problems and a small shapes image task.

Every row has ``id``, ``prompt`` (the question), ``answer`` (a string) and ``solution``: a short reference
response in the demo's answer format, ``7+4=11. The answer is \\boxed{11}.`` (``ANSWER_FORMAT``), used by the
SFT warm start; the rewards parse the last ``\\boxed{…}``. Equations are written without spaces: with digits
tokenised one by one, the longest (two-step) solution is 28 tokens plus EOS, within the demo's 32-token
response limit. Image rows add ``images``: PNG paths relative to the data file's folder.

``split`` makes train and held-out sets disjoint whatever their seeds: each question's text is hashed into ten
buckets; ``"test"`` keeps bucket 0, ``"train"`` the other nine, ``None`` all. A set generated with
``split="test"`` never repeats a question of one generated with ``split="train"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

TASKS_VERSION = 1  # bump when a generator's output changes, so cached task files are regenerated
SPLITS = (None, "train", "test")
ANSWER_FORMAT = "The answer is \\boxed{{{answer}}}."

NAMES = ["Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Eva", "Leo", "Ivy", "Omar", "Zoe", "Raj", "Kim",
         "Noah", "Lily", "Ali", "Sara", "Dan", "Nina"]
OBJECTS = ["apples", "pens", "books", "coins", "cards", "eggs", "stamps", "shells", "marbles", "stickers",
           "cookies", "balls", "flowers", "toys", "candies", "rocks", "cups", "keys", "bottles", "boxes"]
ADD_TEMPLATES = [
    "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?",
    "{name} had {a} {obj}. {other} gave {name} {b} more. How many {obj} does {name} have now?",
    "There are {a} {obj} in a box. {name} puts {b} more {obj} in the box. How many {obj} are in the box?",
    "{name} found {a} {obj} in the morning and {b} {obj} in the afternoon. How many {obj} did {name} find?",
    "{name} has {a} {obj} and {other} has {b} {obj}. How many {obj} do they have together?",
]
SUB_TEMPLATES = [
    "{name} has {a} {obj} and gives {b} to {other}. How many {obj} does {name} have left?",
    "There are {a} {obj} on the table. {name} takes {b} of them. How many {obj} are left on the table?",
    "{name} had {a} {obj} and lost {b}. How many {obj} does {name} have now?",
    "A shop has {a} {obj}. It sells {b} of them. How many {obj} are left in the shop?",
    "{name} has {a} {obj}. {other} has {b} fewer. How many {obj} does {other} have?",
]
TWO_STEP_TEMPLATE = ("{name} has {a} {obj}, buys {b} more and then gives {c} to {other}. "
                     "How many {obj} does {name} have now?")
# difficulty -> (largest operand, probability of a two-step problem)
DIFFICULTIES = {1: (9, 0.0), 2: (20, 0.0), 3: (50, 0.5)}


def in_split(question: str, split: str | None) -> bool:
    """Whether ``question`` belongs to ``split`` (hash bucket 0 of 10 is ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}: set split=train or split=test in the data spec")
    if split is None:
        return True
    bucket = hashlib.sha256(question.encode()).digest()[0] % 10
    return (bucket == 0) == (split == "test")


def _arithmetic_problem(rng: random.Random, max_value: int, two_step_prob: float) -> dict[str, str]:
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    if rng.random() < two_step_prob:
        a, b = rng.randint(1, max_value), rng.randint(1, max_value)
        c = rng.randint(1, a + b)
        question = TWO_STEP_TEMPLATE.format(name=name, other=other, obj=obj, a=a, b=b, c=c)
        result, work = a + b - c, f"{a}+{b}={a + b}. {a + b}-{c}={a + b - c}."
    elif rng.random() < 0.5:
        a, b = rng.randint(1, max_value), rng.randint(1, max_value)
        question = rng.choice(ADD_TEMPLATES).format(name=name, other=other, obj=obj, a=a, b=b)
        result, work = a + b, f"{a}+{b}={a + b}."
    else:
        a = rng.randint(2, max_value)
        b = rng.randint(1, a - 1)
        question = rng.choice(SUB_TEMPLATES).format(name=name, other=other, obj=obj, a=a, b=b)
        result, work = a - b, f"{a}-{b}={a - b}."
    return {"prompt": question, "answer": str(result),
            "solution": f"{work} {ANSWER_FORMAT.format(answer=result)}"}


def make_arithmetic(n: int, seed: int, *, difficulty: int = 2, split: str | None = None) -> list[dict[str, Any]]:
    """``n`` arithmetic word problems (``+`` and ``-``, non-negative results), deterministic per seed.

    ``difficulty``: 1 = operands up to 9; 2 = up to 20; 3 = up to 50 with half the problems two-step.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty={difficulty} is not one of {sorted(DIFFICULTIES)}")
    max_value, two_step_prob = DIFFICULTIES[difficulty]
    rng = random.Random(f"arithmetic/{seed}/{difficulty}")
    rows: list[dict[str, Any]] = []
    for _ in range(n * 50):  # rejection by split keeps ~90% or ~10% of draws
        if len(rows) == n:
            break
        row = _arithmetic_problem(rng, max_value, two_step_prob)
        if in_split(row["prompt"], split):
            rows.append({"id": f"arithmetic-{seed}-{len(rows):06d}", **row, "task": "arithmetic"})
    if len(rows) < n:
        raise RuntimeError(f"could only draw {len(rows)} of {n} arithmetic problems for split={split!r}")
    return rows


def write_task(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows to ``.jsonl`` or ``.parquet`` (by extension), atomically (temp file, then rename)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: task files are .jsonl or .parquet, got {path.suffix or 'no extension'!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".jsonl":
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)
    return path


SHAPES = ("circle", "square", "triangle")
COLORS = [(220, 50, 50), (50, 120, 220), (40, 160, 70), (230, 160, 20), (140, 70, 200)]


def shapes_scene(rng: random.Random, image_size: int = 64) -> dict[str, Any]:
    """One scene (up to 4 shapes, one per quadrant) and its question; no drawing.

    Half the scenes ask "How many <shape>s are in the image?" (answer ``"0"``…``"4"``), half ask which of two
    shapes is bigger (answer a shape name; the sizes differ by at least 2x, so the answer is unambiguous).
    """
    cell = image_size // 2
    if rng.random() < 0.5:
        cells = rng.sample(range(4), rng.randint(1, 4))
        kinds = [rng.choice(SHAPES) for _ in cells]
        sizes = [rng.randint(int(cell * 0.4), int(cell * 0.85)) for _ in cells]
        target = rng.choice(SHAPES)
        count = kinds.count(target)
        question = f"How many {target}s are in the image?"
        answer, work = str(count), f"I count {count} {target}{'' if count == 1 else 's'}."
    else:
        cells, kinds = rng.sample(range(4), 2), rng.sample(SHAPES, 2)
        sizes = [rng.randint(int(cell * 0.8), int(cell * 0.95)), rng.randint(int(cell * 0.25), int(cell * 0.4))]
        if rng.random() < 0.5:
            sizes.reverse()
        answer = kinds[0] if sizes[0] > sizes[1] else kinds[1]
        first, second = rng.sample(kinds, 2)
        question, work = f"Which is bigger, the {first} or the {second}?", f"The {answer} is bigger."
    shapes = []
    for c, kind, size in zip(cells, kinds, sizes, strict=True):
        x0 = (c % 2) * cell + rng.randint(0, cell - size)
        y0 = (c // 2) * cell + rng.randint(0, cell - size)
        shapes.append({"kind": kind, "box": [x0, y0, x0 + size - 1, y0 + size - 1], "color": rng.choice(COLORS)})
    return {"prompt": question, "answer": answer, "solution": f"{work} {ANSWER_FORMAT.format(answer=answer)}",
            "shapes": shapes}


def draw_shapes(shapes: list[dict[str, Any]], image_size: int = 64) -> Any:
    """Render a scene's shapes on a white RGB ``PIL.Image``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x0, y0, x1, y1 = s["box"]
        color = tuple(s["color"])
        if s["kind"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif s["kind"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=color)
    return image


def make_shapes(n: int, seed: int, out_dir: str | Path, *, split: str | None = None, image_size: int = 64,
                image_subdir: str = "images") -> list[dict[str, Any]]:
    """``n`` shape questions with generated PNGs saved under ``out_dir/image_subdir``, deterministic per seed.

    ``images`` holds paths relative to ``out_dir``: write the rows to a file in ``out_dir`` so that
    ``load_prompts`` resolves them. The scene (kinds, boxes, colours) is kept in ``shapes`` for debugging.
    """
    rng = random.Random(f"shapes/{seed}/{image_size}")
    image_dir = Path(out_dir) / image_subdir
    image_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for _ in range(n * 50):
        if len(rows) == n:
            break
        scene = shapes_scene(rng, image_size)
        if not in_split(scene["prompt"] + json.dumps(scene["shapes"]), split):
            continue
        rel = f"{image_subdir}/shapes-{seed}-{len(rows):06d}.png"
        draw_shapes(scene["shapes"], image_size).save(Path(out_dir) / rel)
        rows.append({"id": f"shapes-{seed}-{len(rows):06d}", **scene, "images": [rel], "task": "shapes"})
    if len(rows) < n:
        raise RuntimeError(f"could only draw {len(rows)} of {n} shape scenes for split={split!r}")
    return rows


TASKS: dict[str, Callable[..., list[dict[str, Any]]]] = {"arithmetic": make_arithmetic, "shapes": make_shapes}
