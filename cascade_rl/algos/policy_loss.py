"""Clipped policy-gradient losses for the online stage: GSPO, GSPO-token and GRPO.

GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071)::

    s_i(θ)  = exp( 1/|y_i| Σ_t [log π_θ(y_i,t) − log π_old(y_i,t)] )          sequence ratio, response tokens only
    L_GSPO  = −1/N Σ_i min( s_i A_i , clip(s_i, 1−ε_low, 1+ε_high) A_i )

GSPO-token (same paper), per-token advantages with the sequence ratio's value::

    s_i,t   = sg[s_i] · π_θ(y_i,t) / sg[π_θ(y_i,t)]
    L       = −1/N Σ_i 1/|y_i| Σ_t min( s_i,t A_i,t , clip(s_i,t) A_i,t )

With A_i,t == A_i it equals GSPO in value and gradient.

GRPO / PPO token-level clipping (Shao et al. 2024; Schulman et al. 2017)::

    r_i,t   = π_θ(y_i,t) / π_old(y_i,t)
    L_GRPO  = −1/N_tok Σ_i,t min( r_i,t A_i,t , clip(r_i,t, 1−ε_low, 1+ε_high) A_i,t )

Normalisation: GSPO losses divide the sum of per-sequence losses by ``num_global_seqs``; GRPO divides the sum of
token losses by ``num_global_tokens`` ("token-mean", as DAPO / verl default). Pass the counts over the whole
optimizer step (all data-parallel ranks, all micro-batches) so sharding and gradient accumulation give the same
gradient as one big batch; the defaults (local counts) are only right for a single micro-batch on a single rank.
Deviation from "local B": the default sequence count is the number of sequences with at least one valid token,
so rows masked out entirely (dynamic filtering, empty responses) count nowhere, like masked tokens in GRPO.

Paper defaults: GSPO ε_low=3e-4, ε_high=4e-4; GRPO/PPO 0.2/0.2 (InternVL3.5's released verl scripts also ran GSPO
at 0.2/0.2). Numerical guards: the log-ratio (per sequence for GSPO, per token for GRPO) is clamped to
±``LOG_RATIO_CLAMP`` (20, so the ratio stays below e^20 ≈ 4.9e8) before ``exp``; padding is excluded with
``torch.where`` so NaN/Inf stored in padded positions never reach the loss; a zero-length response contributes 0.

Metrics (detached 0-d tensors, local to this call): ``clip_frac_low`` = share where the ratio is below 1−ε_low with
A<0, ``clip_frac_high`` = share above 1+ε_high with A>0 (where the clip zeroes the gradient, as TRL logs it);
``ratio_mean/min/max``; ``approx_kl`` = k3 estimator of KL(π_old‖π_θ), mean over valid tokens of
``r − 1 − log r`` (Schulman 2020). GSPO reports clip fractions and ratio stats over sequences; GSPO-token
clip fractions over tokens (advantages may differ per token) and ratio stats over sequences; GRPO all over tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
GSPO_CLIP_LOW = 3e-4
GSPO_CLIP_HIGH = 4e-4
PPO_CLIP = 0.2

Count = int | float | Tensor | None
LossOutput = tuple[Tensor, dict[str, Tensor]]


class NonFiniteLogprobsError(ValueError):
    """Old (behaviour) log-probs are −inf or NaN on a response token the loss uses (mask = 1)."""


def _prepare(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check shapes and clip range; return (logprobs, old_logprobs, advantages, mask_bool) in float32+."""
    if logprobs.dim() != 2 or logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            "logprobs, old_logprobs and mask must all be (B, T); got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(
            f"advantages must be (B,) or (B, T) = {tuple(logprobs.shape)}; got {tuple(advantages.shape)}"
        )
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(
            f"need 0 <= clip_low < 1 and clip_high >= 0; got clip_low={clip_low}, clip_high={clip_high}"
        )
    valid = mask.bool()
    bad = valid & ~torch.isfinite(old_logprobs)
    if bool(bad.any()):
        rows = sorted({int(r) for r in bad.nonzero()[:, 0].tolist()})
        raise NonFiniteLogprobsError(
            f"old_logprobs are -inf/NaN on {int(bad.sum())} response token(s) of row(s) {rows[:8]}: the ratio "
            "π_θ/π_old would be inf (a huge or NaN gradient). With gspo.overlap the old log-probs are vLLM's "
            "behaviour log-probs of the sampled tokens; a token the engine gave probability 0 (top_p/top_k "
            "filtering, a stale weight sync) lands here. Set gspo.overlap=false to take them from the learner")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    return logprobs.to(dtype), old_logprobs.to(dtype), advantages.detach().to(dtype), valid


