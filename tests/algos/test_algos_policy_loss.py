"""GSPO / GSPO-token / GRPO losses: hand-computed values, gradients, invariances."""

import math

import pytest
import torch

from cascade_rl.algos.policy_loss import (
    LOG_RATIO_CLAMP,
    POLICY_LOSSES,
    NonFiniteLogprobsError,
    compute_policy_loss,
)

E_HALF = math.exp(0.5)  # 1.6487212707
E_MINUS_HALF = math.exp(-0.5)  # 0.6065306597


def _one_seq(delta: float, advantage: float):
    """One sequence of 2 valid tokens (+1 padding) whose mean log-ratio is ``delta``."""
    old = torch.tensor([[-1.0, -2.0, 0.0]])
    logprobs = (old + delta).clone().requires_grad_(True)
    mask = torch.tensor([[1, 1, 0]])
    return logprobs, old, torch.tensor([advantage]), mask


def test_gspo_ratio_above_clip_with_positive_advantage_has_zero_gradient():
    # mean log-ratio 0.5 -> s = e^0.5 = 1.6487 > 1 + 0.2; A = +1
    # loss = max(-A*s, -A*clip(s)) = max(-1.6487, -1.2) = -1.2 (the constant clipped branch) -> gradient 0
    logprobs, old, adv, mask = _one_seq(0.5, 1.0)
    loss, metrics = compute_policy_loss("gspo", logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.2)
    assert torch.equal(logprobs.grad, torch.zeros_like(logprobs))
    assert metrics["ratio_mean"].item() == pytest.approx(E_HALF)
    assert metrics["clip_frac_high"].item() == 1.0 and metrics["clip_frac_low"].item() == 0.0


def test_gspo_ratio_above_clip_with_negative_advantage_is_unclipped():
    # s = e^0.5 = 1.6487, A = -1: loss = max(+1.6487, +1.2) = 1.6487 (unclipped)
    # d loss / d logprob_t = -A * s / |y| = 1.6487 / 2 = 0.8244 on each valid token, 0 on padding
    logprobs, old, adv, mask = _one_seq(0.5, -1.0)
    loss, metrics = compute_policy_loss("gspo", logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(E_HALF)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[E_HALF / 2, E_HALF / 2, 0.0]]))
    assert metrics["clip_frac_high"].item() == 0.0 and metrics["clip_frac_low"].item() == 0.0


def test_gspo_ratio_below_clip():
    # s = e^-0.5 = 0.6065 < 1 - 0.2.
    # A = -1: loss = max(0.6065, 0.8) = 0.8, clipped -> gradient 0, counted in clip_frac_low
    logprobs, old, adv, mask = _one_seq(-0.5, -1.0)
    loss, metrics = compute_policy_loss("gspo", logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.8)
    assert torch.equal(logprobs.grad, torch.zeros_like(logprobs))
    assert metrics["clip_frac_low"].item() == 1.0
    # A = +1: loss = max(-0.6065, -0.8) = -0.6065, unclipped; gradient = -s/2 = -0.3033 per valid token
    logprobs, old, adv, mask = _one_seq(-0.5, 1.0)
    loss, _ = compute_policy_loss("gspo", logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-E_MINUS_HALF)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-E_MINUS_HALF / 2, -E_MINUS_HALF / 2, 0.0]]))


def test_gspo_paper_default_clip_is_tight():
    # GSPO paper clip (3e-4, 4e-4): mean log-ratio 0.001 -> s = 1.0010005 > 1.0004, A = +1 -> loss = -1.0004
    logprobs, old, adv, mask = _one_seq(0.001, 1.0)
    loss, _ = compute_policy_loss("gspo", logprobs, old, adv, mask, clip_low=3e-4, clip_high=4e-4)
    assert loss.item() == pytest.approx(-1.0004, abs=1e-6)


