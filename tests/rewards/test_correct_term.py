"""``reward.correct_term``: which term decides ``correct``, independent of the order of ``reward.terms``."""

import pytest
from cascade_rl.rewards import RewardScorer

from cascade_rl.config import RecipeConfig, RewardTermConfig
from cascade_rl.config_checks import validate
from cascade_rl.types import Sample

RIGHT = Sample(prompt=[{"role": "user", "content": "3+4?"}], response="\\boxed{7}", ground_truth="7")
# boxed_format only checks for a closed \\boxed{}: 1.0 for the wrong answer too
WRONG = Sample(prompt=[{"role": "user", "content": "3+4?"}], response="\\boxed{8}", ground_truth="7")
TERMS = [RewardTermConfig("math_verify", 1.0, {}), RewardTermConfig("boxed_format", 0.5, {})]


def _correct(terms, **kw) -> list:
    with RewardScorer(terms, timeout_s=5.0, num_workers=0, **kw) as scorer:
        return [r.correct for r in scorer.score([RIGHT, WRONG])]


def test_reordering_terms_keeps_correctness_with_correct_term():
    # math_verify: RIGHT 1.0, WRONG 0.0; boxed_format: 1.0 for both (each has a closed \boxed{})
    assert _correct(TERMS) == [True, False]
    # reordered without correct_term: the first term (boxed_format) decides -> WRONG counts as correct
    assert _correct(TERMS[::-1]) == [True, True]
    # reordered with correct_term: the same verdicts as the original order
    assert _correct(TERMS[::-1], correct_term="math_verify") == [True, False]


def test_unknown_correct_term_is_refused():
    with pytest.raises(ValueError, match="correct_term='nope' names none of reward.terms"):
        _correct(TERMS, correct_term="nope")
    cfg = RecipeConfig()
    cfg.reward.terms = [RewardTermConfig(name="math_verify")]
    cfg.reward.correct_term = "format"
    assert any("reward.correct_term='format'" in p for p in validate(cfg))
    cfg.reward.correct_term = "math_verify"
    assert not any("correct_term" in p for p in validate(cfg))
