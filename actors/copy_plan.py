"""A weight load that is only copies, recorded once and replayed: the fast path of the persistent CUDA IPC sync.

vLLM's in-place reload (``initialize_layerwise_reload`` … ``finalize_layerwise_reload``) puts every layer on the
meta device, rebuilds it on the GPU as each layer's weights arrive, loads them, processes them, and copies the
result back into the tensors that CUDA graphs point at: Python per layer, a fresh allocation per layer, and every
byte copied twice. For a checkpoint whose loaders only copy source bytes into slices of parameters (unquantized
weights: q/k/v stacked into ``qkv_proj``, gate/up into ``gate_up_proj``, the rest one to one), the same load is a
fixed list of ``parameter slice ← source slice`` copies. The learner's persistent buffers and the engine's
parameters keep their addresses from sync to sync (the engine's sleep mode maps its weights back at the same
addresses), so that list can be recorded once and replayed as one ``torch._foreach_copy_``.

``record_copy_plan`` runs the loader under a ``TorchDispatchMode`` and keeps every ``copy_`` from a source buffer
into a parameter. It refuses the plan, saying which op, when anything else reads a source or writes a parameter
(a dtype cast, a transposing copy, a quantizer's processing), when a copy changes dtype or broadcasts, or when
fewer bytes were copied than the sources hold. The caller then checks the recorded load against vLLM's own reload
(``row_checksums`` of every tensor the model holds, derived ones included, must be equal after each) before
trusting it, and ``CopyPlan.valid`` refuses to replay once a parameter moved. Same result, bit for bit, as the
reload whose copies it recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
CONSTANT_WRITES = (aten.fill_.Scalar, aten.zero_.default)  # e.g. zeroing a padded vocabulary's extra rows


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass(eq=False)
class CopyPlan:
    """Copies ``dsts[i] ← srcs[i]`` (views of the parameters and of the source buffers), and where the parameters
    lived when they were recorded."""

    dsts: list[Tensor] = field(default_factory=list)
    srcs: list[Tensor] = field(default_factory=list)
    param_ptrs: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.srcs)

    def valid(self, params: list[Tensor]) -> bool:
        """The parameters are still where the copies write (a reload may have replaced them)."""
        return [p.data_ptr() for p in params] == self.param_ptrs

    def replay(self) -> None:
        torch._foreach_copy_(self.dsts, self.srcs)


class _Recorder(TorchDispatchMode):
    def __init__(self, sources: set[int], targets: set[int]) -> None:
        super().__init__()
        self.sources, self.targets = sources, targets
        self.plan = CopyPlan()
        self.refusal: str | None = None

    def _refuse(self, why: str) -> None:
        self.refusal = self.refusal or why

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.refusal is not None or func.is_view:
            return out
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.device.type != "meta"]
        reads_source = any(_storage(t) in self.sources for t in tensors)
        touches_param = any(_storage(t) in self.targets for t in tensors)
        if func is aten.copy_.default and _storage(args[0]) in self.targets and _storage(args[1]) in self.sources:
            dst, src = args[0], args[1]
            if dst.dtype != src.dtype or dst.shape != src.shape:
                self._refuse(f"a copy {src.dtype}{list(src.shape)} -> {dst.dtype}{list(dst.shape)} converts or "
                             "broadcasts")
            else:
                self.plan.dsts.append(dst)
                self.plan.srcs.append(src)
        elif func in CONSTANT_WRITES and not reads_source:
            pass  # the same constant every load: it stays written, replay need not repeat it
        elif reads_source or touches_param:
            self._refuse(f"{func} reads a source or touches a parameter other than by a plain copy")
        return out


def record_copy_plan(load: Callable[[], Any], sources: Iterable[Tensor],
                     params: list[Tensor]) -> tuple[CopyPlan | None, str]:
    """Run ``load`` (which reads ``sources`` into ``params``) and record it: ``(plan, "")``, or ``(None, why)`` when
    the load is more than copies. The load itself happens either way."""
    sources = list(sources)
    recorder = _Recorder({_storage(t) for t in sources}, {_storage(p) for p in params})
    with torch.no_grad(), recorder:
        load()
    if recorder.refusal is not None:
        return None, recorder.refusal
    plan = recorder.plan
    source_bytes = sum(t.numel() * t.element_size() for t in sources)
    if plan.nbytes < source_bytes:
        return None, f"the load copied {plan.nbytes} of the sources' {source_bytes} bytes"
    plan.param_ptrs = [p.data_ptr() for p in params]
    return plan, ""


def model_state_tensors(model: torch.nn.Module) -> list[Tensor]:
    """Every tensor a module tree holds: parameters, buffers, and tensors kept as plain attributes (where a
    layer's post-load processing leaves derived weights), each once."""
    seen: set[int] = set()
    out: list[Tensor] = []
    for module in model.modules():
        held = [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]
        for t in held:
            if isinstance(t, Tensor) and id(t) not in seen and t.device.type != "meta" and t.numel() > 0:
                seen.add(id(t))
                out.append(t)
    return out


def row_checksums(tensors: list[Tensor]) -> Tensor:
    """float32 sums of every row of every tensor (a 1-D tensor as it is): equal after two loads that put the same
    bytes in the same places, and changed by a swapped, transposed or missing block."""
    rows = [t.detach().reshape(t.shape[0], -1).sum(1, dtype=torch.float32) if t.dim() > 1
            else t.detach().to(torch.float32).reshape(-1) for t in tensors if t.numel() > 0]
    return torch.cat([r.cpu() for r in rows]) if rows else torch.zeros(0)
