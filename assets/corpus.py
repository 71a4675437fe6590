"""raw_corpus (ingest with quarantine), filtered_corpus (clean, token limit, exact dedup within the
shard, perplexity), then source-wide dedup: minhash_signatures per partition, duplicate_clusters
over every shard of the source, deduped_corpus."""

import dagster as dg

import checks
from kun_dagster import registry, stages, storage
from kun_dagster.code_versions import code_version
from kun_dagster.config import KunConfig
from kun_dagster.corpus import CorpusError
from kun_dagster.partitions import SHARD, SOURCE, hive
from kun_dagster.registry import CLUSTERS, SIGNATURES, SOURCE_FILES
from resources import ARROW, STREAM, KunResource, LLMResource

from .common import GPU_POOL, GPU_RETRY, SINGLE_RUN, by_partition, checkpointed, gpu_tags, kinds, report_stage, staged_sink
from .partitions import corpus_partitions


def build(cfg: KunConfig) -> list[dg.AssetsDefinition]:
    parts = corpus_partitions(cfg)

    def spec(name: str, *, checked: bool = True, role: str | None = None, **more) -> dict:
        """What the corpus assets share: a checked one yields its output only if its schema holds (checks.gate)."""
        checks_of = dict(check_specs=checks.specs(name), output_required=False) if checked else {}
        return dict(
            name=name,
            group_name=registry.group(name),
            partitions_def=parts,
            kinds=kinds(cfg, "parquet", role=role, checked=checked),
            backfill_policy=SINGLE_RUN,
            code_version=code_version(name, cfg),
            **checks_of,
            **more,
        )

    @dg.asset(**spec(registry.RAW, deps=[SOURCE_FILES]))
    def raw_corpus(context: dg.AssetExecutionContext, kun: KunResource):
        """Every document of the partition's files (a file's shard is a stable hash of its path),
        streamed in batches; unreadable rows go to the quarantine with a reason code, file and row.
        Config: sources (uri, format, encoding, fields), shards, ingest (size limits), storage.batch_rows."""
        out = {}
        for key in context.partition_keys:
            part = hive(key)
            source_name, shard = part["source"], int(part["shard"])
            try:
                result = stages.ingest(
                    kun.config,
                    source_name,
                    shard,
                    kun.store,
                    staged_sink(kun, registry.RAW, key),
                    quarantine=staged_sink(kun, registry.RAW, key, quarantine=True),
                )
            except CorpusError as e:
                raise dg.Failure(str(e), allow_retries=False) from e
            out[key] = report_stage(context, kun, registry.RAW, key, result)
        yield from checks.gate(context, kun, registry.RAW, out)

    ppl_role = cfg.filter.perplexity_model if cfg.filter.perplexity_max is not None else None

    @dg.asset(
        **spec(
            registry.FILTERED,
            role=ppl_role,
            pool=GPU_POOL,
            retry_policy=GPU_RETRY,
            op_tags=gpu_tags(cfg, ppl_role),
            ins={registry.RAW: dg.AssetIn(metadata={STREAM: True})},
        )
    )
    def filtered_corpus(
        context: dg.AssetExecutionContext,
        kun: KunResource,
        base_llm: LLMResource,
        label_llm: LLMResource,
        raw_corpus,
        base_model: dict,
        label_model: dict,
    ):
        """Cleaned text within filter.max_tokens of the label model's tokenizer, perplexity under the
        reference model (filter.perplexity_model, run with that role's engine settings) at most
        filter.perplexity_max, exact duplicates removed (config: filter)."""
        c = kun.config
        from transformers import AutoTokenizer  # here, not at import: every process that loads the code location would pay for it

        tokenizer = AutoTokenizer.from_pretrained(kun.local_model(label_model["path"]))
        llm, reference = (base_llm, base_model) if c.filter.perplexity_model == "base" else (label_llm, label_model)
        engine = llm.engine(reference) if c.filter.perplexity_max is not None else None
        out = {}
        for key, batches in by_partition(context, raw_corpus).items():  # each partition streamed in, filtered and out
            resumable = checkpointed(kun, registry.FILTERED, key, engine) if engine else None
            result = stages.filter_corpus(
                batches,
                tokenizer,
                resumable,
                c,
                staged_sink(kun, registry.FILTERED, key),
                label=f"filtered_corpus {'/'.join(hive(key).values())}",
            )
            out[key] = report_stage(context, kun, registry.FILTERED, key, result, resumable)
        yield from checks.gate(context, kun, registry.FILTERED, out)

    @dg.asset(**spec(SIGNATURES, checked=False, ins={registry.FILTERED: dg.AssetIn(metadata={STREAM: True})}))
    def minhash_signatures(context: dg.AssetExecutionContext, kun: KunResource, filtered_corpus):
        """A MinHash signature (dedup.num_perm values over character dedup.ngram-grams of the
        normalised text) and an exact-text key per document: what duplicate_clusters compares
        across shards. Config: dedup."""
        out = {}
        for key, batches in by_partition(context, filtered_corpus).items():
            label = f"{SIGNATURES} {'/'.join(hive(key).values())}"
            result = stages.sign(batches, kun.config, staged_sink(kun, SIGNATURES, key), label=label)
            out[key] = report_stage(context, kun, SIGNATURES, key, result)
        return out

    # Every partition of a source depends on the signatures of all its shards (scope: all, of every source).
    every_shard = (
        dg.AllPartitionMapping()
        if cfg.dedup.scope == "all"
        else dg.MultiPartitionMapping(
            {
                SOURCE: dg.DimensionPartitionMapping(SOURCE, dg.IdentityPartitionMapping()),
                SHARD: dg.DimensionPartitionMapping(SHARD, dg.AllPartitionMapping()),
            }
        )
    )

    @dg.asset(**spec(CLUSTERS, checked=False, ins={SIGNATURES: dg.AssetIn(partition_mapping=every_shard, metadata={ARROW: True})}))
    def duplicate_clusters(context: dg.AssetExecutionContext, kun: KunResource, minhash_signatures):
        """Clusters of exact and near-duplicates (estimated Jaccard >= dedup.threshold, MinHash
        LSH) over every shard of the source (dedup.scope: all: of every source), computed once per
        source of the run. A partition holds the cluster members that live in it: each kept or
        dropped, with the kept document's location. Config: dedup."""
        tables = minhash_signatures if isinstance(minhash_signatures, dict) else {context.partition_keys[0]: minhash_signatures}
        group = (lambda k: "all") if kun.config.dedup.scope == "all" else (lambda k: hive(k)["source"])
        found = {}
        for name in dict.fromkeys(group(k) for k in context.partition_keys):
            try:
                found[name] = stages.cluster([t for k, t in tables.items() if group(k) == name], kun.config)
            except stages.DedupError as e:
                raise dg.Failure(str(e), allow_retries=False) from e
            st = found[name].stats
            context.log.info(
                f"{CLUSTERS} {name}: {st['documents']} documents, {st['clusters']} clusters (largest {st['largest_cluster']}), "
                f"dropping {st['duplicates']} in {st['seconds']}s"
            )
        out = {}
        for key in context.partition_keys:
            part, result = hive(key), found[group(key)]
            rows = result.rows
            mine = rows[(rows["source"] == part["source"]) & (rows["shard"].astype(str) == part["shard"])].reset_index(drop=True)
            stats = {**result.stats, "dropped_here": int((mine["role"] != "kept").sum())}
            out[key] = report_stage(context, kun, CLUSTERS, key, stages.StageResult(mine, result.dropped, stats))
        # The clusters' content as the data version: a new file that duplicates nothing re-clusters its
        # source to the same clusters, and deduped_corpus of the other shards stays fresh. Dagster 1.13
        # gives every partition of a run one version: a run of one source (what a new file, a
        # one-source backfill and `kun run` make) is that source's clusters.
        content = storage.content_hash(found[name].rows for name in sorted(found))
        return dg.Output(out, data_version=dg.DataVersion(content))

    @dg.asset(**spec(registry.DEDUPED, ins={registry.FILTERED: dg.AssetIn(metadata={STREAM: True})}))
    def deduped_corpus(context: dg.AssetExecutionContext, kun: KunResource, filtered_corpus, duplicate_clusters):
        """filtered_corpus less every document that duplicate_clusters drops: exact copies
        (duplicate_text) and near-duplicates (near_duplicate) of a document kept elsewhere,
        quarantined with the kept document's location and the estimated Jaccard."""
        clusters = by_partition(context, duplicate_clusters)
        out = {}
        for key, batches in by_partition(context, filtered_corpus).items():
            label = f"{registry.DEDUPED} {'/'.join(hive(key).values())}"
            result = stages.dedupe(batches, clusters[key], staged_sink(kun, registry.DEDUPED, key), label=label)
            out[key] = report_stage(context, kun, registry.DEDUPED, key, result)
        yield from checks.gate(context, kun, registry.DEDUPED, out)

    return [raw_corpus, filtered_corpus, minhash_signatures, duplicate_clusters, deduped_corpus]
