"""instruction_dataset: the final COIG-CQIA records of one source, with provenance and a dataset card."""

import dagster as dg
import pandas as pd
from dagster._core.definitions.data_version import CODE_VERSION_TAG, INPUT_DATA_VERSION_TAG_PREFIX  # Dagster's provenance tags

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
        current = {asset: code_version(asset, c) for asset in versions.PARTITIONED}
        for source in context.partition_keys:
            made = _made_from(context.instance, source, c.shard_keys())
            results[source], cards[source] = dataset.release(
                polished, source, c, kun.base, label_model["name"], chat_model["name"], made, current
            )
            for line in results[source].stats["mixed_versions"]:
                context.log.warning(f"{versions.DATASET} {source}: mixed versions: {line}")
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


MODELS = ("base_model", "label_model", "chat_model")


def _made_from(instance: dg.DagsterInstance, source: str, shards: list[str]) -> list[dict]:
    """The code and model versions that each source x shard partition of the source was last
    materialized under, from the tags Dagster records on every materialization (newest first, paged
    until every partition is found)."""
    keys = [f"{source}|{shard}" for shard in shards]
    made = []
    for asset in versions.PARTITIONED:
        latest: dict[str, dict] = {}
        cursor = None
        while len(latest) < len(keys):
            page = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=keys), limit=1000, cursor=cursor
            )
            for record in page.records:
                latest.setdefault(record.partition_key, record.event_log_entry.tags or {})
            if not page.has_more:
                break
            cursor = page.cursor
        for key in keys:
            t = latest.get(key, {})
            models = {m: t[f"{INPUT_DATA_VERSION_TAG_PREFIX}/{m}"] for m in MODELS if f"{INPUT_DATA_VERSION_TAG_PREFIX}/{m}" in t}
            made.append({"stage": asset, "partition": key, "code_version": t.get(CODE_VERSION_TAG), "models": models})
    return made


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
            "mixed_versions": len(st["mixed_versions"]),
            "distinct_instruction_ratio": dg.MetadataValue.float(div["distinct_ratio"]) if div["texts"] else dg.MetadataValue.text("-"),
            "instruction_clusters": div["near_duplicate_clusters"],
            **({"largest_instruction_clusters": table(pd.DataFrame(div["largest"]), rows=None)} if div["largest"] else {}),
            "card": dg.MetadataValue.md(card),
            **({"preview": table(recs[["instruction", "output", "doc_id", "score"]])} if len(recs) else {}),
        },
        partition_key=source,
    )
