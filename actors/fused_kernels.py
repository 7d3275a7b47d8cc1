"""Fused kernels for the learner's decoder layers: Liger Kernel's Triton RMSNorm, rotary embedding and SwiGLU.

Why: profiled on an H100 (Qwen3-0.6B shape, packed varlen micro-batches, one GSPO update of 280k tokens), the
matmuls took 18 % of the GPU time and unfused elementwise kernels about half: each RMSNorm upcasts to float32 and
runs ~6 kernels forward and more backward, rotary builds ``rotate_half`` copies, SwiGLU runs silu and mul apart,
four norms per layer (input, post-attention, q and k). Liger replaces each with one Triton kernel forward and one
backward that compute the same float32 arithmetic (RMSNorm in the "llama" casting mode HF's Qwen/Llama norms use).

``learner.fused_kernels``:
- ``auto``: Liger where it can run (CUDA + ``liger_kernel`` and ``triton`` importable), else none;
- ``liger``: required (an error says why it cannot run);
- ``none``: the model's own modules.

Liger patches the live model (module ``forward``s bound on the instance, plus the modeling module's
``apply_rotary_pos_emb``), only for model types it knows; its fused linear cross-entropy is not used (the learner's
chunked log-prob path, ``algos/logprobs.py``, also returns entropies and handles temperature). After patching, the
learner checks that a probe's log-probs moved by no more than rounding (``FUSED_CHECK_TOLERANCE``) and refuses to
train otherwise, naming the key to turn it off.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

LIGER_OPS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
             "fused_linear_cross_entropy": False}
# max |Δ log-prob| of the probe, patched vs unpatched: bf16 rounding of a fused vs unfused norm stays near 1e-2
FUSED_CHECK_TOLERANCE = 5e-2


def liger_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("liger_kernel", "triton"))


def choose_fused_kernels(requested: str, device: torch.device, *, is_vlm: bool = False) -> str:
    """``liger`` or ``none`` for ``learner.fused_kernels`` = ``requested`` on ``device``. ``auto`` leaves VLMs alone:
    Liger also patches the vision tower, which the learner's text-only probe does not check."""
    if requested == "none" or (requested == "auto" and is_vlm):
        return "none"
    if requested not in ("auto", "liger"):
        raise ValueError(f"learner.fused_kernels={requested!r}: use auto, liger or none")
    runnable = device.type == "cuda" and liger_installed()
    if requested == "liger" and not runnable:
        why = ("its Triton kernels run on CUDA GPUs only" if device.type != "cuda"
               else "liger_kernel (or triton) is not installed: pip install 'cascade-rl[gpu]'")
        raise ValueError(f"learner.fused_kernels=liger: {why}; set learner.fused_kernels=auto or none")
    return "liger" if runnable else "none"


def instance_patched_modules(model: torch.nn.Module) -> int:
    """Modules whose ``forward`` is bound on the instance (what Liger's instance patching does)."""
    return sum("forward" in m.__dict__ for m in model.modules())


def apply_fused_kernels(model: torch.nn.Module, name: str) -> int:
    """Patch ``model`` in place with kernel set ``name``; returns how many modules now run a fused forward
    (0: none asked, or a model type Liger does not cover)."""
    if name == "none":
        return 0
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    before = instance_patched_modules(model)
    _apply_liger_kernel_to_instance(model=model, **LIGER_OPS)
    return instance_patched_modules(model) - before


def check_fused_kernels(before: torch.Tensor, after: torch.Tensor, name: str, model_type: str) -> float:
    """The probe's log-probs before and after patching: their max |Δ|, or an error if it exceeds rounding."""
    diff = float((before.float() - after.float()).abs().max()) if before.numel() else 0.0
    if not diff <= FUSED_CHECK_TOLERANCE:  # also catches NaN
        raise RuntimeError(f"learner.fused_kernels={name} changed the log-probs of model type {model_type!r} by "
                           f"{diff:.3g} (more than rounding, {FUSED_CHECK_TOLERANCE}); set "
                           "learner.fused_kernels=none")
    return diff


def fused_kernels_report(model: Any, name: str, patched: int, diff: float | None) -> dict[str, Any]:
    return {"fused_kernels": name if patched else "none", "fused_modules": patched, "fused_check_diff": diff,
            "model_type": getattr(model.config, "model_type", None)}
