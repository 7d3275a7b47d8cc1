"""Token log-probs and entropy without a float32 [tokens × vocab] tensor.

For logits ``z`` (or ``z = h Wᵀ`` from hidden states and the LM head) at temperature τ::

    log p(y_t) = z_t,y / τ − logsumexp_v(z_t,v / τ)
    H_t        = logsumexp_v(z_t,v / τ) − Σ_v p_t,v · z_t,v / τ

A naive ``logits.float().log_softmax(-1).gather(...)`` materialises a float32 copy of every logit (1,024 tokens ×
151,936 vocab = 594 MiB) plus a float32 log-softmax of the same size, and autograd keeps them until backward.
Here tokens are processed ``chunk_size`` at a time inside custom ``autograd.Function``s: forward keeps nothing
but its inputs (and the entropy), backward recomputes each chunk's log-softmax and writes
``∂/∂z = g_lp·(onehot(y) − p) − g_H·p·(log p + H)`` (divided by τ) into a gradient of the logits' own dtype.
Peak extra memory is one float32 ``[chunk_size × vocab]`` buffer (two when the entropy is differentiated);
``log_softmax(..., dtype=float32)`` upcasts inside the kernel. Same idea as verl's / Liger's fused linear
cross-entropy, without fusing into the model. float64 inputs are computed in float64.

Labels below 0 (``ignore_index`` -100 convention) give log-prob 0, entropy as computed, and no gradient through
the log-prob.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 512


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bf16/float32 inputs, float64 stays float64 (gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def _log_softmax(z: Tensor, temperature: float) -> Tensor:
    """log_softmax(z / τ) in float32 as a new (c, V) buffer; the upcast happens inside the kernel when τ = 1."""
    if temperature == 1.0:
        return torch.log_softmax(z, dim=-1, dtype=_compute_dtype(z))
    return torch.log_softmax(z.to(_compute_dtype(z), copy=True).div_(temperature), dim=-1)


def _chunk_forward(
    z: Tensor, labels: Tensor, temperature: float, want_entropy: bool
) -> tuple[Tensor, Tensor]:
    """One chunk of logits z (c, V) -> (logprobs (c,), entropy (c,) or (0,)) in float32."""
    logp = _log_softmax(z, temperature)  # (c, V)
    picked = logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)  # (c,)
    logprobs = torch.where(labels >= 0, picked, 0.0)  # (c,)
    if not want_entropy:
        return logprobs, logprobs.new_empty(0)
    return logprobs, -(logp.exp().mul_(logp)).sum(-1)  # (c,)


def _chunk_backward(
    z: Tensor,
    labels: Tensor,
    entropy: Tensor | None,
    g_lp: Tensor | None,
    g_h: Tensor | None,
    temperature: float,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """d/dz of Σ g_lp·log p(y) + g_H·H for one chunk z (c, V): −p·(g_lp + g_H·(log p + H)) + g_lp·onehot(y), / τ;
    float32 math, returned in ``out_dtype`` (default: the float32 compute dtype)."""
    dtype = _compute_dtype(z)
    out_dtype = out_dtype or dtype
    coef = torch.zeros(z.shape[0], dtype=dtype, device=z.device) if g_lp is None else g_lp.to(dtype)
    coef = torch.where(labels >= 0, coef, 0.0)  # (c,) ignored labels get no log-prob gradient
    idx = labels.clamp(min=0)[:, None]  # (c, 1)
    if (g_h is None or entropy is None) and temperature == 1.0:
        # −p·coef rounded straight into out_dtype (no float32 (c, V) gradient, no second pass to cast it); the
        # label column, where coef·(1 − p_y) cancels, is computed apart in float32: the same bits as the
        # float32 gradient cast once
        p = torch.softmax(z, dim=-1, dtype=dtype)  # (c, V)
        grad = torch.mul(p, -coef[:, None], out=torch.empty_like(p, dtype=out_dtype))
        label = p.gather(-1, idx).mul_(-coef[:, None]).add_(coef[:, None])  # (c, 1)
        return grad.scatter_(-1, idx, label.to(out_dtype))
    if g_h is None or entropy is None:
        # softmax straight from the model dtype: one float32 (c, V) buffer, then in place
        x = z.to(dtype, copy=True).div_(temperature)
        grad = torch.softmax(x, dim=-1, dtype=dtype).mul_(-coef[:, None])  # (c, V)
    else:
        logp = _log_softmax(z, temperature)  # (c, V)
        p = logp.exp()  # (c, V)
        weight = logp.add_(entropy[:, None]).mul_(g_h.to(dtype)[:, None]).add_(coef[:, None])  # (c, V)
        grad = p.mul_(weight).neg_()
    grad.scatter_add_(-1, idx, coef[:, None])
    grad = grad.div_(temperature) if temperature != 1.0 else grad
    return grad.to(out_dtype)


def _forward_chunks(
    like: Tensor, make_logits: Callable[[int, int], Tensor], labels: Tensor, ctx: Any, want_entropy: bool
) -> tuple[Tensor, Tensor]:
    """Run _chunk_forward over the N rows of ``like`` in chunks; make_logits(start, end) gives a chunk's logits."""
    n = like.shape[0]
    logprobs = like.new_empty(n, dtype=_compute_dtype(like))  # (N,)
    entropy = like.new_empty(n if want_entropy else 0, dtype=_compute_dtype(like))  # (N,) or (0,)
    for s in range(0, n, ctx.chunk_size):
        e = min(s + ctx.chunk_size, n)
        lp, h = _chunk_forward(make_logits(s, e), labels[s:e], ctx.temperature, want_entropy)
        logprobs[s:e] = lp
        if want_entropy:
            entropy[s:e] = h
    return logprobs, entropy


