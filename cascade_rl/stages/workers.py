"""Starting Ray and the worker groups from the recipe: each group gets its own spec, never the recipe."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import RecipeConfig


def init_ray(cfg: RecipeConfig, verbose: bool = False) -> str:
    """Start or join Ray as ``ray.address`` says, and return where it went (``local`` or the address joined).

    ``ray.address``: unset = the job's cluster when ``ray job submit`` started this driver (its ``RAY_ADDRESS``),
    else a private local instance (a ``RAY_ADDRESS`` exported in a shell is not followed silently); ``local`` = always a private local instance, even beside a ``ray start`` head on this
    machine (never attached silently); ``auto`` = the head running on this machine; ``host:port`` / ``ray://…`` =
    that cluster. A local instance has token auth, no dashboard, and its agent on a free port (never the job agent
    port 52365 a ``ray start`` head needs); docs/multinode.md lists the ports it opens.
    """
    import ray

    from .console import quiet_libraries

    quiet_libraries()  # `import ray` gave its loggers console handlers: keep them to the run's log file
    if ray.is_initialized():
        return "attached"
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # tensors through collective_rpc
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # engine INFO lines drown the progress bars
    env_vars = {k: os.environ[k] for k in ("VLLM_ALLOW_INSECURE_SERIALIZATION", "VLLM_CPU_KVCACHE_SPACE",
                                           "TORCH_EXTENSIONS_DIR", "CASCADE_RL_CACHE", "HF_HUB_OFFLINE",
                                           "VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY")
                if k in os.environ}
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by `ray job submit` for the entrypoint
    address = cfg.ray.address or (os.environ.get("RAY_ADDRESS") if in_job else None) or "local"
    if not cfg.ray.address and not in_job and os.environ.get("RAY_ADDRESS"):
        print(f"Ray: RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set in this shell, but this run is not a Ray job: "
              "starting a private local instance (ray.address=auto or an address joins a cluster)", flush=True)
    if address != "local":
        # Ray refuses a driver runtime env that repeats a key the job's runtime env already sets.
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job_env = (job.get("runtime_env") or {}).get("env_vars") or {}
        env_vars = {k: v for k, v in env_vars.items() if k not in job_env}
        source = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
        print(f"Ray: joining {address} ({source}; ray.address=local starts a private instance instead)", flush=True)
        ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True)
        return address
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        print("Ray: RAY_AUTH_MODE=disabled ignored for a local instance: its ports listen on every interface, "
              "the token is what guards them (docs/multinode.md)", file=sys.stderr, flush=True)
        os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.pop("RAY_ADDRESS", None)  # `local` means local, whatever the shell exported
    with _free_agent_port():
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or max(os.cpu_count() or 2, 2),
                 object_store_memory=cfg.ray.object_store_mb * 1024 * 1024, include_dashboard=False,
                 dashboard_host="127.0.0.1", log_to_driver=verbose, configure_logging=verbose,
                 runtime_env={"env_vars": env_vars})
    if not verbose:
        logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
        print(f"Ray: local instance; worker logs in {logs} (-v streams them here)", flush=True)
    return "local"


@contextlib.contextmanager
def _free_agent_port() -> Iterator[None]:
    """Ray's ``ray.init`` gives a new node's dashboard agent the fixed port 52365, the one a ``ray start`` head
    serves jobs on; the first to bind it breaks the other. ``ray.init`` has no argument for it, so the node
    parameters it builds get a free port instead (a no-op where a Ray release renames them)."""
    from ray._private import parameter

    base = getattr(parameter, "RayParams", None)
    if base is None or "dashboard_agent_listen_port" not in inspect.signature(base).parameters:
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    class _Params(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", port)
            super().__init__(*args, **kwargs)

    parameter.RayParams = _Params
    try:
        yield
    finally:
        parameter.RayParams = base


def is_vlm_model(model_path: str) -> bool:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return "vision_config" in config


def build_groups(cfg: RecipeConfig, model_path: str):
    from ..actors.group import (
        LearnerGroup,
        LearnerSpec,
        RewardGroup,
        RolloutGroup,
        RolloutSpec,
        make_placement,
    )

    vlm = is_vlm_model(model_path)
    m, r, lr = cfg.model, cfg.rollout, cfg.learner
    rollout_spec = RolloutSpec(
        model_path=model_path, backend=r.backend, dtype=m.dtype, max_response_tokens=m.max_response_tokens,
        max_prompt_tokens=m.max_prompt_tokens, temperature=r.temperature, top_p=r.top_p, seed=cfg.seed,
        gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_gib=r.kv_cache_gib,
        enforce_eager=r.enforce_eager, is_vlm=vlm, enable_sleep=r.sleep_when_idle,
        behaviour_logprobs=r.behaviour_logprobs)
    learner_spec = LearnerSpec(
        model_path=model_path, dtype=m.dtype, zero_stage=lr.zero_stage, lr=lr.lr, weight_decay=lr.weight_decay,
        warmup_steps=lr.warmup_steps, lr_schedule=lr.lr_schedule, total_steps=1, grad_clip=lr.grad_clip,
        micro_batch_tokens=lr.micro_batch_tokens, gradient_checkpointing=lr.gradient_checkpointing,
        offload_optimizer=lr.offload_optimizer, seed=cfg.seed, is_vlm=vlm)
    placement = make_placement(r.placement, num_learner_ranks=lr.num_ranks, num_gpus_per_rank=lr.num_gpus_per_rank,
                               num_rollout_workers=r.num_workers, num_gpus_per_worker=r.num_gpus_per_worker)
    learners = LearnerGroup(learner_spec, lr.num_ranks, lr.num_gpus_per_rank, placement=placement.learner)
    rollout = RolloutGroup(rollout_spec, r.num_workers, r.num_gpus_per_worker, placement=placement.rollout)
    terms = [(t.name, t.weight, dict(t.kwargs)) for t in cfg.reward.terms]
    rewards = RewardGroup(terms, timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers,
                          correct_threshold=cfg.reward.correct_threshold)
    return learners, rollout, rewards, vlm  # placement groups go with the job
