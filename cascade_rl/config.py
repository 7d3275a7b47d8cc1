"""Recipe configuration: OmegaConf structured dataclasses, YAML loading with ``base:``, overrides, validation.

A recipe YAML is merged onto ``RecipeConfig``; an unknown key or a wrong type fails at load with the key, the
file and a suggestion. ``validate()`` gathers every cross-field problem and raises them together. Every field
carries a one-line doc (the ``doc`` metadata) with its unit; ``docs/recipe_reference.md`` is generated from them.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


def doc(default: Any = MISSING, text: str = "", factory: Any = None) -> Any:
    """A dataclass field with a one-line description kept in its metadata."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


class ConfigError(ValueError):
    """A recipe problem: the message names the key, the file and what to set."""


@dataclass
class ModelConfig:
    path: str = doc("tiny:lm", "Hugging Face folder of the start policy, or tiny:lm / tiny:vlm (built locally)")
    dtype: Literal["float32", "bfloat16"] = doc("float32", "parameter dtype of learner and rollout engine")
    max_prompt_tokens: int = doc(256, "prompts longer than this (tokens) are rejected with an error")
    max_response_tokens: int = doc(32, "generation length limit (tokens); longer responses are truncated")


@dataclass
class DataConfig:
    train: str = doc("synthetic:arithmetic?n=2000&seed=0&split=train", "training prompts: JSONL/parquet path or synthetic:TASK?n=&seed=")
    eval: str = doc("synthetic:arithmetic?n=128&seed=12345&split=test", "held-out prompts: JSONL/parquet path or synthetic:TASK")
    id_key: str = doc("id", "column holding a unique prompt id")
    prompt_key: str = doc("prompt", "column holding the prompt (a string or a list of chat messages)")
    answer_key: str = doc("answer", "column holding the ground-truth answer")
    image_key: str = doc("images", "column holding image file paths (VLM prompts)")
    system_prompt: str | None = doc(None, "system message prepended to every prompt")


@dataclass
class RolloutConfig:
    backend: Literal["vllm", "hf"] = doc("vllm", "generation engine: vllm (vllm.LLM) or hf (transformers generate)")
    num_workers: int = doc(1, "rollout worker actors")
    num_gpus_per_worker: float = doc(0.0, "GPUs per rollout worker (0 on CPU)")
    group_size: int = doc(8, "G: responses sampled per prompt")
    temperature: float = doc(1.0, "sampling temperature")
    top_p: float = doc(1.0, "nucleus sampling mass")
    gpu_memory_utilization: float = doc(0.5, "vLLM share of GPU memory")
    kv_cache_gib: int = doc(1, "vLLM KV-cache size on CPU (GiB)")
    enforce_eager: bool = doc(True, "disable CUDA graphs / compilation (faster start, slower generation)")
    sleep_when_idle: bool = doc(False, "put vLLM to sleep while learners train (colocated GPUs)")
    behaviour_logprobs: bool = doc(True, "vLLM returns each sampled token's log-prob (logged in rollout records; "
                                         "needed by gspo.overlap); on costs vLLM 0.26 a third of its GPU throughput")
    placement: Literal["split", "colocated"] = doc(
        "split", "split: learners and rollout workers on separate GPUs; colocated: learner rank i and rollout "
        "worker i share GPU i (set fractional num_gpus_per_rank/num_gpus_per_worker and sleep_when_idle)")


@dataclass
class RewardTermConfig:
    name: str = doc(MISSING, "registered reward name or pkg.module:function")
    weight: float = doc(1.0, "weight of this term in the total reward")
    kwargs: dict[str, Any] = doc(text="keyword arguments passed to the reward", factory=dict)


@dataclass
class RewardConfig:
    terms: list[RewardTermConfig] = doc(text="reward terms summed with their weights",
                                        factory=lambda: [RewardTermConfig(name="math_verify")])
    num_workers: int = doc(1, "reward worker actors")
    timeout_s: float = doc(5.0, "time limit per reward call (seconds)")
    correct_threshold: float = doc(0.5, "a sample counts as correct when the first term's score is above this")


