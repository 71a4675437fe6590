"""raw_corpus (ingest with quarantine) and filtered_corpus (clean, token limit, perplexity, dedup)."""

import dagster as dg
from transformers import AutoTokenizer

import checks
from kun_dagster import stages, versions
from kun_dagster.config import KunConfig
from kun_dagster.corpus import CorpusError
from kun_dagster.partitions import hive
from resources import STREAM, KunResource, LLMResource

from .common import GPU_POOL, GPU_RETRY, SINGLE_RUN, by_partition, checkpointed, gpu_tags, kinds, report_stage, staged_sink
from .partitions import corpus_partitions

GROUP = "corpus"


def build(cfg: KunConfig) -> list[dg.AssetsDefinition]:
    parts = corpus_partitions(cfg)

    @dg.asset(
        name=versions.RAW,
        group_name=GROUP,
        partitions_def=parts,
        backfill_policy=SINGLE_RUN,
        kinds=kinds(cfg, "parquet"),
        check_specs=checks.specs(versions.RAW),
        output_required=False,
    )
    def raw_corpus(context: dg.AssetExecutionContext, kun: KunResource):
        """Every document of the partition's files (a file's shard is a stable hash of its path),
        streamed in batches; unreadable rows go to the quarantine with a reason code, file and row.
        Config: sources (uri, format, encoding, fields), shards, storage.batch_rows."""
        out = {}
        for key in context.partition_keys:
            part = hive(key)
            source_name, shard = part["source"], int(part["shard"])
            try:
                result = stages.ingest(kun.config, source_name, shard, kun.store, staged_sink(kun, versions.RAW, key))
            except CorpusError as e:
                raise dg.Failure(str(e), allow_retries=False) from e
            out[key] = report_stage(context, kun, versions.RAW, key, result)
        yield from checks.gate(context, kun, versions.RAW, out)

    ppl_role = cfg.filter.perplexity_model if cfg.filter.perplexity_max is not None else None

    @dg.asset(
        name=versions.FILTERED,
        group_name=GROUP,
        partitions_def=parts,
        backfill_policy=SINGLE_RUN,
        pool=GPU_POOL,
        retry_policy=GPU_RETRY,
        kinds=kinds(cfg, "parquet", role=ppl_role),
        op_tags=gpu_tags(cfg, ppl_role),
        ins={versions.RAW: dg.AssetIn(metadata={STREAM: True})},
        check_specs=checks.specs(versions.FILTERED),
        output_required=False,
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
        tokenizer = AutoTokenizer.from_pretrained(kun.local_model(label_model["path"]))
        llm, reference = (base_llm, base_model) if c.filter.perplexity_model == "base" else (label_llm, label_model)
        engine = llm.engine(reference) if c.filter.perplexity_max is not None else None
        out = {}
        for key, batches in by_partition(context, raw_corpus).items():  # each partition streamed in, filtered and out
            resumable = checkpointed(kun, versions.FILTERED, key, engine) if engine else None
            result = stages.filter_corpus(
                batches,
                tokenizer,
                resumable,
                c,
                staged_sink(kun, versions.FILTERED, key),
                label=f"filtered_corpus {'/'.join(hive(key).values())}",
            )
            out[key] = report_stage(context, kun, versions.FILTERED, key, result, resumable)
        yield from checks.gate(context, kun, versions.FILTERED, out)

    return [raw_corpus, filtered_corpus]
