"""cluster/: the launcher YAML, the KubeRay RayJob, the runtime env and submit.sh — parsed, checked for bind
addresses and secrets, and (slow) used for real: a local token-authenticated Ray head, `ray job submit` with
cluster/runtime_env.yaml and --working-dir, and the tiny recipe end to end read back from MLflow.

The head is started with `ray start --head --block` in its own session and stopped by signalling that process
(then any process still naming its private temp dir): `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cascade_rl.config import load_recipe
from cascade_rl.security import check_bind_address, is_secret_key

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws_gpu.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
SUBMIT = CLUSTER / "submit.sh"
CONFIGS = [LAUNCHER, RAYJOB, RUNTIME_ENV, SUBMIT, CLUSTER / "Dockerfile"]
VENV_BIN = Path(sys.executable).parent


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------- static checks


def test_launcher_config_is_valid_for_ray_up() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(LAUNCHER)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cfg, f"{LAUNCHER.name}: missing {key}"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    validate_config(prepare_config(cfg))  # Ray's own schema, with the provider's defaults filled in
    gpu_types = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t.get("max_workers", 0) >= 1 for t in gpu_types)
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    setup = " ".join(cfg["setup_commands"])
    assert '.[gpu]' in setup
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # a path, not a token


def test_rayjob_manifest_runs_a_real_recipe() -> None:
    job = _load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "cascade-rl run" in spec["entrypoint"]
    # The entrypoint's recipe and overrides load: a misspelt override key would fail on the cluster otherwise.
    words = shlex.split(spec["entrypoint"].split("&&")[-1])
    recipe, overrides = words[words.index("run") + 1], words[words.index("run") + 2 :]
    cfg = load_recipe(ROOT / recipe, overrides)
    gpus_needed = (cfg.learner.num_ranks * cfg.learner.num_gpus_per_rank
                   + cfg.rollout.num_workers * cfg.rollout.num_gpus_per_worker)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    assert runtime_env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"
    workers = cluster["workerGroupSpecs"]
    gpus = sum(int(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               * w["replicas"] for w in workers)
    assert gpus >= gpus_needed > 0, f"the entrypoint needs {gpus_needed} GPUs, the worker groups have {gpus}"


def test_runtime_env_is_valid_and_keeps_the_upload_small() -> None:
    from ray.runtime_env import RuntimeEnv

    env = _load(RUNTIME_ENV)
    RuntimeEnv(**env)  # Ray's own validation of the fields
    excludes = {e.strip("/") for e in env["excludes"]}
    assert {".venv", "runs", ".cache", ".git", "bench/results"} <= excludes
    assert env["env_vars"]["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    # the driver's ray.init(runtime_env={"env_vars": ...}) repeats some keys: without this Ray refuses the job
    assert env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "runtime_env env_vars must be strings"
    assert "working_dir" not in env  # given by --working-dir on the command line


def _code(line: str) -> str:
    return line.split("#", 1)[0]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bind_addresses_are_private_unless_an_explicit_opt_in(path: Path) -> None:
    lines = path.read_text().splitlines()
    found = 0
    for i, line in enumerate(lines):
        code = _code(line)
        hosts = re.findall(r"(?:dashboard-host|--host|node-ip-address)[=:\s]+[\"']?([^\s\"']+)", code)
        hosts += ["0.0.0.0"] * code.count("0.0.0.0") if not hosts else []
        for host in hosts:
            found += 1
            context = " ".join(lines[max(0, i - 4) : i + 1]).lower()
            if check_bind_address(host, f"{path.name}:{i + 1}"):
                assert "explicit opt-in" in context, (
                    f"{path.name}:{i + 1} binds to {host}: use 127.0.0.1 or a private address, or explain the "
                    f"explicit opt-in in a comment just above")
    if path in (LAUNCHER, RAYJOB):
        assert found, f"{path.name}: the dashboard bind address should be set explicitly"


_SECRET_VALUE_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",  # AWS access key id
    r"hf_[A-Za-z0-9]{30,}",  # Hugging Face token
    r"sk-[A-Za-z0-9]{20,}",  # API keys of OpenAI style
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"RAY_AUTH_TOKEN=[^$\s\"']",  # a token on a command line instead of ${VAR} / a file
]


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
            yield f"{path}.{k}", k, v
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}.{i}")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_literal_secrets(path: Path) -> None:
    text = path.read_text()
    for pattern in _SECRET_VALUE_PATTERNS:
        assert not re.search(pattern, _strip_comments(text)), f"{path.name}: looks like a literal secret ({pattern})"
    if path.suffix != ".yaml":
        return
    docs = [_load(path)] + ([yaml.safe_load(_load(path)["spec"]["runtimeEnvYAML"])] if path == RAYJOB else [])
    for doc in docs:
        for where, key, value in _walk(doc):
            if isinstance(key, str) and is_secret_key(key) and key != "secretName":
                assert not isinstance(value, str) or value.startswith(("~", "/", "$")), \
                    f"{path.name}{where}: a secret-looking key holds a literal value"
            if isinstance(value, list):  # Kubernetes env lists: {name, value} must use valueFrom for secrets
                for item in value:
                    if isinstance(item, dict) and is_secret_key(str(item.get("name", ""))):
                        assert "value" not in item, f"{path.name}{where}: {item['name']} must use valueFrom"


def _strip_comments(text: str) -> str:
    return "\n".join(_code(line) for line in text.splitlines())


def test_submit_script_builds_the_documented_command(tmp_path: Path) -> None:
    assert os.access(SUBMIT, os.X_OK)
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)
    env = {**os.environ, "DRY_RUN": "1", "SUBMIT_ARGS": "--no-wait", "HOME": str(tmp_path),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    args = [str(SUBMIT), str(ROOT / "recipes" / "tiny_cascade.yaml"), "seed=1",
            "data.train=synthetic:arithmetic?n=64&seed=0"]
    out = subprocess.run(args, env=env, cwd="/", capture_output=True, text=True, check=True).stdout
    assert not out.startswith("RAY_AUTH_MODE")  # no token anywhere: auth mode left alone
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
    out = subprocess.run(args, env=env, cwd="/", capture_output=True, text=True, check=True).stdout
    words = shlex.split(out)
    assert words[0] == "RAY_AUTH_MODE=token"  # a token file exists: send it
    assert words[2:5] == ["job", "submit", "--address"] and words[5] == "http://127.0.0.1:8265"
    assert words[6] == "--runtime-env-json"
    runtime_env = json.loads(words[7])
    assert runtime_env["excludes"] == _load(RUNTIME_ENV)["excludes"]  # cluster/runtime_env.yaml, extended
    assert runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "120"  # time for a graceful stop
    assert re.fullmatch(r"[0-9a-f]{40}", runtime_env["env_vars"].get("CASCADE_RL_GIT_COMMIT", "0" * 40))
    assert "py_modules" not in runtime_env
    # a head on this machine: the job runs with the Python next to the `ray` used here, not the head's PATH
    assert words[8:12] == ["--working-dir", ".", "--no-wait", "--"]
    assert words[12] == str(VENV_BIN / "python") and words[13:] == [
        "-m", "cascade_rl", "run", "recipes/tiny_cascade.yaml", "seed=1", "data.train=synthetic:arithmetic?n=64&seed=0"]
    module = tmp_path / "my_rewards"
    module.mkdir()
    (module / "__init__.py").write_text("")
    out = subprocess.run(args, env={**env, "PY_MODULES": str(module), "RAY_ADDRESS": "http://10.1.2.3:8265"},
                         cwd="/", capture_output=True, text=True, check=True).stdout
    words = shlex.split(out)
    assert json.loads(words[7])["py_modules"] == [str(module)]
    assert words[12] == "python"  # a remote head: its own `python` (JOB_PYTHON to choose)
    missing = subprocess.run(args, env={**env, "PY_MODULES": str(tmp_path / "nope")}, cwd="/", capture_output=True,
                             text=True)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    usage = subprocess.run([str(SUBMIT)], capture_output=True, text=True)
    assert usage.returncode == 2 and "RECIPE" in usage.stderr
    with tempfile.NamedTemporaryFile(suffix=".yaml") as outside:
        bad = subprocess.run([str(SUBMIT), outside.name], capture_output=True, text=True)
    assert bad.returncode == 2 and "outside the repository" in bad.stderr


# ---------------------------------------------------------------------------------------------- a real head


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are picked (one at a time, the OS may hand the
    same port out twice, and Ray refuses two components on one port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    address: str  # the dashboard / job API
    dashboard_port: int
    gcs_address: str  # what `ray.address` / ray.init joins
    env: dict[str, str]  # what a client needs: RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN
    log: Path


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head with token auth, bound to 127.0.0.1, in a private temp dir, started as the README says:
    the venv's ``ray`` by its path, the venv not activated (so a job's ``cascade-rl`` is not on its PATH)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="crl-ray-", dir="/tmp"))  # short: Ray's unix sockets live here
    dashboard_port, gcs_port, client_port, agent_port = _free_ports(4)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "PATH": path,
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = temp_dir / "ray_start.log"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", "--num-gpus=0",
           f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
           f"--temp-dir={temp_dir}", f"--object-store-memory={512 * 1024 * 1024}", "--disable-usage-stats"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_dashboard(dashboard_port, proc, log)
        yield Head(f"http://127.0.0.1:{dashboard_port}", dashboard_port, f"127.0.0.1:{gcs_port}",
                   {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}, log)
    finally:
        _stop_head(proc, temp_dir)


def _wait_for_dashboard(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token is fine here)
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"Ray dashboard not up on port {port} after {timeout_s}s:\n{log.read_text()[-3000:]}")


def _stop_head(proc: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM the `ray start --block` we started (it shuts its node down), then end any process that still
    names our temp dir (only ours do), then remove the temp dir."""
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    leftovers = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if str(temp_dir) in " ".join(p.info["cmdline"] or []):
                leftovers.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in leftovers:
        p.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=10)
    for p in alive:
        p.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _job(head: Head, *args: str, timeout_s: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), "job", *args], env=head.env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout_s)