def test_grpo_token_level_hand_example():
    # token log-ratios [0.5, -0.5], A = +1, clip 0.2:
    # token 1: max(-1.6487, -1.2) = -1.2 (clipped); token 2: max(-0.6065, -0.8) = -0.6065
    # loss = (-1.2 - 0.6065) / 2 tokens = -0.90327; grad: token 1 clipped -> 0, token 2 -> -r/2 = -0.30327
    old = torch.tensor([[-1.0, -2.0, 0.0]])
    logprobs = (old + torch.tensor([[0.5, -0.5, 0.0]])).requires_grad_(True)
    loss, metrics = compute_policy_loss(
        "grpo", logprobs, old, torch.tensor([1.0]), torch.tensor([[1, 1, 0]]), clip_low=0.2, clip_high=0.2
    )
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 - E_MINUS_HALF) / 2)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -E_MINUS_HALF / 2, 0.0]]))
    assert metrics["clip_frac_high"].item() == pytest.approx(0.5)  # 1 of 2 valid tokens
    assert metrics["ratio_min"].item() == pytest.approx(E_MINUS_HALF)
    assert metrics["ratio_max"].item() == pytest.approx(E_HALF)


def _ragged_batch(seed: int = 0, lengths=(1, 2, 4), pad_to: int = 5):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.zeros(b, pad_to, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    old = -torch.rand(b, pad_to, generator=g) * 3
    return old, mask


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_on_policy_gradient_is_length_normalised_policy_gradient(name):
    # logprobs == old_logprobs -> s_i = 1, no clipping:
    # ∇ loss = -1/B Σ_i A_i/|y_i| Σ_t ∇ log π(y_i,t)  ->  ∂loss/∂logprob[i,t] = -A_i / (|y_i| * B) on valid tokens
    # lengths (1, 2, 4), A = (1, -0.5, 2), B = 3: -1/3, +0.5/6 = 0.0833, -2/12 = -0.1667
    old, mask = _ragged_batch()
    logprobs = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 2.0])
    loss, metrics = compute_policy_loss(name, logprobs, old, adv, mask, clip_low=3e-4, clip_high=4e-4)
    loss.backward()
    expected = mask * torch.tensor([-1 / 3, 0.5 / 6, -2 / 12])[:, None]
    torch.testing.assert_close(logprobs.grad, expected)
    assert loss.item() == pytest.approx(-(1.0 - 0.5 + 2.0) / 3)  # -mean(A_i · 1)
    assert metrics["approx_kl"].item() == 0.0 and metrics["ratio_mean"].item() == 1.0


