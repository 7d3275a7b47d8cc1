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
