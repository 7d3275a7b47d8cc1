"""``learner.fused_kernels`` (``actors/fused_kernels.py``) on the CPU: which kernel set each setting picks, the
patched-module count, and the probe check that refuses a patch which moves log-probs by more than rounding.
The kernels themselves run on CUDA only: ``test_gpu_fused_kernels.py`` compares their log-probs and gradients."""

from __future__ import annotations

import pytest
import torch
from cascade_rl.actors import fused_kernels
from cascade_rl.actors.fused_kernels import (
    FUSED_CHECK_TOLERANCE,
    apply_fused_kernels,
    check_fused_kernels,
    choose_fused_kernels,
    instance_patched_modules,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("installed", [True, False])
def test_auto_takes_liger_only_on_cuda_with_the_package(monkeypatch: pytest.MonkeyPatch, installed: bool) -> None:
    monkeypatch.setattr(fused_kernels, "liger_installed", lambda: installed)
    assert choose_fused_kernels("auto", CPU) == "none"
    assert choose_fused_kernels("auto", CUDA) == ("liger" if installed else "none")
    assert choose_fused_kernels("none", CUDA) == "none"
    # a VLM only when asked: Liger would also patch its vision tower, which the text-only probe does not check
    assert choose_fused_kernels("auto", CUDA, is_vlm=True) == "none"
    if installed:
        assert choose_fused_kernels("liger", CUDA, is_vlm=True) == "liger"


def test_liger_asked_where_it_cannot_run_names_the_key_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_kernels, "liger_installed", lambda: True)
    with pytest.raises(ValueError, match=r"fused_kernels=liger: its Triton kernels run on CUDA GPUs only; set "
                                         r"learner.fused_kernels=auto or none"):
        choose_fused_kernels("liger", CPU)
    assert choose_fused_kernels("liger", CUDA) == "liger"
    monkeypatch.setattr(fused_kernels, "liger_installed", lambda: False)
    with pytest.raises(ValueError, match=r"not installed: pip install 'cascade-rl\[gpu\]'"):
        choose_fused_kernels("liger", CUDA)
    with pytest.raises(ValueError, match="use auto, liger or none"):
        choose_fused_kernels("triton", CUDA)


def test_patched_modules_are_those_with_a_forward_bound_on_the_instance() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    assert instance_patched_modules(model) == 0 and apply_fused_kernels(model, "none") == 0
    model[0].forward = lambda x: x  # what Liger's instance patching does to a norm or an MLP
    model[2].forward = lambda x: x
    assert instance_patched_modules(model) == 2


def test_probe_check_passes_rounding_and_refuses_more() -> None:
    before = torch.tensor([-1.00, -2.00, -3.00])
    # |Δ| = 0.01, 0.03, 0.00: the largest, 0.03, is within the 0.05 tolerance and is returned
    assert check_fused_kernels(before, torch.tensor([-1.01, -2.03, -3.00]), "liger", "qwen3") == pytest.approx(0.03)
    assert FUSED_CHECK_TOLERANCE == 0.05
    # |Δ| = 0.10 at the second token: refused, naming the model type and the key to turn it off
    with pytest.raises(RuntimeError, match=r"model type 'qwen3' by 0.1 .*set learner.fused_kernels=none"):
        check_fused_kernels(before, torch.tensor([-1.00, -2.10, -3.00]), "liger", "qwen3")
    with pytest.raises(RuntimeError, match="by nan"):
        check_fused_kernels(before, torch.tensor([-1.0, float("nan"), -3.0]), "liger", "qwen3")
