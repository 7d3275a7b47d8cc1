"""MPO terms (DPO sigmoid, BCO pair with reward shift, SFT) on hand examples; δ state; sharding invariance."""

import math

import pytest
import torch

from cascade_rl.algos.mpo import MPO_LOSSES, RewardShift, compute_mpo_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(-x))  # = -log σ(x)


# one pair: π_c = -10, ref_c = -12  -> Δ_c = +2;  π_r = -15, ref_r = -14 -> Δ_r = -1;  β = 0.1
PAIR = {
    "policy_chosen_logps": torch.tensor([-10.0]),
    "policy_rejected_logps": torch.tensor([-15.0]),
    "ref_chosen_logps": torch.tensor([-12.0]),
    "ref_rejected_logps": torch.tensor([-14.0]),
}
DPO = softplus(0.1 * (2 - (-1)))  # -log σ(0.3) = 0.554355
# BCO: r_c = 0.1·2 = 0.2, r_r = 0.1·(-1) = -0.1; fresh δ after this batch = mean(0.2, -0.1) = 0.05
# loss = -log σ(0.2 - 0.05) - log σ(-(-0.1 - 0.05)) = 2·(-log σ(0.15)) = 1.241914
BCO = softplus(0.15) + softplus(0.15)
SFT = 10.0 / 4  # chosen NLL sum 10 over 4 tokens


def test_dpo_sigmoid_hand_value():
    loss, metrics = compute_mpo_loss([("sigmoid", 1.0)], **PAIR, beta=0.1, reward_shift=None)
    assert loss.item() == pytest.approx(0.5543552444685271)
    assert loss.item() == pytest.approx(DPO)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.2)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.1)
    assert metrics["rewards/margin"].item() == pytest.approx(0.3)
    assert metrics["rewards/accuracy"].item() == 1.0


def test_bco_pair_hand_value_uses_delta_updated_with_this_batch():
    shift = RewardShift()
    loss, metrics = compute_mpo_loss([("bco_pair", 1.0)], **PAIR, beta=0.1, reward_shift=shift)
    assert shift.mean == pytest.approx(0.05) and shift.count == 2
    assert metrics["delta"].item() == pytest.approx(0.05)
    assert loss.item() == pytest.approx(1.2419140955790642)
    assert loss.item() == pytest.approx(BCO)


def test_sft_is_length_normalised_nll_of_chosen():
    # default chosen_nll_sum = -policy_chosen_logps = 10; 4 tokens -> 2.5
    loss, _ = compute_mpo_loss(
        [("sft", 1.0)], **PAIR, beta=0.1, reward_shift=None, chosen_num_tokens=torch.tensor([4])
    )
    assert loss.item() == pytest.approx(SFT)
    # per-sequence normalisation: NLL sums (6, 6) over (2, 6) tokens -> mean(3, 1) = 2, not 12/8 = 1.5
    two = {k: torch.cat([v, v]) for k, v in PAIR.items()}
    loss, _ = compute_mpo_loss(
        [{"loss": "sft", "weight": 1.0}],
        **two,
        beta=0.1,
        reward_shift=None,
        chosen_nll_sum=torch.tensor([6.0, 6.0]),
        chosen_num_tokens=torch.tensor([2, 6]),
    )
    assert loss.item() == pytest.approx(2.0)


def test_weighted_total_is_weighted_sum_of_terms():
    # 0.8·0.554355 + 0.2·1.241914 + 1.0·2.5 = 3.191867
    terms = [
        {"loss": "sigmoid", "weight": 0.8},
        {"loss": "bco_pair", "weight": 0.2},
        {"loss": "sft", "weight": 1.0},
    ]
    loss, metrics = compute_mpo_loss(
        terms, **PAIR, beta=0.1, reward_shift=RewardShift(), chosen_num_tokens=torch.tensor([4])
    )
    assert loss.item() == pytest.approx(0.8 * DPO + 0.2 * BCO + 1.0 * SFT)
    assert loss.item() == pytest.approx(3.1918670146906347)
    assert metrics["loss_sigmoid"].item() == pytest.approx(DPO)
    assert metrics["loss_bco_pair"].item() == pytest.approx(BCO)
    assert metrics["loss_sft"].item() == pytest.approx(SFT)


def test_delta_is_running_mean_and_survives_save_restore():
    shift = RewardShift()
    shift.update(torch.tensor([0.2, -0.1]))  # mean 0.05 over 2 rewards
    assert shift.mean == pytest.approx(0.05)
    state = shift.state_dict()
    assert state == {"count": 2.0, "mean": pytest.approx(0.05)}
    shift.update(torch.tensor([0.3, 0.1]))  # (0.2 - 0.1 + 0.3 + 0.1) / 4 = 0.125
    assert shift.mean == pytest.approx(0.125) and shift.count == 4

    restored = RewardShift()
    restored.load_state_dict(state)
    restored.update(torch.tensor([0.3, 0.1]))
    assert restored.mean == pytest.approx(shift.mean) and restored.count == shift.count


def test_delta_all_reduce_sums_stats_across_ranks():
    # rank 0 sees rewards (1, 2), rank 1 sees (3, 4, 5); the injected all-reduce adds rank 1's [sum, count]
    other = torch.tensor([12.0, 3.0], dtype=torch.float64)
    in_place = RewardShift()
    in_place.update(torch.tensor([1.0, 2.0]), all_reduce_fn=lambda t: t.add_(other))  # like dist.all_reduce
    returning = RewardShift(all_reduce_fn=lambda t: t + other)
    returning.update(torch.tensor([1.0, 2.0]))
    assert in_place.mean == pytest.approx(3.0) and in_place.count == 5  # (1+2+3+4+5) / 5
    assert returning.mean == pytest.approx(3.0) and returning.count == 5


