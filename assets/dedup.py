"""Source-wide dedup as one component: minhash_signatures per partition, duplicate_clusters over
every shard of a cluster group (dedup.cluster_group: the source, or every source under
dedup.scope: all) through the every-shard partition mapping, and deduped_corpus, which waits for
the clusters' content to move before it re-runs (registry: awaits). The `clusters` job
(registry.STEPS) makes one group's clusters; the algorithms are kun_dagster/dedup.py."""

import dagster as dg

from kun_dagster import dedup, registry, stages, storage
from kun_dagster.config import KunConfig
from kun_dagster.dagster_private import add_partition_metadata
from kun_dagster.partitions import SHARD, SOURCE, hive
from kun_dagster.registry import CLUSTERS, SIGNATURES
from resources import ARROW, STREAM, KunResource

from .common import by_partition, report_stage, run_stage
from .corpus import corpus_spec
from .partitions import corpus_partitions


def _signatures(cfg: KunConfig, parts) -> dg.AssetsDefinition:
    @dg.asset(**corpus_spec(cfg, parts, SIGNATURES, checked=False, ins={registry.FILTERED: dg.AssetIn(metadata={STREAM: True})}))
    def minhash_signatures(context: dg.AssetExecutionContext, kun: KunResource, filtered_corpus):
        """A MinHash signature (dedup.num_perm values over character dedup.ngram-grams of the
        normalised text) and an exact-text key per document: what duplicate_clusters compares
        across shards. Config: dedup."""
        yield from run_stage(context, kun, SIGNATURES, by_partition(context, filtered_corpus), stages.sign, stream=True, checked=False)

    return minhash_signatures


def _clusters(cfg: KunConfig, parts) -> dg.AssetsDefinition:
    # Every partition of a source depends on the signatures of all its shards (scope: all, of every source).
    every_shard = (
        dg.AllPartitionMapping()
        if dedup.across_sources(cfg)
        else dg.MultiPartitionMapping(
            {
                SOURCE: dg.DimensionPartitionMapping(SOURCE, dg.IdentityPartitionMapping()),
                SHARD: dg.DimensionPartitionMapping(SHARD, dg.AllPartitionMapping()),
            }
        )
    )

    @dg.asset(
        **corpus_spec(
            cfg, parts, CLUSTERS, checked=False, ins={SIGNATURES: dg.AssetIn(partition_mapping=every_shard, metadata={ARROW: True})}
        )
    )
    def duplicate_clusters(context: dg.AssetExecutionContext, kun: KunResource, minhash_signatures):
        """Clusters of exact and near-duplicates (estimated Jaccard >= dedup.threshold, MinHash
        LSH) over every shard of the source (dedup.scope: all: of every source), computed once per
        source of the run, in one step or band by band (dedup.mode: the same clusters, under half
        the memory). A partition holds the cluster members that live in it: each kept or
        dropped, with the kept document's location. Config: dedup."""
        keys = context.partition_keys  # listed once: Dagster lists the run's whole range on each call
        tables = minhash_signatures if isinstance(minhash_signatures, dict) else {keys[0]: minhash_signatures}
        group = lambda k: dedup.cluster_group(kun.config, hive(k)["source"])  # noqa: E731
        found = {}
        for name in dict.fromkeys(group(k) for k in keys):
            try:
                found[name] = stages.clusters([t for k, t in tables.items() if group(k) == name], stages.StageContext(kun.config))
            except stages.DedupError as e:
                raise dg.Failure(str(e), allow_retries=False) from e
            st = found[name].stats
            context.log.info(
                f"{CLUSTERS} {name}: {st['documents']} documents, {st['clusters']} clusters (largest {st['largest_cluster']}), "
                f"dropping {st['duplicates']} in {st['seconds']}s ({st['mode'].replace('_', ' ')})"
            )
        out, metadata = {}, {}
        for name, result in found.items():
            rows = result.rows
            shards = {(str(s), str(n)): g.reset_index(drop=True) for (s, n), g in rows.groupby(["source", "shard"], sort=False)}
            for key in (k for k in keys if group(k) == name):
                part = hive(key)
                mine = shards.get((part["source"], part["shard"]), rows.iloc[:0])
                stats = {**result.stats, "dropped_here": int((mine["role"] != "kept").sum())}
                out[key] = stages.StageResult(mine, result.dropped, stats)
                metadata[key] = report_stage(context, kun, CLUSTERS, key, out[key])
        add_partition_metadata(context, metadata)
        # The clusters' content as the data version: a new file that duplicates nothing re-clusters its
        # source to the same clusters, and deduped_corpus of the other shards stays fresh. Dagster 1.13
        # gives every partition of a run one version: a run of one source (what a new file, a
        # one-source backfill and `kun run` make) is that source's clusters.
        content = storage.content_hash(found[name].rows for name in sorted(found))
        return dg.Output(out, data_version=dg.DataVersion(content))

    return duplicate_clusters


def _deduped(cfg: KunConfig, parts) -> dg.AssetsDefinition:
    @dg.asset(**corpus_spec(cfg, parts, registry.DEDUPED, ins={registry.FILTERED: dg.AssetIn(metadata={STREAM: True})}))
    def deduped_corpus(context: dg.AssetExecutionContext, kun: KunResource, filtered_corpus, duplicate_clusters):
        """filtered_corpus less every document that duplicate_clusters drops: exact copies
        (duplicate_text) and near-duplicates (near_duplicate) of a document kept elsewhere,
        quarantined with the kept document's location and the estimated Jaccard."""
        side = {CLUSTERS: by_partition(context, duplicate_clusters)}
        yield from run_stage(context, kun, registry.DEDUPED, by_partition(context, filtered_corpus), stages.dedupe, stream=True, side=side)

    return deduped_corpus


def build(cfg: KunConfig) -> list[dg.AssetsDefinition]:
    parts = corpus_partitions(cfg)
    return [_signatures(cfg, parts), _clusters(cfg, parts), _deduped(cfg, parts)]
