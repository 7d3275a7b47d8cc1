"""The varlen attention of ``actors/attention.py`` on the CPU: a packed row equals each sequence alone, and a learner
using it on packed micro-batches gives the log-probs, loss, gradient norm and update of padded sdpa rows.

On CUDA the same function runs torch's FlashAttention varlen kernel (``bench/bench_step.py`` measures it); here
the segment-wise SDPA reference runs, which is what the learner-level test checks end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cascade_rl.actors.attention import (
    VARLEN_ATTENTION,
    cu_seqlens_from_positions,
    packed_attention_kwargs,
    varlen_attention_forward,
)


def _alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Each sequence through causal SDPA by itself, GQA by repeating key/value heads: (1, total, Hq, D)."""
    outs, start = [], 0
    rep = q.shape[1] // k.shape[1]
    for n in lengths:
        sl = slice(start, start + n)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, sl], k[:, :, sl].repeat_interleave(rep, 1), v[:, :, sl].repeat_interleave(rep, 1),
            is_causal=True)  # (1, Hq, n, D)
        outs.append(o.transpose(1, 2))
        start += n
    return torch.cat(outs, dim=1)


def test_cu_seqlens_from_packed_positions() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])  # lengths 3, 2, 4
    assert cu_seqlens_from_positions(positions).tolist() == [0, 3, 5, 9]
    kw = packed_attention_kwargs(positions, torch.device("cpu"))
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["max_length_q"] == 4 == kw["max_length_k"]


def test_packed_row_equals_each_sequence_alone_and_ignores_its_neighbours() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7]
    q, k, v = (torch.randn(1, h, sum(lengths), 16, generator=g) for h in (4, 2, 2))  # GQA: 4 query, 2 kv heads
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    kw = packed_attention_kwargs(positions, torch.device("cpu"))
    out, _ = varlen_attention_forward(torch.nn.Module(), q, k, v, None, **kw)  # (1, total, Hq, D)
    torch.testing.assert_close(out, _alone(q, k, v, lengths), atol=1e-6, rtol=0)
    # boundaries derived from position_ids when the caller passes none give the same result
    derived, _ = varlen_attention_forward(torch.nn.Module(), q, k, v, None, position_ids=positions)
    torch.testing.assert_close(derived, out, atol=0, rtol=0)
    # changing the last sequence's keys leaves the first two sequences' outputs exactly as they were
    k2 = k.clone()
    k2[:, :, 8:] += 5.0
    moved, _ = varlen_attention_forward(torch.nn.Module(), q, k2, v, None, **kw)
    assert torch.equal(moved[:, :8], out[:, :8]) and not torch.allclose(moved[:, 8:], out[:, 8:])


def test_sliding_window_is_refused_naming_the_key() -> None:
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="learner.attn_implementation=sdpa"):
        varlen_attention_forward(torch.nn.Module(), q, q, q, None, sliding_window=2)


@pytest.mark.slow  # two DeepSpeed workers on the tiny LM (a few seconds each)
def test_learner_packed_varlen_equals_padded_sdpa_logprobs_and_update(tiny_lm: Path) -> None:
    from test_learner import make_worker, random_batch, weights, with_old_logprobs

    batch = random_batch(seed=3)
    runs = []
    for attention in ("varlen", "sdpa"):
        w = make_worker(str(tiny_lm), attn_implementation=attention, micro_batch_tokens=64)
        assert w._packed == (attention == "varlen")  # varlen: packed rows (self-check passed); sdpa: padded
        if attention == "varlen":
            assert w.model.config._attn_implementation == VARLEN_ATTENTION and w.packing_check_diff == 0.0
        lps = w.compute_logprobs(batch)
        with_old_logprobs(batch, lps)
        m = w.train_policy(batch, loss="gspo", clip_low=0.2, clip_high=0.2, num_global_seqs=len(batch),
                           num_global_tokens=sum(map(len, batch.response_token_ids)))
        runs.append((lps, m, weights(w)))
    (lp1, m1, w1), (lp2, m2, w2) = runs
    for a, b in zip(lp1, lp2, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)  # the gradients themselves agree
    assert m1["entropy"] == pytest.approx(m2["entropy"], rel=1e-5)
    for n in w1:
        torch.testing.assert_close(w1[n], w2[n], atol=1e-4, rtol=0)


