"""Mixed Preference Optimization (MPO) loss: a weighted sum of preference, quality and generation terms.

MPO (Wang et al. 2024, "Enhancing the Reasoning Ability of MLLMs via Mixed Preference Optimization",
arXiv:2411.10442): ``L = w_p·L_p + w_q·L_q + w_g·L_g``; InternVL uses w = 0.8 / 0.2 / 1.0 and β = 0.1.
With per-sequence summed log-probs ``π_c, π_r`` (policy) and ``ref_c, ref_r`` (frozen reference)::

    sigmoid   (L_p, DPO, Rafailov et al. 2023)   −log σ( β·((π_c − ref_c) − (π_r − ref_r)) )
    bco_pair  (L_q, BCO, Jung et al. 2024)       r_c = β(π_c − ref_c),  r_r = β(π_r − ref_r)
                                                 −log σ(r_c − δ) − log σ(−(r_r − δ))
    sft       (L_g, LM loss)                     NLL of the chosen response / its number of tokens

``δ`` is the reward shift, a running mean of past rewards kept in :class:`RewardShift`. Order, as in TRL 0.21's
``DPOTrainer.dpo_loss`` (``bco_pair``): the current batch's rewards (r_c and r_r, detached) are folded into the
running mean *first*, then that updated mean is used as δ for this batch's loss. Every call with ``bco_pair``
updates δ, so with gradient accumulation δ moves between micro-batches exactly as in TRL.
Deviation from TRL's ``RunningMoments``: TRL feeds one scalar (the batch mean) per call and rank, so each call
weighs 1; here every reward weighs 1 (count-weighted mean, float64). The two agree whenever each call sees the
same number of pairs per rank, and ours stays exact when shards are uneven.

Averaging: each term's per-pair losses are summed and divided by ``num_global_pairs`` (pairs in the whole
optimizer step across ranks and micro-batches; default = local batch size), so sharding and gradient accumulation
give the one-batch gradient. Deviation: TRL's ``sft`` term is a token-mean over the micro-batch; here it is
length-normalised per chosen response and then averaged over pairs (the same kind of mean as the other terms,
and invariant to sharding).

Metrics (detached 0-d tensors, local mean over this call's pairs): ``rewards/chosen``, ``rewards/rejected``,
``rewards/margin``, ``rewards/accuracy`` (share with r_c > r_r), ``delta`` and ``loss_<term>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

AllReduceFn = Callable[[Tensor], Tensor | None]

MPO_DEFAULT_TERMS = (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0))
MPO_DEFAULT_BETA = 0.1


@dataclass
class RewardShift:
    """Running mean δ of implicit rewards for ``bco_pair``; save ``state_dict()`` with the checkpoint.

    ``all_reduce_fn`` sums a tensor across data-parallel ranks (in place or by returning the result), e.g.
    ``lambda t: torch.distributed.all_reduce(t)``; it is not part of the saved state.
    """

    count: float = 0.0
    mean: float = 0.0
    all_reduce_fn: AllReduceFn | None = field(default=None, repr=False, compare=False)

    @torch.no_grad()
    def update(self, rewards: Tensor, all_reduce_fn: AllReduceFn | None = None) -> float:
        """Fold ``rewards`` (any shape; global over ranks if an all-reduce is given) into δ; return new δ."""
        reduce = all_reduce_fn if all_reduce_fn is not None else self.all_reduce_fn
        flat = rewards.detach().reshape(-1).to(torch.float64)
        stats = torch.stack(
            [flat.sum(), torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device)]
        )
        if reduce is not None:
            out = reduce(stats)
            stats = out if isinstance(out, Tensor) else stats
        batch_sum, batch_count = (float(x) for x in stats.tolist())
        if batch_count > 0:
            total = self.count + batch_count
            self.mean = (self.mean * self.count + batch_sum) / total
            self.count = total
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"count": float(self.count), "mean": float(self.mean)}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.count = float(state["count"])
        self.mean = float(state["mean"])


@dataclass
class PreferenceBatch:
    """Per-pair inputs shared by the MPO terms; built by :func:`compute_mpo_loss`."""

    chosen_logratios: Tensor  # (B,) π_c − ref_c
    rejected_logratios: Tensor  # (B,) π_r − ref_r
    beta: float
    delta: float = 0.0
    chosen_nll_sum: Tensor | None = None  # (B,) −Σ_t log π(chosen_t)
    chosen_num_tokens: Tensor | None = None  # (B,)


def compute_dpo_sigmoid_losses(batch: PreferenceBatch) -> Tensor:
    """DPO: −log σ(β·(Δ_c − Δ_r)) per pair. (B,)"""
    return -F.logsigmoid(batch.beta * (batch.chosen_logratios - batch.rejected_logratios))


def compute_bco_pair_losses(batch: PreferenceBatch) -> Tensor:
    """BCO with reward shift δ: −log σ(r_c − δ) − log σ(−(r_r − δ)) per pair. (B,)"""
    chosen_rewards = batch.beta * batch.chosen_logratios  # (B,)
    rejected_rewards = batch.beta * batch.rejected_logratios  # (B,)
    return -F.logsigmoid(chosen_rewards - batch.delta) - F.logsigmoid(-(rejected_rewards - batch.delta))


def compute_sft_losses(batch: PreferenceBatch) -> Tensor:
    """Length-normalised NLL of the chosen response per pair; 0 for a zero-length response. (B,)"""
    if batch.chosen_num_tokens is None or batch.chosen_nll_sum is None:
        raise ValueError(
            "the 'sft' MPO term needs chosen_num_tokens (and chosen_nll_sum or policy_chosen_logps)"
        )
    num_tokens = batch.chosen_num_tokens.to(batch.chosen_nll_sum.dtype)
    return torch.where(num_tokens > 0, batch.chosen_nll_sum / num_tokens.clamp(min=1), 0.0)


MPO_LOSSES: dict[str, Callable[[PreferenceBatch], Tensor]] = {
    "sigmoid": compute_dpo_sigmoid_losses,
    "bco_pair": compute_bco_pair_losses,
    "sft": compute_sft_losses,
}


def parse_mpo_terms(
    terms: Sequence[tuple[str, float]] | Sequence[Mapping[str, Any]],
) -> list[tuple[str, float]]:
    """Normalise ``[("sigmoid", 0.8), ...]`` or ``[{"loss": "sigmoid", "weight": 0.8}, ...]``; validate names."""
    parsed: list[tuple[str, float]] = []
    for term in terms:
        if isinstance(term, Mapping):
            if set(term) != {"loss", "weight"}:
                raise ValueError(
                    f"an MPO term must have exactly the keys 'loss' and 'weight', got {dict(term)}"
                )
            name, weight = term["loss"], term["weight"]
        else:
            name, weight = term
        if name not in MPO_LOSSES:
            raise ValueError(f"unknown MPO loss term {name!r}; valid names: {sorted(MPO_LOSSES)}")
        if any(name == seen for seen, _ in parsed):
            raise ValueError(
                f"MPO loss term {name!r} listed twice; give each term once with its total weight"
            )
        parsed.append((str(name), float(weight)))
    if not parsed:
        raise ValueError(f"MPO needs at least one loss term; valid names: {sorted(MPO_LOSSES)}")
    return parsed


def compute_mpo_loss(
    terms: Sequence[tuple[str, float]] | Sequence[Mapping[str, Any]],
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = MPO_DEFAULT_BETA,
    reward_shift: RewardShift | None = None,
    chosen_nll_sum: Tensor | None = None,
    chosen_num_tokens: Tensor | None = None,
    num_global_pairs: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted MPO loss over B pairs of summed log-probs (all (B,)).

    ``chosen_nll_sum`` defaults to ``-policy_chosen_logps`` (the summed NLL of the chosen response);
    ``sft`` needs ``chosen_num_tokens``; ``bco_pair`` needs ``reward_shift`` (updated in place, then used).
    """
    parsed = parse_mpo_terms(terms)
    if num_global_pairs is not None and not isinstance(num_global_pairs, Tensor) and num_global_pairs <= 0:
        raise ValueError(f"num_global_pairs={num_global_pairs}: must be > 0 (pairs in the optimizer step over "
                         "all ranks and micro-batches); a loss divided by it would be inf")
    # bf16 sums of log-probs lose ~3 significant digits: the log-ratios and sigmoids are taken in float32
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    policy_chosen_logps, policy_rejected_logps = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.to(dtype), ref_rejected_logps.to(dtype)
    if chosen_nll_sum is not None:
        chosen_nll_sum = chosen_nll_sum.to(dtype)
    shapes = {
        tuple(t.shape)
        for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    }
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(f"MPO log-probs must all be (B,) summed per sequence; got shapes {sorted(shapes)}")
    names = [name for name, _ in parsed]
    if "bco_pair" in names and reward_shift is None:
        raise ValueError(
            "the 'bco_pair' MPO term needs reward_shift=RewardShift() (kept across steps and saved)"
        )
    batch = PreferenceBatch(
        chosen_logratios=policy_chosen_logps - ref_chosen_logps.detach(),  # (B,)
        rejected_logratios=policy_rejected_logps - ref_rejected_logps.detach(),  # (B,)
        beta=float(beta),
        chosen_nll_sum=-policy_chosen_logps if chosen_nll_sum is None else chosen_nll_sum,
        chosen_num_tokens=chosen_num_tokens,
    )
    chosen_rewards = (beta * batch.chosen_logratios).detach()  # (B,)
    rejected_rewards = (beta * batch.rejected_logratios).detach()  # (B,)
    if "bco_pair" in names:
        assert reward_shift is not None
        batch.delta = reward_shift.update(torch.cat([chosen_rewards, rejected_rewards]))
    num_pairs = policy_chosen_logps.numel()
    if num_global_pairs is None:
        denom: float | Tensor = float(max(num_pairs, 1))
    elif isinstance(num_global_pairs, Tensor):
        denom = num_global_pairs.to(dtype).clamp(min=1)  # 0 pairs everywhere: loss 0/1, not 0/0
    else:
        denom = float(num_global_pairs)
    loss = policy_chosen_logps.new_zeros(())
    metrics: dict[str, Tensor] = {}
    for name, weight in parsed:
        per_pair = MPO_LOSSES[name](batch)  # (B,)
        loss = loss + weight * per_pair.sum() / denom
        metrics[f"loss_{name}"] = per_pair.detach().sum() / max(num_pairs, 1)
    metrics.update(_reward_metrics(chosen_rewards, rejected_rewards))
    delta = reward_shift.mean if reward_shift is not None else 0.0
    metrics["delta"] = chosen_rewards.new_tensor(delta)
    return loss, metrics


def _reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    n = max(chosen_rewards.numel(), 1)
    return {
        "rewards/chosen": chosen_rewards.sum() / n,
        "rewards/rejected": rejected_rewards.sum() / n,
        "rewards/margin": (chosen_rewards - rejected_rewards).sum() / n,
        "rewards/accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).sum() / n,
    }
