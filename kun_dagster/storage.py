"""Where dataset versions live: hive-style partition folders under one base URI, published atomically.

Layout: {base}/{asset}/source={s}/shard={k}/part-0.parquet, readable by pyarrow.dataset, DuckDB and
HF datasets. A partition is written to a hidden temporary object beside its final name and then
renamed over it, so readers see the old version or the new one, never half of one (on S3 the
rename is a server-side copy of one object, which also appears whole).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

PART_NAME = "part-0.parquet"
QUARANTINE = "quarantine"  # {base}/quarantine/{asset}/source=.../shard=.../
STAGING = "_staging"  # {base}/_staging/{asset}/source=.../shard=.../: batch checkpoints of a partition
# being computed; the leading underscore keeps pyarrow.dataset, DuckDB and Hive readers out of it.


def upath(uri: str, storage_options: Mapping | None = None) -> UPath:
    return UPath(uri, **dict(storage_options or {}))


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


def remove_tree(path: UPath) -> None:
    """Delete a folder and everything under it; nothing there is fine."""
    if path.exists():
        path.fs.rm(path.path, recursive=True)


def partition_of(directory: UPath) -> dict[str, str]:
    """The hive key=value segments at the end of a partition folder's path."""
    out: dict[str, str] = {}
    for part in reversed(directory.parts):
        if "=" not in part:
            break
        key, value = part.split("=", 1)
        out[key] = value
    return dict(reversed(out.items()))


def to_table(df: pd.DataFrame) -> pa.Table:
    """Arrow table of a frame; all-null columns (an empty partition) become strings, not nulls,
    so that every partition of a dataset has one schema."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type):
            table = table.set_column(i, pa.field(f.name, pa.string()), table.column(i).cast(pa.string()))
    return table


def write_atomic(path: UPath, data: bytes) -> None:
    """Write bytes under a temporary name in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"_tmp-{uuid.uuid4().hex}-{path.name}"
    with tmp.open("wb") as f:
        f.write(data)
    try:
        tmp.rename(path)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(to_table(df), buf, compression="zstd")
    return buf.getvalue()


def write_partition(directory: UPath, df: pd.DataFrame) -> UPath:
    """Publish a partition: replaces whatever the folder held, atomically. Partition columns live
    in the path only (as Hive and pyarrow.dataset expect), so they are dropped from the file."""
    final = directory / PART_NAME
    write_atomic(final, parquet_bytes(df.drop(columns=[c for c in partition_of(directory) if c in df])))
    for stale in directory.glob("part-*.parquet"):  # parts of an older, larger write
        if stale.name != PART_NAME:
            stale.unlink(missing_ok=True)
    return final


def read_partition(directory: UPath, columns: list[str] | None = None) -> pd.DataFrame:
    """The published frame of a partition, its partition columns restored from the path (numbers
    as int64); FileNotFoundError if it was never published."""
    parts = sorted(p for p in directory.glob("part-*.parquet")) if directory.exists() else []
    if not parts:
        raise FileNotFoundError(f"no published partition at {directory}")
    tables = []
    for p in parts:
        with p.open("rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    df = pa.concat_tables(tables, promote_options="default").to_pandas()
    for i, (key, value) in enumerate(partition_of(directory).items()):
        df.insert(i, key, pd.Series([int(value) if value.isdigit() else value] * len(df), index=df.index,
                                    dtype="int64" if value.isdigit() else object))
    return df


def partition_rows(directory: UPath) -> int:
    """Row count from the Parquet footers alone; 0 where nothing is published."""
    if not directory.exists():
        return 0
    total = 0
    for p in directory.glob("part-*.parquet"):
        with p.open("rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total
