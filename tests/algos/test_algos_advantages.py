"""Group advantages: hand values, std convention, dynamic filtering."""

import math

import pytest
import torch

from cascade_rl.algos.advantages import compute_group_advantages


def test_hand_example_sample_std():
    # group 1: rewards (1, 0, 0, 1): mean 0.5, sample std sqrt(4·0.25 / 3) = 0.57735 -> A = ±0.5/0.57735 = ±0.86603
    # group 2: rewards (2, 0, 1, 1): mean 1,   sample std sqrt((1+1+0+0) / 3) = 0.81650 -> A = (1.2247, -1.2247, 0, 0)
    out = compute_group_advantages(torch.tensor([1.0, 0, 0, 1, 2, 0, 1, 1]), 4, eps=0.0)
    s1, s2 = math.sqrt(1 / 3), math.sqrt(2 / 3)
    expected = torch.tensor([0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 1 / s2, -1 / s2, 0.0, 0.0])
    torch.testing.assert_close(out.advantages, expected)
    assert out.num_filtered_groups == 0 and out.num_equal_groups == 0
    assert torch.equal(out.mask, torch.ones(8))


def test_no_std_scaling_keeps_mean_baseline_only():
    # (3, 1) -> mean 2 -> (1, -1); (5, 5, ...) unchanged by eps
    out = compute_group_advantages(torch.tensor([3.0, 1.0, 5.0, 5.0]), 2, scale_std=False)
    torch.testing.assert_close(out.advantages, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_equal_groups_give_zero_and_are_filtered_on_request():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # groups of 3: all-1, mixed, all-0
    plain = compute_group_advantages(rewards, 3)
    assert torch.isfinite(plain.advantages).all()
    assert torch.equal(plain.advantages[:3], torch.zeros(3)) and plain.num_equal_groups == 2
    assert plain.num_filtered_groups == 0
    filtered = compute_group_advantages(rewards, 3, filter_equal=True)
    assert filtered.num_filtered_groups == 2
    torch.testing.assert_close(filtered.mask, torch.tensor([0.0, 0, 0, 1, 1, 1, 0, 0, 0]))
    torch.testing.assert_close(filtered.advantages, plain.advantages)


def test_group_size_one_and_integer_rewards():
    out = compute_group_advantages(torch.tensor([3, 7]), 1)
    assert torch.equal(out.advantages, torch.zeros(2)) and out.advantages.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        compute_group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="NaN"):
        compute_group_advantages(torch.tensor([1.0, float("nan")]), 2)


@pytest.mark.parametrize(("value", "group_size"), [(0.9, 8), (5.3, 16)])
def test_all_equal_float32_group_gets_exactly_zero(value, group_size):
    # eight float32 0.9s: mean(0.9f × 8) rounds one ulp off 0.9f, so r_i − mean ≈ 6e-8 and the sample std ≈ 6e-8;
    # (r_i − mean) / (std + 1e-6) was +0.056 for every member (sixteen 5.3s: +0.32). Equal means A = 0 exactly.
    rewards = torch.full((group_size,), value, dtype=torch.float32)
    out = compute_group_advantages(rewards, group_size)
    assert torch.equal(out.advantages, torch.zeros(group_size))
    assert out.num_equal_groups == 1
    # a mixed group beside it is unaffected: (1, 0) -> mean 0.5, std sqrt(0.5) -> ±0.5/0.70711 = ±0.70711
    mixed = compute_group_advantages(torch.tensor([value] * group_size + [1.0, 0.0] * (group_size // 2)), group_size)
    assert torch.equal(mixed.advantages[:group_size], torch.zeros(group_size))
    assert mixed.advantages[group_size] > 0.5
