"""Session-wide settings: a private cache for built models/extensions, small vLLM KV cache, offline hubs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("CASCADE_RL_CACHE", str(ROOT / ".cache" / "cascade_rl"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One uninterrupted run of the small tiny cascade (tests/e2e_cli.py), shared by the resume tests."""
    from e2e_cli import SMALL, read_run, run_cli

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    log = run_dir.parent / "cli.log"
    rc = run_cli(run_dir, SMALL, log=log)
    assert rc == 0, log.read_text()[-4000:]
    return read_run(run_dir)
