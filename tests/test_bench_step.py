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


def test_op_shares_of_a_profiled_update() -> None:
    # 2 s of an update: gemm 600 ms, flash 200 ms, Liger's RMSNorm 100 ms, log-softmax 50 ms, Adam 30 ms, a copy
    # 20 ms and an elementwise add 0 ms self time are 1,000 ms of device time, so the device was busy half the wall
    ops = [{"name": "nvjet_tst_128x256_gemm", "self_ms": 500.0}, {"name": "sm90_xmma_gemm_bf16", "self_ms": 100.0},
           {"name": "flash_fwd_splitkv_kernel", "self_ms": 150.0}, {"name": "FlashAttnBwd", "self_ms": 50.0},
           {"name": "_rms_norm_forward_kernel", "self_ms": 100.0},
           {"name": "cunn_SoftMaxForward<LogSoftMaxForwardEpilogue>", "self_ms": 50.0},
           {"name": "multi_tensor_apply_kernel<AdamFunctor>", "self_ms": 30.0},
           {"name": "Memcpy DtoD (Device -> Device)", "self_ms": 20.0},
           {"name": "vectorized_elementwise_kernel<add>", "self_ms": 0.0}]
    out = step_metrics.op_shares(ops, wall_s=2.0)
    assert out["device_ms"] == 1000.0 and out["busy"] == 0.5
    assert out["shares"] == {"attention": 0.2, "lm_head_softmax": 0.05, "fused_norm_rope_mlp": 0.1, "optimizer": 0.03,
                             "matmul": 0.6, "copy_cast": 0.02, "other": 0.0}
    assert step_metrics.op_shares([], wall_s=0.0) == {"device_ms": 0.0, "busy": None, "shares": dict.fromkeys(
        ["attention", "lm_head_softmax", "fused_norm_rope_mlp", "optimizer", "matmul", "copy_cast", "other"], 0.0)}
