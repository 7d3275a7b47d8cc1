"""Hypothesis property tests: shapes, masks, finiteness under extreme log-ratios, packing round trips."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_rl.algos.advantages import compute_group_advantages
from cascade_rl.algos.mpo import RewardShift, compute_mpo_loss
from cascade_rl.algos.packing import build_micro_batch, plan_micro_batches
from cascade_rl.algos.policy_loss import POLICY_LOSSES, compute_policy_loss

FAST = settings(max_examples=40, deadline=None)
extreme = st.sampled_from([0.0, 1e-6, -1e-6, 0.3, -0.3, 30.0, -30.0, 1e4, -1e4])


@st.composite
def policy_batches(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 6))
    log_ratio = draw(st.lists(extreme, min_size=b * t, max_size=b * t))
    mask = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    per_token = draw(st.booleans())
    n_adv = b * t if per_token else b
    adv = draw(st.lists(st.floats(-5, 5), min_size=n_adv, max_size=n_adv))
    old = -torch.linspace(0.1, 5.0, b * t).view(b, t)
    advantages = torch.tensor(adv).view(b, t) if per_token else torch.tensor(adv)
    return old + torch.tensor(log_ratio).view(b, t), old, advantages, torch.tensor(mask).view(b, t)


@FAST
@given(batch=policy_batches(), name=st.sampled_from(sorted(POLICY_LOSSES)), clip=st.sampled_from([3e-4, 0.2]))
def test_policy_losses_finite_and_masked(batch, name, clip):
    lp, old, adv, mask = batch
    lp = lp.requires_grad_(True)
    loss, metrics = compute_policy_loss(name, lp, old, adv, mask, clip_low=clip, clip_high=clip)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.isfinite(lp.grad).all()
    assert torch.equal(lp.grad[~mask], torch.zeros_like(lp.grad[~mask]))  # padding gets no gradient
    for key, value in metrics.items():
        assert value.dim() == 0 and torch.isfinite(value), key
        assert not value.requires_grad
    assert 0.0 <= metrics["clip_frac_low"] <= 1.0 and 0.0 <= metrics["clip_frac_high"] <= 1.0


@FAST
@given(
    rewards=st.lists(st.sampled_from([0.0, 0.5, 1.0, -3.0, 1e6]), min_size=1, max_size=24),
    group_size=st.integers(1, 6),
    scale_std=st.booleans(),
    filter_equal=st.booleans(),
)
def test_group_advantages_zero_mean_finite(rewards, group_size, scale_std, filter_equal):
    n = len(rewards) - len(rewards) % group_size
    if n == 0:
        return
    r = torch.tensor(rewards[:n], dtype=torch.float64)
    out = compute_group_advantages(r, group_size, scale_std=scale_std, filter_equal=filter_equal)
    assert out.advantages.shape == out.mask.shape == (n,)
    assert torch.isfinite(out.advantages).all()
    group_means = out.advantages.view(-1, group_size).mean(dim=1)
    assert torch.allclose(group_means, torch.zeros_like(group_means), atol=1e-6 * (1 + r.abs().max()))
    kept_groups = int(out.mask.view(-1, group_size)[:, 0].sum())
    assert kept_groups + out.num_filtered_groups == n // group_size


@FAST
@given(
    logps=st.lists(st.tuples(extreme, extreme, extreme, extreme), min_size=1, max_size=5),
    beta=st.sampled_from([0.01, 0.1, 1.0]),
)
def test_mpo_finite_for_extreme_logps(logps, beta):
    cols = [torch.tensor(c) for c in zip(*logps, strict=True)]
    pol_c = cols[0].clone().requires_grad_(True)
    tokens = torch.arange(len(logps))  # includes a zero-length chosen response
    loss, metrics = compute_mpo_loss(
        [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)], pol_c, cols[1], cols[2], cols[3],
        beta=beta, reward_shift=RewardShift(), chosen_num_tokens=tokens,
    )  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pol_c.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


@FAST
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=20),
    budget=st.integers(12, 40),
    min_batches=st.integers(1, 4),
)
def test_packing_respects_budget_and_round_trips(lengths, budget, min_batches):
    plan = plan_micro_batches(lengths, budget, min_num_micro_batches=min_batches)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= budget for b in plan)
    # each packed micro-batch holds its sequences back to back: splitting the row restores them
    seqs = [([1000 + i], list(range(100 * i, 100 * i + n))) for i, n in enumerate(lengths)]
    for b in plan:
        mb = build_micro_batch([seqs[i] for i in b], packed=True, pad_token_id=0, units=b)
        rows = torch.split(mb.input_ids[0], [1 + lengths[i] for i in b])
        assert [r.tolist() for r in rows] == [[*seqs[i][0], *seqs[i][1]] for i in b]
        assert mb.targets.tolist() == [t for i in b for t in seqs[i][1]]
