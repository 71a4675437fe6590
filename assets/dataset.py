"""instruction_dataset (one per round): the final COIG-CQIA records of one source, with provenance and a dataset card."""

import dagster as dg
import pandas as pd

import checks
from kun_dagster import dataset, registry, schemas, storage
from kun_dagster.code_versions import code_version
from kun_dagster.config import KunConfig
from kun_dagster.dagster_private import CODE_VERSION_TAG, INPUT_DATA_VERSION_TAG_PREFIX
from kun_dagster.registry import CHAT_MODEL, MODELS, ROUND_STAGES, in_round
from resources import KunResource

from . import evaluation
from .common import SINGLE_RUN, kinds, schema_of, table
from .partitions import SOURCE, source_partitions


def build(cfg: KunConfig) -> list[dg.AssetsDefinition]:
    out = []
    for k in range(1, cfg.iterations + 1):
        out.append(_release(cfg, k))
        if cfg.evaluation.enabled:
            out.append(evaluation.build(cfg, k))
    return out


def _release(cfg: KunConfig, k: int) -> dg.AssetsDefinition:
    name, polished, chat = (in_round(s, k) for s in (registry.DATASET, registry.POLISHED, CHAT_MODEL))
    where = "release/{source}" if k == cfg.iterations else f"release/round{k}/{{source}} (release/{{source}} is the last round's)"

    @dg.asset(
        name=name,
        group_name=registry.group(name),
        partitions_def=source_partitions(cfg),
        backfill_policy=SINGLE_RUN,
        kinds=kinds(cfg, "parquet", "json"),
        ins={
            registry.POLISHED: dg.AssetIn(
                key=polished, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=SOURCE)
            ),
            CHAT_MODEL: dg.AssetIn(key=chat),
            registry.LABEL_MODEL: dg.AssetIn(),
        },
        check_specs=checks.specs(name),
        output_required=False,
        code_version=code_version(name, cfg),
        description=(
            f"Round {k}'s COIG-CQIA records (instruction, input, output, task_type, domain, ...) with provenance "
            "(source, doc_id, file, row, score, models), published and gated like every dataset version (Parquet under "
            f"{name}/source=...), then released as {where}: train.jsonl and a dataset card (counts, stage funnel, "
            "rounds, versions, config). Config: dataset, tags, and the retention bound checks.retention.instruction_dataset."
        ),
    )
    def instruction_dataset(context: dg.AssetExecutionContext, kun: KunResource, polished_pairs, label_model: dict, chat_model: dict):
        c = kun.config
        frames = polished_pairs if isinstance(polished_pairs, dict) else {"all": polished_pairs}
        polished_rows = pd.concat([schemas.empty_frame(registry.POLISHED), *frames.values()], ignore_index=True)
        results, cards = {}, {}
        current = {asset: code_version(asset, c) for asset in _partitioned(k)}
        reports = dataset.read_reports(kun.base, k - 1)
        for source in context.partition_keys:
            made = _made_from(context.instance, source, c.shard_keys(), k)
            results[source], cards[source] = dataset.release(
                polished_rows, source, c, kun.base, label_model["name"], chat_model["name"], made, current, k, reports
            )
            for line in results[source].stats["mixed_versions"]:
                context.log.warning(f"{name} {source}: mixed versions: {line}")
            _report(context, kun, name, source, results[source], cards[source], k)
        mixed = [f"{s}: {line}" for s, r in results.items() for line in r.stats["mixed_versions"]]
        if mixed and c.dataset.mixed_versions == "block":  # what the card would flag, refused outright
            raise dg.Failure(
                f"{name} not released: its inputs were made under another config or model ("
                + "; ".join(mixed[:5])
                + (f"; and {len(mixed) - 5} more" if len(mixed) > 5 else "")
                + "). Re-materialize the stale partitions (`kun run` does; the UI marks them), "
                "or set dataset.mixed_versions: warn to release it flagged.",
                allow_retries=False,
            )
        folders = {source: dataset.release_dir(kun.base, source, k, c.iterations) for source in results}

        def publish() -> None:  # the JSONL copies and cards of every source, before the output is recorded
            dataset.publish_releases({folders[s]: (r.rows, cards[s]) for s, r in results.items()}, context.run_id)
            for source, result in results.items():
                context.log.info(f"{name} {source}: {len(result.rows)} records -> {folders[source]}")

        yield from checks.gate(context, kun, name, results, publish)  # all sources' records hold, or none is released

    return instruction_dataset


def _partitioned(k: int) -> tuple[str, ...]:
    """The source x shard assets round k's release is made from."""
    return tuple(in_round(a, k) if a in ROUND_STAGES else a for a in registry.PARTITIONED)


def _made_from(instance: dg.DagsterInstance, source: str, shards: list[str], k: int = 1) -> list[dict]:
    """The code and model versions that each source x shard partition of the source was last
    materialized under, from the tags Dagster records on every materialization (newest first, paged
    until every partition is found)."""
    keys = [f"{source}|{shard}" for shard in shards]
    made = []
    models = (*MODELS[:-1], in_round(CHAT_MODEL, k))
    for asset in _partitioned(k):
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
            used = {m: t[f"{INPUT_DATA_VERSION_TAG_PREFIX}/{m}"] for m in models if f"{INPUT_DATA_VERSION_TAG_PREFIX}/{m}" in t}
            made.append({"stage": asset, "partition": key, "code_version": t.get(CODE_VERSION_TAG), "models": used})
    return made


def _report(context: dg.AssetExecutionContext, kun: KunResource, name: str, source: str, result, card: str, k: int) -> None:
    recs, st = result.rows, result.stats
    div = st["diversity"]
    context.add_asset_metadata(
        {
            "dagster/row_count": len(recs),
            "dagster/column_schema": schema_of(storage.columns(recs)),
            "parquet": dg.MetadataValue.path(str(storage.partition_dir(kun.base, name, {"source": source}))),
            "release": dg.MetadataValue.path(str(dataset.release_dir(kun.base, source, k, kun.config.iterations))),
            "funnel": table(dataset.funnel_frame(st["funnel"], len(recs), st["dropped"]), rows=None),
            "quarantined": len(result.dropped),
            "mixed_versions": len(st["mixed_versions"]),
            "distinct_instruction_ratio": dg.MetadataValue.float(div["distinct_ratio"]) if div["texts"] else dg.MetadataValue.text("-"),
            "instruction_clusters": div["near_duplicate_clusters"],
            **({"largest_instruction_clusters": table(pd.DataFrame(div["largest"]), rows=None)} if div["largest"] else {}),
            **({"rounds": table(pd.DataFrame(st["rounds"]), rows=None, width=200)} if st["rounds"] else {}),
            "card": dg.MetadataValue.md(card),
            **({"preview": table(recs[["instruction", "output", "doc_id", "score"]])} if len(recs) else {}),
        },
        partition_key=source,
    )
