"""``cascade-rl rewards list|check`` through the real argparse entry points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cascade_rl.rewards_cli import main


def test_list_shows_names_batched_flag_and_doc(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rewards", "list"]) == 0
    out = capsys.readouterr().out
    prm_line = next(line for line in out.splitlines() if line.startswith("prm "))
    assert " yes " in prm_line and "Process reward model" in prm_line
    assert any(line.startswith("math_verify ") and " no " in line for line in out.splitlines())


def test_check_passes_on_matching_examples(fixtures_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["rewards", "check", "math_verify", "--examples", str(fixtures_dir / "math_examples.jsonl"),
                 "--workers", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "#0: math_verify=1; total=1  ok" in out
    assert "error[math_verify]: no answer found" in out  # the reason of example 4 is shown
    assert out.strip().endswith("7 examples, 7 with `expected`, 0 mismatch(es), 1 with errors/reasons")


def test_check_fails_on_a_mismatch_with_kwargs_and_module_reference(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"prompt": "p", "response": "LOUD", "expected": 1.5}, {"prompt": "p", "response": "quiet", "expected": 1.0}]
    path = tmp_path / "ex.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    code = main(["rewards", "check", "my_ext_reward:shout", "--examples", str(path), "--kwargs", '{"bonus": 0.5}',
                 "--timeout", "2"])
    out = capsys.readouterr().out
    assert code == 1
    assert "#0: shout=1.5; total=1.5  ok" in out and "#1: shout=0.5; total=0.5  MISMATCH: expected 1.0, got 0.5" in out


@pytest.mark.parametrize("content, args, why", [
    ('{"prompt": "p"}', [], "missing `response`"),
    ("not json", [], "not valid JSON"),
    ('{"prompt": "p", "response": "r"}', ["--kwargs", "[1]"], "--kwargs must be a JSON object"),
])
def test_check_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, args: list[str],
                                 why: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert main(["rewards", "check", "format", "--examples", str(path), *args]) == 2
    assert why in capsys.readouterr().err


def test_check_unknown_reward_and_wired_into_main_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ex.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}')
    assert main(["rewards", "check", "math_verfy", "--examples", str(path), "--workers", "0"]) == 2
    assert "Did you mean 'math_verify'?" in capsys.readouterr().err
    from cascade_rl.cli import build_parser

    args = build_parser().parse_args(["rewards", "list"])
    assert args.func(args) == 0


def test_rewards_check_refuses_a_callable_that_is_not_a_reward(tmp_path: Path, capsys) -> None:
    """`rewards check pydoc:pipepager --kwargs '{"cmd": ...}'` ran the shell command; now it is refused."""
    marker = tmp_path / "pwned"
    path = tmp_path / "ex.jsonl"
    path.write_text('{"prompt": "q", "response": "r", "answer": "a"}\n')
    code = main(["rewards", "check", "pydoc:pipepager", "--examples", str(path),
                 "--kwargs", json.dumps({"cmd": f"touch {marker}"}), "--workers", "0"])
    assert code != 0 and not marker.exists()
    assert "not declared as a reward" in capsys.readouterr().err
