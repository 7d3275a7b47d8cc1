"""Rollout logs: every generated response, as a ``RolloutRecord``, appended to parquet shards in one folder.

Layout (``docs/rollout_logs.md`` has the full schema)::

    <folder>/shard-000000.parquet   one shard per ``RolloutLogWriter.append`` call, fixed schema ``ROLLOUT_SCHEMA``
    <folder>/shard-000001.parquet
    <folder>/.tmp-<uuid>.parquet    a write in progress (or left by a crash): ignored by readers

    <folder>/shard-000000-000063.parquet   a compacted shard: the records of shards 0..63, merged

Crash safety: a shard is written to ``.tmp-<uuid>.parquet``, fsynced, then renamed with ``os.replace``, so a
reader sees a whole shard or none. Compaction (``compact_rollout_log``) writes the merged shard the same way, under
a name that says which shard indices it covers, then deletes the shards it replaces; a shard covered by a
compacted one (left by a crash in between) is ignored by readers and deleted by the next writer, so no record is
read twice. Shard *indices* (not file counts) are what a checkpoint records: ``next_shard_index``. A writer opened on an existing folder continues the shard numbering and loads
every ``record_id`` already logged, so a resumed run appends without losing or duplicating records. One writer
per folder and shard prefix at a time; readers may run while it writes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from ..types import RolloutRecord

if TYPE_CHECKING:
    import datasets

ROLLOUT_SCHEMA = pa.schema([
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("step", pa.int64()),
    pa.field("policy_version", pa.int64()),
    pa.field("prompt_id", pa.string()),
    pa.field("prompt", pa.string()),  # JSON of the chat messages
    pa.field("images", pa.list_(pa.string())),
    pa.field("ground_truth", pa.string()),
    pa.field("response", pa.string()),
    pa.field("prompt_token_ids", pa.list_(pa.int32())),
    pa.field("response_token_ids", pa.list_(pa.int32())),
    pa.field("behaviour_logprobs", pa.list_(pa.float32())),
    pa.field("rewards", pa.string()),  # JSON of {component: score}
    pa.field("reward", pa.float64()),
    pa.field("correct", pa.bool_()),
    pa.field("finish_reason", pa.string()),
    pa.field("num_prompt_tokens", pa.int64()),
    pa.field("num_response_tokens", pa.int64()),
    pa.field("generate_s", pa.float64()),
    pa.field("error", pa.string()),
    pa.field("image_sha256", pa.list_(pa.string())),
    pa.field("image_tiles", pa.list_(pa.int32())),
])
_FIELDS = [f.name for f in dataclasses.fields(RolloutRecord)]
assert _FIELDS == ROLLOUT_SCHEMA.names, "ROLLOUT_SCHEMA must list RolloutRecord's fields in order"
# Columns an older shard may lack; they are filled with nulls when read.
_OPTIONAL_COLUMNS = {"error", "image_sha256", "image_tiles"}
_SHARD_RE = re.compile(r"^(?P<prefix>[^.].*?)-(?P<index>\d+)(?:-(?P<end>\d+))?\.parquet$")
COMPACT_TARGET_ROWS = 262_144  # at most this many rows per compacted shard
COMPACT_FANOUT = 16  # shards merged at once: a few dozen files at 1M records, each record rewritten ~log16(shards) times
TMP_PREFIX = ".tmp-"


class CorruptShardError(ValueError):
    """A shard that cannot be read as parquet (truncated copy, disk full, foreign file)."""


def shard_range(path: Path) -> tuple[str, int, int] | None:
    """``(prefix, first index, last index)`` of a shard name (a plain shard covers one index), else None."""
    m = _SHARD_RE.match(path.name)
    if not m:
        return None
    start = int(m["index"])
    return m["prefix"], start, int(m["end"]) if m["end"] else start


def _all_shards(folder: Path) -> list[Path]:
    def key(p: Path) -> tuple[str, int, int]:
        r = shard_range(p)
        return (r[0], r[1], -r[2]) if r else (p.name, -1, 0)

    return sorted((p for p in folder.glob("*.parquet") if not p.name.startswith(".") and p.is_file()), key=key)


def _covered(shards: list[Path]) -> set[Path]:
    """Shards whose indices a larger compacted shard of the same prefix also holds (a crash mid-compaction)."""
    ranges = [(p, r) for p in shards if (r := shard_range(p)) is not None]
    compacted = [(p, r) for p, r in ranges if r[1] != r[2]]  # only a compacted shard can cover another
    return {p for p, r in ranges for q, o in compacted
            if q is not p and o[0] == r[0] and o[1] <= r[1] and r[2] <= o[2] and o != r}


def list_shards(folder: str | Path) -> list[Path]:
    """The shards of a log, ordered by (prefix, index); hidden files (``.tmp-*`` included) are left out, and so
    are shards a compacted shard already holds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"rollout log folder {folder} does not exist (or is not a folder); check the path, "
                                f"or run a `rollout` stage / `cascade-rl logs import` to create it")
    shards = _all_shards(folder)
    covered = _covered(shards)
    return [p for p in shards if p not in covered]


