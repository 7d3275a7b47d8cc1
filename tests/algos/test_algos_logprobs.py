"""Chunked log-probs / entropy equal the naive full-vocab computation (values and gradients)."""

import pytest
import torch

from cascade_rl.algos.logprobs import (
    compute_logprobs_from_hidden,
    compute_response_logprobs,
    compute_token_logprobs,
    gather_response,
)


def naive(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    logp = (logits.float() / temperature).log_softmax(-1)  # (..., V) the float32 tensor we avoid
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.where(labels >= 0, picked, 0.0), entropy


def _inputs(seed=0, shape=(3, 7), vocab=50):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[0, -2:] = -100  # ignored positions
    return logits, labels


@pytest.mark.parametrize("chunk_size", [1, 4, 21, 1000])  # 21 tokens: chunks of 4 leave a ragged tail
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_match_naive(chunk_size, temperature):
    logits, labels = _inputs()
    w_lp, w_h = torch.randn(3, 7), torch.randn(3, 7)  # random upstream gradients for both outputs

    a = logits.clone().requires_grad_(True)
    lp, ent = compute_token_logprobs(
        a, labels, chunk_size=chunk_size, temperature=temperature, return_entropy=True
    )
    ((lp * w_lp).sum() + (ent * w_h).sum()).backward()

    b = logits.clone().requires_grad_(True)
    lp_ref, ent_ref = naive(b, labels, temperature)
    ((lp_ref * w_lp).sum() + (ent_ref * w_h).sum()).backward()

    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)
    assert torch.equal(lp[0, -2:], torch.zeros(2))  # ignored labels


def test_logprob_only_grad_and_input_untouched():
    logits, labels = _inputs(seed=1)
    before = logits.clone()
    a = logits.requires_grad_(True)
    lp = compute_token_logprobs(a, labels, chunk_size=5)
    lp.sum().backward()
    b = before.clone().requires_grad_(True)
    naive(b, labels)[0].sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)
    assert torch.equal(logits.detach(), before)  # float32 input is copied per chunk, never modified in place


def test_bf16_logits_upcast_per_chunk():
    logits, labels = _inputs(seed=2)
    bf16 = logits.bfloat16().requires_grad_(True)
    lp = compute_token_logprobs(bf16, labels, chunk_size=4)
    lp.sum().backward()
    assert lp.dtype == torch.float32 and bf16.grad.dtype == torch.bfloat16
    ref = bf16.detach().float().requires_grad_(True)
    ref_lp = naive(ref, labels)[0]
    ref_lp.sum().backward()
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(bf16.grad.float(), ref.grad, atol=1e-2, rtol=1e-2)  # grad rounded to bf16


def test_bf16_gradient_has_the_bits_of_the_float32_gradient_cast_once():
    """The log-prob-only backward rounds −p·g straight into bf16 and computes the label column g·(1 − p_y) apart:
    bit for bit what the float32 gradient, label term added, then cast to bf16, holds (one rounding, none more).
    Rows: a confident label (p_y near 1, where a bf16 subtraction would cancel), an ignored label (-100: zero
    gradient in the row), random rows."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 40, generator=g) * 3
    labels = torch.randint(0, 40, (6,), generator=g)
    logits[0] = 0.0
    logits[0, labels[0]] = 10.5  # p_y = 1 / (1 + 39·e^-10.5) = 0.998930: 1 - p_y = 0.00107
    labels[1] = -100
    bf16 = logits.bfloat16().requires_grad_(True)
    up = torch.tensor([1.0, 2.0, -0.5, 0.25, 3.0, -1.0])  # upstream d loss / d log p per token
    (compute_token_logprobs(bf16, labels, chunk_size=4) * up).sum().backward()

    p = torch.softmax(bf16.detach().float(), dim=-1)  # the float32 reference, written out
    coef = torch.where(labels >= 0, up, 0.0)
    want = p * -coef[:, None]
    want[torch.arange(6), labels.clamp(min=0)] += coef
    assert bf16.grad.dtype == torch.bfloat16
    assert torch.equal(bf16.grad, want.to(torch.bfloat16))
    assert torch.equal(bf16.grad[1], torch.zeros(40, dtype=torch.bfloat16))
    # 1·(1 − p_y) = 0.00107 (bf16: 0.001068); 1 − p_y taken in bf16 would give 0 (p_y rounds to 1.0)
    assert abs(bf16.grad[0, labels[0]].item() - 0.00107) < 1e-5


def test_gradcheck_float64():
    logits, labels = _inputs(seed=3, shape=(2, 3), vocab=6)
    x = logits.double().requires_grad_(True)
    fn = lambda z: compute_token_logprobs(z, labels, chunk_size=2, temperature=0.9, return_entropy=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_from_hidden_matches_naive(chunk_size):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 16, generator=g)
    weight = torch.randn(40, 16, generator=g) * 0.3
    labels = torch.randint(0, 40, (2, 5), generator=g)
    labels[1, 0] = -100
    w_lp, w_h = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)

    h1, W1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = compute_logprobs_from_hidden(h1, W1, labels, chunk_size=chunk_size, return_entropy=True)
    ((lp * w_lp).sum() + (ent * w_h).sum()).backward()

    h2, W2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp_ref, ent_ref = naive(h2 @ W2.T, labels)
    ((lp_ref * w_lp).sum() + (ent_ref * w_h).sum()).backward()

    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(W1.grad, W2.grad, atol=1e-5, rtol=0)


def test_from_hidden_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, -100, 2])
    fn = lambda h, w: compute_logprobs_from_hidden(h, w, labels, chunk_size=3, return_entropy=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight), fast_mode=True)


def test_response_logprobs_shift_and_window():
    # row 0: prompt 2 tokens + response 3; row 1: prompt 3 + response 2; L = 6, right padded
    # response token j of row b is input_ids[b, p_b + j], predicted by logits[b, p_b + j - 1]
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 6, 11, generator=g)
    input_ids = torch.randint(0, 11, (2, 6), generator=g)
    prompt, response = torch.tensor([2, 3]), torch.tensor([3, 2])
    lp, mask = compute_response_logprobs(logits, input_ids, prompt, response, chunk_size=4)
    full = logits.log_softmax(-1)
    expected = torch.zeros(2, 3)
    for b in range(2):
        for j in range(int(response[b])):
            pos = int(prompt[b]) + j
            expected[b, j] = full[b, pos - 1, input_ids[b, pos]]
    torch.testing.assert_close(lp, expected)
    assert mask.tolist() == [[True, True, True], [True, True, False]]


def test_gather_response_rejects_overflow():
    with pytest.raises(ValueError, match="exceed"):
        gather_response(torch.zeros(1, 4), torch.tensor([3]), torch.tensor([2]))


def test_empty_input():
    lp = compute_token_logprobs(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_naive():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(4, 300, 151_936, device="cuda", generator=g).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 151_936, (4, 300), device="cuda", generator=g)
    lp = compute_token_logprobs(logits, labels, chunk_size=256)
    lp.sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    ref_lp = naive(ref, labels)[0]
    ref_lp.sum().backward()
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-3, rtol=1e-2)
