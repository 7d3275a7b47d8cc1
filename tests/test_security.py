"""Security defaults: bind-address warnings, redaction of secrets before MLflow/logs, reward specs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cascade_rl.config import flatten, load_recipe
from cascade_rl.security import (
    REDACTED,
    check_bind_address,
    check_reward_spec,
    is_secret_key,
    recipe_problems,
    redact,
    redact_text,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "10.0.3.7", "172.20.1.1", "192.168.1.5",
                                  "fd00::5", "head-svc.default.svc.cluster.local"])
def test_loopback_private_and_hostnames_pass(host: str) -> None:
    assert check_bind_address(host, "Ray dashboard") == []


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", None, "*"])
def test_wildcards_warn_and_say_what_to_do(host: str | None) -> None:
    (warning,) = check_bind_address(host, "MLflow UI")
    assert warning.startswith("MLflow UI binds to") and "every interface" in warning
    assert "127.0.0.1" in warning and "RAY_AUTH_MODE=token" in warning


@pytest.mark.parametrize("host", ["8.8.8.8", "2001:4860:4860::8888"])
def test_public_addresses_warn(host: str) -> None:
    (warning,) = check_bind_address(host, "Ray dashboard")
    assert f"public address {host}" in warning


@pytest.mark.parametrize("key", ["hf_token", "tracking.password", "reward.terms.0.kwargs.api_key", "apiKey",
                                 "OPENAI_API_KEY", "aws_secret_access_key", "db-passwd", "RAY_AUTH_TOKEN",
                                 "credentials", "client_secret", "private-key"])
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["model.max_response_tokens", "learner.micro_batch_tokens", "tokenizer",
                                 "eval/response_tokens", "rollout.num_workers", "keep_last", "monkey"])
def test_not_secret_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_hides_secret_values_and_url_passwords_keeps_the_rest() -> None:
    params = {
        "model.max_response_tokens": "24",
        "reward.terms.0.kwargs.api_key": "sk-abc123",
        "tracking.uri": "https://alice:s3cr3t@mlflow.internal:5000",
        "empty_token": "",
        "nested": {"hf_token": "hf_xyz", "path": "/data", "urls": ["postgresql://u:pw@db/x", "file:///tmp"]},
    }
    out = redact(params)
    assert out == {
        "model.max_response_tokens": "24",
        "reward.terms.0.kwargs.api_key": REDACTED,
        "tracking.uri": f"https://alice:{REDACTED}@mlflow.internal:5000",
        "empty_token": "",  # nothing to hide; keeps "not set" visible
        "nested": {"hf_token": REDACTED, "path": "/data", "urls": [f"postgresql://u:{REDACTED}@db/x", "file:///tmp"]},
    }
    assert params["reward.terms.0.kwargs.api_key"] == "sk-abc123"  # the input is not modified
    assert "s3cr3t" not in str(out) and "sk-abc123" not in str(out)
    assert redact_text("see https://bob:pw@host/x and http://host/y") == f"see https://bob:{REDACTED}@host/x and http://host/y"


def test_redacting_the_flattened_tiny_recipe_changes_nothing(tmp_path: Path) -> None:
    """The tiny recipe has no secrets: redaction must not hide its *_tokens lengths."""
    params = flatten(load_recipe(ROOT / "recipes" / "tiny_cascade.yaml", [f"run_dir={tmp_path}"]))
    assert redact(params) == params
    withkey = flatten(load_recipe(ROOT / "recipes" / "tiny_cascade.yaml",
                                  [f"run_dir={tmp_path}", "reward.terms.0.kwargs={api_key: sk-live-1}"]))
    assert redact(withkey)["reward.terms.0.kwargs.api_key"] == REDACTED


@pytest.mark.parametrize("spec", ["math_verify", "format-think", "prm.visual", "my_rewards.math:score",
                                  "pkg.sub.mod:Scorer.batched"])
def test_reward_specs_accepted(spec: str) -> None:
    check_reward_spec(spec)


@pytest.mark.parametrize(("spec", "why"), [
    ("https://evil.example/reward.py", "URL"),
    ("http://10.0.0.1:8000/score", "URL"),
    ("file:rewards.py", "URL"),
    ("s3://bucket/reward.py:score", "URL"),
    ("/tmp/reward.py", "file path"),
    ("./rewards/mine.py:score", "file path"),
    ("~/r.py", "file path"),
    ("rewards\\mine:score", "file path"),
    ("mine.py", "file path"),
    ("pkg.mod:", "pkg.module:function"),
    ("a:b:c", "pkg.module:function"),
    ("rm -rf x", "registered reward name"),
    ("", "registered name"),
])
def test_reward_specs_rejected_with_the_key(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        check_reward_spec(spec, key="reward.terms.2.name")
    assert str(info.value).startswith("reward.terms.2.name")


def test_recipe_problems_names_each_bad_term() -> None:
    cfg = SimpleNamespace(reward=SimpleNamespace(terms=[SimpleNamespace(name="math_verify"),
                                                        SimpleNamespace(name="https://x/r.py")]))
    (problem,) = recipe_problems(cfg)
    assert problem.startswith("reward.terms.1.name='https://x/r.py'") and "URL" in problem


@pytest.mark.parametrize("key", ["apitoken", "authToken", "GITHUB_ACCESSTOKEN", "dbpassword", "tracking.accesskey",
                                 "reward.terms.0.kwargs.clientsecret"])
def test_compound_secret_key_names_are_caught(key: str) -> None:
    """`apitoken` slipped past the word list (params of `api_token` were redacted)."""
    assert is_secret_key(key)
    assert redact({key: "v4lue"}) == {key: REDACTED}


def test_one_rule_for_tags_run_names_nested_kwargs_and_urls() -> None:
    tags = {"team": "rl", "apitoken": "abc123", "note": "pulled from https://u:pw1@hub.example/x?token=qq9&page=2"}
    assert redact(tags) == {"team": "rl", "apitoken": REDACTED,
                            "note": f"pulled from https://u:{REDACTED}@hub.example/x?token={REDACTED}&page=2"}
    assert redact_text("exp-hf_token=hf_abc-lr3") == f"exp-hf_token={REDACTED}"
    assert redact_text("run with hf_AbCdEfGhIjKlMnOpQrStUv") == f"run with {REDACTED}"
    assert redact_text("max_response_tokens=24 lr=3e-4") == "max_response_tokens=24 lr=3e-4"
    nested = {"reward": {"terms": [{"name": "judge", "kwargs": {"endpoint": {"apitoken": "t0k", "retries": 2}}}]}}
    assert redact(nested)["reward"]["terms"][0]["kwargs"]["endpoint"] == {"apitoken": REDACTED, "retries": 2}


def test_the_driver_redacts_tags_and_the_run_name_before_mlflow(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from cascade_rl.stages import driver

    cfg = load_recipe(ROOT / "recipes" / "tiny_cascade.yaml",
                      [f"run_dir={tmp_path}", "tracking.run_name=exp-token=s3cr3t",
                       "tracking.tags={apitoken: t0k, owner: me}"])
    monkeypatch.setattr(driver, "_start_workers", lambda *a, **k: None)
    driver._start(cfg, tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["apitoken"] == REDACTED and run.data.tags["owner"] == "me"
    assert run.info.run_name == f"exp-token={REDACTED}"
    assert "s3cr3t" not in str(run.data.params) and "t0k" not in str(run.data.params)


def test_run_dir_is_created_owner_only_and_the_recipe_can_widen_it(tmp_path: Path, monkeypatch) -> None:
    import stat

    from cascade_rl.config_checks import validate
    from cascade_rl.stages import driver

    monkeypatch.setattr(driver, "_start", lambda *a: (_ for _ in ()).throw(RuntimeError("stop here")))
    for mode, want in (("0700", 0o700), ("0750", 0o750)):
        run_dir = tmp_path / mode / "run"
        cfg = load_recipe(ROOT / "recipes" / "tiny_cascade.yaml", [f"run_dir={run_dir}", f"run_dir_mode='{mode}'"])
        with pytest.raises(RuntimeError, match="stop here"):
            driver.run(cfg)
        assert stat.S_IMODE(run_dir.stat().st_mode) == want and stat.S_IMODE(run_dir.parent.stat().st_mode) == want
    cfg = load_recipe(ROOT / "recipes" / "tiny_cascade.yaml", [f"run_dir={tmp_path}"])
    cfg.run_dir_mode = "0055"
    assert any(p.startswith("run_dir_mode='0055'") for p in validate(cfg))


def test_ray_token_file_is_made_0600_only_when_it_is_ours(tmp_path: Path, monkeypatch) -> None:
    import stat

    from cascade_rl.security import tighten_ray_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert tighten_ray_token() is False  # no token file: nothing created
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("t")
    token.chmod(0o644)  # as Ray writes it
    assert tighten_ray_token() is True and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert tighten_ray_token() is False and token.read_text() == "t"


def test_ray_session_folder_is_made_owner_only(tmp_path: Path) -> None:
    """Ray creates /tmp/ray/session_* 0755: its worker logs (prompts, tracebacks) were readable by every user."""
    import stat

    from cascade_rl.security import tighten_ray_session

    session = tmp_path / "session_2026-12-07_00-00-00_1"
    assert tighten_ray_session(session) is False  # missing: nothing created
    session.mkdir(mode=0o755)
    session.chmod(0o755)
    assert tighten_ray_session(session) is True and stat.S_IMODE(session.stat().st_mode) == 0o700
    assert tighten_ray_session(session) is False  # already owner only


def test_base_pointing_at_a_non_recipe_quotes_only_an_excerpt(tmp_path: Path) -> None:
    from cascade_rl.config import ConfigError

    secret = tmp_path / "passwd"
    secret.write_text("".join(f"user{i}:x:{i}:{i}:User {i}:/home/user{i}:/bin/bash\n" for i in range(40)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {secret}\nname: x\n")
    with pytest.raises(ConfigError, match="not a recipe") as info:
        load_recipe(recipe, [])
    msg = str(info.value)
    assert len(msg) < 400 and "user39" not in msg and str(secret) in msg
