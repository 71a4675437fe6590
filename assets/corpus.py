"""raw_corpus (ingest with quarantine) and filtered_corpus (clean, token limit, exact dedup within
the shard, perplexity); the source-wide dedup that follows is assets/dedup.py."""

import dagster as dg

import checks
from kun_dagster import registry, stages
from kun_dagster.code_versions import code_version
from kun_dagster.config import KunConfig
from kun_dagster.registry import SOURCE_FILES
from kun_dagster.stages.raw import LISTINGS
from resources import STREAM, KunResource, LLMResource

from .common import GPU_RETRY, SINGLE_RUN, by_partition, columns, gpu_tags, kinds, llm_pool, run_stage
from .partitions import corpus_partitions


def corpus_spec(cfg: KunConfig, parts, name: str, *, checked: bool = True, role: str | None = None, **more) -> dict:
    """What the corpus assets share: a checked one yields its output only if its schema holds (checks.gate)."""
    checks_of = dict(check_specs=checks.specs(name), output_required=False) if checked else {}
    return dict(
        name=name,
        group_name=registry.group(name),
        partitions_def=parts,
        kinds=kinds(cfg, "parquet", role=role, checked=checked),
        backfill_policy=SINGLE_RUN,
        code_version=code_version(name, cfg),
        metadata=columns(name),
        **checks_of,
        **more,
    )


def _raw_corpus(cfg: KunConfig, parts) -> dg.AssetsDefinition:
    @dg.asset(**corpus_spec(cfg, parts, registry.RAW, deps=[SOURCE_FILES]))
    def raw_corpus(context: dg.AssetExecutionContext, kun: KunResource):
        """Every document of the partition's files (a file's shard is a stable hash of its path),
        streamed in batches; unreadable rows go to the quarantine with a reason code, file and row.
        Config: sources (uri, format, encoding, fields), shards, ingest (size limits), storage.batch_rows."""
        keys = context.partition_keys
        listings = {}  # one dict for every key: each source is listed once in the step, however many shards it runs
        yield from run_stage(
            context, kun, registry.RAW, dict.fromkeys(keys), stages.ingest, stream=True, side={LISTINGS: dict.fromkeys(keys, listings)}
        )

    return raw_corpus


def _filtered_corpus(cfg: KunConfig, parts) -> dg.AssetsDefinition:
    ppl_role = cfg.filter.perplexity_model if cfg.filter.perplexity_max is not None else None

    @dg.asset(
        **corpus_spec(
            cfg,
            parts,
            registry.FILTERED,
            role=ppl_role,
            pool=llm_pool(cfg, ppl_role),
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
        inputs = by_partition(context, raw_corpus)  # each partition streamed in, filtered and out
        yield from run_stage(context, kun, registry.FILTERED, inputs, stages.filter_corpus, engine=engine, tokenizer=tokenizer, stream=True)

    return filtered_corpus


def build(cfg: KunConfig) -> list[dg.AssetsDefinition]:
    parts = corpus_partitions(cfg)
    return [_raw_corpus(cfg, parts), _filtered_corpus(cfg, parts)]
