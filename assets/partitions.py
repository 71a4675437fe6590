"""Partitions: source corpus x shard.

Dagster orders a MultiPartitionsDefinition's dimensions by name and lists its keys with the first
dimension outermost; a single-run backfill launches one run per contiguous key range. The shard
dimension is named `source_shard` so that it sorts after `source`: all shards of one source are
then one contiguous range, and a one-source backfill is one run that loads each model once.
Storage still names the column `shard` (source=.../shard=...).
"""

import dagster as dg

from kun_dagster import dedup
from kun_dagster.config import KunConfig
from kun_dagster.partitions import BAND, GROUP, SHARD, SOURCE


def corpus_partitions(cfg: KunConfig) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition(
        {
            SOURCE: dg.StaticPartitionsDefinition([s.name for s in cfg.sources]),
            SHARD: dg.StaticPartitionsDefinition(cfg.shard_keys()),
        }
    )


def source_partitions(cfg: KunConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([s.name for s in cfg.sources])


def band_partitions(cfg: KunConfig) -> dg.MultiPartitionsDefinition:
    """lsh_band_pairs' (dedup.mode: band_steps): cluster group x LSH band. `cluster_group` sorts
    before `lsh_band`, so a group's bands are one contiguous key range."""
    n_bands, _ = dedup.bands(cfg.dedup.threshold, cfg.dedup.num_perm)
    return dg.MultiPartitionsDefinition(
        {GROUP: dg.StaticPartitionsDefinition(dedup.group_keys(cfg)), BAND: dg.StaticPartitionsDefinition([str(k) for k in range(n_bands)])}
    )