@dataclass
class LearnerConfig:
    num_ranks: int = doc(1, "learner processes (data-parallel ranks), one Ray actor each")
    num_gpus_per_rank: float = doc(0.0, "GPUs per learner rank (0 on CPU)")
    zero_stage: int = doc(2, "DeepSpeed ZeRO stage (0-3)")
    lr: float = doc(1e-4, "peak learning rate")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    warmup_steps: int = doc(0, "linear warm-up optimizer steps")
    lr_schedule: Literal["constant", "cosine"] = doc("constant", "learning-rate schedule after warm-up")
    grad_clip: float = doc(1.0, "gradient norm clip")
    micro_batch_tokens: int = doc(4096, "token budget of one packed micro-batch")
    auto_micro_batch_tokens: bool = doc(False, "GPU: at the first training step raise the micro-batch budget to "
                                               "what free GPU memory holds (micro_batch_tokens is the floor)")
    attention: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2", "flex_attention"] = doc(
        "auto", "learner attention: auto = varlen on CUDA (packed rows, torch's FlashAttention varlen kernel), "
                "else sdpa (padded rows)")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward")
    offload_optimizer: bool = doc(False, "ZeRO optimizer state offload to CPU")


@dataclass
class SFTConfig:
    epochs: int = doc(1, "passes over the training prompts with their reference solutions")
    batch_size: int = doc(32, "sequences per optimizer step (global)")


@dataclass
class MPOConfig:
    beta: float = doc(0.1, "DPO/BCO temperature")
    terms: list[dict[str, Any]] = doc(
        text="loss terms [{loss: sigmoid|bco_pair|sft, weight}]",
        factory=lambda: [{"loss": "sigmoid", "weight": 0.8}, {"loss": "bco_pair", "weight": 0.2},
                         {"loss": "sft", "weight": 1.0}])
    epochs: int = doc(1, "passes over the pairs")
    batch_size: int = doc(16, "pairs per optimizer step (global)")
    max_pairs_per_prompt: int = doc(15, "cap on correctness pairs per prompt")
    logs: str | None = doc(None, "rollout log folder to build pairs from (default: this run's rollout stage)")


@dataclass
class GSPOConfig:
    loss: Literal["gspo", "gspo_token", "grpo"] = doc("gspo", "policy loss")
    clip_low: float = doc(3e-4, "ratio clipped below at 1 - clip_low")
    clip_high: float = doc(4e-4, "ratio clipped above at 1 + clip_high")
    num_steps: int = doc(10, "rollout batches (policy-update rounds)")
    prompts_per_step: int = doc(16, "prompts per rollout batch")
    num_minibatches: int = doc(1, "optimizer updates per rollout batch")
    scale_std: bool = doc(True, "divide group advantages by the group std")
    filter_equal_groups: bool = doc(True, "drop groups whose rewards are all equal (dynamic filtering)")
    pass_rate_min: float = doc(0.0, "keep prompts whose logged accuracy is >= this")
    pass_rate_max: float = doc(1.0, "keep prompts whose logged accuracy is <= this")
    overlap: bool = doc(False, "one-step off-policy: the next batch generates while this one trains (old "
                               "log-probs are then the rollout engine's behaviour log-probs)")


@dataclass
class StageConfig:
    kind: Literal["sft", "rollout", "mpo", "gspo"] = doc(MISSING, "stage type")
    name: str = doc("", "stage name (default: the kind); names folders and metric prefixes")
    lr: float | None = doc(None, "learning rate for this stage (default learner.lr)")
    num_prompts: int = doc(256, "rollout stage: prompts to sample from")
    sft: SFTConfig = doc(text="sft stage settings", factory=SFTConfig)
    mpo: MPOConfig = doc(text="mpo stage settings", factory=MPOConfig)
    gspo: GSPOConfig = doc(text="gspo stage settings", factory=GSPOConfig)


@dataclass
class EvalConfig:
    every_steps: int = doc(5, "evaluate every N steps inside a stage (and at each stage end)")
    num_prompts: int = doc(128, "held-out prompts scored per evaluation")
    sampled_n: int = doc(0, "also score N sampled responses per prompt (0 = greedy only)")
    num_table_rows: int = doc(16, "sample rollouts logged as an MLflow table per evaluation")


@dataclass
class TrackingConfig:
    uri: str | None = doc(None, "MLflow tracking URI (default sqlite:///<run_dir>/mlflow.db)")
    experiment: str = doc("cascade_rl", "MLflow experiment name")
    run_name: str | None = doc(None, "MLflow run name (default: recipe name)")
    tags: dict[str, str] = doc(text="MLflow tags", factory=dict)


@dataclass
class CheckpointConfig:
    every_steps: int = doc(5, "save a checkpoint every N steps (and at each stage end)")
    keep_last: int = doc(2, "checkpoints kept per stage (older ones deleted)")
    export_hf: bool = doc(True, "write a Hugging Face folder of the final policy")


@dataclass
class RayConfig:
    address: str | None = doc(None, "Ray address (default: the job's cluster, else a local instance)")
    num_cpus: int | None = doc(None, "CPUs for a local Ray instance")
    object_store_mb: int = doc(1024, "object store size of a local Ray instance (MiB)")


