"""Each storage fault ends in one named error that names run_dir / the file and the recovery."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from cascade_rl.stages.storage import StorageError, storage_error, translate_storage_errors

ROOT = Path(__file__).resolve().parents[2]


def _record(i: int):  # noqa: ANN202 - a RolloutRecord
    from cascade_rl.types import RolloutRecord

    return RolloutRecord(record_id=f"r/{i}", run_id="r", stage="gspo", step=0, policy_version=1, prompt_id="p",
                         prompt="[]", images=[], ground_truth="1", response="1", prompt_token_ids=[1],
                         response_token_ids=[2], behaviour_logprobs=[-0.5], rewards="{}", reward=1.0, correct=True,
                         finish_reason="stop", num_prompt_tokens=1, num_response_tokens=1, generate_s=0.0,
                         error=None)


def test_disk_full_at_a_shard_write_says_free_space_then_resume(tmp_path: Path, monkeypatch) -> None:
    from cascade_rl.data import rollout_log

    writer = rollout_log.RolloutLogWriter(tmp_path / "rollouts" / "gspo")

    def full(table: object, where: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rollout_log.pq, "write_table", full)
    with pytest.raises(StorageError, match="disk full") as info, translate_storage_errors(tmp_path):
        writer.append([_record(0)])
    msg = str(info.value)
    assert f"run_dir {tmp_path}" in msg and "Free space" in msg and "resume=auto" in msg
    assert not list((tmp_path / "rollouts" / "gspo").iterdir())  # the temp file is gone, no half shard


def test_a_read_only_run_dir_is_named(tmp_path: Path, monkeypatch) -> None:
    from cascade_rl.stages import state

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".tmp-run_state.json"))

    monkeypatch.setattr(state, "open", read_only, raising=False)
    with pytest.raises(StorageError, match="read-only file system") as info, translate_storage_errors(tmp_path):
        state.RunState().save(tmp_path)
    assert f"run_dir {tmp_path}" in str(info.value) and ".tmp-run_state.json" in str(info.value)
    assert "run_dir=<a writable folder>" in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_mlflow_db_ends_the_driver_with_a_named_error(tmp_path: Path, damage: str) -> None:
    from cascade_rl.config import load_recipe
    from cascade_rl.stages import driver
    from cascade_rl.tracking import Tracker

    db = tmp_path / "mlflow.db"
    Tracker(None, "exp", tmp_path)  # a real store
    raw = db.read_bytes()
    db.write_bytes(raw[:100] + b"\0" * 4000 if damage == "truncated" else b"not a database at all " * 200)
    cfg = load_recipe(ROOT / "recipes" / "tiny_cascade.yaml", [f"run_dir={tmp_path}", "resume=auto"])
    with pytest.raises(StorageError) as info:
        driver.run(cfg)
    msg = str(info.value)
    assert f"MLflow store {db}" in msg and f"mv {db} {db}.bad" in msg and "resume=auto" in msg


def test_an_emptied_mlflow_db_on_resume_is_named(tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException

    from cascade_rl.tracking import Tracker

    (tmp_path / "mlflow.db").write_bytes(b"")
    with pytest.raises(MlflowException) as info:
        Tracker(None, "exp", tmp_path).start("x", {}, run_id="0123456789abcdef0123456789abcdef")
    err = storage_error(info.value, tmp_path)
    assert err is not None and f"MLflow store {tmp_path / 'mlflow.db'}" in str(err)


def test_a_rollout_folder_removed_between_stages_is_named(tmp_path: Path) -> None:
    from cascade_rl.data.rollout_log import read_rollout_log

    with pytest.raises(StorageError, match="rollout log folder") as info, translate_storage_errors(tmp_path):
        read_rollout_log(tmp_path / "rollouts" / "rollout")
    assert f"run_dir {tmp_path}" in str(info.value) and "checkpoints" in str(info.value)


def test_other_errors_pass_unchanged(tmp_path: Path) -> None:
    with pytest.raises(KeyError), translate_storage_errors(tmp_path):
        raise KeyError("x")
