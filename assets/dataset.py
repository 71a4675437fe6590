"""instruction_dataset (one per round): the final COIG-CQIA records of one source, with provenance; dataset_card: its release folder."""

import dagster as dg
import pandas as pd

import checks
from kun_dagster import card, dataset, registry, schemas, storage, training
from kun_dagster.code_versions import code_version
from kun_dagster.config import KunConfig
from kun_dagster.dagster_private import CODE_VERSION_TAG, INPUT_DATA_VERSION_TAG_PREFIX
from kun_dagster.partitions import hive
from kun_dagster.registry import CHAT_MODEL, MODELS, in_round
from resources import ALL, TALLY, KunResource

from . import evaluation
from .common import SINGLE_RUN, kinds, schema_of, table
from .partitions import SOURCE, source_partitions


def build(cfg: KunConfig) -> list[dg.AssetsDefinition]:
    out = []
    for k in range(1, cfg.iterations + 1):
        out.append(_release(cfg, k))
        if cfg.evaluation.enabled:
            out.append(evaluation.build(cfg, k))
        out.append(_card(cfg, k))
    return out


def _tallies(k: int) -> dict[str, dg.AssetIn]:
    """Round k's stages as the release reads them: each of the source's partitions tallied (rows,
    quarantine reasons; scored_pairs with its scores, polished_pairs whole), keyed by stage."""
    shards = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=SOURCE)
    columns = {registry.SCORED: ["score", "score_rule"], registry.POLISHED: ALL}
    return {
        stage: dg.AssetIn(key=registry.round_asset(stage, k), partition_mapping=shards, metadata={TALLY: columns.get(stage, [])})
        for stage in registry.CORPUS
    }


def _release(cfg: KunConfig, k: int) -> dg.AssetsDefinition:
    name, chat = in_round(registry.DATASET, k), in_round(CHAT_MODEL, k)

    @dg.asset(
        name=name,
        group_name=registry.group(name),
        partitions_def=source_partitions(cfg),
        backfill_policy=SINGLE_RUN,
        kinds=kinds(cfg, "parquet"),
        ins={**_tallies(k), CHAT_MODEL: dg.AssetIn(key=chat), registry.LABEL_MODEL: dg.AssetIn(), registry.SEED_DATA: dg.AssetIn()},
        check_specs=checks.specs(name),
        output_required=False,
        code_version=code_version(name, cfg),
        description=(
            f"Round {k}'s COIG-CQIA records (instruction, input, output, task_type, domain, ...) with provenance "
            "(source, doc_id, file, row, score, models), as polishment made them, answers repeated across shards "
            f"dropped; gated like every dataset version (Parquet under {name}/source=...), and refused when its inputs "
            "were made under another config (dataset.mixed_versions); records that carry a held-out seed's answer are "
            "quarantined (dataset.heldout_overlap). Records the source's funnel, read from each stage's partitions. "
            "Config: dataset, tags, and the retention bound checks.retention.instruction_dataset."
        ),
    )
    def instruction_dataset(
        context: dg.AssetExecutionContext, kun: KunResource, label_model: dict, chat_model: dict, seed_data: pd.DataFrame, **stages
    ):
        c = kun.config
        by_source = _by_source(stages)
        current = {asset: code_version(asset, c) for asset in _partitioned(k)}
        heldout = training.heldout_seeds(seed_data)  # what no record may carry
        results = {}
        for source in context.partition_keys:
            mine = by_source.get(source, {})
            polished = pd.concat(
                [schemas.empty_frame(registry.POLISHED), *(t.frame for t in mine.get(registry.POLISHED, []))], ignore_index=True
            )
            fun = dataset.funnel(mine, c.score.threshold)
            made = _made_from(context.instance, source, c.shard_keys(), k)
            results[source] = dataset.release(polished, source, c, label_model["name"], chat_model["name"], fun, made, current, heldout)
            for line in results[source].stats["mixed_versions"]:
                context.log.warning(f"{name} {source}: mixed versions: {line}")
            _report(context, kun, name, source, results[source])
        _refuse_mixed(name, results, c.dataset.mixed_versions)
        yield from checks.gate(context, kun, name, results)  # all sources' records hold, or none is released

    return instruction_dataset


def _by_source(stages: dict[str, dict[str, storage.Tally]]) -> dict[str, dict[str, list[storage.Tally]]]:
    """{stage: {partition key: tally}} as {source: {stage: [its shards' tallies]}}."""
    out: dict[str, dict[str, list]] = {}
    for stage, parts in stages.items():
        for key, t in (parts or {}).items():
            out.setdefault(hive(key)["source"], {}).setdefault(stage, []).append(t)
    return out