class _LogprobsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, labels: Tensor, chunk_size: int, temperature: float, want_entropy: bool
    ):
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        logprobs, entropy = _forward_chunks(logits, lambda s, e: logits[s:e], labels, ctx, want_entropy)
        ctx.save_for_backward(logits, labels, entropy)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor | None, g_h: Tensor | None):
        logits, labels, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)  # (N, V) in the logits' dtype
        for s in range(0, logits.shape[0], ctx.chunk_size):
            e = min(s + ctx.chunk_size, logits.shape[0])
            grad[s:e] = _chunk_backward(
                logits[s:e],
                labels[s:e],
                None if g_h is None else entropy[s:e],
                None if g_lp is None else g_lp[s:e],
                None if g_h is None else g_h[s:e],
                ctx.temperature,
                grad.dtype,
            )
        return grad, None, None, None, None


class _LogprobsFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        chunk_size: int,
        temperature: float,
        want_entropy: bool,
    ):
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        # each chunk's logits (c, V) are built in the model dtype and dropped: never the full (N, V)
        logprobs, entropy = _forward_chunks(
            hidden, lambda s, e: hidden[s:e] @ weight.T, labels, ctx, want_entropy
        )
        ctx.save_for_backward(hidden, weight, labels, entropy)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor | None, g_h: Tensor | None):
        hidden, weight, labels, entropy = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)  # (N, H)
        # accumulated in the weight's dtype with addmm_ (float32 inside each product), as Liger's fused linear
        # cross-entropy does: a float32 (V, H) accumulator would cost more memory than the naive path saves
        grad_weight = torch.zeros_like(weight)  # (V, H)
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            e = min(s + ctx.chunk_size, hidden.shape[0])
            g = _chunk_backward(
                hidden[s:e] @ weight.T,
                labels[s:e],
                None if g_h is None else entropy[s:e],
                None if g_lp is None else g_lp[s:e],
                None if g_h is None else g_h[s:e],
                ctx.temperature,
                hidden.dtype,
            )  # (c, V)
            grad_hidden[s:e] = g @ weight
            grad_weight.addmm_(g.T, hidden[s:e])
        return grad_hidden, grad_weight, None, None, None, None


