"""Source-wide dedup as one component: minhash_signatures per partition, duplicate_clusters over
every shard of a cluster group (dedup.cluster_group: the source, or every source under
dedup.scope: all) through the every-shard partition mapping, and deduped_corpus, which waits for
the clusters' content to move before it re-runs (registry: awaits). The `clusters` job
(registry.STEPS) makes one group's clusters; the algorithms are kun_dagster/dedup.py.

Under dedup.mode: band_steps, lsh_band_pairs sits between the signatures and the clusters: one
partition per cluster group x LSH band, each its own run (multi-run backfill policy), so a
group's bands run at once wherever the run launcher or executor puts them; the clusters step
merges them."""

import dagster as dg

from kun_dagster import dedup, registry, stages, storage
from kun_dagster.code_versions import code_version
from kun_dagster.config import KunConfig
from kun_dagster.dagster_private import add_partition_metadata
from kun_dagster.partitions import GROUP, SHARD, SOURCE, hive
from kun_dagster.registry import CLUSTERS, LSH_BANDS, SIGNATURES
from kun_dagster.stages import deduped
from resources import ARROW, STREAM, KunResource

from .common import by_partition, kinds, report_stage, run_stage
from .corpus import corpus_spec
from .partitions import band_partitions, corpus_partitions

# One band per run: a backfill of a group's bands (the UI's, the daemon's) is that many runs, each a
# bounded step that the run launcher can put on its own machine.
ONE_BAND_PER_RUN = dg.BackfillPolicy.multi_run(1)


def _group_of(cfg: KunConfig, key: str) -> str:
    """The cluster group's partition key that a corpus partition key falls in."""
    return dedup.group_key(dedup.cluster_group(cfg, hive(key)["source"]))


def _keyed(context: dg.AssetExecutionContext, name: str, value) -> dict:
    """An input of many partitions as {its partition key: value}, one partition's bare value too."""
    return value if isinstance(value, dict) else {context.asset_partition_keys_for_input(name)[0]: value}


def _bands(cfg: KunConfig) -> dg.AssetsDefinition:
    # A band of a group reads the signatures of every shard of the group's sources.
    group_shards = (
        dg.AllPartitionMapping()
        if dedup.across_sources(cfg)
        else dg.MultiPartitionMapping({SOURCE: dg.DimensionPartitionMapping(GROUP, dg.IdentityPartitionMapping())})
    )

    @dg.asset(
        name=LSH_BANDS,
        group_name=registry.group(LSH_BANDS),
        partitions_def=band_partitions(cfg),
        kinds=kinds(cfg, "parquet", checked=False),
        backfill_policy=ONE_BAND_PER_RUN,
        code_version=code_version(LSH_BANDS, cfg),
        ins={SIGNATURES: dg.AssetIn(partition_mapping=group_shards, metadata={ARROW: True})},
    )
    def lsh_band_pairs(context: dg.AssetExecutionContext, kun: KunResource, minhash_signatures):
        """One LSH band's candidate pairs over every shard of a cluster group (the source; under
        dedup.scope: all, every source), each verified against the threshold: documents as ranks
        (source as listed, file, row). The step holds the band's buckets, the text keys and the
        candidates' signatures (~0.25 KB a document, bench/README.md), not the group's signature
        matrix; duplicate_clusters merges every band. Only under dedup.mode: band_steps."""
        tables = _keyed(context, SIGNATURES, minhash_signatures)
        out, metadata, ranked = {}, {}, {}
        keys = context.partition_keys  # one from a backfill or `kun run`; a run launched over a range ranks its group once
        for key in keys:
            part = hive(key, bands=True)
            if part["group"] not in ranked:  # the group checked and ranked once for all its bands in the step
                mine = [t for k, t in tables.items() if _group_of(kun.config, k) == part["group"]]
                try:
                    ranked = {part["group"]: deduped.prepare(mine, stages.StageContext(kun.config))}
                except stages.DedupError as e:
                    raise dg.Failure(str(e), allow_retries=False) from e
            result = stages.band_pairs(None, int(part["band"]), stages.StageContext(kun.config), ranked[part["group"]])
            out[key], metadata[key] = result, report_stage(context, kun, LSH_BANDS, key, result)
            st = result.stats
            context.log.info(
                f"{LSH_BANDS} {part['group']} band {st['band']} of {st['bands']}: {st['documents']} documents, "
                f"{st['candidate_pairs']} candidate pairs, {st['near_pairs']} near-duplicates, in {st['seconds']}s"
            )
        add_partition_metadata(context, metadata)
        content = storage.content_hash(out[k].rows for k in keys)
        return dg.Output(out, data_version=dg.DataVersion(content))

    return lsh_band_pairs


