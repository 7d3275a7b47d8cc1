"""Recipe loading: base chains, overrides, typos with suggestions, wrong types, gathered cross-field errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade_rl.config import ConfigError, flatten, load_recipe, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe: Path) -> None:
    cfg = load_recipe(recipe)
    assert cfg.stages and all(s.name for s in cfg.stages)


def test_base_and_overrides(tmp_path: Path) -> None:
    _write(tmp_path, "base.yaml", "name: a\nseed: 1\nstages: [{kind: sft}]\nrollout: {group_size: 4}\n")
    child = _write(tmp_path, "child.yaml", "base: base.yaml\nname: b\n")
    cfg = load_recipe(child, ["seed=7", "rollout.temperature=0.5", "tracking.tags={team: rl}"])
    assert (cfg.name, cfg.seed, cfg.rollout.group_size, cfg.rollout.temperature) == ("b", 7, 4, 0.5)
    assert cfg.run_dir == "runs/b"  # ${name} interpolation resolved after the merge
    assert cfg.tracking.tags == {"team": "rl"}
    assert flatten(cfg)["rollout.group_size"] == "4"
    assert "group_size: 4" in to_yaml(cfg)


def test_misspelt_key_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, "typo.yaml", "stages: [{kind: sft}]\nrollout: {group_sise: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "rollout.group_sise" in msg and str(path) in msg and "Did you mean `rollout.group_size`" in msg


def test_misspelt_override_and_nested_stage_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "ok.yaml", "stages: [{kind: sft}, {kind: gspo}]\n")
    with pytest.raises(ConfigError, match="learner.zero_stag.*Did you mean `learner.zero_stage`"):
        load_recipe(path, ["learner.zero_stag=3"])
    with pytest.raises(ConfigError, match="clip_hgh.*clip_high"):
        load_recipe(path, ["stages.1.gspo.clip_hgh=0.3"])


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    path = _write(tmp_path, "type.yaml", "stages: [{kind: sft}]\nrollout: {group_size: four}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert "rollout.group_size" in str(err.value) and "int" in str(err.value)
    with pytest.raises(ConfigError, match="stages.0.kind|stages\\[0\\].kind"):
        load_recipe(_write(tmp_path, "kind.yaml", "stages: [{kind: ppo}]\n"))


def test_cross_field_problems_are_gathered(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.yaml", "rollout: {group_size: -1}\nstages:\n"
                  "  - {kind: gspo, gspo: {clip_low: 1.5}}\n  - {kind: mpo}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "rollout.group_size=-1" in msg
    assert "stages.0.gspo.clip_low=1.5" in msg
    assert "stages.1: mpo needs a rollout stage" in msg
    assert msg.count("\n  - ") >= 3


def test_missing_file_and_base_loop(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    loop = _write(tmp_path, "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_recipe(loop)


def test_recipe_reference_matches_dataclasses() -> None:
    from cascade_rl.config import reference_markdown

    shipped = (ROOT / "docs" / "recipe_reference.md").read_text().strip()
    assert shipped == reference_markdown().strip(), (
        "docs/recipe_reference.md is stale: run `python -m cascade_rl.config > docs/recipe_reference.md`")


def test_packing_error_names_keys_the_loader_accepts(tmp_path: Path) -> None:
    """The learner's packing error tells the user to set `learner.packing=…`: the loader must accept each value."""
    import re
    from types import SimpleNamespace

    from cascade_rl.actors.learner import LearnerWorker

    fake = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa")),
                           spec=SimpleNamespace(packing="packed"), packing_check_diff=0.5,
                           _packing_isolates_sequences=lambda: False)
    with pytest.raises(RuntimeError) as err:
        LearnerWorker._choose_packing(fake)
    told = re.findall(r"(learner\.\w+)=(\w+)", str(err.value))
    assert len(told) >= 2, str(err.value)
    path = _write(tmp_path, "ok.yaml", "stages: [{kind: sft}]\n")
    for key, value in told:
        cfg = load_recipe(path, [f"{key}={value}"])
        assert cfg.learner.packing == value
    with pytest.raises(ConfigError, match="learner.packing"):
        load_recipe(path, ["learner.packing=tight"])


@pytest.mark.parametrize("stage, key", [
    ("{kind: mpo, gspo: {clip_low: 0.2}}", "stages.1.gspo"),
    ("{kind: mpo, gspo: {}}", "stages.1.gspo"),  # present in the YAML, even if equal to the defaults
    ("{kind: gspo, num_prompts: 10}", "stages.1.num_prompts"),
    ("{kind: rollout, lr: 1.0e-4}", "stages.1.lr"),
    ("{kind: gspo, mpo: {beta: 0.2}}", "stages.1.mpo"),
])
def test_block_of_another_stage_kind_is_an_error(tmp_path: Path, stage: str, key: str) -> None:
    path = _write(tmp_path, "kinds.yaml", f"stages:\n  - {{kind: rollout}}\n  - {stage}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert f"{key}: a stage of kind" in str(err.value) and str(path) in str(err.value)


def test_override_of_another_kinds_block_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "ok.yaml", "stages: [{kind: rollout}, {kind: mpo}]\n")
    with pytest.raises(ConfigError, match="stages.1.gspo: a stage of kind `mpo` does not read `gspo`"):
        load_recipe(path, ["stages.1.gspo.num_steps=3"])
    assert load_recipe(path, ["stages.1.mpo.beta=0.2"]).stages[1].mpo.beta == 0.2


