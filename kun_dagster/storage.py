"""Where dataset versions live (partition I/O; reaching the store is store.py): hive-style partition folders under one base URI, published atomically.

Layout: {base}/{asset}/source={s}/shard={k}/part-0.parquet, readable by pyarrow.dataset, DuckDB and
HF datasets. A partition is written to a hidden temporary object beside its final name and then
renamed over it, so readers see the old version or the new one, never half of one (on S3 the
rename is a server-side copy of one object, which also appears whole).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

PART_NAME = "part-0.parquet"
QUARANTINE = "quarantine"  # {base}/quarantine/{asset}/source=.../shard=.../
REPORTS = "reports"  # {base}/reports/{asset}.json: the evaluation's figures (resources/io.py writes them)
STAGING = "_staging"  # {base}/_staging/{asset}/source=.../shard=.../: batch checkpoints of a partition
# being computed; the leading underscore keeps pyarrow.dataset, DuckDB and Hive readers out of it.


def partition_dir(base: UPath, asset: str, partition: Mapping[str, str]) -> UPath:
    """{base}/{asset}/k1=v1/k2=v2 in the mapping's order (source before shard)."""
    path = base.joinpath(*asset.split("/")) if asset else base
    for key, value in partition.items():
        path = path / f"{key}={value}"
    return path


def quarantine_dir(base: UPath, asset: str, partition: Mapping[str, str]) -> UPath:
    return partition_dir(base, f"{QUARANTINE}/{asset}", partition)


def staging_dir(base: UPath, asset: str, partition: Mapping[str, str]) -> UPath:
    return partition_dir(base, f"{STAGING}/{asset}", partition)


def remove_tree(path: UPath, prune_up_to: UPath | None = None) -> None:
    """Delete a folder and everything under it (nothing there is fine); on a local disk, then the
    parent folders it leaves empty, up to and including `prune_up_to` (object stores have none)."""
    if path.exists():
        path.fs.rm(path.path, recursive=True)
    if prune_up_to is None or path.protocol not in ("", "file", "local"):
        return
    for parent in path.parents:
        if len(parent.parts) < len(prune_up_to.parts):
            return
        try:
            parent.rmdir()  # fails, and stops the walk, where the folder still holds something
        except OSError:
            return


def partition_of(directory: UPath) -> dict[str, str]:
    """The hive key=value segments at the end of a partition folder's path."""
    out: dict[str, str] = {}
    for part in reversed(directory.parts):
        if "=" not in part:
            break
        key, value = part.split("=", 1)
        out[key] = value
    return dict(reversed(out.items()))


def to_table(df: pd.DataFrame, schema: pa.Schema | None = None) -> pa.Table:
    """Arrow table of a frame. With `schema` (the dataset version's, schemas.arrow_schema, less the
    partition columns), its columns come first, with its types, and a column the frame lacks is
    added empty: every partition of a dataset has one schema, an empty one included. Other
    all-null columns become strings, not nulls."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    if schema is not None:
        extra = [table.schema.field(n) for n in table.column_names if n not in schema.names]
        # no rows: every column empty of its type (an empty batch's columns were typed by pandas)
        columns = [
            table.column(f.name).cast(f.type) if f.name in table.column_names and len(table) else pa.nulls(len(table), f.type)
            for f in schema
        ]
        table = pa.Table.from_arrays(columns + [table.column(f.name) for f in extra], schema=pa.schema(list(schema) + extra))
    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type):
            table = table.set_column(i, pa.field(f.name, pa.string()), table.column(i).cast(pa.string()))
    return table


def file_schema(schema: pa.Schema | None, directory: UPath) -> pa.Schema | None:
    """A dataset version's schema as its files hold it: without the columns the folder names."""
    if schema is None:
        return None
    in_path = partition_of(directory)
    return pa.schema([f for f in schema if f.name not in in_path])


def content_hash(frames: Iterable[pd.DataFrame]) -> str:
    """A hash of the frames' rows (values, column names and types, in order): the same data hashes
    the same in any process, so it can serve as a data version."""
    h = hashlib.sha256()
    for df in frames:
        sink = pa.BufferOutputStream()
        table = to_table(df.reset_index(drop=True))
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()[:16]


