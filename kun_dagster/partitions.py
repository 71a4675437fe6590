"""Partition keys as storage sees them: source corpus x shard, or a source alone.

Dagster names the shard dimension `source_shard` (assets/partitions.py says why); storage names
the column `shard` (source=.../shard=...). A corpus key joins its dimension values in dimension-name
order: Dagster writes "wudao|1", its UPathIOManager "wudao/1". This is the one place that reads one.
"""

from __future__ import annotations

SOURCE, SHARD = "source", "source_shard"  # Dagster's dimension names
HIVE = {SOURCE: "source", SHARD: "shard"}  # -> storage's column names, in storage order


def hive(key: str, sep: str = "|") -> dict[str, str]:
    """{source, shard} of a corpus partition key ({source} of a source key)."""
    values = str(key).split(sep)
    if len(values) == 1:
        return {"source": values[0]}
    dims = dict(zip(sorted(HIVE), values, strict=True))
    return {column: dims[dim] for dim, column in HIVE.items()}
