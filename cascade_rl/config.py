"""Recipe configuration: OmegaConf structured dataclasses, YAML loading with ``base:``, overrides, validation.

A recipe YAML is merged onto ``RecipeConfig``; an unknown key or a wrong type fails at load with the key, the
file and a suggestion. ``validate()`` (``config_checks.py``) gathers every cross-field problem and raises them
together. Every field
carries a one-line doc (the ``doc`` metadata) with its unit; ``docs/recipe_reference.md`` is generated from them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, cast

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cascade_rl.types import RewardTermConfig  # the one reward-term type, recipe to scorer


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
    max_tiles: int = doc(12, "VLMs: most InternVL dynamic tiles per image (vision-input-size tiles, plus a "
                             "thumbnail when > 1); 0 keeps the model folder's image-processor setting")


@dataclass
class DataConfig:
    train: str = doc("synthetic:arithmetic?n=2000&seed=0&split=train", "training prompts: JSONL/parquet path or synthetic:TASK?n=&seed=")
    eval: str = doc("synthetic:arithmetic?n=128&seed=12345&split=test", "held-out prompts: JSONL/parquet path or synthetic:TASK")
    id_key: str | None = doc(None, "column holding a unique prompt id (null: `id` if present, else a hash of the "
                                   "prompt); keys may be dotted for nested columns, e.g. extra_info.index")
    prompt_key: str = doc("prompt", "column holding the prompt (a string or a list of chat messages)")
    answer_key: str = doc("answer", "column holding the ground-truth answer, e.g. reward_model.ground_truth")
    answer_format: Literal["raw", "gsm8k", "boxed"] = doc(
        "raw", "how the ground truth is read from the answer cell: as is, after `####` (gsm8k), or the last "
        "\\boxed{} (boxed)")
    sft_target_key: str | None = doc(None, "column the sft stage trains on (null: `solution` if present, else the "
                                           "answer cell)")
    image_key: str = doc("images", "column holding image file paths (VLM prompts)")
    system_prompt: str | None = doc(None, "system message prepended to every prompt")
    skip_bad_rows: bool = doc(False, "leave out (and count in a warning) prompt rows with a missing or unreadable "
                                     "image or a placeholder/image count mismatch, instead of stopping")


@dataclass
class RolloutConfig:
    backend: Literal["vllm", "hf"] = doc("vllm", "generation engine: vllm (vllm.LLM) or hf (transformers generate)")
    num_workers: int = doc(1, "rollout worker actors")
    num_gpus_per_worker: float = doc(0.0, "GPUs per rollout worker (0 on CPU); with tensor_parallel_size > 1 "
                                                "the worker holds tensor_parallel_size x this")
    group_size: int = doc(8, "G: responses sampled per prompt")
    temperature: float = doc(1.0, "sampling temperature")
    top_p: float = doc(1.0, "nucleus sampling mass")
    gpu_memory_utilization: float = doc(0.5, "vLLM share of GPU memory")
    kv_cache_gib: int = doc(1, "vLLM KV-cache size on CPU (GiB)")
    enforce_eager: bool = doc(True, "disable CUDA graphs / compilation (faster start, slower generation)")
    compile: bool = doc(True, "GPU with enforce_eager=false: vLLM compiles the model (torch.compile, piecewise "
                              "CUDA graphs); false skips compilation (~20 s of a cold engine start) and captures "
                              "whole-model CUDA graphs for decoding only (cudagraph_mode FULL_DECODE_ONLY)")
    sleep_when_idle: bool = doc(False, "put vLLM to sleep while learners train (colocated GPUs)")
    engine_process: Literal["auto", "inline", "separate"] = doc(
        "auto", "where vLLM's engine core runs: inline in the rollout actor (its start skips a process and a "
                    "second vLLM import) or in a separate child process (overlaps scheduling with the model); auto: "
                    "inline on CPU, separate on GPU")
    behaviour_logprobs: bool = doc(True, "vLLM returns each sampled token's log-prob (logged in rollout records; "
                                         "needed by gspo.overlap); on costs vLLM 0.26 a third of its GPU throughput")
    ignore_eos: bool = doc(False, "keep generating past EOS to max_response_tokens (benchmarks: fixed lengths)")
    max_images_per_prompt: int = doc(4, "vLLM: most images one prompt may carry (limit_mm_per_prompt)")
    hf_max_batch_sequences: int = doc(64, "hf backend: sequences (prompts x group_size) per generate call")
    tensor_parallel_size: int = doc(
        1, "vLLM tensor parallelism: GPUs (one vLLM process each) per rollout worker, all on one node; split "
           "placement only, with num_gpus_per_worker=1 (the worker then holds this many GPUs)")
    placement: Literal["split", "colocated"] = doc(
        "split", "split: learners and rollout workers on separate GPUs; colocated: learner rank i and rollout "
        "worker i share GPU i (set fractional num_gpus_per_rank/num_gpus_per_worker and sleep_when_idle)")


@dataclass
class RewardConfig:
    terms: list[RewardTermConfig] = doc(text="reward terms summed with their weights",
                                        factory=lambda: [RewardTermConfig(name="math_verify")])
    num_workers: int = doc(1, "reward worker actors")
    timeout_s: float = doc(5.0, "time limit per reward call (seconds)")
    correct_threshold: float = doc(0.5, "a sample counts as correct when the correct_term's score is above this")
    correct_term: str | None = doc(None, "the term (its name in reward.terms) whose score decides `correct` for "
                                         "pairs, pass rates and eval accuracy; default: the first term")


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
    gradient_checkpointing: bool = doc(False, "recompute activations in backward")
    offload_optimizer: bool = doc(False, "ZeRO optimizer state offload to CPU")
    packing: Literal["auto", "packed", "padded"] = doc(
        "auto", "micro-batch layout: packed rows (one row, per-sequence position ids), padded rows, or auto "
                "(packed with varlen attention: varlen / flash / flex, else padded)")
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2", "flex_attention"] = doc(
        "auto", "learner attention: auto = varlen on CUDA in bfloat16/float16 (packed rows, torch's FlashAttention "
                "varlen kernel, actors/attention.py), else sdpa (padded rows; float32, CPU); or a transformers "
                "attn_implementation")
    fused_kernels: Literal["auto", "liger", "none"] = doc(
        "auto", "fused Triton kernels for the decoder's RMSNorm, rotary embedding and SwiGLU (Liger Kernel, "
                "actors/fused_kernels.py): auto = on CUDA where liger-kernel is installed (the gpu extra), text models "
                "only; liger = required (VLMs: also the vision tower's norms); none = the model's own modules")
    freeze_vision: bool = doc(False, "VLMs: keep the vision tower fixed (no gradients, no optimizer state, not "
                                     "re-sent in weight sync), as InternVL's RL does")
    freeze_projector: bool = doc(False, "VLMs: keep the vision-to-language projector fixed (as freeze_vision)")


@dataclass
class SFTConfig:
    epochs: int = doc(1, "passes over the training prompts with their reference solutions")
    batch_size: int = doc(32, "sequences per optimizer step (global)")


@dataclass
class MPOTermConfig:
    loss: str = doc(MISSING, "loss term: a name in cascade_rl/algos/mpo.py MPO_LOSSES (sigmoid, bco_pair, sft)")
    weight: float = doc(1.0, "weight of this term in the MPO loss")


@dataclass
class MPOConfig:
    beta: float = doc(0.1, "DPO/BCO temperature")
    terms: list[MPOTermConfig] = doc(
        text="loss terms summed with their weights (InternVL3.5: 0.8 sigmoid, 0.2 bco_pair, 1.0 sft)",
        factory=lambda: [MPOTermConfig("sigmoid", 0.8), MPOTermConfig("bco_pair", 0.2), MPOTermConfig("sft", 1.0)])
    epochs: int = doc(1, "passes over the pairs")
    batch_size: int = doc(16, "pairs per optimizer step (global)")
    max_pairs_per_prompt: int = doc(15, "cap on correctness pairs per prompt")
    logs: str | None = doc(None, "rollout log folder to build pairs from (default: this run's rollout stage)")
    pairs: str | None = doc(None, "preference pairs to train on instead of a rollout log: JSONL/parquet file, "
                                  "datasets folder, or an MMPR meta.json")
    pairs_prompt_key: str | None = doc("prompt", "pairs column holding the prompt (null: the shared prefix of "
                                                 "chosen/rejected message lists)")
    pairs_chosen_key: str = doc("chosen", "pairs column holding the chosen response (string or message list)")
    pairs_rejected_key: str = doc("rejected", "pairs column holding the rejected response (string or messages)")
    pairs_image_key: str = doc("images", "pairs column holding image paths (MMPR: image)")


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


# The StageConfig fields each stage kind reads besides ``kind`` and ``name``; any other is an error, not ignored.
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("lr", "sft"), "rollout": ("num_prompts",), "mpo": ("lr", "mpo"), "gspo": ("lr", "gspo")}


@dataclass
class StageConfig:
    kind: Literal["sft", "rollout", "mpo", "gspo"] = doc(MISSING, "stage type")
    name: str = doc("", "stage name (default: the kind); names folders and metric prefixes")
    lr: float | None = doc(None, "sft/mpo/gspo stages: learning rate for this stage (default learner.lr)")
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
    best_of_n: int = doc(0, "also sample N responses per prompt and score the one reward.terms component "
                            "eval.best_of_n_by ranks highest (Best-of-N, InternVL3.5's parallel thinking); 0 = off")
    best_of_n_by: str = doc("prm", "reward term label (a reward.terms entry, weight 0 allowed) that picks the "
                                   "Best-of-N response")


@dataclass
class TrackingConfig:
    uri: str | None = doc(None, "MLflow tracking URI (default sqlite:///<run_dir>/mlflow.db)")
    experiment: str = doc("cascade_rl", "MLflow experiment name")
    run_name: str | None = doc(None, "MLflow run name (default: recipe name)")
    tags: dict[str, str] = doc(text="MLflow tags", factory=dict)
    system_metrics_s: float = doc(10.0, "seconds between system/* samples (CPU, memory, GPU with pynvml); 0 = off")


@dataclass
class CheckpointConfig:
    every_steps: int = doc(5, "save a checkpoint every N steps (and at each stage end)")
    keep_last: int = doc(2, "checkpoints kept per stage (older ones deleted)")
    export_hf: bool = doc(True, "write a Hugging Face folder of the final policy")


@dataclass
class RayConfig:
    address: str | None = doc(None, "Ray to use: unset = the job's cluster under `ray job submit`, else a private "
                              "local instance; local | auto (the head on this machine) | host:port | ray://…")
    num_cpus: int | None = doc(None, "CPUs for a local Ray instance")
    object_store_mb: int = doc(1024, "object store size of a local Ray instance (MiB)")


@dataclass
class RecipeConfig:
    name: str = doc("cascade", "recipe name (MLflow run name, run folder)")
    seed: int = doc(0, "global random seed")
    run_dir: str = doc("runs/${name}", "folder for logs, checkpoints and the local MLflow store")
    run_dir_mode: str = doc("0700", "octal permissions of a run_dir the run creates (0750: the group may read)")
    resume: Literal["never", "auto"] = doc("never", "never, or auto: continue from the newest complete checkpoint")
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
    except Exception as exc:  # yaml errors carry line numbers; keep them (but never quote much of the file)
        raise ConfigError(f"{path}: not valid YAML: {_excerpt(str(exc), 300)}") from exc
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    _check_looks_like_recipe(path, raw)
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = _read_yaml((path.parent / str(base)), seen + (path.resolve(),))
    merged = OmegaConf.merge(parent, raw)
    assert isinstance(merged, DictConfig)  # a mapping merged onto a mapping
    return merged


def _excerpt(text: str, limit: int = 60) -> str:
    """At most ``limit`` characters of ``text``: an error must not print a file that is not a recipe."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def _check_looks_like_recipe(path: Path, raw: DictConfig) -> None:
    """Refuse a file whose top-level keys are not recipe keys (``base: /etc/passwd``), quoting only an excerpt."""
    known = {f.name for f in fields(RecipeConfig)} | {"base"}
    strange = [str(k) for k in raw.keys() if str(k) not in known and not re.fullmatch(r"[A-Za-z_]\w{0,63}", str(k))]
    if strange:
        raise ConfigError(f"{path}: not a recipe (a recipe is a mapping of keys such as name, model, stages; this "
                          f"file has {len(list(raw.keys()))} top-level key(s), e.g. {_excerpt(strange[0])!r}). "
                          f"Check the path given as `base:` or on the command line.")


