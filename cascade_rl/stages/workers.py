"""Starting Ray and the worker groups from the recipe: each group gets its own spec, never the recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import RecipeConfig


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


def build_groups(cfg: RecipeConfig, model_path: str, *, overlap_start: bool = True, ignore_eos: bool = False):
    """Learner, rollout and reward groups from the recipe. ``overlap_start``: all groups start at once (each
    group's ``start_s`` says how long it took); where learner rank i and vLLM worker i share a GPU, the vLLM
    engines start once the learners hold their memory, since vLLM sizes its KV cache from the memory it sees free
    while profiling. ``ignore_eos`` (benchmarks only): every response is ``model.max_response_tokens`` long."""
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
        behaviour_logprobs=r.behaviour_logprobs, ignore_eos=ignore_eos)
    learner_spec = LearnerSpec(
        model_path=model_path, dtype=m.dtype, zero_stage=lr.zero_stage, lr=lr.lr, weight_decay=lr.weight_decay,
        warmup_steps=lr.warmup_steps, lr_schedule=lr.lr_schedule, total_steps=1, grad_clip=lr.grad_clip,
        micro_batch_tokens=lr.micro_batch_tokens, gradient_checkpointing=lr.gradient_checkpointing,
        offload_optimizer=lr.offload_optimizer, seed=cfg.seed, is_vlm=vlm, attn_implementation=lr.attention,
        auto_micro_batch_tokens=lr.auto_micro_batch_tokens,
        shared_gpu_reserve_fraction=r.gpu_memory_utilization if r.placement == "colocated" and r.sleep_when_idle
        else 0.0)
    placement = make_placement(r.placement, num_learner_ranks=lr.num_ranks, num_gpus_per_rank=lr.num_gpus_per_rank,
                               num_rollout_workers=r.num_workers, num_gpus_per_worker=r.num_gpus_per_worker)
    learners = LearnerGroup(learner_spec, lr.num_ranks, lr.num_gpus_per_rank, placement=placement.learner,
                            wait=not overlap_start)
    rollout = RolloutGroup(rollout_spec, r.num_workers, r.num_gpus_per_worker, placement=placement.rollout,
                           defer_engines=overlap_start and placement.rollout.shared_gpu)
    terms = [(t.name, t.weight, dict(t.kwargs)) for t in cfg.reward.terms]
    rewards = RewardGroup(terms, timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers,
                          correct_threshold=cfg.reward.correct_threshold)
    learners.wait_ready()
    rollout.start_engines()  # no-op unless deferred
    rollout.connect(learners)  # the weight-sync path (NCCL, CUDA IPC or object store), chosen once
    return learners, rollout, rewards, vlm  # placement groups go with the job
