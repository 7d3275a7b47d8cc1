"""Registry: names, module:function references, refusals with clear messages, term resolution."""

from __future__ import annotations

import cascade_rl.rewards as rewards
import pytest
from cascade_rl.rewards import RewardLookupError, get_reward, list_rewards, register_reward, resolve_terms
from cascade_rl.rewards.registry import _REGISTRY

from cascade_rl.types import RewardTermConfig, Sample

BUILTINS = {"math_verify", "choice", "exact_match", "format", "boxed_format", "length_penalty", "prm",
            "contains_answer"}


def test_importing_the_package_registers_the_builtins() -> None:
    listed = list_rewards()
    assert BUILTINS <= set(listed)
    fn, doc, batched = listed["prm"]
    assert batched and fn is rewards.prm.prm_reward and doc.startswith("Process reward model")
    assert listed["math_verify"][2] is False


def test_external_module_function_reference_works() -> None:
    fn = get_reward("my_ext_reward:shout")
    assert fn(Sample(prompt=[], response="YES"), bonus=0.5) == 1.5
    with rewards.RewardScorer([RewardTermConfig("my_ext_reward:shout", 2.0, {"bonus": 0.25})], num_workers=1) as scorer:
        (res,) = scorer.score([Sample(prompt=[], response="LOUD")])
    assert res.components == {"shout": 1.25} and res.total == 2.5  # 2.0 * (1 + 0.25)


def test_duplicate_registration_is_refused_naming_both_modules() -> None:
    @register_reward("dup_test_reward")
    def first(sample: Sample) -> float:
        return 1.0

    def second(sample: Sample) -> float:
        return 0.0

    second.__module__ = "some_other_pkg.rewards"
    try:
        with pytest.raises(ValueError, match="registered twice") as info:
            register_reward("dup_test_reward")(second)
        msg = str(info.value)
        assert "test_rewards_registry" in msg and "some_other_pkg.rewards" in msg
        register_reward("dup_test_reward")(first)  # the same function again (a reload) is fine
    finally:
        _REGISTRY.pop("dup_test_reward", None)


def test_unknown_name_lists_registered_and_suggests() -> None:
    with pytest.raises(RewardLookupError) as info:
        get_reward("math_verfy")
    msg = str(info.value)
    assert "Did you mean 'math_verify'?" in msg and "exact_match" in msg and "module:function" in msg


@pytest.mark.parametrize("spec", ["rewards/evil.py", "evil.py", "http://x.org/r:fn", "C:\\r\\x:fn", "a\\b"])
def test_paths_and_urls_are_refused(spec: str) -> None:
    with pytest.raises(RewardLookupError, match="file path or URL"):
        get_reward(spec)


@pytest.mark.parametrize("spec, why", [("no_such_module_xyz:fn", "cannot import"),
                                       ("my_ext_reward:nope", "has no attribute"),
                                       ("my_ext_reward:", "not of the form"),
                                       ("os:sep", "not a function")])
def test_bad_references_explain(spec: str, why: str) -> None:
    with pytest.raises(RewardLookupError, match=why):
        get_reward(spec)


def test_resolve_terms_labels_and_errors_name_the_key() -> None:
    terms = resolve_terms([RewardTermConfig("math_verify", 1, {}), RewardTermConfig("math_verify", 0.5, {"mode": "boxed"}),
                           RewardTermConfig("my_ext_reward:shout", 1.0, {})])
    assert [t.label for t in terms] == ["math_verify", "math_verify_2", "shout"]
    assert terms[0].ref == "cascade_rl.rewards.math_verify_reward:math_verify_reward"
    with pytest.raises(RewardLookupError, match=r"reward\.terms\.1\.name: unknown reward 'nope'"):
        resolve_terms([RewardTermConfig("format", 1.0, {}), RewardTermConfig("nope", 1.0, {})])
    with pytest.raises(ValueError, match=r"reward\.terms\.0\.weight"):
        resolve_terms([RewardTermConfig("format", "heavy", {})])
    with pytest.raises(ValueError, match=r"reward\.terms\.0\.kwargs"):
        resolve_terms([RewardTermConfig("format", 1.0, [1])])


def test_an_arbitrary_callable_is_refused_even_when_importable() -> None:
    """`pydoc:pipepager` with kwargs {cmd: ...} ran a shell command; only declared rewards resolve."""
    with pytest.raises(RewardLookupError, match="not declared as a reward"):
        get_reward("pydoc:pipepager")
    with pytest.raises(RewardLookupError, match="not declared as a reward"):
        resolve_terms([RewardTermConfig("pydoc:pipepager", 1.0, {"cmd": "touch /tmp/pwned"})])
    with pytest.raises(RewardLookupError, match="not declared as a reward"):
        get_reward("os:getcwd")


def test_a_module_in_the_working_directory_is_not_imported(tmp_path, monkeypatch) -> None:
    """`python -m` puts the working directory first on sys.path: a file there must not run on `validate`."""
    import sys

    marker = tmp_path / "ran"
    (tmp_path / "cwd_trap_mod.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                             "from cascade_rl.rewards import reward\n"
                                             "@reward\ndef score(sample):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    with pytest.raises(RewardLookupError, match="working directory is not searched"):
        get_reward("cwd_trap_mod:score")
    assert not marker.exists() and "cwd_trap_mod" not in sys.modules
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # asked for explicitly: imported, as any import would be
    assert get_reward("cwd_trap_mod:score")(None) == 1.0 and marker.exists()
    sys.modules.pop("cwd_trap_mod", None)
