"""Recipe validation: every cross-field and range problem of a loaded recipe, each naming its key and the fix.

``load_recipe`` (``config.py``) raises them together; a stage field its ``kind`` does not read is one of them.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any

from .actors.gpu_layout import GpuRequest, request_problems
from .config import STAGE_FIELDS, RecipeConfig, StageConfig, foreign_stage_key


def validate(cfg: RecipeConfig) -> list[str]:
    """Every cross-field problem of a recipe, each naming its key and the fix (empty when fine)."""
    p: list[str] = []
    if not re.fullmatch(r"0?o?[0-7]{3}", str(cfg.run_dir_mode)) or not int(str(cfg.run_dir_mode)[-3:], 8) & 0o700:
        p.append(f"run_dir_mode={cfg.run_dir_mode!r}: an octal mode such as 0700 (owner only) or 0750, quoted in "
                 f"YAML; the owner needs access")
    if not cfg.stages:
        p.append("stages is empty: list at least one stage, e.g. `stages: [{kind: sft}]`")
    names = [s.name for s in cfg.stages]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        p.append(f"stages: name `{dup}` is used twice; give each stage a unique `name`")
    r = cfg.rollout
    if r.group_size < 1:
        p.append(f"rollout.group_size={r.group_size}: must be >= 1 (2 or more for group advantages)")
    if r.num_workers < 1:
        p.append(f"rollout.num_workers={r.num_workers}: must be >= 1")
    if not 0.0 < r.top_p <= 1.0:
        p.append(f"rollout.top_p={r.top_p}: must be in (0, 1]")
    if r.temperature < 0:
        p.append(f"rollout.temperature={r.temperature}: must be >= 0")
    if not r.behaviour_logprobs and any(s.kind == "gspo" and s.gspo.overlap for s in cfg.stages):
        p.append("gspo.overlap needs the behaviour policy's log-probs (the learner has moved on): set "
                 "rollout.behaviour_logprobs=true or turn gspo.overlap off")
    if r.sleep_when_idle and any(s.kind == "gspo" and s.gspo.overlap for s in cfg.stages):
        p.append("rollout.sleep_when_idle and gspo.overlap both set: a sleeping engine cannot generate the next "
                 "batch during training; turn one off")
    if r.tensor_parallel_size > 1 and r.backend != "vllm":
        p.append(f"rollout.tensor_parallel_size={r.tensor_parallel_size} needs rollout.backend=vllm (the hf "
                 f"backend runs one process per worker); set rollout.tensor_parallel_size=1 or rollout.backend=vllm")
    p.extend(request_problems(gpu_request(cfg)))
    lr = cfg.learner
    if lr.zero_stage not in (0, 1, 2, 3):
        p.append(f"learner.zero_stage={lr.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
    if lr.num_ranks < 1:
        p.append(f"learner.num_ranks={lr.num_ranks}: must be >= 1")
    if lr.micro_batch_tokens < cfg.model.max_prompt_tokens + cfg.model.max_response_tokens:
        p.append(f"learner.micro_batch_tokens={lr.micro_batch_tokens} is below one full sequence "
                 f"(model.max_prompt_tokens + model.max_response_tokens = "
                 f"{cfg.model.max_prompt_tokens + cfg.model.max_response_tokens}); raise it")
    if cfg.model.max_response_tokens < 1:
        p.append(f"model.max_response_tokens={cfg.model.max_response_tokens}: must be >= 1")
    if not cfg.reward.terms:
        p.append("reward.terms is empty: name at least one reward, e.g. `[{name: math_verify}]`")
    names = [t.name for t in cfg.reward.terms]
    if cfg.reward.correct_term is not None and cfg.reward.correct_term not in names:
        p.append(f"reward.correct_term={cfg.reward.correct_term!r} names none of reward.terms {names}; set it to "
                 "one of those names (or leave it out: the first term decides `correct`)")
    if cfg.reward.timeout_s <= 0:
        p.append(f"reward.timeout_s={cfg.reward.timeout_s}: must be > 0 seconds")
    p.extend(_range_checks(cfg))
    for i, s in enumerate(cfg.stages):
        p.extend(_validate_stage(i, s, cfg))
    return p


def gpu_request(cfg: RecipeConfig) -> GpuRequest:
    """The recipe's GPU ask as numbers (``actors/gpu_layout.py`` does the arithmetic)."""
    r, lr = cfg.rollout, cfg.learner
    return GpuRequest(r.placement, lr.num_ranks, lr.num_gpus_per_rank, r.num_workers, r.num_gpus_per_worker,
                      r.tensor_parallel_size)


