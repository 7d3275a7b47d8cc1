"""The recorded weight load (``copy_plan.py``): which loads it keeps as copies, which it refuses, and that a replay
puts new source bytes exactly where the load put the old ones. The live vLLM check is in test_vllm_load.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from cascade_rl.actors.copy_plan import CopyPlan, record_copy_plan, row_checksums


def _stacked_model() -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    qkv = torch.nn.Parameter(torch.zeros(6, 2))  # rows 0-1: q, 2-3: k, 4-5: v (vLLM's QKVParallelLinear at TP=1)
    emb = torch.nn.Parameter(torch.zeros(5, 2))  # 4 vocabulary rows + 1 padding row (zeroed)
    return qkv, emb


def _load(qkv: torch.Tensor, emb: torch.Tensor, named: dict[str, torch.Tensor]) -> None:
    """A loader in vLLM's style: narrow the parameter, copy the checkpoint tensor in, zero the padding."""
    for i, name in enumerate(("q", "k", "v")):
        qkv.data.narrow(0, 2 * i, 2).copy_(named[name])
    emb.data[:4].copy_(named["emb"])
    emb.data[4:].fill_(0.0)


def _sources() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    flat = torch.arange(20, dtype=torch.float32)  # q = 0..3, k = 4..7, v = 8..11, emb = 12..19
    views = {"q": flat[0:4].view(2, 2), "k": flat[4:8].view(2, 2), "v": flat[8:12].view(2, 2),
             "emb": flat[12:20].view(4, 2)}
    return flat, views


def test_a_load_of_plain_copies_is_recorded_and_replays_new_bytes_in_place() -> None:
    qkv, emb = _stacked_model()
    flat, views = _sources()
    plan, why = record_copy_plan(lambda: _load(qkv, emb, views), [flat], [qkv, emb])
    assert why == "" and isinstance(plan, CopyPlan)
    assert len(plan.dsts) == 4 and plan.nbytes == 20 * 4  # q, k, v, emb: every source byte once; fill_ not kept
    assert qkv.flatten().tolist() == list(range(12))  # the load itself ran
    emb.data[4].fill_(0.0)

    flat.mul_(10)  # the learner writes new weights into the same buffer
    assert plan.valid([qkv, emb])
    plan.replay()
    assert qkv.flatten().tolist() == [10.0 * i for i in range(12)]
    assert emb.flatten().tolist() == [10.0 * i for i in range(12, 20)] + [0.0, 0.0]


def test_a_cast_a_transpose_copy_or_a_partial_load_is_refused_with_the_reason() -> None:
    qkv, emb = _stacked_model()
    flat, views = _sources()

    def casting() -> None:  # a bf16 engine loading float32 sources converts in the copy
        _load(qkv, emb, {**views, "q": views["q"].to(torch.float64)})

    plan, why = record_copy_plan(casting, [flat], [qkv, emb])
    assert plan is None and "_to_copy" in why

    def converting_copy() -> None:
        qkv.data.narrow(0, 0, 2).copy_(views["q"])
        emb.data.to(torch.float64)  # harmless read of a parameter, but not a copy: refused conservatively
    plan, why = record_copy_plan(converting_copy, [flat], [qkv, emb])
    assert plan is None and "touches a parameter" in why

    def transposing() -> None:  # a contiguous copy of a transposed source is a new tensor: replay would miss it
        qkv.data.narrow(0, 0, 2).copy_(views["q"].t().contiguous())
    plan, why = record_copy_plan(transposing, [flat], [qkv, emb])
    assert plan is None and "clone" in why

    plan, why = record_copy_plan(lambda: qkv.data.narrow(0, 0, 2).copy_(views["q"]), [flat], [qkv, emb])
    assert plan is None and why == "the load copied 16 of the sources' 80 bytes"