def test_gspo_on_length_one_sequences_equals_grpo():
    # |y_i| = 1: s_i = r_i,1 and GSPO's 1/B equals GRPO's 1/num_tokens, so loss and gradient coincide,
    # including sequences clipped above and below (log-ratios spread over ±0.6 with clip 0.2)
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(16, 1, generator=g)
    delta = (torch.rand(16, 1, generator=g) - 0.5) * 1.2
    adv = torch.randn(16, generator=g)
    mask = torch.ones(16, 1)
    results = {}
    for name in ("gspo", "gspo_token", "grpo"):
        lp = (old + delta).requires_grad_(True)
        loss, metrics = compute_policy_loss(name, lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
        loss.backward()
        results[name] = (loss.detach(), lp.grad, metrics)
    for name in ("gspo", "gspo_token"):
        torch.testing.assert_close(results[name][0], results["grpo"][0])
        torch.testing.assert_close(results[name][1], results["grpo"][1])
        for key in ("clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_min", "ratio_max", "approx_kl"):
            torch.testing.assert_close(results[name][2][key], results["grpo"][2][key])
    assert 0 < results["grpo"][2]["clip_frac_low"] + results["grpo"][2]["clip_frac_high"] < 1


def test_gspo_token_equals_gspo_for_sequence_advantages_off_policy():
    # s_i,t has the value of s_i and gradient s_i ∇log π(y_t); with A_i,t = A_i the per-sequence
    # token-mean of -A·s_i,t has gradient -A_i s_i/|y_i| Σ_t ∇log π = the GSPO gradient
    old, mask = _ragged_batch(seed=2, lengths=(3, 5, 2, 4))
    delta = torch.randn(old.shape, generator=torch.Generator().manual_seed(3)) * 0.3
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    grads, losses = [], []
    for name, a in (("gspo", adv), ("gspo_token", adv[:, None].expand_as(old))):
        lp = (old + delta).requires_grad_(True)
        loss, _ = compute_policy_loss(name, lp, old, a, mask, clip_low=0.1, clip_high=0.1)
        loss.backward()
        grads.append(lp.grad)
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_two_shards_with_global_counts_equal_one_batch(name):
    # shard A = rows 0..2 padded to T=5, shard B = rows 3..5 padded to T=7; pass the global counts
    # (6 sequences, Σ mask tokens) to both and sum the two gradients -> the one-batch gradient
    lengths = (1, 5, 3, 7, 2, 4)
    old, mask = _ragged_batch(seed=4, lengths=lengths, pad_to=7)
    delta = torch.randn(old.shape, generator=torch.Generator().manual_seed(5)) * 0.5
    adv = torch.tensor([1.0, -1.0, 0.3, -0.7, 2.0, 0.0])
    kw = {"clip_low": 0.2, "clip_high": 0.28}

    full = (old + delta).requires_grad_(True)
    loss_full, _ = compute_policy_loss(name, full, old, adv, mask, **kw)
    loss_full.backward()

    sharded = (old + delta).requires_grad_(True)
    counts = {"num_global_seqs": 6, "num_global_tokens": int(mask.sum())}
    loss_a, _ = compute_policy_loss(name, sharded[:3, :5], old[:3, :5], adv[:3], mask[:3, :5], **kw, **counts)
    counts_as_tensors = {k: torch.tensor(v) for k, v in counts.items()}  # e.g. after an all-reduce
    loss_b, _ = compute_policy_loss(name, sharded[3:], old[3:], adv[3:], mask[3:], **kw, **counts_as_tensors)
    (loss_a + loss_b).backward()
    torch.testing.assert_close(loss_a + loss_b, loss_full)
    torch.testing.assert_close(sharded.grad, full.grad)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_padding_never_changes_loss(name):
    # 3 more padded columns filled with NaN / ±inf / huge values: loss, gradient on real tokens and metrics unchanged
    old, mask = _ragged_batch(seed=6, lengths=(2, 3, 1))
    delta = torch.randn(old.shape, generator=torch.Generator().manual_seed(7)) * 0.4
    adv = torch.tensor([0.5, -1.5, 1.0])
    lp = (old + delta).requires_grad_(True)
    loss, metrics = compute_policy_loss(name, lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()

    junk = torch.tensor([[float("nan"), float("inf"), -1e30]] * 3)
    lp_pad = torch.cat([old + delta, junk], dim=1).requires_grad_(True)
    old_pad = torch.cat([old, -junk], dim=1)
    mask_pad = torch.cat([mask, torch.zeros(3, 3, dtype=mask.dtype)], dim=1)
    loss_pad, metrics_pad = compute_policy_loss(
        name, lp_pad, old_pad, adv, mask_pad, clip_low=0.2, clip_high=0.2
    )
    loss_pad.backward()
    torch.testing.assert_close(loss_pad, loss)
    torch.testing.assert_close(lp_pad.grad[:, :5], lp.grad)
    assert torch.equal(lp_pad.grad[:, 5:], torch.zeros(3, 3))
    for key, value in metrics.items():
        torch.testing.assert_close(metrics_pad[key], value)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_zero_length_response_contributes_zero(name):
    # row 1 has no valid token: loss and gradient equal those of the batch without it, no NaN
    old, mask = _ragged_batch(seed=8, lengths=(2, 0, 3))
    lp = (old + 0.1).requires_grad_(True)
    adv = torch.tensor([1.0, 5.0, -1.0])
    loss, _ = compute_policy_loss(name, lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    keep = torch.tensor([0, 2])
    lp2 = (old[keep] + 0.1).requires_grad_(True)
    loss2, _ = compute_policy_loss(name, lp2, old[keep], adv[keep], mask[keep], clip_low=0.2, clip_high=0.2)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    assert torch.equal(lp.grad[1], torch.zeros(5))
    torch.testing.assert_close(lp.grad[keep], lp2.grad)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_all_masked_batch_is_zero_and_differentiable(name):
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = compute_policy_loss(
        name, lp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), clip_low=0.2, clip_high=0.2
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros(2, 3))
    assert all(torch.isfinite(v) for v in metrics.values())


def test_extreme_log_ratio_is_clamped_before_exp():
    # mean log-ratio +1e4 would overflow exp; it is clamped to +20 -> ratio e^20 ≈ 4.85e8, A = -1 -> loss = e^20
    logprobs, old, adv, mask = _one_seq(1e4, -1.0)
    loss, metrics = compute_policy_loss("gspo", logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(LOG_RATIO_CLAMP), rel=1e-5)
    assert torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_approx_kl_is_k3_estimator():
    # token log-ratios lr = [0.5, -0.5] -> k3 = (e^lr - 1) - lr: 0.14872 and 0.10653, mean 0.12763
    old = torch.tensor([[-1.0, -2.0]])
    lp = old + torch.tensor([[0.5, -0.5]])
    _, metrics = compute_policy_loss(
        "grpo", lp, old, torch.ones(1), torch.ones(1, 2), clip_low=0.2, clip_high=0.2
    )
    expected = ((E_HALF - 1 - 0.5) + (E_MINUS_HALF - 1 + 0.5)) / 2
    assert metrics["approx_kl"].item() == pytest.approx(expected)


def test_unknown_name_and_bad_shapes_raise():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo'.*\['grpo', 'gspo', 'gspo_token'\]"):
        compute_policy_loss("ppo", lp, lp, torch.ones(2), lp, clip_low=0.2, clip_high=0.2)
    with pytest.raises(ValueError, match="advantages must be"):
        compute_policy_loss("gspo", lp, lp, torch.ones(3), lp, clip_low=0.2, clip_high=0.2)
    with pytest.raises(ValueError, match="clip_low"):
        compute_policy_loss("gspo", lp, lp, torch.ones(2), lp, clip_low=1.5, clip_high=0.2)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_zero_tensor_global_count_gives_zero_not_nan(name):
    # an all-masked shard on a rank whose global count (a 0-d tensor, e.g. all-reduced) is 0:
    # sum of losses 0 / count 0 was NaN; the tensor count is clamped to 1, so the loss is 0 / 1 = 0
    lp = torch.zeros(2, 3, requires_grad=True)
    zero = torch.tensor(0)
    loss, _ = compute_policy_loss(name, lp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), clip_low=0.2,
                                  clip_high=0.2, num_global_seqs=zero, num_global_tokens=zero)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("bad", [float("-inf"), float("nan")])
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_non_finite_old_logprobs_on_real_tokens_raise(name, bad):
    # one −inf old log-prob: ratio exp(lp − (−inf)) = inf; gspo_token's gradient was ~8e7. Named error instead.
    old = torch.tensor([[-1.0, bad, -1.0]])
    with pytest.raises(NonFiniteLogprobsError, match="gspo.overlap"):
        compute_policy_loss(name, torch.full((1, 3), -1.0), old, torch.ones(1), torch.ones(1, 3),
                            clip_low=0.2, clip_high=0.2)
    # the same value on a padded position (mask 0) is ignored: ratio 1, A = 1 -> loss −1 (gspo) / −2/2 (grpo)
    loss, _ = compute_policy_loss(name, torch.full((1, 3), -1.0), old, torch.ones(1), torch.tensor([[1.0, 0, 1]]),
                                  clip_low=0.2, clip_high=0.2)
    assert loss.item() == -1.0
