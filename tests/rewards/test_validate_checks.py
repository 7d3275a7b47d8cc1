"""``cascade-rl validate`` calls each reward once on a real row, checks mpo sources and prompt lengths as run does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cascade_rl.cli import main
from cascade_rl.config import load_recipe
from cascade_rl.recipe_checks import check_resources

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cascade.yaml"


def _problems(tmp_path: Path, *overrides: str) -> list[str]:
    return check_resources(load_recipe(RECIPE, [f"run_dir={tmp_path / 'run'}", *overrides]))


def test_misspelt_kwarg_is_named_with_its_term(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "reward.terms=[{name: math_verify}, {name: 'bad_rewards:needs_bonus', "
                                   "kwargs: {bonu: 1}}]")
    assert len(problems) == 1, problems
    assert problems[0].startswith("reward.terms.1 (bad_rewards:needs_bonus, kwargs {'bonu': 1}): called once on "
                                  "row 'arithmetic-")
    assert "unexpected keyword argument 'bonu'" in problems[0] and "reward.terms.1.kwargs" in problems[0]
    assert _problems(tmp_path, "reward.terms=[{name: 'bad_rewards:needs_bonus', kwargs: {bonus: 1}}]") == []


def test_reward_that_raises_on_a_real_row_is_named(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "reward.terms=[{name: 'bad_rewards:huge'}, {name: 'my_ext_reward:index_echo'}]")
    # index_echo reads metadata["index"], which the arithmetic rows lack: the run would score every sample 0.0
    assert len(problems) == 1 and problems[0].startswith("reward.terms.1 (my_ext_reward:index_echo")
    assert "raised KeyError: 'index'" in problems[0]


def test_missing_mpo_logs_folder_and_bad_pairs_file(tmp_path: Path) -> None:
    bad_pairs = tmp_path / "pairs.jsonl"
    bad_pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "reject": "b"}) + "\n")
    problems = _problems(tmp_path, "stages=[{kind: mpo, mpo: {logs: nowhere}}, "
                                   f"{{kind: mpo, name: m2, mpo: {{pairs: '{bad_pairs}'}}}}]")
    assert problems[0].startswith("stages.0.mpo.logs='nowhere': no such folder")
    assert problems[1].startswith("stages.1.mpo.pairs: ") and "missing column(s) `rejected` (set " \
        "stages.1.mpo.pairs_rejected_key)" in problems[1]


def test_validate_refuses_prompts_over_max_prompt_tokens(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "what is " + "one plus " * 60 + "one?", "answer": "61"}) + "\n")
    code = main(["validate", str(RECIPE), f"run_dir={tmp_path / 'run'}", f"data.train={data}",
                 "model.max_prompt_tokens=64"])
    err = capsys.readouterr().err
    assert code == 1
    assert "data.train: " in err and "over model.max_prompt_tokens=64" in err


def test_run_refuses_a_broken_reward_before_any_worker_starts(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    code = main(["run", str(RECIPE), f"run_dir={tmp_path / 'run'}",
                 "reward.terms=[{name: 'bad_rewards:needs_bonus', kwargs: {bonu: 1}}]"])
    assert code == 2 and "reward.terms.0 (bad_rewards:needs_bonus" in capsys.readouterr().err
    assert not (tmp_path / "run" / "mlflow.db").exists()  # no MLflow run, no Ray, no worker