def _refuse_mixed(name: str, results: dict, mode: str) -> None:
    mixed = [f"{s}: {line}" for s, r in results.items() for line in r.stats["mixed_versions"]]
    if mixed and mode == "block":  # what the card would flag, refused outright
        raise dg.Failure(
            f"{name} not released: its inputs were made under another config or model ("
            + "; ".join(mixed[:5])
            + (f"; and {len(mixed) - 5} more" if len(mixed) > 5 else "")
            + "). Re-materialize the stale partitions (`kun run` does; the UI marks them), "
            "or set dataset.mixed_versions: warn to release it flagged.",
            allow_retries=False,
        )


def _card(cfg: KunConfig, k: int) -> dg.AssetsDefinition:
    """Round k's release folders: the one writer of train.jsonl, README.md and manifest.json, from
    what rounds 1..k's releases and evaluations recorded."""
    name = in_round(registry.CARD, k)
    where = "release/{source}" if k == cfg.iterations else f"release/round{k}/{{source}} (release/{{source}} is the last round's)"
    releases = {in_round(registry.DATASET, j): dg.AssetIn(metadata={TALLY: ALL if j == k else []}) for j in range(1, k + 1)}
    reports = {in_round(registry.EVALUATION, j): dg.AssetIn() for j in range(1, k + 1)} if cfg.evaluation.enabled else {}

    @dg.asset(
        name=name,
        group_name=registry.group(name),
        partitions_def=source_partitions(cfg),
        backfill_policy=SINGLE_RUN,
        kinds=kinds(cfg, "json", checked=False),
        ins={**releases, **reports},
        code_version=code_version(name, cfg),
        description=(
            f"Round {k}'s release, as users download it: {where} holds train.jsonl (the records in COIG-CQIA's nine "
            "columns, provenance in `metadata`), README.md (the dataset card: counts, stage funnel, diversity, rounds, "
            "evaluation, versions, config) and manifest.json, written together (all sources or none)."
        ),
    )
    def dataset_card(context: dg.AssetExecutionContext, kun: KunResource, **inputs) -> None:
        c = kun.config
        folders = {}
        for source in context.partition_keys:
            recorded = {j: inputs[in_round(registry.DATASET, j)][source] for j in range(1, k + 1)}
            now = recorded[k]
            if now.stats is None:
                raise dg.Failure(f"{in_round(registry.DATASET, k)} {source}: recorded no stats; re-materialize it", allow_retries=False)
            ran = {j: inputs.get(in_round(registry.EVALUATION, j)) for j in range(1, k + 1)}
            rounds = (
                [card.round_row(j, recorded[j].stats, ran[j], source) for j in recorded] if c.iterations > 1 or any(ran.values()) else []
            )
            md = card.card(source, now.stats, c, rounds)
            folders[card.release_dir(kun.base, source, k, c.iterations)] = (now.frame, md)
            context.add_asset_metadata(_card_metadata(now, md, rounds), partition_key=source)
        card.publish_releases(folders, context.run_id)
        for out, (recs, _) in folders.items():
            context.log.info(f"{name}: {len(recs)} records -> {out}")

    return dataset_card


def _card_metadata(now: storage.Tally, md: str, rounds: list[dict]) -> dict:
    st = now.stats
    return {
        "records": now.rows,
        "funnel": table(dataset.funnel_frame(st["funnel"], now.rows, st.get("dropped")), rows=None),
        **({"rounds": table(pd.DataFrame(rounds), rows=None, width=200)} if rounds else {}),
        "card": dg.MetadataValue.md(md),
    }


def _partitioned(k: int) -> tuple[str, ...]:
    """The source x shard assets round k's release is made from."""
    return tuple(registry.round_asset(a, k) for a in registry.PARTITIONED)


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


def _report(context: dg.AssetExecutionContext, kun: KunResource, name: str, source: str, result) -> None:
    recs, st = result.rows, result.stats
    div = st["diversity"]
    context.add_asset_metadata(
        {
            "dagster/row_count": len(recs),
            "dagster/column_schema": schema_of(storage.columns(recs)),
            "parquet": dg.MetadataValue.path(str(storage.partition_dir(kun.base, name, {"source": source}))),
            "funnel": table(dataset.funnel_frame(st["funnel"], len(recs), st["dropped"]), rows=None),
            "quarantined": len(result.dropped),
            "mixed_versions": len(st["mixed_versions"]),
            "distinct_instruction_ratio": dg.MetadataValue.float(div["distinct_ratio"]) if div["texts"] else dg.MetadataValue.text("-"),
            "instruction_clusters": div["near_duplicate_clusters"],
            **({"largest_instruction_clusters": table(pd.DataFrame(div["largest"]), rows=None)} if div["largest"] else {}),
            **({"preview": table(recs[["instruction", "output", "doc_id", "score"]])} if len(recs) else {}),
        },
        partition_key=source,
    )
