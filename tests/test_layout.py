"""The import table of STYLE.md, enforced by reading every module's imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> (may import from the project, may import from outside: None = anything)
RULES = {
    "cascade_rl/algos": ({"cascade_rl.algos"}, {"torch", "math", "dataclasses", "typing", "collections",
                                                "__future__", "functools", "itertools", "collections.abc"}),
    # cascade_rl.hf: the one processor / image loader / multimodal prompt renderer
    "rewards": ({"cascade_rl.rewards", "cascade_rl.types", "cascade_rl.seeding", "cascade_rl.hf"}, None),
    "actors": ({"cascade_rl.actors", "cascade_rl.algos", "cascade_rl.rewards", "cascade_rl.types",
                "cascade_rl.seeding", "cascade_rl.hf"}, None),
    "cascade_rl/data": ({"cascade_rl.data", "cascade_rl.types", "cascade_rl.seeding", "cascade_rl.hf"}, None),
    # the driver reaches workers only through the group API (actors.group), never a worker module
    "cascade_rl/stages": ({"cascade_rl.stages", "cascade_rl.actors.group", "cascade_rl.config", "cascade_rl.tracking",
                           "cascade_rl.data", "cascade_rl.types", "cascade_rl.algos", "cascade_rl.security",
                           "cascade_rl.seeding", "cascade_rl.hf"}, None),
}


def _package_of(path: Path) -> list[str]:
    """``actors/x.py`` -> [cascade_rl, actors]; ``cascade_rl/algos/x.py`` -> [cascade_rl, algos]."""
    parts = list(path.relative_to(ROOT).parts[:-1])
    return parts if parts[0] == "cascade_rl" else ["cascade_rl", *parts]


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb level-1 packages from the module's own
                pkg = _package_of(path)
                base = pkg[: len(pkg) - (node.level - 1)]
                out.append(".".join(base + ([node.module] if node.module else [])))
            else:
                out.append(node.module or "")
    return out


@pytest.mark.parametrize("folder", sorted(RULES))
def test_import_rules(folder: str) -> None:
    allowed_project, allowed_external = RULES[folder]
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "cascade_rl":
                if not any(name == a or name.startswith(a + ".") for a in allowed_project):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
            elif allowed_external is not None and name not in allowed_external and top not in allowed_external:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "imports across a layer boundary (see STYLE.md):\n" + "\n".join(bad)


def test_nothing_imports_stages() -> None:
    offenders = []
    for folder in ("cascade_rl/algos", "cascade_rl/data", "rewards", "actors"):
        for path in (ROOT / folder).rglob("*.py"):
            if "stages" in path.read_text() and "cascade_rl.stages" in path.read_text():
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


WORKER_MODULES = ("rollout", "rollout_hf", "rollout_types", "learner", "learner_batches", "reward", "weight_sync")
MAX_LINES = 500


def _top_level_imports(path: Path) -> list[str]:
    """Modules imported at module level (not inside a function, a class body or ``if TYPE_CHECKING:``)."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module or "")
        elif isinstance(node, ast.Try):
            names += [a.name for n in node.body if isinstance(n, ast.Import) for a in n.names]
    return names


@pytest.mark.parametrize("module", WORKER_MODULES)
def test_worker_modules_do_not_import_ray(module: str) -> None:
    """Workers are plain classes (group.py applies ``ray.remote``): they import, and unit-test, without Ray."""
    top = [n for n in _top_level_imports(ROOT / "actors" / f"{module}.py") if n.split(".")[0] == "ray"]
    assert not top, f"actors/{module}.py imports {top} at module level; import ray where it is used"
    code = f"import sys, cascade_rl.actors.{module}; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"importing actors/{module}.py imports ray through one of its imports"


def test_rollout_backends_do_not_import_each_other_at_load() -> None:
    for a, b in (("rollout", "rollout_hf"), ("rollout_hf", "rollout")):
        top = _top_level_imports(ROOT / "actors" / f"{a}.py")
        rel = [n.module for n in ast.parse((ROOT / "actors" / f"{a}.py").read_text()).body
               if isinstance(n, ast.ImportFrom) and n.level == 1]
        assert f"cascade_rl.actors.{b}" not in top and b not in rel, f"actors/{a}.py imports actors/{b}.py"


def test_files_stay_within_the_line_budget() -> None:
    long = []
    for folder in ("cascade_rl", "actors", "rewards", "tests", "bench", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, f"files over {MAX_LINES} lines (split them by responsibility):\n" + "\n".join(long)


def test_ci_runs_lint_and_types_before_the_tests() -> None:
    script = (ROOT / "scripts" / "test.sh").read_text()
    lint, types, tests = (script.index(s) for s in ("ruff check", "-m mypy", "-m pytest"))
    assert lint < tests and types < tests
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"mypy==' in pyproject and "[tool.mypy]" in pyproject
    for target in ("cascade_rl/algos", "rewards", "cascade_rl/stages", "cascade_rl/config.py"):
        assert f'"{target}"' in pyproject.split("[tool.mypy]")[1].split("[tool.")[0], target
