"""GPU: Liger's fused RMSNorm / RoPE / SwiGLU (``learner.fused_kernels=liger``) give the tiny Qwen3's log-probs and
gradients of the model's own modules, in float32 (tight) and bfloat16 (rounding), and a learner on CUDA patches
them in by default (``auto``) after its probe check. Run with ``pytest -m gpu``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


def _logprobs_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
    lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
    lp.sum().backward()
    return lp.detach(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype,lp_tol,grad_tol", [(torch.float32, 1e-4, 1e-3), (torch.bfloat16, 5e-2, 5e-2)])
def test_liger_matches_the_models_own_modules(tiny_lm: Path, dtype: torch.dtype, lp_tol: float,
                                             grad_tol: float) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("liger_kernel")
    from cascade_rl.actors.fused_kernels import apply_fused_kernels
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=dtype, attn_implementation="sdpa").cuda()
    ids = torch.randint(10, model.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(0)).cuda()
    lp0, g0 = _logprobs_and_grads(model, ids)
    # every norm (2 per layer + q/k norms + the final one) and every MLP runs a fused forward now
    layers = model.config.num_hidden_layers
    assert apply_fused_kernels(model, "liger") == 4 * layers + 1 + layers
    lp1, g1 = _logprobs_and_grads(model, ids)
    assert (lp0 - lp1).abs().max().item() <= lp_tol
    for name, g in g0.items():
        rel = ((g - g1[name]).norm() / g.norm().clamp(min=1e-12)).item()
        assert rel <= grad_tol, f"{name}: relative gradient difference {rel:.3g}"


def test_a_cuda_learner_patches_liger_in_by_default(tiny_lm: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("liger_kernel")
    from test_learner import make_worker

    w = make_worker(str(tiny_lm), dtype="bfloat16", attn_implementation="auto")
    assert w.fused["fused_kernels"] == "liger" and w.fused["fused_modules"] > 0
    assert w.fused["fused_check_diff"] is not None and w.fused["fused_check_diff"] <= 5e-2