@dataclass
class RecipeConfig:
    name: str = doc("cascade", "recipe name (MLflow run name, run folder)")
    seed: int = doc(0, "global random seed")
    run_dir: str = doc("runs/${name}", "folder for logs, checkpoints and the local MLflow store")
    resume: str = doc("never", "never | auto (newest complete checkpoint)")
    model: ModelConfig = doc(text="policy model", factory=ModelConfig)
    data: DataConfig = doc(text="prompt datasets", factory=DataConfig)
    rollout: RolloutConfig = doc(text="rollout workers", factory=RolloutConfig)
    reward: RewardConfig = doc(text="reward terms and workers", factory=RewardConfig)
    learner: LearnerConfig = doc(text="DeepSpeed learner workers", factory=LearnerConfig)
    stages: list[StageConfig] = doc(text="stages run in order", factory=list)
    eval: EvalConfig = doc(text="held-out evaluation", factory=EvalConfig)
    tracking: TrackingConfig = doc(text="MLflow tracking", factory=TrackingConfig)
    checkpoint: CheckpointConfig = doc(text="checkpoints", factory=CheckpointConfig)
    ray: RayConfig = doc(text="Ray connection", factory=RayConfig)


# ---------------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read a recipe file, merging it over its ``base:`` recipe (path relative to the file)."""
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself ({' -> '.join(map(str, seen))})")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = _read_yaml((path.parent / str(base)), seen + (path.resolve(),))
    return OmegaConf.merge(parent, raw)


def _known_keys(node: Any) -> list[str]:
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into one naming the key, the file and a likely fix."""
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    msg = getattr(exc, "msg", str(exc)).split("\n")[0]
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        leaf = str(key).split(".")[-1]
        parent_key = str(key).rsplit(".", 1)[0] if "." in str(key) else ""
        candidates = _keys_at(parent_key)
        close = difflib.get_close_matches(leaf, candidates, n=1, cutoff=0.5)
        hint = f" Did you mean `{(parent_key + '.' if parent_key else '') + close[0]}`?" if close else ""
        valid = f" Valid keys here: {', '.join(candidates)}." if candidates else ""
        return ConfigError(f"{source}: unknown key `{key}`.{hint}{valid}")
    if isinstance(exc, ValidationError):
        expected = _type_at(str(key))
        return ConfigError(f"{source}: wrong type for `{key}`: {msg}" + (f" (expected {expected})" if expected else ""))
    return ConfigError(f"{source}: {msg} (key `{key}`)")


def _node_at(dotted: str) -> Any:
    node: Any = RecipeConfig
    for part in [p for p in dotted.split(".") if p]:
        if part.isdigit() or (part.startswith("[") and part.endswith("]")):
            continue
        hints = {f.name: f for f in fields(node)} if is_dataclass(node) else {}
        if part not in hints:
            return None
        f = hints[part]
        node = f.default_factory() if f.default_factory is not MISSING else f.default
        if isinstance(node, list):
            node = {"stages": StageConfig, "terms": RewardTermConfig}.get(part, None)
    return node


def _keys_at(dotted: str) -> list[str]:
    node = _node_at(dotted.replace("[", ".").replace("]", ""))
    return _known_keys(node)


def _type_at(dotted: str) -> str:
    parts = dotted.replace("[", ".").replace("]", "").split(".")
    parent = _node_at(".".join(parts[:-1]))
    if not is_dataclass(parent):
        return ""
    for f in fields(parent):
        if f.name == parts[-1]:
            return str(f.type)
    return ""


def _check_list_items(raw: DictConfig, source: str) -> None:
    """Merge list items (stages, reward terms) one by one so an error can name its index."""
    for dotted, schema in (("stages", StageConfig), ("reward.terms", RewardTermConfig)):
        items = OmegaConf.select(raw, dotted, default=None)
        if not isinstance(items, ListConfig):
            continue
        for i, item in enumerate(items):
            try:
                OmegaConf.merge(OmegaConf.structured(schema), item)
            except OmegaConfBaseException as exc:
                key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or ""
                exc.full_key = f"{dotted}.{i}.{key}" if key else f"{dotted}.{i}"
                raise _explain(exc, source) from None


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> RecipeConfig:
    """Load a recipe YAML (following ``base:``), apply ``key=value`` overrides and validate it."""
    path = Path(path)
    schema = OmegaConf.structured(RecipeConfig)
    raw = _read_yaml(path)
    _check_list_items(raw, str(path))
    try:
        merged = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as exc:
        raise _explain(exc, str(path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override `{item}` is not of the form key=value (e.g. seed=1)")
        key, value = item.split("=", 1)
        try:
            OmegaConf.update(merged, key, yaml.safe_load(value) if value else "", merge=True)
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"command-line override `{item}`") from None
    try:
        cfg: RecipeConfig = OmegaConf.to_object(merged)  # resolves ${...} interpolations
    except OmegaConfBaseException as exc:
        raise _explain(exc, str(path)) from None
    for i, stage in enumerate(cfg.stages):
        if not stage.name:
            stage.name = stage.kind if [s.kind for s in cfg.stages].count(stage.kind) == 1 else f"{stage.kind}{i}"
    problems = validate(cfg)
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s) in the recipe:\n  - " + "\n  - ".join(problems))
    return cfg


def to_yaml(cfg: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: RecipeConfig) -> dict[str, str]:
    """The resolved recipe as ``{dotted.key: value}`` strings (MLflow params)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, (dict, DictConfig)):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, ListConfig)) and any(isinstance(v, (dict, DictConfig)) for v in node):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}")
        else:
            out[prefix] = str(node)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out