def _status(head: Head, submission_id: str) -> str:
    """SUCCEEDED / FAILED / STOPPED / RUNNING / PENDING, from `ray job status`."""
    out = _job(head, "status", "--address", head.address, submission_id)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    done = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", text)
    if done:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[done.group(1)]
    match = re.search(r"Status for job '[^']+': (\w+)", text)
    return match.group(1) if match else f"unknown:\n{text}"


@pytest.mark.slow
def test_runtime_env_in_local_job_submit(ray_head: Head) -> None:
    import psutil

    # The dashboard listens on loopback only, and refuses a request without the token.
    listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == ray_head.dashboard_port}
    assert listening == {"127.0.0.1"}
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{ray_head.address}/api/jobs/", timeout=10)
    assert denied.value.code == 401

    probe = ("import os, cascade_rl; print('CRL_ENV', os.environ['VLLM_ALLOW_INSECURE_SERIALIZATION'], "
             "os.environ['HF_HUB_OFFLINE']); print('CRL_PKG', cascade_rl.__file__); "
             "print('CRL_LS', ','.join(sorted(os.listdir('.'))))")
    submission_id = f"crl-env-{secrets.token_hex(4)}"
    out = _job(ray_head, "submit", "--address", ray_head.address, "--submission-id", submission_id,
               "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".", "--", sys.executable, "-c", probe)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs
    assert _status(ray_head, submission_id) == "SUCCEEDED", logs
    assert re.search(r"^CRL_ENV 1 1$", logs, re.M), logs
    pkg = re.search(r"^CRL_PKG (.+)$", logs, re.M).group(1)
    assert "working_dir_files" in pkg and not pkg.startswith(str(ROOT)), pkg  # the uploaded copy
    uploaded = set(re.search(r"^CRL_LS (.+)$", logs, re.M).group(1).split(","))
    assert {"cascade_rl", "recipes", "cluster", "pyproject.toml"} <= uploaded
    assert not uploaded & {".venv", "runs", ".cache", ".git"}, uploaded


def _driver_parts_landed() -> bool:
    """The driver needs the actor groups and the reward registry (built by other issues)."""
    return (ROOT / "actors" / "group.py").is_file() and (ROOT / "rewards" / "__init__.py").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not _driver_parts_landed(), reason="actors/group.py or rewards/ not landed yet")