def next_shard_index(folder: str | Path, shard_prefix: str = "shard") -> int:
    """One past the highest shard index written under ``shard_prefix`` (0 for a missing or empty log): what a
    checkpoint records, so a resumed run can set aside exactly the shards written after it."""
    folder = Path(folder)
    ends = [r[2] for p in (_all_shards(folder) if folder.is_dir() else []) if (r := shard_range(p)) and
            r[0] == shard_prefix]
    return max(ends, default=-1) + 1


def compact_rollout_log(folder: str | Path, *, below: int, shard_prefix: str = "shard", fanout: int = COMPACT_FANOUT,
                        target_rows: int = COMPACT_TARGET_ROWS) -> int:
    """Merge shards whose indices are all ``< below``, ``fanout`` consecutive shards of one level at a time (a
    level-L shard covers about ``fanout**L`` indices), up to ``target_rows`` rows per shard; returns the number of
    files removed. Records, their order and the shard numbering are unchanged; each record is rewritten about
    ``log_fanout(num shards)`` times in all.

    ``below`` is a boundary no resume can cross (the driver passes the previous checkpoint's
    ``next_shard_index``), so a compacted shard never straddles the point a resumed run sets shards aside from.
    """
    folder = Path(folder)
    removed, merged_any, rows = 0, True, {}
    while merged_any:
        merged_any = False
        eligible = [(p, r[1], r[2]) for p in list_shards(folder) if (r := shard_range(p)) and r[0] == shard_prefix
                    and r[2] < below]
        levels = [int(math.log(end - start + 1, fanout) + 1e-9) for _, start, end in eligible]
        i = 0
        while i + fanout <= len(eligible):
            run = eligible[i : i + fanout]
            contiguous = all(b[1] == a[2] + 1 for a, b in zip(run, run[1:], strict=False))
            if len(set(levels[i : i + fanout])) == 1 and contiguous and \
                    sum(rows.setdefault(p, _read_metadata(p).num_rows) for p, _, _ in run) <= target_rows:
                table = pa.concat_tables([_read_shard(p, None) for p, _, _ in run])
                write_table_atomic(table, folder / f"{shard_prefix}-{run[0][1]:06d}-{run[-1][2]:06d}.parquet")
                for p, _, _ in run:
                    p.unlink(missing_ok=True)
                removed, merged_any, i = removed + fanout - 1, True, i + fanout
            else:
                i += 1
    _fsync_dir(folder)
    return removed


def _corrupt_error(path: Path, exc: Exception) -> CorruptShardError:
    return CorruptShardError(
        f"rollout log shard {path} is not readable parquet ({type(exc).__name__}: {exc}). It was probably "
        f"truncated by an interrupted copy or a full disk (the writer itself never leaves half shards). Move it "
        f"out of the folder (its records are then missing from the log), or pass skip_corrupt=True "
        f"(`--skip-corrupt` in `cascade-rl logs` / `pairs`) to read the other shards and skip it with a warning.")


def _read_shard(path: Path, columns: list[str] | None) -> pa.Table:
    """One shard as a table with ``ROLLOUT_SCHEMA`` (or the requested columns of it)."""
    try:
        table = pq.read_table(path, columns=None if columns is None else
                              [c for c in columns if c in pq.read_schema(path).names])
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt_error(path, exc) from exc
    wanted = ROLLOUT_SCHEMA.names if columns is None else columns
    missing = [c for c in wanted if c not in table.column_names and c not in _OPTIONAL_COLUMNS]
    if missing:
        raise ValueError(f"rollout log shard {path} lacks columns {missing}: it was not written by "
                         f"RolloutLogWriter. Convert foreign logs with `cascade-rl logs import` instead.")
    for name in wanted:
        if name not in table.column_names:
            field = ROLLOUT_SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(len(table), field.type))
    schema = pa.schema([ROLLOUT_SCHEMA.field(c) for c in wanted])
    try:
        return table.select(wanted).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"rollout log shard {path} has columns of the wrong type ({exc}); expected the schema "
                         f"in docs/rollout_logs.md") from exc