# ---------------------------------------------------------------------------------------------- validation


def validate(cfg: RecipeConfig) -> list[str]:
    """Every cross-field problem of a recipe, each naming its key and the fix (empty when fine)."""
    p: list[str] = []
    if cfg.resume not in ("never", "auto"):
        p.append(f"resume={cfg.resume!r}: use `never` or `auto`")
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
    if cfg.reward.timeout_s <= 0:
        p.append(f"reward.timeout_s={cfg.reward.timeout_s}: must be > 0 seconds")
    p.extend(_range_checks(cfg))
    for i, s in enumerate(cfg.stages):
        p.extend(_validate_stage(i, s, cfg))
    return p


def _range_checks(cfg: RecipeConfig) -> list[str]:
    """Single-field ranges: ``key=value: must be …`` for each value outside its range."""
    def at_least(low: int) -> tuple[Any, str]:
        return (lambda v: v >= low), f">= {low}"

    finite = (math.isfinite, "a finite number")
    m, r, w, lr, ev, ck = cfg.model, cfg.rollout, cfg.reward, cfg.learner, cfg.eval, cfg.checkpoint
    table: list[tuple[str, Any, tuple[Any, str]]] = [
        ("model.max_prompt_tokens", m.max_prompt_tokens, at_least(1)),
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
    p: list[str] = []
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
        valid = {"sigmoid", "bco_pair", "sft"}
        for j, t in enumerate(s.mpo.terms):
            if set(t) - {"loss", "weight"} or "loss" not in t:
                p.append(f"{key}.mpo.terms.{j}: each term is {{loss, weight}}, got {dict(t)}")
            elif t["loss"] not in valid:
                p.append(f"{key}.mpo.terms.{j}.loss={t['loss']!r}: valid losses are {sorted(valid)}")
        if s.mpo.beta <= 0:
            p.append(f"{key}.mpo.beta={s.mpo.beta}: must be > 0")
        if not any(x.kind == "rollout" for x in cfg.stages[:i]) and not s.mpo.logs:
            p.append(f"{key}: mpo needs a rollout stage before it or `{key}.mpo.logs` naming a rollout log")
    if s.kind == "rollout" and s.num_prompts < 1:
        p.append(f"{key}.num_prompts={s.num_prompts}: must be >= 1")
    return p


# ---------------------------------------------------------------------------------------------- reference


def reference_markdown() -> str:
    """The recipe reference (``docs/recipe_reference.md``), generated from the dataclasses' field docs."""
    lines = ["# Recipe reference", "",
             "Generated from `cascade_rl/config.py` by `python -m cascade_rl.config`; a test keeps it in sync.", ""]

    def section(cls: type, prefix: str) -> None:
        rows, nested = [], []
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if is_dataclass(default):
                nested.append((type(default), f"{prefix}{f.name}."))
                continue
            shown = "(required)" if default is MISSING else repr(default)
            if f.name == "stages":
                nested.append((StageConfig, f"{prefix}stages.N."))
            if f.name == "terms" and cls is RewardConfig:
                nested.append((RewardTermConfig, f"{prefix}terms.N."))
            typ = str(f.type).replace("|", "\\|")
            text = f.metadata.get("doc", "").replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | `{typ}` | `{shown}` | {text} |")
        title = prefix.rstrip(".") or "top level"
        lines.extend([f"## `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for sub, sub_prefix in nested:
            section(sub, sub_prefix)

    section(RecipeConfig, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