def _range_checks(cfg: RecipeConfig) -> list[str]:
    """Single-field ranges: ``key=value: must be …`` for each value outside its range."""
    def at_least(low: int) -> tuple[Any, str]:
        return (lambda v: v >= low), f">= {low}"

    finite = (math.isfinite, "a finite number")
    m, r, w, lr, ev, ck = cfg.model, cfg.rollout, cfg.reward, cfg.learner, cfg.eval, cfg.checkpoint
    table: list[tuple[str, Any, tuple[Any, str]]] = [
        ("model.max_prompt_tokens", m.max_prompt_tokens, at_least(1)),
        ("model.max_tiles", m.max_tiles, at_least(0)),
        ("rollout.num_gpus_per_worker", r.num_gpus_per_worker, at_least(0)),
        ("rollout.gpu_memory_utilization", r.gpu_memory_utilization, (lambda v: 0 < v <= 1, "in (0, 1]")),
        ("rollout.kv_cache_gib", r.kv_cache_gib, at_least(1)),
        ("reward.num_workers", w.num_workers, at_least(1)),
        ("reward.correct_threshold", w.correct_threshold, finite),
        *[(f"reward.terms.{i}.weight", t.weight, finite) for i, t in enumerate(w.terms)],
        ("learner.num_gpus_per_rank", lr.num_gpus_per_rank, at_least(0)),
        ("learner.lr", lr.lr, (lambda v: v > 0 and math.isfinite(v), "> 0")),
        ("learner.weight_decay", lr.weight_decay, at_least(0)),
        ("learner.warmup_steps", lr.warmup_steps, at_least(0)),
        ("eval.every_steps", ev.every_steps, at_least(0)),
        ("eval.num_prompts", ev.num_prompts, at_least(1)),
        ("eval.sampled_n", ev.sampled_n, at_least(0)),
        ("eval.num_table_rows", ev.num_table_rows, at_least(0)),
        ("checkpoint.every_steps", ck.every_steps, at_least(0)),
        ("checkpoint.keep_last", ck.keep_last, at_least(0)),
        ("ray.object_store_mb", cfg.ray.object_store_mb, at_least(75)),  # Ray's own minimum is 75 MiB
    ]
    if cfg.ray.num_cpus is not None:
        table.append(("ray.num_cpus", cfg.ray.num_cpus, at_least(1)))
    for i, s in enumerate(cfg.stages):
        if s.kind == "sft":
            table += [(f"stages.{i}.sft.{k}", getattr(s.sft, k), at_least(1)) for k in ("epochs", "batch_size")]
        if s.kind == "mpo":
            table += [(f"stages.{i}.mpo.{k}", getattr(s.mpo, k), at_least(1))
                      for k in ("epochs", "batch_size", "max_pairs_per_prompt")]
    return [f"{key}={value!r}: must be {need}; set it in the recipe or override `{key}=…`"
            for key, value, (ok, need) in table if not ok(value)]


def _validate_stage(i: int, s: StageConfig, cfg: RecipeConfig) -> list[str]:
    key = f"stages.{i}"
    default = StageConfig(kind=s.kind)
    p = [foreign_stage_key(i, s.kind, f.name) for f in fields(StageConfig)
         if f.name not in ("kind", "name", *STAGE_FIELDS[s.kind]) and getattr(s, f.name) != getattr(default, f.name)]
    if s.lr is not None and s.lr <= 0:
        p.append(f"{key}.lr={s.lr}: must be > 0")
    if s.kind == "gspo":
        g = s.gspo
        for name in ("clip_low", "clip_high"):
            v = getattr(g, name)
            if not 0 <= v < 1 and name == "clip_low":
                p.append(f"{key}.gspo.clip_low={v}: must be in [0, 1) (ratio is clipped at 1 - clip_low)")
            if v < 0 and name == "clip_high":
                p.append(f"{key}.gspo.clip_high={v}: must be >= 0")
        if g.num_minibatches < 1 or g.prompts_per_step < 1 or g.num_steps < 1:
            p.append(f"{key}.gspo: num_steps, prompts_per_step and num_minibatches must be >= 1")
        elif g.prompts_per_step % g.num_minibatches:
            p.append(f"{key}.gspo.prompts_per_step={g.prompts_per_step} is not divisible by "
                     f"num_minibatches={g.num_minibatches}")
        if cfg.rollout.group_size < 2:
            p.append(f"{key}: gspo needs rollout.group_size >= 2 to form group advantages")
        if not 0 <= g.pass_rate_min <= g.pass_rate_max <= 1:
            p.append(f"{key}.gspo: need 0 <= pass_rate_min <= pass_rate_max <= 1")
    if s.kind == "mpo":
        from cascade_rl.algos.mpo import MPO_LOSSES  # the losses the learner can compute (imports torch)

        if not s.mpo.terms:
            p.append(f"{key}.mpo.terms is empty: list at least one term, e.g. `[{{loss: sigmoid, weight: 1.0}}]`")
        for j, t in enumerate(s.mpo.terms):
            if t.loss not in MPO_LOSSES:
                p.append(f"{key}.mpo.terms.{j}.loss={t.loss!r}: valid losses are {sorted(MPO_LOSSES)}")
            elif [u.loss for u in s.mpo.terms].index(t.loss) < j:
                p.append(f"{key}.mpo.terms.{j}.loss={t.loss!r} is listed twice; give each loss once")
            if not math.isfinite(t.weight):
                p.append(f"{key}.mpo.terms.{j}.weight={t.weight}: must be a finite number")
        if s.mpo.beta <= 0:
            p.append(f"{key}.mpo.beta={s.mpo.beta}: must be > 0")
        if s.mpo.pairs and s.mpo.logs:
            p.append(f"{key}.mpo: set either `pairs` (a pairs file) or `logs` (a rollout log), not both")
        elif not any(x.kind == "rollout" for x in cfg.stages[:i]) and not s.mpo.logs and not s.mpo.pairs:
            p.append(f"{key}: mpo needs a rollout stage before it, `{key}.mpo.logs` naming a rollout log, or "
                     f"`{key}.mpo.pairs` naming a preference-pairs file")
    if s.kind == "rollout" and s.num_prompts < 1:
        p.append(f"{key}.num_prompts={s.num_prompts}: must be >= 1")
    return p