def _token_log_ratio(logprobs: Tensor, old_logprobs: Tensor, valid: Tensor) -> Tensor:
    """log π_θ − log π_old on valid tokens, 0 on padding (never touching padded values)."""
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    return torch.where(valid, logprobs - old_logprobs.detach(), zero)  # (B, T)


def _approx_kl(token_log_ratio: Tensor, valid: Tensor) -> Tensor:
    """k3 estimator of KL(π_old‖π_θ) averaged over valid tokens."""
    lr = token_log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k3 = torch.expm1(lr) - lr  # (B, T), 0 on padding because lr == 0 there
    return k3.sum() / valid.sum().clamp(min=1)


def _clip_fractions(
    ratio: Tensor, adv: Tensor, valid: Tensor, clip_low: float, clip_high: float
) -> dict[str, Tensor]:
    """Share of ``valid`` entries where the clip zeroes the gradient, below and above separately."""
    ratio, adv = ratio.detach(), adv.detach()
    n = valid.sum().clamp(min=1)
    low = (ratio < 1.0 - clip_low) & (adv < 0) & valid
    high = (ratio > 1.0 + clip_high) & (adv > 0) & valid
    return {"clip_frac_low": low.sum() / n, "clip_frac_high": high.sum() / n}


def _ratio_stats(ratio: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Mean/min/max of the ratio over ``valid`` entries (0 when there are none)."""
    if not bool(valid.any()):
        zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
        return {"ratio_mean": zero, "ratio_min": zero, "ratio_max": zero}
    r = ratio.detach()[valid]
    return {"ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max()}


def _clipped_objective(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float) -> Tensor:
    """Pessimistic PPO surrogate as a loss: max(−A·r, −A·clip(r))."""
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))


def _denominator(count: Count, local_count: Tensor, dtype: torch.dtype) -> Tensor | float:
    """The global count if given (int, float or 0-d tensor), else the local one (at least 1). A tensor count is
    clamped to >= 1 (no host sync to check it): with a global count of 0 nothing is valid and the loss is 0/1 = 0,
    not 0/0 = NaN."""
    if count is None:
        return local_count.clamp(min=1).to(dtype)
    if isinstance(count, Tensor):
        return count.to(dtype).clamp(min=1)
    if count <= 0:
        raise ValueError(f"global count must be positive, got {count}")
    return float(count)


def _sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, valid: Tensor) -> tuple[Tensor, ...]:
    """Token log-ratios (B, T), the clamped mean log-ratio per sequence (B,) — log s_i of GSPO — the sequences
    with at least one response token (B,), and their lengths clamped to >= 1 (B,)."""
    lengths = valid.sum(dim=1)  # (B,)
    safe_len = lengths.clamp(min=1).to(logprobs.dtype)  # (B,)
    token_lr = _token_log_ratio(logprobs, old_logprobs, valid)  # (B, T)
    seq_lr = (token_lr.sum(dim=1) / safe_len).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B,)
    return token_lr, seq_lr, lengths > 0, safe_len


def compute_gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = GSPO_CLIP_LOW,
    clip_high: float = GSPO_CLIP_HIGH,
    num_global_seqs: Count = None,
    num_global_tokens: Count = None,
) -> LossOutput:
    """GSPO sequence-level clipped loss. (B, T) inputs; (B, T) advantages are reduced by their masked mean."""
    del num_global_tokens  # sequence-normalised
    logprobs, old_logprobs, advantages, valid = _prepare(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high
    )
    token_lr, seq_lr, seq_valid, safe_len = _sequence_log_ratio(logprobs, old_logprobs, valid)
    ratio = torch.exp(seq_lr)  # (B,)
    if advantages.dim() == 2:
        advantages = torch.where(valid, advantages, 0.0).sum(dim=1) / safe_len  # (B,)
    seq_loss = _clipped_objective(ratio, advantages, clip_low, clip_high)  # (B,)
    total = torch.where(seq_valid, seq_loss, 0.0).sum()
    loss = total / _denominator(num_global_seqs, seq_valid.sum(), logprobs.dtype)
    metrics = _clip_fractions(ratio, advantages, seq_valid, clip_low, clip_high) | _ratio_stats(
        ratio, seq_valid
    )
    metrics["approx_kl"] = _approx_kl(token_lr, valid)
    return loss, metrics


def compute_gspo_token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = GSPO_CLIP_LOW,
    clip_high: float = GSPO_CLIP_HIGH,
    num_global_seqs: Count = None,
    num_global_tokens: Count = None,
) -> LossOutput:
    """GSPO-token: s_i,t = sg[s_i]·π/sg[π], per-token advantages, length-normalised per sequence."""
    del num_global_tokens
    logprobs, old_logprobs, advantages, valid = _prepare(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high
    )
    token_lr, seq_lr, seq_valid, safe_len = _sequence_log_ratio(logprobs, old_logprobs, valid)
    seq_ratio = torch.exp(seq_lr).detach()  # (B,) sg[s_i]
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    lp = torch.where(valid, logprobs, zero)  # (B, T) keep padded garbage out of the graph
    token_ratio = seq_ratio[:, None] * torch.exp(lp - lp.detach())  # (B, T), value s_i, grad s_i ∇log π
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logprobs)  # (B, T)
    token_loss = torch.where(valid, _clipped_objective(token_ratio, adv, clip_low, clip_high), zero)  # (B, T)
    seq_loss = token_loss.sum(dim=1) / safe_len  # (B,)
    loss = seq_loss.sum() / _denominator(num_global_seqs, seq_valid.sum(), logprobs.dtype)
    metrics = _clip_fractions(token_ratio, adv, valid, clip_low, clip_high) | _ratio_stats(
        seq_ratio, seq_valid
    )
    metrics["approx_kl"] = _approx_kl(token_lr, valid)
    return loss, metrics


def compute_grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = PPO_CLIP,
    clip_high: float = PPO_CLIP,
    num_global_seqs: Count = None,
    num_global_tokens: Count = None,
) -> LossOutput:
    """GRPO / PPO token-level clipped loss, token-mean over ``num_global_tokens``."""
    del num_global_seqs
    logprobs, old_logprobs, advantages, valid = _prepare(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high
    )
    token_lr = _token_log_ratio(logprobs, old_logprobs, valid)  # (B, T)
    ratio = torch.exp(token_lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (B, T)
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logprobs)  # (B, T)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    token_loss = torch.where(valid, _clipped_objective(ratio, adv, clip_low, clip_high), zero)  # (B, T)
    loss = token_loss.sum() / _denominator(num_global_tokens, valid.sum(), logprobs.dtype)
    metrics = _clip_fractions(ratio, adv, valid, clip_low, clip_high) | _ratio_stats(ratio, valid)
    metrics["approx_kl"] = _approx_kl(token_lr, valid)
    return loss, metrics


PolicyLossFn = Callable[..., LossOutput]

POLICY_LOSSES: dict[str, PolicyLossFn] = {
    "gspo": compute_gspo_loss,
    "gspo_token": compute_gspo_token_loss,
    "grpo": compute_grpo_loss,
}

# How each loss's metrics are averaged over micro-batches and ranks: these names per response token (a token-level
# ratio gives one value per token), every other one per sequence (GSPO's sequence ratio: one value per sequence).
TOKEN_WEIGHTED_METRICS: dict[str, frozenset[str]] = {
    "gspo": frozenset({"approx_kl"}),
    "gspo_token": frozenset({"approx_kl", "clip_frac_low", "clip_frac_high"}),
    "grpo": frozenset({"approx_kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_min", "ratio_max"}),
}


def compute_policy_loss(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    num_global_seqs: Count = None,
    num_global_tokens: Count = None,
) -> LossOutput:
    """Dispatch to ``POLICY_LOSSES[name]``; returns (scalar loss, metrics of detached 0-d tensors)."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid names: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name](
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        num_global_seqs=num_global_seqs,
        num_global_tokens=num_global_tokens,
    )
