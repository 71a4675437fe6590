"""instruction_dataset: the final COIG-CQIA records of one source, with provenance and a dataset card."""

import dagster as dg
import pandas as pd

import checks
from kun_dagster import dataset, schemas, storage, versions
from kun_dagster.code_versions import code_version
from kun_dagster.config import KunConfig
from resources import KunResource

from .common import SINGLE_RUN, kinds, schema_of, table
from .partitions import SOURCE, source_partitions

GROUP = "dataset"


def build(cfg: KunConfig) -> list[dg.AssetsDefinition]:
    @dg.asset(
        name=versions.DATASET,
        group_name=GROUP,
        partitions_def=source_partitions(cfg),
        backfill_policy=SINGLE_RUN,
        kinds=kinds(cfg, "parquet", "json"),
        ins={versions.POLISHED: dg.AssetIn(partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=SOURCE))},
        check_specs=checks.specs(versions.DATASET),
        output_required=False,
        code_version=code_version(versions.DATASET, cfg),
    )
    def instruction_dataset(context: dg.AssetExecutionContext, kun: KunResource, polished_pairs, label_model: dict, chat_model: dict):
        """COIG-CQIA records (instruction, input, output, task_type, domain, ...) with provenance
        (source, doc_id, file, row, score, models), published and gated like every dataset version
        (Parquet under instruction_dataset/source=...), then released as
        release/{source}/train.jsonl with a dataset card (counts, stage funnel, config). Config:
        dataset, and the retention bound checks.retention.instruction_dataset."""
        c = kun.config
        frames = polished_pairs if isinstance(polished_pairs, dict) else {"all": polished_pairs}
        polished = pd.concat([schemas.empty_frame(versions.POLISHED), *frames.values()], ignore_index=True)
        results, cards = {}, {}
        for source in context.partition_keys:
            results[source], cards[source] = dataset.release(polished, source, c, kun.base, label_model["name"], chat_model["name"])
            _report(context, kun, source, results[source], cards[source])
        published = False
        for event in checks.gate(context, kun, versions.DATASET, results):  # all sources' records hold, or none is released
            published |= isinstance(event, dg.Output)
            yield event
        if published:  # the Parquet partitions are in place: the JSONL copies and cards go beside them
            for source, result in results.items():
                out = dataset.publish_release(kun.base, source, result.rows, cards[source])
                context.log.info(f"{versions.DATASET} {source}: {len(result.rows)} records -> {out}")

    return [instruction_dataset]


def _report(context: dg.AssetExecutionContext, kun: KunResource, source: str, result, card: str) -> None:
    recs, st = result.rows, result.stats
    div = st["diversity"]
    context.add_asset_metadata(
        {
            "dagster/row_count": len(recs),
            "dagster/column_schema": schema_of(storage.columns(recs)),
            "parquet": dg.MetadataValue.path(str(storage.partition_dir(kun.base, versions.DATASET, {"source": source}))),
            "release": dg.MetadataValue.path(str(dataset.release_dir(kun.base, source))),
            "funnel": table(dataset.funnel_frame(st["funnel"], len(recs), st["dropped"]), rows=None),
            "quarantined": len(result.dropped),
            "distinct_instruction_ratio": dg.MetadataValue.float(div["distinct_ratio"]) if div["texts"] else dg.MetadataValue.text("-"),
            "instruction_clusters": div["near_duplicate_clusters"],
            **({"largest_instruction_clusters": table(pd.DataFrame(div["largest"]), rows=None)} if div["largest"] else {}),
            "card": dg.MetadataValue.md(card),
            **({"preview": table(recs[["instruction", "output", "doc_id", "score"]])} if len(recs) else {}),
        },
        partition_key=source,
    )