def _check_chunk(chunk_size: int, temperature: float) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 token, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def compute_token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log p(labels) from logits (..., V) and labels (...); float32 (...), plus entropy (...) if asked.

    ``logits[..., t, :]`` must already be the prediction for ``labels[..., t]`` (shift before calling, or use
    :func:`compute_response_logprobs`).
    """
    _check_chunk(chunk_size, temperature)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits (..., V) and labels (...) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}"
        )
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    logprobs, entropy = _LogprobsFromLogits.apply(
        flat, labels.reshape(-1), chunk_size, float(temperature), return_entropy
    )
    logprobs = logprobs.view(labels.shape)
    return (logprobs, entropy.view(labels.shape)) if return_entropy else logprobs


def compute_logprobs_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log p(labels) from hidden states (..., H) and the LM head weight (V, H), never building (N, V) logits.

    Gradients flow to both ``hidden`` and ``lm_head_weight`` (the latter accumulated over chunks in its own
    dtype, as Liger does; pass a larger ``chunk_size`` for fewer bf16 roundings). Under ZeRO-3 the weight must be gathered
    (``deepspeed.zero.GatheredParameters``) by the caller, since this bypasses the module's hooks.
    """
    _check_chunk(chunk_size, temperature)
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != lm_head_weight.shape[-1]:
        raise ValueError(
            f"need hidden (..., H), lm_head_weight (V, H), labels (...); got {tuple(hidden.shape)}, "
            f"{tuple(lm_head_weight.shape)}, {tuple(labels.shape)}"
        )
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    logprobs, entropy = _LogprobsFromHidden.apply(
        flat, lm_head_weight, labels.reshape(-1), chunk_size, float(temperature), return_entropy
    )
    logprobs = logprobs.view(labels.shape)
    return (logprobs, entropy.view(labels.shape)) if return_entropy else logprobs


def gather_response(
    values: Tensor, prompt_lengths: Tensor, response_lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """Cut the response window out of per-position values.

    ``values[b, t]`` belongs to input position t (B, L); response token j of row b sits at position
    ``prompt_lengths[b] + j``. Returns (B, T) values, right-padded with 0, and mask (B, T), T = max response length.
    """
    num_rows, length = values.shape
    max_len = int(response_lengths.max().item()) if num_rows else 0
    j = torch.arange(max_len, device=values.device)  # (T,)
    pos = prompt_lengths.to(values.device)[:, None] + j[None, :]  # (B, T)
    mask = j[None, :] < response_lengths.to(values.device)[:, None]  # (B, T)
    if bool((pos[mask] >= length).any()):
        raise ValueError("prompt_lengths + response_lengths exceed the sequence length of values")
    picked = values.gather(1, pos.clamp(min=0, max=max(length - 1, 0)))  # (B, T)
    return torch.where(mask, picked, torch.zeros((), dtype=values.dtype, device=values.device)), mask


def compute_response_logprobs(
    logits: Tensor,
    input_ids: Tensor,
    prompt_lengths: Tensor,
    response_lengths: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Log-probs of the response tokens of right-padded ``prompt ‖ response`` rows.

    logits (B, L, V) from the model on input_ids (B, L); logits at position t predict token t+1 (the shift).
    Returns logprobs (B, T) and mask (B, T), where T is the longest response.
    """
    if (prompt_lengths < 1).any():
        raise ValueError(
            "every row needs a prompt of at least 1 token: the first response token is predicted from it"
        )
    token_lp = compute_token_logprobs(
        logits[:, :-1], input_ids[:, 1:], chunk_size=chunk_size, temperature=temperature
    )  # (B, L-1): entry t is log p(input_ids[:, t+1])
    assert isinstance(token_lp, Tensor)  # no entropy asked for
    # response token j is input position p+j, whose log-prob is token_lp[:, p+j-1]
    return gather_response(token_lp, prompt_lengths - 1, response_lengths)
