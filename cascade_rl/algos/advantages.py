"""Group-relative advantages (GRPO / GSPO).

For prompt ``g`` with ``G`` sampled responses and scalar rewards ``r_1..r_G``::

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)        scale_std=True  (GRPO, GSPO, InternVL3.5)
    A_i =  r_i - mean_g(r)                             scale_std=False (Dr. GRPO, Liu et al. 2025)

``std_g`` is the **sample (unbiased, Bessel-corrected) std**, i.e. ``torch.std(..., correction=1)``, as in
verl's ``compute_grpo_outcome_advantage`` and TRL's ``GRPOTrainer``. With ``G == 1`` the sample std is undefined;
we use 0 there (the advantage is 0 anyway because ``r_i == mean``). An all-equal group gets exactly 0: its
float mean may differ from the members by one rounding step (eight float32 0.9s: mean − r_i ≈ 6e-8, std ≈ 6e-8,
so (r_i − mean)/(std + eps) would be +0.056), so equal groups are set to 0 explicitly.

Dynamic filtering (DAPO, Yu et al. 2025): a group whose rewards are all equal (all right or all wrong) has zero
advantage for every member and only dilutes the batch. With ``filter_equal=True`` its members get ``mask == 0``
and the number of such groups is reported. "Equal" means exactly equal floats (``max == min``); rewards from
verifiers are discrete, and a tolerance would silently drop groups of a continuous reward model.

Rewards are laid out group-major: ``rewards[g * G + i]`` is response ``i`` of prompt ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GroupAdvantages:
    """Output of :func:`compute_group_advantages`."""

    advantages: Tensor  # (N*G,) float, 0 for filtered responses
    mask: Tensor  # (N*G,) float, 1 = keep, 0 = response belongs to a filtered group
    num_filtered_groups: int  # groups dropped by filter_equal (0 when filter_equal=False)
    num_equal_groups: int  # groups whose rewards were all equal (reported whether or not filtered)


def compute_group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale_std: bool = True,
    eps: float = 1e-6,
    filter_equal: bool = False,
) -> GroupAdvantages:
    """Normalise rewards within each group of ``group_size`` consecutive responses.

    Args:
        rewards: (N*G,) scalar reward per response, group-major.
        group_size: G, responses per prompt.
        scale_std: divide by the group's sample std (+eps); False keeps only the mean baseline.
        eps: added to the std so an all-equal group gives 0, not NaN.
        filter_equal: mask out (mask=0) every response of a group whose rewards are all equal.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (num_prompts * group_size,), got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}; "
            "every prompt must contribute exactly group_size responses"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN/Inf; map failed reward calls to a finite value before this")
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    grouped = rewards.detach().to(dtype).view(-1, group_size)  # (N, G)
    mean = grouped.mean(dim=1, keepdim=True)  # (N, 1)
    advantages = grouped - mean  # (N, G)
    if scale_std:
        if group_size > 1:
            std = grouped.std(dim=1, keepdim=True, correction=1)  # (N, 1)
        else:
            std = torch.zeros_like(mean)
        advantages = advantages / (std + eps)
    equal = grouped.amax(dim=1) == grouped.amin(dim=1)  # (N,)
    advantages = torch.where(equal[:, None], torch.zeros((), dtype=dtype), advantages)  # exact 0, not rounding
    num_equal = int(equal.sum().item())
    keep = torch.ones_like(grouped)  # (N, G)
    num_filtered = 0
    if filter_equal:
        keep = (~equal).to(dtype)[:, None].expand_as(grouped).clone()
        num_filtered = num_equal
        advantages = advantages * keep
    return GroupAdvantages(
        advantages=advantages.reshape(-1),
        mask=keep.reshape(-1),
        num_filtered_groups=num_filtered,
        num_equal_groups=num_equal,
    )
