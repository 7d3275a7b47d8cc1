"""Attention over packed micro-batches without padding: a transformers attention function that keeps each packed
sequence to itself, given the packing's sequence boundaries (``cu_seqlens``).

For one packed row of sequences s_0 … s_{n−1} (lengths ℓ_i, offsets ``cu_seqlens = [0, ℓ_0, ℓ_0+ℓ_1, …]``),
token t of sequence i attends to tokens 0..t of sequence i only (causal, block-diagonal):

    out_t = softmax(q_t K_iᵀ · scale + causal) V_i        cost Σ ℓ_i² instead of (Σ ℓ_i)²

Kernels: on CUDA, ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen, shipped with torch ≥ 2.10;
forward and backward in bf16). Elsewhere (CPU tests) the same result segment by segment with
``scaled_dot_product_attention(is_causal=True)``. ``tests/actors/test_attention.py`` checks that a packed row
gives the log-probs and gradients of padded rows.

Why not the built-in names: ``flash_attention_2`` needs the ``flash_attn`` package (often absent); ``sdpa`` on a
packed row builds a dense (total × total) mask; ``flex_attention`` compiles a block mask per shape. The function is
registered under ``VARLEN_ATTENTION`` with ``transformers.AttentionInterface``; transformers has no mask function
for that name, so it skips mask building and passes the keyword arguments of the model call through to every
attention layer: the learner passes ``cu_seq_lens_q/k`` and ``max_length_q/k`` (``packed_attention_kwargs``),
computed on the host from the packing, so nothing in the micro-batch loop waits for the GPU.

Right-padded rows (no ``cu_seq_lens``) are attended row by row, causally: a real token never sees the padding
after it, so their outputs are exact too.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from cascade_rl.types import SequenceBatch

VARLEN_ATTENTION = "cascade_varlen"


@functools.cache
def varlen_kernel() -> Any | None:
    """torch's FlashAttention varlen function, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_available(device: torch.device) -> bool:
    """Can ``VARLEN_ATTENTION`` run its fused kernel here (CUDA + torch's varlen_attn)?"""
    return device.type == "cuda" and varlen_kernel() is not None