def write_atomic(path: UPath, data: bytes) -> None:
    """Write bytes under a temporary name in the same folder, then rename over `path`."""
    tmp = write_staged(path, data)
    try:
        tmp.rename(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_staged(path: UPath, data: bytes) -> UPath:
    """Write bytes beside `path` under a temporary name, flushed to disk (fsync, where the store is a
    local disk), and return that name for a rename later; on any failure (a full disk) nothing is
    left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"_tmp-{uuid.uuid4().hex}-{path.name}"
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            try:
                fd = f.fileno()
            except (OSError, ValueError, AttributeError):  # an object store's file: the upload is its commit
                fd = None
            if fd is not None:
                os.fsync(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def parquet_bytes(df: pd.DataFrame, schema: pa.Schema | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(to_table(df, schema), buf, compression="zstd")
    return buf.getvalue()


def write_partition(directory: UPath, df: pd.DataFrame, schema: pa.Schema | None = None) -> UPath:
    """Publish a partition: replaces whatever the folder held, atomically. Partition columns live
    in the path only (as Hive and pyarrow.dataset expect), so they are dropped from the file.
    `schema`: the dataset version's Arrow schema (an empty frame is written with all its columns)."""
    final = directory / PART_NAME
    write_atomic(final, parquet_bytes(_without_partition_columns(df, directory), file_schema(schema, directory)))
    _drop_stale_parts(directory)
    return final


def _without_partition_columns(df: pd.DataFrame, directory: UPath) -> pd.DataFrame:
    return df.drop(columns=[c for c in partition_of(directory) if c in df])


def _drop_stale_parts(directory: UPath) -> None:
    for stale in directory.glob("part-*.parquet"):  # parts of an older, larger write
        if stale.name != PART_NAME:
            stale.unlink(missing_ok=True)


@dataclass
class Staged:
    """A partition's rows written to one Parquet file under a temporary name, not yet published."""

    path: UPath
    rows: int
    schema: pa.Schema
    head: pd.DataFrame  # the first rows, for the UI's preview

    def batches(self, rows: int) -> Iterator[pd.DataFrame]:
        """The staged rows read back `rows` at a time, partition columns restored (for checks)."""
        yield from _file_batches(self.path, self.path.parent, rows)


Rows = pd.DataFrame | Staged  # what a stage hands over: its rows in memory, or a file it streamed into staging


def row_count(rows: Rows) -> int:
    return rows.rows if isinstance(rows, Staged) else len(rows)


def preview(rows: Rows) -> pd.DataFrame:
    """A few rows for the UI."""
    return rows.head if isinstance(rows, Staged) else rows.head(5)


def columns(rows: Rows) -> pa.Schema:
    return rows.schema if isinstance(rows, Staged) else to_table(rows).schema


def batches_of(rows: Rows, size: int) -> Iterable[pd.DataFrame]:
    """The rows `size` at a time (a staged file is read back; a frame is one batch)."""
    return rows.batches(size) if isinstance(rows, Staged) else [rows]


def by_reason(rows: Rows, batch: int = 100_000) -> dict[str, tuple[int, dict]]:
    """Quarantine rows per reason: (count, the first row), read a batch at a time when staged."""
    out: dict[str, tuple[int, dict]] = {}
    for df in batches_of(rows, batch):
        for reason, group in df.groupby("reason", sort=False):
            n, first = out.get(reason, (0, group.iloc[0].to_dict()))
            out[reason] = (n + len(group), first)
    return out


def publish(rows: Rows, directory: UPath, schema: pa.Schema | None = None) -> UPath:
    """Publish rows as the partition: a staged file by one rename, a frame written with `schema`
    (the dataset version's: an empty partition has every column, typed)."""
    return publish_staged(rows, directory) if isinstance(rows, Staged) else write_partition(directory, rows, schema)


class Sink(Protocol):
    """Where a streaming stage writes its output batches; close() gives the stage's rows."""

    def write(self, df: pd.DataFrame) -> None: ...

    def close(self) -> Rows: ...


class FrameSink:
    """Collects a stage's output batches in memory: the result is one DataFrame."""

    def __init__(self):
        self._frames: list[pd.DataFrame] = []

    def write(self, df: pd.DataFrame) -> None:
        self._frames.append(df)

    def close(self) -> pd.DataFrame:
        frames = [f for f in self._frames if len(f)] or self._frames[:1]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


class ParquetSink:
    """Writes a stage's output batches into one Parquet file (a row group per batch) at `path`, in
    the partition's staging folder, holding one batch in memory; publish_staged renames it into
    place. Partition columns (the folder's hive segments) stay in the path, as in write_partition."""

    def __init__(self, path: UPath, schema: pa.Schema | None = None):
        self.path, self.rows = path, 0
        self.schema = file_schema(schema, path.parent)  # the dataset version's: typed even with no rows
        self._writer: pq.ParquetWriter | None = None
        self._file = None
        self._head: pd.DataFrame | None = None

    def write(self, df: pd.DataFrame) -> None:
        if self._head is None or (len(df) and not len(self._head)):
            self._head = df.head(5)
        if not len(df):  # an empty batch's all-null columns would fix their type as string: rows decide
            return
        table = to_table(_without_partition_columns(df, self.path.parent), self.schema)
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("wb")
            self._writer = pq.ParquetWriter(self._file, table.schema, compression="zstd")
        else:
            table = table.select(self._writer.schema.names).cast(self._writer.schema)
        self._writer.write_table(table)
        self.rows += len(df)

    def close(self) -> Staged:
        if self._writer is None:  # no rows at all: an empty file with the batches' columns
            head = self._head if self._head is not None else pd.DataFrame()
            frame = _without_partition_columns(head, self.path.parent)
            write_atomic(self.path, parquet_bytes(frame, self.schema))
            return Staged(self.path, 0, to_table(frame, self.schema).schema, head)
        self._writer.close()
        self._file.close()
        return Staged(self.path, self.rows, self._writer.schema, self._head)


def publish_staged(staged: Staged, directory: UPath) -> UPath:
    """Publish a staged file as the partition: one rename (on S3 one server-side copy), atomic for readers."""
    final = directory / PART_NAME
    directory.mkdir(parents=True, exist_ok=True)
    staged.path.rename(final)
    _drop_stale_parts(directory)
    return final


def _published_parts(directory: UPath) -> list[UPath]:
    parts = sorted(p for p in directory.glob("part-*.parquet")) if directory.exists() else []
    if not parts:
        raise FileNotFoundError(f"no published partition at {directory}")
    return parts


def _with_partition_columns(df: pd.DataFrame, directory: UPath) -> pd.DataFrame:
    """Partition columns restored from the path, first (numbers as int64)."""
    for i, (key, value) in enumerate(partition_of(directory).items()):
        df.insert(
            i,
            key,
            pd.Series([int(value) if value.isdigit() else value] * len(df), index=df.index, dtype="int64" if value.isdigit() else object),
        )
    return df


READ_BUFFER = 1 << 20  # bytes read at a time from a part file's column chunk when it is streamed


def _streamed(f) -> pq.ParquetFile:
    """A part file to be read a batch at a time. pyarrow's default pre-buffers the columns of every
    row group of the file before the first batch, so a streamed shard was held whole (213 MB of
    Python bytes for a 209 MB file); read through a buffer, a reader holds about one batch (4 MB)."""
    return pq.ParquetFile(f, pre_buffer=False, buffer_size=READ_BUFFER)


def _file_batches(path: UPath, directory: UPath, rows: int) -> Iterator[pd.DataFrame]:
    """A Parquet file read `rows` at a time, the partition columns of `directory` restored."""
    with path.open("rb") as f:
        pf = _streamed(f)
        if not pf.metadata.num_rows:  # an empty partition is one empty batch with every column
            yield _with_partition_columns(pf.schema_arrow.empty_table().to_pandas(), directory)
            return
        for batch in pf.iter_batches(batch_size=rows):
            yield _with_partition_columns(batch.to_pandas(), directory)


def _read_parts(directory: UPath, columns: list[str] | None) -> pa.Table:
    tables = []
    for p in _published_parts(directory):
        with p.open("rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables, promote_options="default")


def read_partition(directory: UPath, columns: list[str] | None = None) -> pd.DataFrame:
    """The published frame of a partition, its partition columns restored from the path (numbers
    as int64); FileNotFoundError if it was never published."""
    return _with_partition_columns(_read_parts(directory, columns).to_pandas(), directory)


def read_table(directory: UPath, columns: list[str] | None = None) -> pa.Table:
    """The published partition as one Arrow table (no pandas: binary columns stay one buffer),
    its partition columns appended from the path."""
    table = _read_parts(directory, columns)
    for key, value in partition_of(directory).items():
        if key not in table.column_names:
            table = table.append_column(key, pa.array([int(value) if value.isdigit() else value] * len(table)))
    return table


@dataclass
class PartitionTable:
    """A published partition to be read as Arrow when needed: a reader of many partitions holds one
    at a time, and knows the rows of all from their footers first."""

    directory: UPath

    def __post_init__(self):
        _published_parts(self.directory)  # fail at load, not halfway through

    @property
    def num_rows(self) -> int:
        return partition_rows(self.directory)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        return read_table(self.directory, columns)

    def batches(self, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        """Columns stored in the files (not the path's), `rows` at a time, in the order read() gives."""
        for p in _published_parts(self.directory):
            with p.open("rb") as f:
                yield from _streamed(f).iter_batches(batch_size=rows, columns=columns)


@dataclass
class PartitionBatches:
    """A published partition read lazily, `rows` at a time: memory holds one batch, not the shard."""

    directory: UPath
    rows: int

    def __post_init__(self):
        self.parts = _published_parts(self.directory)  # fail at load, not halfway through

    @property
    def total(self) -> int:
        """Rows of the partition, from the Parquet footers (for progress)."""
        return partition_rows(self.directory)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        for p in self.parts:
            yield from _file_batches(p, self.directory, self.rows)


def partition_rows(directory: UPath) -> int:
    """Row count from the Parquet footers alone; 0 where nothing is published."""
    if not directory.exists():
        return 0
    total = 0
    for p in directory.glob("part-*.parquet"):
        with p.open("rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


STATS = "_stats.json"  # beside a partition's part files: the figures its stage recorded (StageResult.stats)


def plain(value):
    """numpy scalars and arrays as JSON's numbers and lists."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 else value.tolist()


def write_stats(directory: UPath, stats: dict) -> None:
    write_atomic(directory / STATS, json.dumps(stats, ensure_ascii=False, default=plain).encode("utf-8"))


def read_stats(directory: UPath) -> dict | None:
    """What the partition's stage recorded; None where it recorded nothing (published before stats were kept)."""
    try:
        return json.loads((directory / STATS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


@dataclass
class Tally:
    """What a published partition holds, without its rows: how many, its quarantine's rows by
    reason, the stats its stage recorded, and where asked for, a few of its columns."""

    rows: int
    quarantined: dict[str, int]
    stats: dict | None = None
    frame: pd.DataFrame | None = None


ALL_COLUMNS = "*"  # a Tally's columns: every one


def tally(directory: UPath, quarantine: UPath, columns: list[str] | str = ()) -> Tally:
    """The partition's Tally, with `columns` read (none; ALL_COLUMNS: every one); zero where it was
    never published: a funnel counts what exists."""
    reasons: dict[str, int] = {}
    if partition_rows(quarantine):
        reasons = read_partition(quarantine, ["reason"])["reason"].value_counts().sort_index().to_dict()
    rows, frame = partition_rows(directory), None
    if columns:
        wanted = None if columns == ALL_COLUMNS else list(columns)
        frame = read_partition(directory, wanted) if rows else pd.DataFrame(columns=wanted)
    return Tally(rows, {str(k): int(v) for k, v in reasons.items()}, read_stats(directory), frame)
