"""Partition keys as storage sees them: source corpus x shard, a source alone, or (dedup.mode:
band_steps) cluster group x LSH band.

Dagster names the shard dimension `source_shard` (assets/partitions.py says why); storage names
the column `shard` (source=.../shard=...). A corpus key joins its dimension values in dimension-name
order: Dagster writes "wudao|1", its UPathIOManager "wudao/1". This is the one place that reads one.
"""

from __future__ import annotations

import re

SOURCE, SHARD = "source", "source_shard"  # Dagster's dimension names
HIVE = {SOURCE: "source", SHARD: "shard"}  # -> storage's column names, in storage order
GROUP, BAND = "cluster_group", "lsh_band"  # lsh_band_pairs' dimensions: a group's bands are one key range
HIVE_BANDS = {GROUP: "group", BAND: "band"}


_SOURCE = re.compile(r"[a-z][a-z0-9_]*")  # config.SourceConfig.name's pattern
_SHARD = re.compile(r"0|[1-9][0-9]{0,3}")  # config.KunConfig.shards is at most 4096


class PartitionKeyError(ValueError):
    """A partition key that names no source or shard (a hand-written tag, `../../etc`)."""


def hive(key: str, sep: str = "|", bands: bool = False) -> dict[str, str]:
    """{source, shard} of a corpus partition key ({source} of a source key; {group, band} of a
    cluster group x band key, `bands`). Paths are built from them (and removed recursively), so a
    key is checked here, where they are read: a source name as the config allows one and a shard
    or band number; anything else (a tag such as dagster/partition/source=../../etc, which skips
    Dagster's own key check) is refused."""
    names = HIVE_BANDS if bands else HIVE
    values = str(key).split(sep)
    if len(values) == 1 and not bands:
        part = {"source": values[0]}
    else:
        dims = dict(zip(sorted(names), values, strict=True))
        part = {column: dims[dim] for dim, column in names.items()}
    first, second = part.get("group", part.get("source")), part.get("band", part.get("shard"))
    if not _SOURCE.fullmatch(first) or (second is not None and not _SHARD.fullmatch(second)):
        what = "cluster group and band number" if bands else "source name (a-z, 0-9, _) and shard number"
        raise PartitionKeyError(f"partition key {key!r}: not a {what}")
    return part