def test_a_moved_parameter_invalidates_the_plan() -> None:
    qkv, emb = _stacked_model()
    flat, views = _sources()
    plan, _ = record_copy_plan(lambda: _load(qkv, emb, views), [flat], [qkv, emb])
    assert plan is not None and plan.valid([qkv, emb])
    qkv.data = torch.zeros(6, 2)  # a reload that swapped the storage: the recorded views write elsewhere
    assert not plan.valid([qkv, emb])


def test_row_checksums_see_a_swapped_block_that_whole_sums_miss() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    swapped = torch.tensor([[3.0, 4.0], [1.0, 2.0]])
    bias = torch.tensor([0.5, -0.5])
    # rows sum to 3 and 7 (then the bias as it is); a swap of the rows gives 7, 3: the same total, another vector
    assert row_checksums([a, bias]).tolist() == [3.0, 7.0, 0.5, -0.5]
    assert row_checksums([swapped, bias]).tolist() == [7.0, 3.0, 0.5, -0.5]


# ------------------------------------------------------------------------------------------------ the sync's use


class _Model(torch.nn.Module):
    """vLLM-like: q/k/v stacked into one parameter; ``load_weights`` takes checkpoint-named tensors."""

    def __init__(self, transform: bool = False) -> None:
        super().__init__()
        self.qkv, self.emb = _stacked_model()
        self.transform = transform  # a quantizer-like reload: the weights end up other than the copies put them

    def load_weights(self, weights: Any) -> None:
        _load(self.qkv, self.emb, dict(weights))


def _worker(model: _Model, flat: torch.Tensor, views: dict[str, torch.Tensor]) -> Any:
    config = SimpleNamespace(quantization=None, hf_config=SimpleNamespace(tie_word_embeddings=False),
                             hf_text_config=None)
    return SimpleNamespace(model_runner=SimpleNamespace(model=model), vllm_config=SimpleNamespace(model_config=config),
                           _cascade_sources=[flat], _cascade_persistent=list(views.items()), _cascade_plan=None)


def test_the_sync_records_at_the_first_load_replays_after_and_reloads_when_unsure(monkeypatch: Any) -> None:
    """``load_persistent_views`` with vLLM's reload stood in for by the same loader (plus, for one model, a
    post-load step that changes the weights): recorded, replayed, refused for a moved parameter or a reload
    whose result the copies do not reproduce."""
    from cascade_rl.actors import vllm_load
    from vllm.platforms import current_platform

    def reload(model: _Model, config: Any, weights: Any) -> None:  # vLLM's in-place reload
        model.load_weights(weights)
        if model.transform:
            model.qkv.data.mul_(2.0)

    monkeypatch.setattr(vllm_load, "_reload_in_place", reload)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    model = _Model()
    flat, views = _sources()
    worker = _worker(model, flat, views)
    assert vllm_load.load_persistent_views(worker) == "recorded"
    flat.add_(100)  # the learner's next weights
    assert vllm_load.load_persistent_views(worker) == "replayed"
    assert model.qkv.flatten().tolist() == [100.0 + i for i in range(12)]

    model.qkv.data = torch.zeros(6, 2)  # moved: the plan is dropped for good, vLLM's reload from then on
    how = vllm_load.load_persistent_views(worker)
    assert how == "reloaded: the engine's parameters moved since the copies were recorded"
    assert model.qkv.flatten().tolist() == [100.0 + i for i in range(12)]
    assert vllm_load.load_persistent_views(worker) == how

    model = _Model(transform=True)
    worker = _worker(model, flat, views)
    assert vllm_load.load_persistent_views(worker) == "reloaded: the recorded copies leave the weights unlike " \
                                                        "vLLM's reload"
    assert model.qkv.flatten().tolist() == [2 * (100.0 + i) for i in range(12)]  # vLLM's result stands

    monkeypatch.setattr(current_platform, "is_cuda", lambda: False)
    worker = _worker(_Model(), flat, views)
    assert vllm_load.load_persistent_views(worker).startswith("reloaded: copies are replayed only on CUDA")
