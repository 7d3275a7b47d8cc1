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
from cascade_rl.algos.packing import (
    PackedMicroBatch,
    pack_micro_batch,
    pack_sequences,
    pack_values,
    pad_sequences,
    plan_micro_batches,
    unpack,
    unpack_to_original,
)
from cascade_rl.algos.policy_loss import POLICY_LOSSES, compute_policy_loss

__all__ = [
    "MPO_LOSSES",
    "POLICY_LOSSES",
    "GroupAdvantages",
    "PackedMicroBatch",
    "RewardShift",
    "compute_group_advantages",
    "compute_logprobs_from_hidden",
    "compute_mpo_loss",
    "compute_policy_loss",
    "compute_response_logprobs",
    "compute_token_logprobs",
    "gather_response",
    "pack_micro_batch",
    "pack_sequences",
    "pack_values",
    "pad_sequences",
    "plan_micro_batches",
    "parse_mpo_terms",
    "unpack",
    "unpack_to_original",
]
