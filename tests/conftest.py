"""Session-wide settings: a private cache for built models/extensions, small vLLM KV cache, offline hubs."""

from __future__ import annotations

import os
from collections.abc import Iterator
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
    """One uninterrupted run of the small tiny cascade (tests/e2e_cli.py, HF backend), shared by the resume tests."""
    from e2e_cli import SMALL_HF, read_run, run_cli

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    log = run_dir.parent / "cli.log"
    rc = run_cli(run_dir, SMALL_HF, log=log)
    assert rc == 0, log.read_text()[-4000:]
    return read_run(run_dir)


@pytest.fixture(scope="session")
def tiny_lm() -> Path:
    """The tiny Qwen3 built from config (cached by content under CASCADE_RL_CACHE)."""
    from cascade_rl.data.tiny_models import build_tiny_lm

    return build_tiny_lm()


@pytest.fixture(scope="session")
def tiny_vlm() -> Path:
    """The tiny InternVL-architecture VLM built from config."""
    from cascade_rl.data.tiny_models import build_tiny_vlm

    return build_tiny_vlm()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance for the whole session (2 CPUs, a 512 MiB object store), whichever folder asks first."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=512 << 20, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