def test_auto_micro_batch_budget_arithmetic() -> None:
    from cascade_rl.actors.attention import (
        ACTIVATION_SAFETY,
        AUTO_BUDGET_RESERVE_BYTES,
        activation_bytes_per_token,
        auto_micro_batch_tokens,
    )
    from transformers import Qwen3Config

    # Qwen3-0.6B shape: h 1024, q 16·128 = 2048, kv 8·128 = 1024, I 3072, 28 layers
    cfg = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128)
    per_layer = 6 * 1024 + 2048 + 2 * 1024 + 4 * 3072  # 22,528 values
    full = activation_bytes_per_token(cfg, dtype_bytes=2, gradient_checkpointing=False)
    assert full == (28 * per_layer + 2 * 1024) * 2  # 1,265,664 B ≈ 1.2 MiB per token
    ckpt = activation_bytes_per_token(cfg, dtype_bytes=2, gradient_checkpointing=True)
    assert ckpt == (28 * 1024 + per_layer + 2 * 1024) * 2
    # 40 GiB free, 10 GiB reserved for others: (40 − 6 − 10) GiB / (2.0 · 1,265,664 B) = 10,180 tokens → 9,216
    got = auto_micro_batch_tokens(cfg, free_bytes=40 << 30, floor=4096, dtype_bytes=2, gradient_checkpointing=False,
                                  reserve_bytes=10 << 30)
    per_token = int(ACTIVATION_SAFETY * full)
    assert got == ((40 << 30) - AUTO_BUDGET_RESERVE_BYTES - (10 << 30)) // per_token // 1024 * 1024 == 9_216
    # never below the recipe's floor, never above the cap
    assert auto_micro_batch_tokens(cfg, free_bytes=1 << 30, floor=4096, dtype_bytes=2,
                                   gradient_checkpointing=False) == 4096
    assert auto_micro_batch_tokens(cfg, free_bytes=1 << 40, floor=4096, dtype_bytes=2,
                                   gradient_checkpointing=True) == 65_536