def _random_pairs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pol_c = -torch.rand(n, generator=g) * 20
    pol_r = -torch.rand(n, generator=g) * 20
    ref_c = pol_c + torch.randn(n, generator=g)
    ref_r = pol_r + torch.randn(n, generator=g)
    tokens = torch.randint(1, 30, (n,), generator=g)
    return pol_c, pol_r, ref_c, ref_r, tokens


def test_two_data_parallel_shards_equal_one_batch():
    # 6 pairs; each "rank" holds 3, passes num_global_pairs=6 and all-reduces δ statistics with the other
    # rank; the summed gradients equal the 6-pair gradient and both ranks end with the one-batch δ
    pol_c, pol_r, ref_c, ref_r, tokens = _random_pairs(6, seed=0)
    terms = [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]

    def run(idx, shift, n_global):
        pc = pol_c.clone().requires_grad_(True)
        pr = pol_r.clone().requires_grad_(True)
        loss, _ = compute_mpo_loss(
            terms, pc[idx], pr[idx], ref_c[idx], ref_r[idx], beta=0.1, reward_shift=shift,
            chosen_num_tokens=tokens[idx], num_global_pairs=n_global,
        )  # fmt: skip
        loss.backward()
        return loss.detach(), pc.grad, pr.grad

    full_shift = RewardShift(count=10, mean=0.3)
    loss_full, gc_full, gr_full = run(torch.arange(6), full_shift, None)

    def stats(idx):
        rewards = torch.cat([0.1 * (pol_c[idx] - ref_c[idx]), 0.1 * (pol_r[idx] - ref_r[idx])]).double()
        return torch.stack([rewards.sum(), torch.tensor(float(rewards.numel()), dtype=torch.float64)])

    a, b = torch.arange(3), torch.arange(3, 6)
    shift_a = RewardShift(count=10, mean=0.3, all_reduce_fn=lambda t: t + stats(b))
    shift_b = RewardShift(count=10, mean=0.3, all_reduce_fn=lambda t: t + stats(a))
    loss_a, gc_a, gr_a = run(a, shift_a, 6)
    loss_b, gc_b, gr_b = run(b, shift_b, 6)
    torch.testing.assert_close(loss_a + loss_b, loss_full)
    torch.testing.assert_close(gc_a + gc_b, gc_full)
    torch.testing.assert_close(gr_a + gr_b, gr_full)
    assert shift_a.mean == pytest.approx(full_shift.mean) == pytest.approx(shift_b.mean)


def test_two_micro_batches_equal_one_batch_for_sigmoid_and_sft():
    # gradient accumulation: two halves with num_global_pairs = 6, summed -> one batch.
    # (bco_pair's δ is updated per call, as in TRL, so it moves between micro-batches by design.)
    pol_c, pol_r, ref_c, ref_r, tokens = _random_pairs(6, seed=1)
    pc = pol_c.clone().requires_grad_(True)
    terms = [("sigmoid", 0.8), ("sft", 1.0)]
    full, _ = compute_mpo_loss(
        terms, pc, pol_r, ref_c, ref_r, beta=0.1, reward_shift=None, chosen_num_tokens=tokens
    )
    full.backward()
    g_full = pc.grad.clone()
    pc.grad = None
    for half in (slice(0, 2), slice(2, 6)):  # uneven micro-batches: 2 + 4 pairs
        part, _ = compute_mpo_loss(
            terms, pc[half], pol_r[half], ref_c[half], ref_r[half], beta=0.1, reward_shift=None,
            chosen_num_tokens=tokens[half], num_global_pairs=6,
        )  # fmt: skip
        part.backward()
    torch.testing.assert_close(pc.grad, g_full)


def test_errors_list_valid_names_and_requirements():
    with pytest.raises(ValueError, match=r"unknown MPO loss term 'ipo'.*\['bco_pair', 'sft', 'sigmoid'\]"):
        compute_mpo_loss([("ipo", 1.0)], **PAIR, beta=0.1, reward_shift=None)
    with pytest.raises(ValueError, match="reward_shift"):
        compute_mpo_loss([("bco_pair", 1.0)], **PAIR, beta=0.1, reward_shift=None)
    with pytest.raises(ValueError, match="chosen_num_tokens"):
        compute_mpo_loss([("sft", 1.0)], **PAIR, beta=0.1, reward_shift=None)
    with pytest.raises(ValueError, match="twice"):
        compute_mpo_loss([("sft", 1.0), ("sft", 1.0)], **PAIR, beta=0.1, reward_shift=None)
    assert sorted(MPO_LOSSES) == ["bco_pair", "sft", "sigmoid"]


def test_zero_global_pairs_is_an_error_not_inf():
    # DPO sum 0.554355 / 0 pairs was inf; an int/float count of 0 is refused, a 0-d tensor count is clamped to 1
    with pytest.raises(ValueError, match="num_global_pairs=0"):
        compute_mpo_loss([("sigmoid", 1.0)], **PAIR, num_global_pairs=0)
    loss, _ = compute_mpo_loss([("sigmoid", 1.0)], **PAIR, num_global_pairs=torch.tensor(0))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(DPO, rel=1e-6)


def test_bf16_inputs_are_upcast_to_float32():
    # bf16 holds -10.0625 vs -10.0 apart only by its ~3 digits; the loss is computed (and returned) in float32
    pair = {k: v.to(torch.bfloat16) for k, v in PAIR.items()}
    loss, metrics = compute_mpo_loss([("sigmoid", 1.0)], **pair, beta=0.1)
    assert loss.dtype == torch.float32 and metrics["rewards/margin"].dtype == torch.float32
    assert loss.item() == pytest.approx(DPO, rel=1e-6)  # -log σ(0.3) = 0.554355 exactly as in float32
