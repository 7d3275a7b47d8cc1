"""Starting Ray and the worker groups from the recipe: each group gets its own spec, never the recipe."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar, cast

from ..config import ModelConfig, RecipeConfig, recipe_with
from ..security import tighten_ray_session

S = TypeVar("S")
SPEC_SECTIONS = {"LearnerSpec": "learner", "RolloutSpec": "rollout"}  # the recipe section of each worker spec


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
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    tighten_ray_session(session)  # worker logs hold prompts and tracebacks: owner only
    if not verbose:
        print(f"Ray: local instance; worker logs in {session / 'logs'} (-v streams them here)", flush=True)
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

    setattr(parameter, "RayParams", _Params)  # noqa: B010 - a module attribute mypy sees as a class
    try:
        yield
    finally:
        setattr(parameter, "RayParams", base)  # noqa: B010


def is_vlm_model(model_path: str) -> bool:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return "vision_config" in config


def spec_sources(spec_cls: type) -> dict[str, str]:
    """Recipe key of each recipe-derived field of a worker spec.

    A spec field is the recipe field of the same name in ``model.*`` or in the worker's own section
    (``learner.*`` for ``LearnerSpec``, ``rollout.*`` for ``RolloutSpec``); its default, doc and checks live in
    ``cascade_rl/config.py`` only. Spec fields found in neither are derived by the driver (``build_spec``).
    """
    section = SPEC_SECTIONS[spec_cls.__name__]
    declared = {"model": {f.name for f in fields(ModelConfig)},
                section: {f.name for f in fields(type(getattr(RecipeConfig(), section)))}}
    out: dict[str, str] = {}
    for f in fields(cast(Any, spec_cls)):
        owners = [sec for sec, names in declared.items() if f.name in names]
        assert len(owners) <= 1, f"{spec_cls.__name__}.{f.name} is declared in {owners}: rename one"
        if owners:
            out[f.name] = f"{owners[0]}.{f.name}"
    return out


def build_spec(spec_cls: type[S], cfg: RecipeConfig, **derived: Any) -> S:
    """A worker spec: each recipe field copied by name (``spec_sources``), plus the ``derived`` values."""
    values = {name: getattr(getattr(cfg, key.split(".")[0]), name) for name, key in spec_sources(spec_cls).items()}
    return spec_cls(**values, **derived)


def spec_with(spec_cls: type[S], model_path: str, **values: Any) -> S:
    """A spec from the default recipe with ``values`` set by spec field name (tests and benchmarks); recipe fields
    are type-checked as in a recipe file, derived ones default to seed 0, a text model and one schedule step."""
    sources = spec_sources(spec_cls)
    derived = {"seed": 0, "is_vlm": False, "total_steps": 1, "shared_gpu_reserve_fraction": 0.0}
    derived = {k: v for k, v in derived.items() if k in {f.name for f in fields(cast(Any, spec_cls))}}
    derived.update({k: v for k, v in values.items() if k not in sources})
    cfg = recipe_with({sources[k]: v for k, v in values.items() if k in sources})
    return build_spec(spec_cls, cfg, model_path=str(model_path), **derived)


def build_groups(cfg: RecipeConfig, model_path: str, *, overlap_start: bool = True) -> tuple[Any, Any, Any, bool]:
    """Learner, rollout and reward groups from the recipe. ``overlap_start``: all groups start at once (each
    group's ``start_s`` says how long it took); where learner rank i and vLLM worker i share a GPU, the vLLM
    engines start once the learners hold their memory, since vLLM sizes its KV cache from the memory it sees free
    while profiling."""
    from ..actors.group import (
        LearnerGroup,
        LearnerSpec,
        RewardGroup,
        RolloutGroup,
        RolloutSpec,
        make_placement,
    )

    vlm = is_vlm_model(model_path)
    r, lr = cfg.rollout, cfg.learner
    shares_gpu = r.placement == "colocated" and r.sleep_when_idle  # a waking engine takes its share back
    rollout_spec = build_spec(RolloutSpec, cfg, model_path=model_path, seed=cfg.seed, is_vlm=vlm)
    learner_spec = build_spec(LearnerSpec, cfg, model_path=model_path, seed=cfg.seed, is_vlm=vlm, total_steps=1,
                              shared_gpu_reserve_fraction=r.gpu_memory_utilization if shares_gpu else 0.0)
    placement = make_placement(r.placement, num_learner_ranks=lr.num_ranks, num_gpus_per_rank=lr.num_gpus_per_rank,
                               num_rollout_workers=r.num_workers, num_gpus_per_worker=r.num_gpus_per_worker,
                               tensor_parallel_size=r.tensor_parallel_size)
    learners = LearnerGroup(learner_spec, lr.num_ranks, lr.num_gpus_per_rank, placement=placement.learner,
                            wait=not overlap_start)
    rollout = RolloutGroup(rollout_spec, r.num_workers, r.num_gpus_per_worker, placement=placement.rollout,
                           defer_engines=overlap_start and placement.rollout.shared_gpu)
    rewards = RewardGroup(list(cfg.reward.terms), timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers,
                          correct_threshold=cfg.reward.correct_threshold, correct_term=cfg.reward.correct_term)
    learners.wait_ready()
    rollout.start_engines()  # no-op unless deferred
    rollout.connect(learners)  # the weight-sync path (NCCL, CUDA IPC or object store), chosen once
    return learners, rollout, rewards, vlm  # placement groups go with the job