def register_varlen_attention() -> str:
    """Register the attention function with transformers (idempotent); returns its name for
    ``from_pretrained(attn_implementation=...)``."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    return VARLEN_ATTENTION


def cu_seqlens_from_positions(position_ids: Tensor) -> Tensor:
    """(1, total) positions restarting at 0 per sequence → (n+1,) int32 boundaries ``[0, ℓ_0, ℓ_0+ℓ_1, …]``."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)  # (n,)
    end = torch.tensor([flat.numel()], dtype=starts.dtype, device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def packed_attention_kwargs(position_ids: Tensor, device: torch.device) -> dict[str, Any]:
    """Model-call keyword arguments for a packed row: boundaries computed from CPU ``position_ids`` (no GPU wait),
    copied to ``device`` without blocking the host."""
    if position_ids.device.type != "cpu":
        raise ValueError("packed_attention_kwargs needs the micro-batch's position_ids on the CPU")
    cu = cu_seqlens_from_positions(position_ids)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    if device.type == "cuda":
        cu = cu.pin_memory().to(device, non_blocking=True)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


def varlen_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, cu_seq_lens_q: Tensor | None = None,
                             max_length_q: int | None = None, is_causal: bool | None = None,
                             **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention interface: query (B, Hq, L, D), key/value (B, Hkv, L, D) → ((B, L, Hq, D), None).

    Causal unless the layer says otherwise (``is_causal=False`` or ``module.is_causal``, as sdpa reads them): a
    VLM's vision tower attends bidirectionally within each image tile."""
    if sliding_window is not None:
        raise NotImplementedError(f"{VARLEN_ATTENTION} attention does not implement sliding windows (model "
                                  f"{type(module).__name__}); set learner.attn_implementation=sdpa")
    if dropout:
        raise NotImplementedError(f"{VARLEN_ATTENTION} attention has no dropout; set attention_dropout=0")
    b, hq, length, d = query.shape
    hkv = key.shape[1]
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if cu_seq_lens_q is None:
        positions = kwargs.get("position_ids")
        if b == 1 and positions is not None and attention_mask is None:  # packed, boundaries not passed: derive
            cu_seq_lens_q = cu_seqlens_from_positions(positions).to(query.device)
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        else:  # one sequence per row (right padding: causal attention never reaches the pads after a token)
            cu_seq_lens_q = torch.arange(0, (b + 1) * length, length, dtype=torch.int32, device=query.device)
            max_length_q = length
    q = query.transpose(1, 2).reshape(b * length, hq, d)  # (T, Hq, D)
    k = key.transpose(1, 2).reshape(b * length, hkv, d)  # (T, Hkv, D)
    v = value.transpose(1, 2).reshape(b * length, hkv, d)  # (T, Hkv, D)
    kernel = varlen_kernel() if query.device.type == "cuda" else None
    if kernel is not None:
        out = _fused(kernel, q, k, v, cu_seq_lens_q, int(max_length_q), scaling, causal=causal)
    else:
        out = _segmentwise(q, k, v, cu_seq_lens_q, scaling, causal=causal)
    return out.reshape(b, length, hq, d), None


def _fused(kernel: Any, q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float | None, *,
           causal: bool = True) -> Tensor:
    extra: dict[str, Any] = {}
    if k.shape[1] != q.shape[1]:
        if _takes_gqa_flag(kernel):
            extra["enable_gqa"] = True
        else:  # older torch: give every query head its own copy of its key/value head
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    window = (-1, 0) if causal else (-1, -1)  # (-1, -1): full attention within each sequence
    return kernel(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=window, **extra)  # (T, Hq, D)


@functools.cache
def _takes_gqa_flag(kernel: Any) -> bool:
    return "enable_gqa" in inspect.signature(kernel).parameters


def _segmentwise(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float | None, *,
                 causal: bool = True) -> Tensor:
    """The reference: SDPA (causal by default) on each sequence alone (T, H, D) → (T, Hq, D)."""
    gqa = k.shape[1] != q.shape[1]
    parts = []
    bounds = cu.tolist()
    for a, e in zip(bounds[:-1], bounds[1:], strict=True):
        seg = [t[a:e].transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, ℓ, D)
        o = torch.nn.functional.scaled_dot_product_attention(*seg, is_causal=causal, scale=scale, enable_gqa=gqa)
        parts.append(o[0].transpose(0, 1))  # (ℓ, Hq, D)
    return torch.cat(parts) if parts else q.new_zeros(q.shape)


def set_attention(worker: Any, name: str) -> bool:
    """Switch a live ``LearnerWorker`` to attention ``name`` (``varlen``, ``auto`` or a transformers name) and
    re-choose its micro-batch layout (packed only where attention is varlen and the self-check passes). Returns
    whether micro-batches are now packed. The step benchmark uses it to compare layouts on one warm learner."""
    worker.spec.attn_implementation = name
    worker.model.set_attn_implementation(worker._attn_implementation())
    worker._packed = worker._choose_packing()
    return worker._packed


AUTO_BUDGET_RESERVE_BYTES = 6 << 30  # left free: LM-head chunks, optimizer-step temporaries, fragmentation
AUTO_BUDGET_MAX_TOKENS = 65_536
# measured against the estimate below (1.2 MiB per token at the Qwen3-0.6B shape), H100: sdpa, 16k-token micro-batches
# peaked at 42 GiB with ~12 GiB of weights and optimizer state (~1.8 MiB per token); varlen, 33,792-token budget
# (safety 1.5): the learner held 74.1 GiB allocated and ran out of memory in the LM head's log-softmax at the second
# step, once the persistent weight-sync buffers were allocated (~1.84 MiB per token). 2.0 leaves ~20 % over that
ACTIVATION_SAFETY = 2.0


def activation_bytes_per_token(config: Any, *, dtype_bytes: int, gradient_checkpointing: bool) -> int:
    """Bytes autograd keeps per token of a decoder-only model's forward (a deliberately high estimate).

    Per layer: the inputs of both norms, q/k/v, the attention output and o_proj input, gate, up and their product
    (≈ 6·h + q + 2·kv + 4·I values); with recomputation only each layer's input (h) plus one layer in full.
    """
    text = config.get_text_config()
    h, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q_dim = text.num_attention_heads * head_dim
    kv_dim = getattr(text, "num_key_value_heads", text.num_attention_heads) * head_dim
    per_layer = 6 * h + q_dim + 2 * kv_dim + 4 * inter
    values = (layers * h + per_layer) if gradient_checkpointing else layers * per_layer
    return (values + 2 * h) * dtype_bytes  # + the final hidden state and its gradient for the LM head


def auto_micro_batch_tokens(config: Any, *, free_bytes: int, floor: int, dtype_bytes: int,
                            gradient_checkpointing: bool, reserve_bytes: int = 0) -> int:
    """The largest multiple of 1,024 tokens whose activations (estimate × ``ACTIVATION_SAFETY``) fit
    ``free_bytes`` less ``AUTO_BUDGET_RESERVE_BYTES`` and ``reserve_bytes`` (memory others will claim: a sleeping
    colocated engine's share, the weight-sync buffers); at least ``floor`` (``learner.micro_batch_tokens``), at
    most ``AUTO_BUDGET_MAX_TOKENS``."""
    per_token = int(ACTIVATION_SAFETY * activation_bytes_per_token(
        config, dtype_bytes=dtype_bytes, gradient_checkpointing=gradient_checkpointing))
    fits = max(0, free_bytes - AUTO_BUDGET_RESERVE_BYTES - reserve_bytes) // per_token // 1024 * 1024
    return int(max(floor, min(fits, AUTO_BUDGET_MAX_TOKENS)))


def free_device_bytes(device: torch.device) -> int:
    """Memory this process could still allocate on ``device``: the driver's free memory plus what torch's
    caching allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def release_cached_memory(device: torch.device, shared_gpu_reserve_fraction: float) -> bool:
    """After an optimizer step on a GPU shared with a sleeping engine: hand the caching allocator's unused blocks
    back to the driver, so the engine can map its share again when it wakes (what is allocated stays). Without it
    the learner keeps its peak activations reserved: on an H100 the engine's wake-up ran out of memory."""
    if device.type != "cuda" or shared_gpu_reserve_fraction <= 0:
        return False
    torch.cuda.empty_cache()
    return True


class LearnerSpeedControls:
    """Mixed into the learner actor by ``group.py``: switch speed settings of a live learner and profile one
    update (what ``bench/bench_step.py`` uses to compare old and new paths on one warm start)."""

    spec: Any
    model: Any
    device: Any
    _packed: bool
    _auto_budget_done: bool
    fused: dict[str, Any]
    _apply_fused_kernels: Any  # LearnerSetupMixin's
    train_policy: Any  # LearnerWorker's (this mixin comes first in the MRO)

    def configure_speed(self, attention: str | None = None, micro_batch_tokens: int | None = None,
                        auto_micro_batch_tokens: bool | None = None,
                        fused_kernels: str | None = None) -> dict[str, Any]:
        """Switch attention (and packing with it), the micro-batch budget or the fused kernels of a live learner
        (fused kernels can be turned on, not off: patching is one-way)."""
        if fused_kernels is not None and fused_kernels != self.spec.fused_kernels:
            if self.fused["fused_modules"]:
                raise ValueError(f"fused kernels are already patched in ({self.fused}); start a new learner with "
                                 f"learner.fused_kernels={fused_kernels}")
            self.spec.fused_kernels = fused_kernels
            self.fused = self._apply_fused_kernels()
        if attention is not None:
            set_attention(self, attention)
        if micro_batch_tokens is not None:
            self.spec.micro_batch_tokens = micro_batch_tokens
        if auto_micro_batch_tokens is not None:
            self.spec.auto_micro_batch_tokens, self._auto_budget_done = auto_micro_batch_tokens, False
        if str(self.device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)  # peak_mem_gib then measures the new settings
        return {"attention": self.model.config._attn_implementation, "packed": self._packed,
                "micro_batch_tokens": self.spec.micro_batch_tokens, "fused_kernels": self.fused["fused_kernels"],
                "fused_modules": self.fused["fused_modules"], "fused_check_diff": self.fused["fused_check_diff"]}

    def profile_train_policy(self, batch: SequenceBatch, **kwargs: Any) -> dict[str, Any]:
        """One ``train_policy`` step (a real update) under torch.profiler: its metrics and the top
        operators by self time on the device (CPU on a CPU learner), as a table."""
        from torch.profiler import ProfilerActivity, profile

        cuda = str(self.device).startswith("cuda")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            metrics = self.train_policy(batch, **kwargs)
        averages = prof.key_averages()
        for key in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
            try:
                table = averages.table(sort_by=key, row_limit=30)
                break
            except (AttributeError, KeyError, ValueError):
                table, key = "", "self_cpu_time_total"
        ops = sorted(({"name": e.key, "self_ms": getattr(e, key, 0.0) / 1e3, "calls": e.count} for e in averages),
                     key=lambda o: -o["self_ms"])
        return {"metrics": metrics, "table": table, "ops": [o for o in ops if o["self_ms"] > 0]}


HALF_DTYPES = ("bfloat16", "float16")  # FlashAttention kernels (varlen, flash_attention_2) run in these only


def choose_attention(requested: str, dtype: str, device: torch.device) -> str:
    """The ``attn_implementation`` the learner loads for ``learner.attn_implementation`` = ``requested``:
    ``auto`` takes the fused varlen kernel on CUDA in bf16/fp16, else flash-attn 2 if installed, else ``sdpa``
    (float32 and CPU runs). ``varlen`` on CPU runs its segment-by-segment reference in any dtype."""
    cuda, half = device.type == "cuda", dtype in HALF_DTYPES
    if requested in ("varlen", "flash_attention_2") and cuda and not half:
        raise ValueError(f"learner.attn_implementation={requested} runs FlashAttention kernels, which take bfloat16 "
                         f"or float16 only, and model.dtype is {dtype}: set model.dtype=bfloat16, or "
                         "learner.attn_implementation=sdpa (or auto) for a float32 run")
    if requested == "varlen" or (requested == "auto" and cuda and half and varlen_available(device)):
        return register_varlen_attention()
    if requested != "auto":
        return requested
    if cuda and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"
