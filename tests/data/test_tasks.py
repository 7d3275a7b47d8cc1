"""Synthetic tasks: deterministic per seed, correct answers, disjoint splits, files that round-trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from cascade_rl.data.tasks import TASKS, make_arithmetic, make_shapes, write_task

BOXED = re.compile(r"\\boxed\{([^}]*)\}")


def test_arithmetic_is_deterministic_per_seed() -> None:
    assert make_arithmetic(50, 3) == make_arithmetic(50, 3)
    assert make_arithmetic(50, 3) != make_arithmetic(50, 4)
    assert make_arithmetic(50, 3, difficulty=1) != make_arithmetic(50, 3, difficulty=2)


@pytest.mark.parametrize("difficulty,max_operand", [(1, 9), (2, 20), (3, 50)])
def test_arithmetic_solutions_compute_the_answer(difficulty: int, max_operand: int) -> None:
    rows = make_arithmetic(300, 0, difficulty=difficulty)
    assert len({r["id"] for r in rows}) == 300
    for r in rows:
        assert BOXED.findall(r["solution"]) == [r["answer"]] and int(r["answer"]) >= 0
        # each "a+b=c." / "a-b=c." step holds, e.g. "7+4=11." -> 7 + 4 == 11; the last result is the answer
        steps = re.findall(r"(\d+)([+-])(\d+)=(\d+)\.", r["solution"])
        assert steps and steps[-1][3] == r["answer"]
        for a, op, b, c in steps:
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
        assert max(int(x) for x in re.findall(r"\d+", r["prompt"])) <= 2 * max_operand  # two-step: c <= a + b
        assert re.findall(r"\d+", r["prompt"])[0] == steps[0][0]  # the first number of the question starts


def test_arithmetic_mixes_operations_and_two_step_only_at_difficulty_3() -> None:
    ops = [re.findall(r"[+-]", r["solution"].split(" The")[0]) for r in make_arithmetic(200, 0, difficulty=2)]
    assert {"+"} in map(set, ops) and {"-"} in map(set, ops) and max(map(len, ops)) == 1
    two_step = [r for r in make_arithmetic(200, 0, difficulty=3) if r["solution"].count("=") == 2]
    assert 60 < len(two_step) < 140  # half the problems, +-40


def test_splits_are_disjoint_whatever_the_seed() -> None:
    train = {r["prompt"] for r in make_arithmetic(900, 0, difficulty=1, split="train")}
    test = {r["prompt"] for r in make_arithmetic(100, 0, difficulty=1, split="test")}
    assert len(test) > 50 and not train & test
    with pytest.raises(ValueError, match="split"):
        make_arithmetic(1, 0, split="valid")


def test_shapes_images_and_answers(tmp_path: Path) -> None:
    rows = make_shapes(40, 7, tmp_path / "a")
    again = make_shapes(40, 7, tmp_path / "b")
    assert rows == again  # same rows (relative paths) and the same pixels
    for r, r2 in zip(rows, again, strict=True):
        img = Image.open(tmp_path / "a" / r["images"][0])
        assert img.size == (64, 64) and img.tobytes() == Image.open(tmp_path / "b" / r2["images"][0]).tobytes()
        assert BOXED.findall(r["solution"]) == [r["answer"]]
        shapes = r["shapes"]
        for s in shapes:  # the centre pixel of each shape is painted in its colour
            x0, y0, x1, y1 = s["box"]
            assert img.getpixel(((x0 + x1) // 2, (y0 + 3 * y1) // 4)) == tuple(s["color"])
        if r["prompt"].startswith("How many"):
            kind = r["prompt"].split()[2][:-1]  # "How many circles ..." -> "circle"
            assert r["answer"] == str(sum(s["kind"] == kind for s in shapes))
        else:
            area = {s["kind"]: (s["box"][2] - s["box"][0]) for s in shapes}
            assert r["answer"] == max(area, key=area.get)
    kinds = {r["prompt"].split()[0] for r in rows}
    assert kinds == {"How", "Which"}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_write_task_round_trips(tmp_path: Path, suffix: str) -> None:
    rows = make_arithmetic(5, 0)
    path = write_task(rows, tmp_path / f"t{suffix}")
    if suffix == ".jsonl":
        back = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        back = pq.read_table(path).to_pylist()
    assert back == rows
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    with pytest.raises(ValueError, match=r"\.jsonl or \.parquet"):
        write_task(rows, tmp_path / "t.csv")


def test_tasks_registry() -> None:
    assert TASKS == {"arithmetic": make_arithmetic, "shapes": make_shapes}
