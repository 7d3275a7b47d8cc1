"""cascade_rl: Cascade RL (offline MPO + online GSPO) post-training on Ray."""

__version__ = "0.1.0"

from pathlib import Path as _Path

# A source checkout first on sys.path (`ray job submit --working-dir .`): actors/ and rewards/ sit beside this
# package, so cascade_rl.actors and cascade_rl.rewards resolve from the same copy as cascade_rl itself.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "actors" / "__init__.py").is_file():
    __path__.append(str(_root))