def test_mpo_terms_are_typed_and_checked_against_the_loss_table(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade_rl.algos import mpo as mpo_algos

    def recipe(terms: str) -> Path:
        return _write(tmp_path, "mpo.yaml", f"stages: [{{kind: rollout}}, {{kind: mpo, mpo: {{terms: {terms}}}}}]\n")

    cfg = load_recipe(recipe("[{loss: sft, weight: 2}]"))
    assert (cfg.stages[1].mpo.terms[0].loss, cfg.stages[1].mpo.terms[0].weight) == ("sft", 2.0)
    with pytest.raises(ConfigError, match=r"stages.1.mpo.terms.0.loss='ipo': valid losses are \['bco_pair'"):
        load_recipe(recipe("[{loss: ipo}]"))
    with pytest.raises(ConfigError, match="stages.1.mpo.terms.1.loss='sft' is listed twice"):
        load_recipe(recipe("[{loss: sft}, {loss: sft}]"))
    with pytest.raises(ConfigError, match="unknown key `stages.1.mpo.terms.0.wieght`.*Did you mean"):
        load_recipe(recipe("[{loss: sft, wieght: 1}]"))
    # the valid names are the learner's own loss table, not a copy kept in the config
    monkeypatch.setitem(mpo_algos.MPO_LOSSES, "ipo", mpo_algos.MPO_LOSSES["sigmoid"])
    assert load_recipe(recipe("[{loss: ipo}]")).stages[1].mpo.terms[0].loss == "ipo"


def test_resume_is_a_literal(tmp_path: Path) -> None:
    path = _write(tmp_path, "ok.yaml", "stages: [{kind: sft}]\n")
    assert load_recipe(path, ["resume=auto"]).resume == "auto"
    with pytest.raises(ConfigError, match="resume"):
        load_recipe(path, ["resume=sometimes"])


def test_worker_specs_are_derived_from_the_recipe_in_one_place() -> None:
    """Every spec field is a recipe key (same name, its default and doc only in config.py) or a derived value."""
    import dataclasses

    from cascade_rl.actors.learner import LearnerSpec
    from cascade_rl.actors.rollout import RolloutSpec

    from cascade_rl.config import recipe_with, reference_markdown
    from cascade_rl.stages.workers import build_spec, spec_sources

    derived = {"model_path", "seed", "is_vlm", "total_steps", "shared_gpu_reserve_fraction"}
    reference = reference_markdown()
    for cls in (LearnerSpec, RolloutSpec):
        names = {f.name for f in dataclasses.fields(cls)}
        sources = spec_sources(cls)
        assert names - set(sources) <= derived, f"{cls.__name__} fields that are no recipe key"
        assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(cls)), "defaults belong in config"
        for key in sources.values():
            assert f"| `{key}` |" in reference, f"{key} is not documented"
    values = {"learner.packing": "padded", "learner.attn_implementation": "eager", "learner.zero_stage": 3,
              "model.dtype": "bfloat16", "rollout.ignore_eos": True, "rollout.sleep_when_idle": True,
              "rollout.hf_max_batch_sequences": 7, "rollout.max_images_per_prompt": 2}
    cfg = recipe_with(values)
    learner = build_spec(LearnerSpec, cfg, model_path="/m", seed=3, is_vlm=False, total_steps=1,
                         shared_gpu_reserve_fraction=0.0)
    rollout = build_spec(RolloutSpec, cfg, model_path="/m", seed=3, is_vlm=False)
    for key, value in values.items():
        spec = learner if key.split(".")[0] == "learner" else rollout
        assert getattr(spec, key.split(".")[1]) == value, key
    assert learner.dtype == rollout.dtype == "bfloat16"


def test_reward_terms_keep_one_type_from_recipe_to_scorer(tmp_path: Path) -> None:
    from cascade_rl.actors.reward import RewardSpec, RewardWorker
    from cascade_rl.rewards import resolve_terms

    from cascade_rl.types import RewardTermConfig, Sample

    path = _write(tmp_path, "r.yaml", "stages: [{kind: sft}]\n"
                  "reward: {terms: [{name: exact_match, weight: 2.0}, {name: format, weight: 0.5}]}\n")
    reward = load_recipe(path).reward
    terms = reward.terms
    assert all(type(t) is RewardTermConfig for t in terms)
    worker = RewardWorker(RewardSpec(terms=terms, timeout_s=reward.timeout_s,
                                     correct_threshold=reward.correct_threshold, num_processes=0))  # what the reward group hands its actors
    assert [(t.spec, t.weight) for t in worker.scorer.terms] == [("exact_match", 2.0), ("format", 0.5)]
    (res,) = worker.score([Sample(prompt=[], response="7", ground_truth="7")])
    assert res.components["exact_match"] == 1.0
    with pytest.raises(ValueError, match=r"reward\.terms\.0: expected a RewardTermConfig"):
        resolve_terms([("exact_match", 1.0, {})])  # the old triple form is gone
    worker.close()
