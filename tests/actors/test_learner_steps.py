"""The shared micro-batch loop of ``LearnerWorker.train_*`` on an in-process fake engine (no DeepSpeed), and the
metric weighting each policy loss declares."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from cascade_rl.actors.learner import LearnerWorker
from cascade_rl.actors.learner_batches import MetricAccumulator

from cascade_rl.algos.packing import build_micro_batch
from cascade_rl.algos.policy_loss import POLICY_LOSSES, TOKEN_WEIGHTED_METRICS, compute_policy_loss
from cascade_rl.types import SequenceBatch


def test_every_policy_loss_declares_its_token_weighted_metrics() -> None:
    assert set(TOKEN_WEIGHTED_METRICS) == set(POLICY_LOSSES)
    lp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])  # (B, T)
    mask = torch.tensor([[True, True], [True, False]])
    for name in POLICY_LOSSES:
        _, metrics = compute_policy_loss(name, lp, lp + 0.1, torch.tensor([1.0, -1.0]), mask, clip_low=0.2,
                                         clip_high=0.2, num_global_seqs=2, num_global_tokens=3)
        assert TOKEN_WEIGHTED_METRICS[name] <= set(metrics), name


def _fake_worker(per_mb_logprobs: list[list[list[float]]]) -> Any:
    """A LearnerWorker stand-in: micro-batch k holds len(per_mb_logprobs[k]) sequences with those log-probs."""
    mbs, units = [], 0
    for rows in per_mb_logprobs:
        seqs = [([1], [2] * len(r)) for r in rows]
        mbs.append(build_micro_batch(seqs, packed=False, pad_token_id=0, units=list(range(units, units + len(rows)))))
        units += len(rows)
    fake = SimpleNamespace(device=torch.device("cpu"), engine=SimpleNamespace(module=torch.nn.Module()),
                           backward_calls=0, _to_device=lambda t: t)
    lps = iter([[torch.tensor(r, requires_grad=True) for r in rows] for rows in per_mb_logprobs])

    def forward(mb: Any, **_: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        out = next(lps)
        return out, [torch.zeros_like(t) for t in out], torch.zeros(())

    def backward(loss: torch.Tensor) -> None:
        fake.backward_calls += 1

    fake._training_micro_batches = lambda *a: mbs
    fake._forward = forward
    fake._backward = backward
    fake._oom_guard = lambda *a: __import__("contextlib").nullcontext()
    fake._finish_step = lambda acc, t0: acc.reduce(1, torch.device("cpu"))
    fake._train_step = lambda *a, **k: LearnerWorker._train_step(fake, *a, **k)
    return fake


@pytest.mark.parametrize("loss", ["gspo", "grpo"])
def test_policy_metrics_are_weighted_as_the_loss_declares(loss: str) -> None:
    # micro-batch 0: one sequence of 3 tokens, ratio e^0.3 per token; micro-batch 1: one 1-token sequence, ratio 1
    rows = [[[-1.0, -1.0, -1.0]], [[-2.0]]]
    fake = _fake_worker(rows)
    batch = SequenceBatch([[1], [1]], [[2, 2, 2], [2]], advantages=[1.0, -1.0],
                          old_logprobs=[[-1.3, -1.3, -1.3], [-2.0]])
    m = LearnerWorker.train_policy(fake, batch, loss=loss, clip_low=0.5, clip_high=10.0, num_global_seqs=2,
                                   num_global_tokens=4)
    r = float(torch.tensor(0.3).exp())
    # per sequence: (r + 1) / 2; per token: (3r + 1) / 4
    expected = (3 * r + 1) / 4 if "ratio_mean" in TOKEN_WEIGHTED_METRICS[loss] else (r + 1) / 2
    assert m["ratio_mean"] == pytest.approx(expected, rel=1e-5)
    assert m["num_tokens"] == 3 + 1 + 2  # prompt + response tokens of both micro-batches
    assert fake.backward_calls == 2


def test_accumulator_means_use_declared_weights() -> None:
    acc = MetricAccumulator()
    acc.add("x", 1.0, 3)
    acc.add("x", 5.0, 1)  # (1·3 + 5·1) / 4 = 2
    acc.add("x_max", 7.0, 1)
    assert acc.reduce(1, torch.device("cpu")) == {"x": 2.0, "x_max": 7.0}