def list_item_type(f: Any) -> type | None:
    """The dataclass of a ``list[XConfig]`` field's items (None for other fields)."""
    text = str(f.type)
    if not (text.startswith("list[") and text.endswith("Config]")):
        return None
    item = globals().get(text[len("list["):-1])
    return item if isinstance(item, type) and is_dataclass(item) else None


def foreign_stage_key(i: int, kind: str, key: str) -> str:
    """The problem of a stage field that its kind does not read (``{kind: mpo, gspo: {...}}``)."""
    belongs = [k for k, names in STAGE_FIELDS.items() if key in names]
    reads = ", ".join(("kind", "name", *STAGE_FIELDS[kind]))
    return (f"stages.{i}.{key}: a stage of kind `{kind}` does not read `{key}` (it reads {reads}); "
            f"move it to a stage of kind {' / '.join(belongs) or '?'} or delete it")


def _raw_foreign_stage_keys(raw: DictConfig, cfg: RecipeConfig) -> list[str]:
    """Stage keys written in the YAML that the stage's kind does not read (even when equal to the default)."""
    stages = raw.get("stages")
    if not isinstance(stages, ListConfig) or len(stages) != len(cfg.stages):  # overrides replaced the list
        return []
    out = []
    for i, item in enumerate(stages):
        kind = item.get("kind") if isinstance(item, DictConfig) else None
        if kind in STAGE_FIELDS and kind == cfg.stages[i].kind:
            out += [foreign_stage_key(i, kind, str(k)) for k in item
                    if k not in ("kind", "name") and k not in STAGE_FIELDS[kind]]
    return out


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> RecipeConfig:
    """Load a recipe YAML (following ``base:``), apply ``key=value`` overrides and validate it."""
    from .overrides import apply_override, check_list_items, explain

    path = Path(path)
    schema = OmegaConf.structured(RecipeConfig)
    raw = _read_yaml(path)
    check_list_items(raw, str(path))
    try:
        merged = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as exc:
        raise explain(exc, str(path)) from None
    assert isinstance(merged, DictConfig)  # a mapping merged onto the schema
    for item in overrides or []:
        apply_override(merged, item)
    try:
        cfg = cast(RecipeConfig, OmegaConf.to_object(merged))  # resolves ${...} interpolations
    except OmegaConfBaseException as exc:
        raise explain(exc, str(path)) from None
    for i, stage in enumerate(cfg.stages):
        if not stage.name:
            stage.name = stage.kind if [s.kind for s in cfg.stages].count(stage.kind) == 1 else f"{stage.kind}{i}"
    from .config_checks import validate  # the checks import the schema above

    problems = list(dict.fromkeys(_raw_foreign_stage_keys(raw, cfg) + validate(cfg)))
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s) in the recipe:\n  - " + "\n  - ".join(problems))
    return cfg


def recipe_with(values: Mapping[str, Any] | None = None) -> RecipeConfig:
    """The default recipe with ``{dotted.key: value}`` set, type-checked as a recipe file is (not validated)."""
    merged = OmegaConf.structured(RecipeConfig)
    for key, value in (values or {}).items():
        try:
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as exc:
            from .overrides import explain

            raise explain(exc, f"recipe key `{key}`") from None
    cfg = cast(RecipeConfig, OmegaConf.to_object(merged))
    return cfg


def to_yaml(cfg: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: RecipeConfig) -> dict[str, str]:
    """The resolved recipe as ``{dotted.key: value}`` strings (MLflow params)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, (dict, DictConfig)):
            for k, v in node.items():
                walk(v, f"{prefix}.{k!s}" if prefix else str(k))
        elif isinstance(node, (list, ListConfig)) and any(isinstance(v, (dict, DictConfig)) for v in node):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}")
        else:
            out[prefix] = str(node)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out


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
            item = list_item_type(f)
            if item is not None:
                nested.append((item, f"{prefix}{f.name}.N."))
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