def test_submit_tiny_recipe_end_to_end(ray_head: Head, tmp_path: Path) -> None:
    """The documented path: cluster/submit.sh -> ray job submit -> cascade-rl run on the head, MLflow read back."""
    from mlflow.tracking import MlflowClient

    from cascade_rl.report import make_report

    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "data.train=synthetic:arithmetic?n=256&seed=0",
                 "data.eval=synthetic:arithmetic?n=32&seed=12345", "eval.num_prompts=32", "eval.every_steps=0",
                 "rollout.group_size=4", "stages.0.sft.batch_size=32", "stages.1.num_prompts=32",
                 "stages.3.gspo.num_steps=2", "stages.3.gspo.prompts_per_step=8", "checkpoint.every_steps=0",
                 "checkpoint.export_hf=false"]
    outside = tmp_path / "outside" / "my_rewards"  # a reward module outside the repository
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text(OUTSIDE_REWARD)
    overrides.append("reward.terms.0.name=my_rewards:outside_math")
    submission_id = f"crl-tiny-{secrets.token_hex(4)}"
    # as the README: `PATH=$PWD/.venv/bin:$PATH cluster/submit.sh …` against a head whose PATH lacks the venv
    env = {**ray_head.env, "SUBMIT_ARGS": f"--submission-id {submission_id}", "PY_MODULES": str(outside),
           "PATH": f"{VENV_BIN}{os.pathsep}{ray_head.env['PATH']}"}
    out = subprocess.run([str(SUBMIT), "recipes/tiny_cascade.yaml", *overrides], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=1700)
    logs = out.stdout[-6000:] + out.stderr[-6000:]
    assert _status(ray_head, submission_id) == "SUCCEEDED", logs

    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the recipe run; stages are children
    assert run.info.status == "FINISHED"
    assert run.data.params["name"] == "tiny_cascade" and run.data.params["stages.3.gspo.num_steps"] == "2"
    assert client.get_metric_history(run.info.run_id, "reward/outside_math")  # the outside module scored
    accuracy = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert len(accuracy) >= 4  # the start and the end of sft, mpo, gspo (a rollout stage leaves the policy as is)
    report = make_report(run_dir, tmp_path / "report.png")
    assert [name for _, name in report.boundaries] == ["sft", "rollout", "mpo", "gspo"]