def _read_tables(folder: str | Path, columns: list[str] | None, skip_corrupt: bool,
                 skipped: list[str] | None = None) -> list[pa.Table]:
    """Every shard as a table; corrupt ones raise, or with ``skip_corrupt`` are named in ``skipped`` and warned."""
    tables, skipped = [], skipped if skipped is not None else []
    for path in list_shards(folder):
        try:
            tables.append(_read_shard(path, columns))
        except CorruptShardError:
            if not skip_corrupt:
                raise
            skipped.append(path.name)
    if skipped:
        warnings.warn(f"rollout log {folder}: skipped {len(skipped)} corrupt shard(s): {', '.join(skipped)}",
                      stacklevel=3)
    return tables


def read_rollout_table(folder: str | Path, *, columns: list[str] | None = None, skip_corrupt: bool = False,
                       skipped: list[str] | None = None) -> pa.Table:
    """All shards of a log as one pyarrow table (optionally only ``columns``), in shard order. With
    ``skip_corrupt``, unreadable shards are left out with a warning and their names appended to ``skipped``."""
    unknown = [c for c in columns or [] if c not in ROLLOUT_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown rollout log columns {unknown}; valid: {ROLLOUT_SCHEMA.names}")
    tables = _read_tables(folder, columns, skip_corrupt, skipped)
    if not tables:
        schema = ROLLOUT_SCHEMA if columns is None else pa.schema([ROLLOUT_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables)


def read_rollout_log(folder: str | Path, *, skip_corrupt: bool = False) -> list[RolloutRecord]:
    """Every record of a log, in shard order. Log-probs come back as float32 values (the stored precision)."""
    return [RolloutRecord(**row) for row in read_rollout_table(folder, skip_corrupt=skip_corrupt).to_pylist()]


def load_rollout_dataset(folder: str | Path, *, skip_corrupt: bool = False,
                         cache_dir: str | Path | None = None) -> datasets.Dataset:
    """The log as a ``datasets.Dataset`` (``load_dataset("parquet", ...)``, split ``train``)."""
    import datasets

    shards = list_shards(folder)
    if skip_corrupt:
        good = []
        for path in shards:
            try:
                pq.read_metadata(path)
                good.append(path)
            except (pa.ArrowException, OSError):
                warnings.warn(f"rollout log {folder}: skipped corrupt shard {path.name}", stacklevel=2)
        shards = good
    else:
        for path in shards:  # fail with the clear message before datasets does with its own
            _read_metadata(path)
    if not shards:
        raise ValueError(f"rollout log {folder} has no readable shards; nothing to load")
    return datasets.load_dataset("parquet", data_files=[str(p) for p in shards], split="train",
                                 cache_dir=None if cache_dir is None else str(cache_dir))


def _read_metadata(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt_error(path, exc) from exc


def count_records(folder: str | Path, *, skip_corrupt: bool = False) -> int:
    """Number of records in a log, from the parquet footers (no data is read)."""
    total = 0
    for path in list_shards(folder):
        try:
            total += _read_metadata(path).num_rows
        except CorruptShardError:
            if not skip_corrupt:
                raise
            warnings.warn(f"rollout log {folder}: skipped corrupt shard {path.name}", stacklevel=2)
    return total


def records_to_table(records: Iterable[RolloutRecord]) -> pa.Table:
    """Records as a ``ROLLOUT_SCHEMA`` table; a record whose values don't fit the schema is named in the error."""
    records = list(records)
    try:
        return pa.Table.from_pylist([r.to_row() for r in records], schema=ROLLOUT_SCHEMA)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        for r in records:  # find the offending record for the message
            try:
                pa.Table.from_pylist([r.to_row()], schema=ROLLOUT_SCHEMA)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                raise ValueError(f"record {r.record_id!r} does not fit the rollout log schema: {exc} "
                                 f"(see docs/rollout_logs.md for each column's type)") from exc
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_table_atomic(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` via ``<dir>/.tmp-<uuid>.parquet`` + fsync + ``os.replace``."""
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}.parquet"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


class RolloutLogWriter:
    """Appends records to a log folder, one shard per ``append`` call, skipping ids already logged.

    Opening the writer removes ``.tmp-*`` files (writes a crash interrupted), continues the shard numbering of
    ``<shard_prefix>-<index>.parquet`` and loads every logged ``record_id`` into ``record_ids``.
    """

    def __init__(self, folder: str | Path, *, shard_prefix: str = "shard") -> None:
        if not shard_prefix or "/" in shard_prefix or shard_prefix.startswith("."):
            raise ValueError(f"shard_prefix={shard_prefix!r}: use a plain, non-hidden name such as 'shard'")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_prefix = shard_prefix
        self.num_temp_files_removed = 0
        for tmp in self.folder.glob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
            self.num_temp_files_removed += 1
        for leftover in _covered(_all_shards(self.folder)):  # a compaction interrupted after its rename
            leftover.unlink(missing_ok=True)
        self.record_ids: set[str] = set()
        self._next_index = next_shard_index(self.folder, shard_prefix)
        for path in list_shards(self.folder):
            self.record_ids.update(_read_shard(path, ["record_id"]).column("record_id").to_pylist())

    def __len__(self) -> int:
        return len(self.record_ids)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self.record_ids

    def append(self, records: list[RolloutRecord]) -> Path | None:
        """Write the records not yet logged as one new shard; return its path (None if nothing was new)."""
        new: list[RolloutRecord] = []
        seen: set[str] = set()
        for r in records:
            if not r.record_id:
                raise ValueError("a RolloutRecord has an empty record_id; ids must be deterministic and non-empty "
                                 "so a resumed run can skip what it already logged")
            if r.record_id not in self.record_ids and r.record_id not in seen:
                seen.add(r.record_id)
                new.append(r)
        if not new:
            return None
        table = records_to_table(new)
        path = self._shard_path(self._next_index)
        while path.exists():  # never overwrite a shard, even one another process wrote meanwhile
            self._next_index += 1
            path = self._shard_path(self._next_index)
        write_table_atomic(table, path)
        self._next_index += 1
        self.record_ids.update(seen)
        return path

    def _shard_path(self, index: int) -> Path:
        return self.folder / f"{self.shard_prefix}-{index:06d}.parquet"



def summarize_rollout_log(folder: str | Path, *, skip_corrupt: bool = False) -> dict[str, object]:
    """Counts for ``cascade-rl logs stats``: records, prompts, accuracy, rewards, finish reasons, errors.

    ``accuracy`` is over records with a verdict (``correct`` not None); ``accuracy_all`` over records whose
    prompt has a ground truth, counting ``correct=None`` as wrong (the rule pairs and pass rates use).
    """
    cols = ["run_id", "stage", "prompt_id", "ground_truth", "correct", "reward", "finish_reason", "error",
            "num_response_tokens"]
    skipped: list[str] = []
    rows = read_rollout_table(folder, columns=cols, skip_corrupt=skip_corrupt, skipped=skipped).to_pylist()
    checkable = [r for r in rows if r["ground_truth"] is not None]
    scored = [r for r in rows if r["correct"] is not None]
    num_right = sum(r["correct"] is True for r in rows)

    def counts(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in rows:
            out[str(r[key])] = out.get(str(r[key]), 0) + 1
        return dict(sorted(out.items()))

    return {
        "num_records": len(rows), "num_shards": len(list_shards(folder)), "num_corrupt_shards_skipped": len(skipped),
        "num_prompts": len({r["prompt_id"] for r in rows}),
        "num_prompts_without_answer": len({r["prompt_id"] for r in rows if r["ground_truth"] is None}),
        "num_scored": len(scored), "accuracy": num_right / len(scored) if scored else None,
        "accuracy_all": sum(r["correct"] is True for r in checkable) / len(checkable) if checkable else None,
        "mean_reward": sum(r["reward"] for r in rows) / len(rows) if rows else None,
        "mean_response_tokens": sum(r["num_response_tokens"] for r in rows) / len(rows) if rows else None,
        "num_errors": sum(r["error"] is not None for r in rows),
        "finish_reasons": counts("finish_reason"), "runs": counts("run_id"), "stages": counts("stage"),
    }
