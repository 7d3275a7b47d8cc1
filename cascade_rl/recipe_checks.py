"""What ``cascade-rl validate`` (and ``run``, before the driver starts any worker) checks beyond the recipe itself.

- data: ``data.train`` / ``data.eval`` resolve; with ``read_prompt_rows`` every row of a local file is read and
  checked, prompt lengths included (``model.max_prompt_tokens`` with the policy's tokenizer, as ``run`` does);
- model: a local folder has a loadable config;
- rewards: each ``reward.terms`` entry resolves, and is called once with its kwargs on the first row of
  ``data.train`` (response = that row's reference answer), so a wrong signature, a misspelt kwarg or a reward
  that raises is named with its term before any sample is scored 0.0;
- mpo stages: ``mpo.logs`` names an existing folder, ``mpo.pairs`` a readable pairs file;
- GPUs (``check_gpus``, when ``validate`` is given a cluster: ``--gpus N --gpus-per-node M`` or ``--ray-address``):
  the bundles of ``learner.*`` / ``rollout.*`` fit the cluster's nodes (``actors/gpu_layout.py``).

Each problem is one line naming the recipe key.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .config import ConfigError, RecipeConfig


def _load_tokenizer(cfg: RecipeConfig, problems: list[str]) -> Any:
    from .data.tiny_models import resolve_model_path

    try:
        path = resolve_model_path(cfg.model.path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - any load failure is reported with the key
        problems.append(f"model.path={cfg.model.path!r}: cannot load its tokenizer ({type(exc).__name__}: {exc})")
        return None


def _check_data(cfg: RecipeConfig, read_prompt_rows: bool, problems: list[str]) -> None:
    from .data.prompts import load_prompts, prompt_options, resolve_data_path

    d = cfg.data
    user_files = [k for k in ("train", "eval") if not getattr(d, k).startswith("synthetic:")]
    tokenizer = _load_tokenizer(cfg, problems) if read_prompt_rows and user_files else None
    options = prompt_options(d, tokenizer=tokenizer, max_prompt_tokens=cfg.model.max_prompt_tokens)
    for key in ("train", "eval"):
        spec = getattr(d, key)
        try:
            path = resolve_data_path(spec, Path(cfg.run_dir) / "data", check_only=True)
            if read_prompt_rows and key in user_files:  # a user's file: every row, now
                load_prompts(path, **options)
        except (FileNotFoundError, ValueError) as exc:  # PromptDataError is a ValueError
            problems.append(f"data.{key}: {exc}")


def _check_model(cfg: RecipeConfig, problems: list[str]) -> None:
    from .data.tiny_models import resolve_model_path

    if cfg.model.path.startswith("tiny:"):
        return
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(resolve_model_path(cfg.model.path))
    except Exception as exc:  # noqa: BLE001 - any load failure is reported with the key
        problems.append(f"model.path={cfg.model.path!r}: cannot load its config ({exc})")


def _check_rewards(cfg: RecipeConfig, problems: list[str]) -> None:
    from .data.prompts import first_prompt, prompt_options
    from .rewards import get_reward
    from .rewards.registry import resolve_terms
    from .rewards.safe import probe_term
    from .security import check_reward_spec
    from .types import Sample

    resolvable = []
    for i, term in enumerate(cfg.reward.terms):
        try:
            check_reward_spec(term.name, key=f"reward.terms.{i}.name")
            get_reward(term.name)
            resolvable.append(i)
        except (KeyError, ValueError, ImportError) as exc:
            msg = str(exc)
            problems.append(msg if msg.startswith("reward.terms.") else f"reward.terms.{i}.name: {msg}")
    if not resolvable:
        return
    with tempfile.TemporaryDirectory(prefix="cascade-rl-probe-") as scratch:
        try:
            item = first_prompt(cfg.data.train, prompt_options(cfg.data), Path(scratch))
        except (FileNotFoundError, ValueError):
            return  # already reported by the data check
        sample = Sample(prompt=item.messages, response=str(item.sft_target or item.answer or ""),
                        ground_truth=item.answer, metadata=dict(item.metadata), images=list(item.images))
        terms = resolve_terms(list(cfg.reward.terms))
        for i in resolvable:
            why = probe_term(terms[i], sample, cfg.reward.timeout_s)
            if why:
                kwargs = dict(cfg.reward.terms[i].kwargs)
                problems.append(f"reward.terms.{i} ({cfg.reward.terms[i].name}, kwargs {kwargs}): called once on "
                                f"row {item.id!r} of data.train, it {why}; fix the function or "
                                f"reward.terms.{i}.kwargs")


def _check_stage_sources(cfg: RecipeConfig, problems: list[str]) -> None:
    from .data.pair_files import load_pair_file

    for i, s in enumerate(cfg.stages):
        if s.kind != "mpo":
            continue
        if s.mpo.logs and not Path(s.mpo.logs).expanduser().is_dir():
            problems.append(f"stages.{i}.mpo.logs={s.mpo.logs!r}: no such folder; point it at a rollout log "
                            "folder (parquet shards), or build one with `cascade-rl logs import`")
        if s.mpo.pairs:
            try:
                load_pair_file(s.mpo, key=f"stages.{i}.mpo")
            except (FileNotFoundError, ValueError) as exc:
                problems.append(f"stages.{i}.mpo.pairs: {exc}")


def check_resources(cfg: RecipeConfig, *, read_prompt_rows: bool = True) -> list[str]:
    """Every problem found beyond the recipe (see the module docstring), one line each; empty when fine."""
    problems: list[str] = []
    _check_data(cfg, read_prompt_rows, problems)
    _check_rewards(cfg, problems)
    _check_model(cfg, problems)
    _check_stage_sources(cfg, problems)
    return problems


def check_gpus(cfg: RecipeConfig, node_gpus: list[int], where: str) -> list[str]:
    """Why the recipe's GPU bundles don't fit nodes with ``node_gpus`` GPUs each (empty when they fit)."""
    from .actors.gpu_layout import fit_problems
    from .config_checks import gpu_request

    return fit_problems(gpu_request(cfg), node_gpus, where)


def gpu_summary(cfg: RecipeConfig) -> str:
    """One line: the GPUs the recipe needs and how they are laid out."""
    from .actors.gpu_layout import bundle_layout
    from .config_checks import gpu_request

    layout = bundle_layout(gpu_request(cfg))
    if layout.mode == "cpu":
        return "GPUs: none (CPU)"
    tp = cfg.rollout.tensor_parallel_size
    engines = f"{cfg.rollout.num_workers} engine(s) x {layout.rollout_gpus:g}" + (f" (TP {tp})" if tp > 1 else "")
    return (f"GPUs: {layout.gpus_needed:g} ({layout.mode}: {cfg.learner.num_ranks} learner rank(s) x "
            f"{layout.learner_gpus:g}, {engines})")


def ray_node_gpus(address: str | None) -> list[int]:
    """GPUs of each alive node of a running Ray cluster: the one this process is connected to, else the one at
    ``address`` (joined for this call only; ``auto``: the head on this machine)."""
    import ray

    from .actors.placement import node_gpus

    joined = not ray.is_initialized()
    if joined:
        try:
            ray.init(address=address or "auto", log_to_driver=False, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - no cluster there, refused, wrong address: said with the option
            raise ConfigError(f"validate --ray-address {address}: cannot join a Ray cluster there "
                              f"({type(exc).__name__}: {str(exc)[:200]}); start it, or describe the cluster with "
                              "--gpus N --gpus-per-node M") from None
    try:
        return node_gpus()
    finally:
        if joined:
            ray.shutdown()
