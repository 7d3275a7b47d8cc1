"""Starting Ray and the worker groups from the recipe: each group gets its own spec, never the recipe."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar, cast

from ..config import ModelConfig, RecipeConfig, recipe_with

S = TypeVar("S")
SPEC_SECTIONS = {"LearnerSpec": "learner", "RolloutSpec": "rollout"}  # the recipe section of each worker spec


def init_ray(cfg: RecipeConfig) -> None:
    """Join the job's cluster (``ray job submit`` sets RAY_ADDRESS) or start a local instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # tensors through collective_rpc
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # engine INFO lines drown the progress bars
    env_vars = {k: os.environ[k] for k in ("VLLM_ALLOW_INSECURE_SERIALIZATION", "VLLM_CPU_KVCACHE_SPACE",
                                           "TORCH_EXTENSIONS_DIR", "CASCADE_RL_CACHE", "HF_HUB_OFFLINE",
                                           "VLLM_LOGGING_LEVEL")
                if k in os.environ}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Ray refuses a driver runtime env that repeats a key the job's runtime env already sets.
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job_env = (job.get("runtime_env") or {}).get("env_vars") or {}
        env_vars = {k: v for k, v in env_vars.items() if k not in job_env}
        ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or max(os.cpu_count() or 2, 2),
                 object_store_memory=cfg.ray.object_store_mb * 1024 * 1024, include_dashboard=False,
                 runtime_env={"env_vars": env_vars})


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
    derived = {"seed": 0, "is_vlm": False, "total_steps": 1}
    derived = {k: v for k, v in derived.items() if k in {f.name for f in fields(cast(Any, spec_cls))}}
    derived.update({k: v for k, v in values.items() if k not in sources})
    cfg = recipe_with({sources[k]: v for k, v in values.items() if k in sources})
    return build_spec(spec_cls, cfg, model_path=str(model_path), **derived)


def build_groups(cfg: RecipeConfig, model_path: str) -> tuple[Any, Any, Any, bool]:
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
    rollout_spec = build_spec(RolloutSpec, cfg, model_path=model_path, seed=cfg.seed, is_vlm=vlm)
    learner_spec = build_spec(LearnerSpec, cfg, model_path=model_path, seed=cfg.seed, is_vlm=vlm, total_steps=1)
    placement = make_placement(r.placement, num_learner_ranks=lr.num_ranks, num_gpus_per_rank=lr.num_gpus_per_rank,
                               num_rollout_workers=r.num_workers, num_gpus_per_worker=r.num_gpus_per_worker)
    learners = LearnerGroup(learner_spec, lr.num_ranks, lr.num_gpus_per_rank, placement=placement.learner)
    rollout = RolloutGroup(rollout_spec, r.num_workers, r.num_gpus_per_worker, placement=placement.rollout)
    rewards = RewardGroup(list(cfg.reward.terms), timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers,
                          correct_threshold=cfg.reward.correct_threshold, correct_term=cfg.reward.correct_term)
    return learners, rollout, rewards, vlm  # placement groups go with the job
