"""Command-line overrides: list items named in errors, appending one past the end, one-line syntax errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cascade_rl.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_cascade.yaml"  # 4 stages, 1 reward term


def test_typo_inside_a_list_literal_names_the_item() -> None:
    with pytest.raises(ConfigError, match=r"unknown key `reward\.terms\.1\.wieght`\. Did you mean "
                                          r"`reward\.terms\.1\.weight`\? Valid keys here: name, weight, kwargs\.$"):
        load_recipe(RECIPE, ["reward.terms=[{name: math_verify}, {name: format, wieght: 1}]"])
    with pytest.raises(ConfigError, match=r"unknown key `stages\.4\.epoch`.*Valid keys here: kind, name"):
        load_recipe(RECIPE, ["stages.4={kind: sft, epoch: 2}"])


def test_index_one_past_the_end_appends() -> None:
    cfg = load_recipe(RECIPE, ["reward.terms.1.name=format", "reward.terms.1.weight=0.5",
                               "stages.4.kind=sft", "stages.4.sft.epochs=2"])
    assert [(t.name, t.weight) for t in cfg.reward.terms] == [("math_verify", 1.0), ("format", 0.5)]
    assert [s.kind for s in cfg.stages] == ["sft", "rollout", "mpo", "gspo", "sft"] and cfg.stages[4].sft.epochs == 2


@pytest.mark.parametrize("override,error", [
    ("stages.6.kind=sft", r"`stages` has 4 item\(s\) \(indices 0-3\), so `stages\.6` is past its end; use an "
                          r"index up to 4"),
    ("reward.terms.3.name=x", r"`reward\.terms` has 1 item\(s\).*`reward\.terms\.3` is past its end"),
    ("stages..x=1", r"key `stages\.\.x` is not a dotted key path"),
    ("seed=[1", r"value `\[1` is not valid YAML \(expected ',' or '\]'.*quote the value"),
    ("seed", r"is not of the form key=value"),
])
def test_bad_overrides_are_one_line_errors(override: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error) as info:
        load_recipe(RECIPE, [override])
    assert "\n" not in str(info.value)


def test_cli_prints_no_traceback_for_override_syntax() -> None:
    for override in ("stages..x=1", "seed=[1"):
        out = subprocess.run([sys.executable, "-m", "cascade_rl", "validate", str(RECIPE), override],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert out.stderr.startswith("error: command-line override") and out.stderr.count("\n") == 1