def _signatures(cfg: KunConfig, parts) -> dg.AssetsDefinition:
    @dg.asset(**corpus_spec(cfg, parts, SIGNATURES, checked=False, ins={registry.FILTERED: dg.AssetIn(metadata={STREAM: True})}))
    def minhash_signatures(context: dg.AssetExecutionContext, kun: KunResource, filtered_corpus):
        """A MinHash signature (dedup.num_perm values over character dedup.ngram-grams of the
        normalised text) and an exact-text key per document: what duplicate_clusters compares
        across shards. Config: dedup."""
        yield from run_stage(context, kun, SIGNATURES, by_partition(context, filtered_corpus), stages.sign, stream=True, checked=False)

    return minhash_signatures


def _clusters(cfg: KunConfig, parts) -> dg.AssetsDefinition:
    # Every partition of a source depends on the signatures of all its shards (scope: all, of every
    # source), and under band_steps on every band of its group.
    across = dedup.across_sources(cfg)
    every_shard = (
        dg.AllPartitionMapping()
        if across
        else dg.MultiPartitionMapping(
            {
                SOURCE: dg.DimensionPartitionMapping(SOURCE, dg.IdentityPartitionMapping()),
                SHARD: dg.DimensionPartitionMapping(SHARD, dg.AllPartitionMapping()),
            }
        )
    )
    ins = {SIGNATURES: dg.AssetIn(partition_mapping=every_shard, metadata={ARROW: True})}
    if dedup.band_steps(cfg):
        every_band = (
            dg.AllPartitionMapping()
            if across
            else dg.MultiPartitionMapping({GROUP: dg.DimensionPartitionMapping(SOURCE, dg.IdentityPartitionMapping())})
        )
        ins[LSH_BANDS] = dg.AssetIn(partition_mapping=every_band, metadata={ARROW: True})
    description = (
        "Clusters of exact and near-duplicates (estimated Jaccard >= dedup.threshold, MinHash LSH) over every shard of "
        "the source (dedup.scope: all: of every source), computed once per source of the run, in one step or band by "
        "band (dedup.mode: the same clusters, under half the memory; band_steps: merged from lsh_band_pairs). A "
        "partition holds the cluster members that live in it: each kept or dropped, with the kept document's "
        "location. Config: dedup."
    )
    spec = corpus_spec(cfg, parts, CLUSTERS, checked=False, ins=ins, description=description)

    if dedup.band_steps(cfg):

        @dg.asset(**spec)
        def duplicate_clusters(context: dg.AssetExecutionContext, kun: KunResource, minhash_signatures, lsh_band_pairs):
            return _cluster(context, kun, minhash_signatures, _keyed(context, LSH_BANDS, lsh_band_pairs))

    else:

        @dg.asset(**spec)
        def duplicate_clusters(context: dg.AssetExecutionContext, kun: KunResource, minhash_signatures):
            return _cluster(context, kun, minhash_signatures, None)

    return duplicate_clusters


def _merged(cfg: KunConfig, group: str, parts: list, bands: dict) -> stages.StageResult:
    """A group's clusters from its lsh_band_pairs partitions (band_steps)."""
    mine = {}
    for key, table in bands.items():
        part = hive(key, bands=True)
        if part["group"] == dedup.group_key(group):
            mine[int(part["band"])] = (
                table.read(["a", "b", "ok"]).select(["a", "b", "ok"]).to_pandas(),
                storage.read_stats(table.directory),
            )
    return stages.merge_bands(parts, mine, stages.StageContext(cfg))


def _cluster(context: dg.AssetExecutionContext, kun: KunResource, minhash_signatures, bands: dict | None) -> dg.Output:
    keys = context.partition_keys  # listed once: Dagster lists the run's whole range on each call
    tables = _keyed(context, SIGNATURES, minhash_signatures)
    group = lambda k: dedup.cluster_group(kun.config, hive(k)["source"])  # noqa: E731
    found = {}
    for name in dict.fromkeys(group(k) for k in keys):
        parts = [t for k, t in tables.items() if group(k) == name]
        try:
            found[name] = (
                stages.clusters(parts, stages.StageContext(kun.config)) if bands is None else _merged(kun.config, name, parts, bands)
            )
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
    bands = [_bands(cfg)] if dedup.band_steps(cfg) else []
    return [_signatures(cfg, parts), *bands, _clusters(cfg, parts), _deduped(cfg, parts)]
