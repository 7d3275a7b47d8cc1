"""The import table of STYLE.md, enforced by reading every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> (may import from the project, may import from outside: None = anything)
RULES = {
    "cascade_rl/algos": ({"cascade_rl.algos"}, {"torch", "math", "dataclasses", "typing", "collections",
                                                "__future__", "functools", "itertools", "collections.abc"}),
    # cascade_rl.hf: the one processor / image loader / multimodal prompt renderer
    "rewards": ({"cascade_rl.rewards", "cascade_rl.types", "cascade_rl.hf"}, None),
    "actors": ({"cascade_rl.actors", "cascade_rl.algos", "cascade_rl.rewards", "cascade_rl.types", "cascade_rl.hf"},
               None),
    "cascade_rl/data": ({"cascade_rl.data", "cascade_rl.types", "cascade_rl.hf"}, None),
    # the driver reaches workers only through the group API (actors.group), never a worker module
    "cascade_rl/stages": ({"cascade_rl.stages", "cascade_rl.actors.group", "cascade_rl.config", "cascade_rl.tracking",
                           "cascade_rl.data", "cascade_rl.types", "cascade_rl.algos", "cascade_rl.security",
                           "cascade_rl.hf"}, None),
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
