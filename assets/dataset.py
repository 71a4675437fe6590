"""instruction_dataset: the final COIG-CQIA records of one source, with provenance and a dataset card."""

import dagster as dg
import pandas as pd

import checks
from kun_dagster import dataset, schemas, storage
from kun_dagster.config import KunConfig
from resources import KunResource

from .common import SINGLE_RUN, kinds, schema_of, table
from .partitions import SOURCE, source_partitions

GROUP = "dataset"


def build(cfg: KunConfig) -> list[dg.AssetsDefinition]:
    @dg.asset(
        group_name=GROUP,
        partitions_def=source_partitions(cfg),
        backfill_policy=SINGLE_RUN,
        kinds=kinds(cfg, "parquet", "json"),
        ins={"polished_pairs": dg.AssetIn(partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=SOURCE))},
        check_specs=checks.specs("instruction_dataset"),
        output_required=False,
    )
    def instruction_dataset(context: dg.AssetExecutionContext, kun: KunResource, polished_pairs, label_model: dict, chat_model: dict):
        """COIG-CQIA records (instruction, input, output, task_type, domain, ...) with provenance
        (source, doc_id, file, row, score, models), as Parquet under instruction_dataset/source=...
        and as release/{source}/train.jsonl with a dataset card (counts, stage funnel, config)."""
        c = kun.config
        frames = polished_pairs if isinstance(polished_pairs, dict) else {"all": polished_pairs}
        polished = pd.concat([schemas.empty_frame("polished_pairs"), *frames.values()], ignore_index=True)
        by_source = {s: dataset.records(polished[polished["source"] == s], c, label_model["name"], chat_model["name"])
                     for s in context.partition_keys}  # a source with no rows left gets empty records and its card
        funnels = {s: dataset.funnel(kun.base, s, c.shard_keys(), c.score.threshold) for s in by_source}
        check = checks.schema_check("instruction_dataset", {s: schemas.validate("instruction_dataset", r, c) for s, r in by_source.items()})
        warn = checks.warn_results("instruction_dataset", {"retention": {
            s: dataset.release_retention(funnels[s], len(r), c.checks.retention["instruction_dataset"]) for s, r in by_source.items()}})
        checks.log_failures(context, "instruction_dataset", [check, *warn])
        if check.passed:  # release nothing unless every source's records hold
            for source, recs in by_source.items():
                _release(context, kun, source, recs, funnels[source], label_model, chat_model)
            yield dg.MaterializeResult()
        yield check
        yield from warn

    return [instruction_dataset]


def _release(context: dg.AssetExecutionContext, kun: KunResource, source: str, recs: pd.DataFrame, fun: dict, label_model: dict,
             chat_model: dict) -> None:
    c = kun.config
    card = dataset.card(source, len(recs), fun, c, label_model["name"], chat_model["name"])
    parquet_dir = storage.partition_dir(kun.base, "instruction_dataset", {"source": source})
    storage.write_partition(parquet_dir, recs, schemas.arrow_schema("instruction_dataset"))
    release = dataset.publish_release(kun.base, source, recs, card)
    context.log.info(f"instruction_dataset {source}: {len(recs)} records -> {release}")
    context.add_asset_metadata(
        {
            "dagster/row_count": len(recs),
            "dagster/column_schema": schema_of(recs),
            "parquet": dg.MetadataValue.path(str(parquet_dir)),
            "release": dg.MetadataValue.path(str(release)),
            "funnel": table(dataset.funnel_frame(fun, len(recs)), rows=None),
            "card": dg.MetadataValue.md(card),
            **({"preview": table(recs[["instruction", "output", "doc_id", "score"]])} if len(recs) else {}),
        },
        partition_key=source,
    )