def test_cached_memory_goes_back_only_on_a_gpu_shared_with_an_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (H100, colocated 0.6B step bench): the learner kept its peak activations in torch's cache and
    the sleeping vLLM engine could not map its 30 % share back (CUDA out of memory in wake_up)."""
    from cascade_rl.actors.attention import release_cached_memory

    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    assert release_cached_memory(torch.device("cuda", 0), 0.3) is True
    assert calls == [1]
    assert release_cached_memory(torch.device("cuda", 0), 0.0) is False  # split placement: the GPU is its own
    assert release_cached_memory(torch.device("cpu"), 0.3) is False
    assert calls == [1]


@pytest.mark.slow
def test_a_live_learner_switches_attention_and_profiles_an_update(tiny_lm: Path) -> None:
    from cascade_rl.actors.attention import LearnerSpeedControls
    from cascade_rl.actors.learner import LearnerSpec, LearnerWorker
    from test_learner import free_port, random_batch, with_old_logprobs

    from cascade_rl.stages.workers import spec_with

    class Learner(LearnerSpeedControls, LearnerWorker):
        pass

    w = Learner(spec_with(LearnerSpec, str(tiny_lm), zero_stage=2, lr=1e-3, micro_batch_tokens=64), 0, 1,
                "127.0.0.1", free_port())
    batch = random_batch(seed=4)
    padded = w.compute_logprobs(batch)
    assert w.configure_speed(attention="varlen") == {"attention": VARLEN_ATTENTION, "packed": True,
                                                     "micro_batch_tokens": 64, "fused_kernels": "none",
                                                     "fused_modules": 0, "fused_check_diff": None}
    with pytest.raises(ValueError, match="learner.fused_kernels=liger: its Triton kernels run on CUDA GPUs only"):
        w.configure_speed(fused_kernels="liger")
    packed = w.compute_logprobs(batch)
    for a, b in zip(padded, packed, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert w.configure_speed(attention="sdpa", micro_batch_tokens=128)["packed"] is False
    with_old_logprobs(batch, packed)
    out = w.profile_train_policy(batch, loss="gspo", clip_low=0.2, clip_high=0.2, num_global_seqs=len(batch),
                                 num_global_tokens=sum(map(len, batch.response_token_ids)))
    assert out["metrics"]["grad_norm"] > 0 and "aten::mm" in out["table"]
    mm = next(o for o in out["ops"] if o["name"] == "aten::mm")
    assert mm["self_ms"] > 0 and mm["calls"] > 0
    assert [o["self_ms"] for o in out["ops"]] == sorted((o["self_ms"] for o in out["ops"]), reverse=True)


def test_fused_path_calls_the_kernel_causally_with_matching_heads() -> None:
    """The CUDA branch's call, with a stand-in kernel of torch 2.11's signature (no enable_gqa): key/value heads
    are repeated to the query heads, the window is causal, and the result is the per-sequence attention."""
    from cascade_rl.actors.attention import _fused, _segmentwise

    seen = {}

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        seen.update(heads=(q.shape[1], k.shape[1]), window=window_size, max=(max_q, max_k))
        return _segmentwise(q, k, v, cu_q, scale)

    g = torch.Generator().manual_seed(1)
    lengths = [4, 6]
    q, k, v = (torch.randn(1, h, 10, 8, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    out = _fused(kernel, *(t.transpose(1, 2).reshape(10, -1, 8) for t in (q, k, v)), cu, 6, None)
    assert seen == {"heads": (4, 4), "window": (-1, 0), "max": (6, 6)}
    torch.testing.assert_close(out[None], _alone(q, k, v, lengths), atol=1e-6, rtol=0)


def test_auto_attention_keeps_flash_kernels_to_half_precision() -> None:
    """FlashAttention takes bf16/fp16 only: a float32 run on CUDA gets sdpa from ``auto`` (it used to get varlen
    and fail in the first forward), and an explicit varlen/flash request is refused naming both keys."""
    from cascade_rl.actors.attention import choose_attention

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_attention("auto", "float32", cuda) == "sdpa"  # no flash_attn package in the test env
    assert choose_attention("auto", "bfloat16", cpu) == "sdpa"
    assert choose_attention("eager", "float32", cuda) == "eager"
    assert choose_attention("varlen", "float32", cpu) == VARLEN_ATTENTION  # CPU reference runs in any dtype
    for requested in ("varlen", "flash_attention_2"):
        with pytest.raises(ValueError, match=r"model.dtype is float32.*learner.attn_implementation=sdpa"):
            choose_attention(requested, "float32", cuda)


def test_vision_tower_attention_stays_bidirectional() -> None:
    """A layer with ``is_causal=False`` (InternVL's vision attention passes it and sets ``module.is_causal``) gets
    full attention within each row, on both branches: it used to get the causal mask, so on CUDA ``auto`` (varlen
    in bf16) fed a VLM learner other image features than vLLM's engine computes."""
    from cascade_rl.actors.attention import _fused, _segmentwise

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 4, 5, 8, generator=g) for _ in range(3))  # 3 tiles of 5 patches, no mask
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, L, H, D)
    vision = torch.nn.Module()
    vision.is_causal = False
    for module, kwargs in ((vision, {}), (torch.nn.Module(), {"is_causal": False})):
        out, _ = varlen_attention_forward(module, q, k, v, None, **kwargs)
        torch.testing.assert_close(out, full, atol=1e-6, rtol=0)
    seen = {}

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        seen["window"] = window_size
        return _segmentwise(q, k, v, cu_q, scale, causal=window_size == (-1, 0))

    cu = torch.tensor([0, 5, 10, 15], dtype=torch.int32)
    out = _fused(kernel, *(t.transpose(1, 2).reshape(15, 4, 8) for t in (q, k, v)), cu, 5, None, causal=False)
    assert seen["window"] == (-1, -1)
    torch.testing.assert_close(out.reshape(3, 5, 4, 8), full, atol=1e-6, rtol=0)


def test_vlm_image_features_under_varlen_equal_sdpa(tiny_vlm: Path) -> None:
    """The tiny InternVL loaded with the varlen attention (what ``auto`` picks on CUDA in bf16) computes the
    image features sdpa does: transformers hands the vision tower the same attention function."""
    from cascade_rl.actors.attention import register_varlen_attention
    from transformers import AutoModelForImageTextToText

    models = [AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32, attn_implementation=name)
              for name in (register_varlen_attention(), "sdpa")]
    size = models[0].config.vision_config.image_size
    pixels = torch.randn(2, 3, *(size if isinstance(size, list | tuple) else (size, size)),
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        varlen, sdpa = (m.get_image_features(pixel_values=pixels).pooler_output for m in models)
    torch.testing.assert_close(varlen, sdpa, atol=1e-5, rtol=0)