OUTSIDE_REWARD = """
from cascade_rl.rewards.registry import get_reward, register_reward


@register_reward("outside_math")
def outside_math(sample, **kwargs):
    return get_reward("math_verify")(sample, **kwargs)
"""

LOCAL_PROBE = """
import os, sys, psutil, ray
from cascade_rl.config import load_recipe
from cascade_rl.stages.workers import init_ray
cfg = load_recipe(sys.argv[1], ["ray.num_cpus=1", "ray.object_store_mb=100", *sys.argv[2:]])
where = init_ray(cfg)
me = psutil.Process()
ours = {p.pid for p in me.children(recursive=True)} | {me.pid}
ports = sorted({c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in ours})
print("PROBE", where, ray.get_runtime_context().gcs_address, int(ray.cluster_resources()["CPU"]), ports)
session = ray._private.worker.global_worker.node.get_session_dir_path()
print("SESSION_MODE", oct(os.stat(session).st_mode & 0o777))
ray.shutdown()
"""


def _probe(head: Head, *overrides: str, **env: str) -> tuple[str, str, int, list[int]]:
    env = {**{k: v for k, v in head.env.items() if k != "RAY_ADDRESS"}, **env}
    out = subprocess.run([sys.executable, "-c", LOCAL_PROBE, str(ROOT / "recipes" / "tiny_cascade.yaml"),
                          *overrides], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = re.search(r"^PROBE (\S+) (\S+) (\d+) \[(.*)\]$", out.stdout, re.M)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    if line[1] == "local":  # a session folder this run created is owner only (Ray makes it 0755)
        assert re.search(r"^SESSION_MODE 0o700$", out.stdout, re.M), out.stdout[-2000:]
    return line[1], line[2], int(line[3]), [int(p) for p in line[4].split(",") if p.strip()]


@pytest.mark.slow
def test_local_run_beside_a_head_never_attaches_or_collides(ray_head: Head) -> None:
    """A `ray start` head is up and the shell exports RAY_ADDRESS: a local run still gets its own instance (its
    ray.num_cpus, not the head's 4), with no dashboard and its agent off the job port 52365; ray.address joins."""
    where, gcs, cpus, ports = _probe(ray_head, RAY_ADDRESS=ray_head.gcs_address)
    assert where == "local" and gcs.rsplit(":", 1)[1] != ray_head.gcs_address.rsplit(":", 1)[1] and cpus == 1
    assert 52365 not in ports and ray_head.dashboard_port not in ports and 8265 not in ports
    where, gcs, cpus, _ = _probe(ray_head, f"ray.address={ray_head.gcs_address}")
    assert where == ray_head.gcs_address and cpus == 4  # chosen explicitly: the head


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not _driver_parts_landed(), reason="actors/group.py or rewards/ not landed yet")
def test_ray_job_stop_checkpoints_and_prints_the_resume_command(ray_head: Head, tmp_path: Path) -> None:
    """`ray job stop` = SIGTERM: the driver ends its step, checkpoints, marks the run KILLED, says how to resume,
    and prints no stack dump."""
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "rollout.backend=hf", "rollout.group_size=4", "stages.1.num_prompts=32",
                 "stages.3.gspo.num_steps=50", "stages.3.gspo.prompts_per_step=8", "eval.num_prompts=16",
                 "eval.every_steps=0", "checkpoint.every_steps=0", "checkpoint.export_hf=false"]
    submission_id = f"crl-stop-{secrets.token_hex(4)}"
    env = {**ray_head.env, "SUBMIT_ARGS": f"--no-wait --submission-id {submission_id}",
           "PATH": f"{VENV_BIN}{os.pathsep}{ray_head.env['PATH']}"}
    out = subprocess.run([str(SUBMIT), "recipes/tiny_cascade.yaml", *overrides], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    deadline = time.monotonic() + 1200
    while not list((run_dir / "rollouts" / "gspo").glob("shard-*.parquet")):
        assert time.monotonic() < deadline and _status(ray_head, submission_id) in ("PENDING", "RUNNING"), \
            _job(ray_head, "logs", "--address", ray_head.address, submission_id).stdout[-4000:]
        time.sleep(2)
    stop = _job(ray_head, "stop", "--address", ray_head.address, submission_id, timeout_s=600)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    logs = _job(ray_head, "logs", "--address", ray_head.address, submission_id).stdout
    assert _status(ray_head, submission_id) == "STOPPED"
    assert "stopped (SIGTERM) after step" in logs and "resume=auto" in logs, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
    steps = [p for p in (run_dir / "checkpoints" / "s03-gspo").glob("step-*") if (p / "COMPLETE").exists()]
    assert steps, "no complete gspo checkpoint after ray job stop"
