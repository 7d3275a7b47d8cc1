"""The step benchmark's arithmetic (``bench/step_metrics.py``) on made-up events: the generation roofline (KV-cache
bytes every decode step must read) and the per-phase split of a step, with the numbers written out."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
step_metrics = pytest.importorskip("step_metrics")


def test_kv_reads_and_roofline_of_one_step() -> None:
    # two sequences: prompt 3 + response 2 reads 2·3 + 2·3/2 = 9 cached tokens; prompt 1 + response 4: 4 + 10 = 14
    batch = SimpleNamespace(prompt_token_ids=[[1, 2, 3], [4]], response_token_ids=[[5, 6], [7, 8, 9, 10]])
    info = step_metrics.learner_info("compute_logprobs", (batch,), None)
    assert info["kv_token_reads"] == 9 + 14 and info["tokens"] == 5 + 5 and info["sum_len_sq"] == 25 + 25
    m = {"num_params": 10, "num_layers": 1, "attn_dim": 4, "weight_bytes": 20, "kv_bytes_per_token": 1000}
    # generate 2 s, old log-probs 1 s of the second sequence (14 reads), two updates of 1 s, one per sequence, inside
    # a 6 s step: the roofline counts the updates' reads (every response once), not the old-log-prob batch's
    first = step_metrics.learner_info("train_policy", (SimpleNamespace(prompt_token_ids=[[1, 2, 3]],
                                                                        response_token_ids=[[5, 6]]),), None)
    second = step_metrics.learner_info("train_policy", (SimpleNamespace(prompt_token_ids=[[4]],
                                                                         response_token_ids=[[7, 8, 9, 10]]),), None)
    events = [("generate", 0.0, 2.0, {"output_tokens": 6}), ("old_logprobs", 2.0, 3.0, second),
              ("update", 3.0, 4.0, first), ("update", 4.0, 5.0, second)]
    out = step_metrics.step_summary(events, 0.0, 6.0, m, None, None, hbm=1e4)
    # 23 reads · 1,000 B = 23,000 B at 10,000 B/s = 2.3 s, above the 2 s measured: share 2.3 / 2 = 1.15
    assert out["generate_kv_roofline_s"] == 2.3 and out["generate_share_of_roofline"] == 1.15
    assert out["generate_kv_read_tb"] == round(23_000 / 1e12, 3)
    assert out["update_s"] == [1.0, 1.0] and out["driver_overhead_s"] == 1.0 and out["generate_tokens_per_s"] == 3.0
    assert "generate_kv_roofline_s" not in step_metrics.step_summary(events, 0.0, 6.0, m, None, None)  # no bandwidth
