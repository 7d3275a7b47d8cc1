"""Pure-torch RL math: group advantages, GSPO/GRPO policy losses, MPO, chunked log-probs, sequence packing.

Imports torch and the standard library only, so it is cheap to import and testable alone.
"""

from cascade_rl.algos.advantages import GroupAdvantages, compute_group_advantages
from cascade_rl.algos.logprobs import (
    compute_logprobs_from_hidden,
    compute_response_logprobs,
    compute_token_logprobs,
    gather_response,
)
from cascade_rl.algos.mpo import MPO_LOSSES, RewardShift, compute_mpo_loss, parse_mpo_terms
from cascade_rl.algos.packing import MicroBatch, build_micro_batch, pad_rows, plan_micro_batches, plan_units
from cascade_rl.algos.policy_loss import POLICY_LOSSES, compute_policy_loss

__all__ = [
    "MPO_LOSSES",
    "MicroBatch",
    "POLICY_LOSSES",
    "GroupAdvantages",
    "RewardShift",
    "build_micro_batch",
    "compute_group_advantages",
    "compute_logprobs_from_hidden",
    "compute_mpo_loss",
    "compute_policy_loss",
    "compute_response_logprobs",
    "compute_token_logprobs",
    "gather_response",
    "pad_rows",
    "plan_micro_batches",
    "plan_units",
    "parse_mpo_terms",
]
