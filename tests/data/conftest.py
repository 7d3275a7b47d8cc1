"""Session fixtures for data tests: the tiny models (built once into the session cache) and one vLLM engine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_lm_vllm(tiny_lm: Path) -> Iterator[Any]:
    """One vLLM engine on the tiny LM for the whole session (engine start ~30 s on CPU)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    vllm = pytest.importorskip("vllm")
    llm = vllm.LLM(model=str(tiny_lm), enforce_eager=True, dtype="float32", max_model_len=512,
                   max_num_seqs=8, seed=0)
    yield llm
    del llm
