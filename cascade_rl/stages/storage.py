"""Storage faults, translated once: what broke under ``run_dir``, and how to recover.

The driver runs every stage inside ``translate_storage_errors(run_dir)``; an error from the disk or the local MLflow
store (raised here, in a Ray actor, or deep inside DeepSpeed / SQLAlchemy) becomes one ``StorageError`` whose
message names the file, ``run_dir`` and the fix, instead of a long traceback:

- disk full (ENOSPC, EDQUOT): free space; ``resume=auto`` then continues from the newest complete checkpoint
  (a shard or checkpoint is written to a temp name and renamed, so nothing half-written is ever read back);
- ``run_dir`` not writable (EROFS, EACCES, EPERM): fix its permissions or point ``run_dir`` elsewhere;
- ``mlflow.db`` truncated, emptied or replaced: move it aside (checkpoints and rollout logs are unaffected);
- a rollout log folder removed between stages: restore it, or rerun the stage that writes it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}
_DB_DAMAGE = ("file is not a database", "database disk image is malformed", "no such table",
              "file is encrypted or is not a database")


class StorageError(RuntimeError):
    """A storage fault under ``run_dir``; the message says which file and what to do."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (``__cause__``, ``__context__``, a Ray task error's ``cause``), once each."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(c for c in (getattr(e, "cause", None), e.__cause__, e.__context__) if isinstance(c, BaseException))


def _disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno in _FULL) or "No space left on device" in str(e)


def storage_error(exc: BaseException, run_dir: Path) -> StorageError | None:
    """The ``StorageError`` that explains ``exc``, or None when it is not a storage fault."""
    causes = list(_causes(exc))
    for e in causes:
        where = getattr(e, "filename", None) or run_dir
        if _disk_full(e):
            return StorageError(f"disk full while writing {where} (run_dir {run_dir}). Free space on that disk, then "
                                f"run the same command with resume=auto: it continues from the newest complete "
                                f"checkpoint, losing and duplicating nothing.")
        if isinstance(e, OSError) and e.errno in _DENIED:
            why = "is on a read-only file system" if e.errno == errno.EROFS else "is not writable by this user"
            return StorageError(f"run_dir {run_dir} {why} (writing {where}). Make it writable (or set "
                                f"run_dir=<a writable folder>), then run again with resume=auto.")
    db = run_dir / "mlflow.db"
    for e in causes:
        text = str(e)
        if any(s in text for s in _DB_DAMAGE) or (type(e).__name__ == "MlflowException" and "not found" in text
                                                  and "Run" in text):
            return StorageError(f"the MLflow store {db} is damaged or is not the one this run used (truncated, "
                                f"emptied or replaced: {text.splitlines()[0][:160]}). Move it aside (mv {db} "
                                f"{db}.bad) and run again with resume=auto: training continues from the newest "
                                f"checkpoint into a new MLflow run (the old metrics stay in the moved file); "
                                f"or set tracking.uri to the server that holds the run.")
    for e in causes:
        if isinstance(e, FileNotFoundError) and "rollout log folder" in str(e):
            return StorageError(f"{e} — under run_dir {run_dir}, a rollout log a later stage reads was removed after "
                                f"its stage finished. Restore the folder, or move that rollout stage's checkpoints "
                                f"(and later ones) out of {run_dir / 'checkpoints'} and resume=auto to write it "
                                f"again.")
    return None


@contextmanager
def translate_storage_errors(run_dir: Path) -> Iterator[None]:
    """Re-raise a storage fault as a ``StorageError`` (the original chained); other errors pass unchanged."""
    try:
        yield
    except Exception as exc:
        err = storage_error(exc, run_dir)
        if err is None:
            raise
        raise err from exc
