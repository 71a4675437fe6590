"""source_files: the source corpora's files as an observable source asset, partitioned like the
corpus (source x shard). A partition's data version hashes (path, size, ETag or mtime) of the
files that fall in that shard, so a new, changed or removed file makes exactly its shard's
raw_corpus partition stale ("has a new dependency data version"). The `observe_sources` sensor
records versions every deploy.observe_interval seconds, and only those that changed; `kun run`
records them before it ingests. A tick lists and reads new files' ids (sources with id_field)
for TICK_BUDGET_S at most: a source with more to read is observed on a later tick, which goes on
where this one stopped (corpus._IdCache), so no tick overruns Dagster's limit.
"""

from __future__ import annotations

import time

import dagster as dg

from assets.partitions import corpus_partitions
from kun_dagster.config import KunConfig
from kun_dagster.corpus import CorpusError, shard_versions
from kun_dagster.dagster_private import DATA_VERSION_TAG  # the tag Dagster reads a data version from
from kun_dagster.registry import SOURCE_FILES
from kun_dagster.store import Store, is_s3
from resources import KunResource

KEY = dg.AssetKey(SOURCE_FILES)


# Of the sensor's 60 s (Dagster's gRPC limit on a sensor's evaluation), how long a tick may spend
# listing sources and reading new files' ids; a source whose reading is left over is observed on a
# later tick (a listing under way is finished: at 100k objects on S3, ~28 s; bench/README.md).
TICK_BUDGET_S = 40.0


def observe(
    cfg: KunConfig, store: Store, sources: list[str] | None = None, errors: list[str] | None = None, budget_s: float | None = None
) -> dict[str, str]:
    """{corpus partition key: data version} of every shard of the given sources (default: all).
    A source that cannot be listed is left out and said in `errors` (or raised when errors is None),
    as is one whose ids are still being read when `budget_s` (the whole call's) runs out, and one
    not reached by then; with a budget the sources are taken from a start that moves each minute,
    so a large one does not keep the others waiting for ever."""
    out = {}
    until = time.monotonic() + budget_s if budget_s is not None else None
    todo = [s for s in cfg.sources if sources is None or s.name in sources]
    if until is not None and todo:
        turn = int(time.time() // 60) % len(todo)
        todo = todo[turn:] + todo[:turn]
    for source in todo:
        uri = cfg.resolve(source.uri)
        if until is not None and time.monotonic() > until and errors is not None:
            errors.append(f"source {source.name}: not listed in this tick ({budget_s:.0f} s spent); the next one will")
            continue
        try:
            found = shard_versions(source, uri, cfg.shards, store.options(uri), cfg.ingest, cfg.manifest(source), until)
        except CorpusError as e:
            if errors is None:
                raise
            errors.append(str(e))
            continue
        # Dagster's multi-partition key: dimension values joined in dimension-name order (source|shard)
        out.update({f"{source.name}|{shard}": version for shard, version in found.items()})
    return out


def last_observed(instance: dg.DagsterInstance) -> dict[str, str]:
    """The data version last recorded for each partition of source_files (one query)."""
    tags = instance.event_log_storage.get_latest_tags_by_partition(KEY, dg.DagsterEventType.ASSET_OBSERVATION, [DATA_VERSION_TAG])
    return {k: t[DATA_VERSION_TAG] for k, t in tags.items() if DATA_VERSION_TAG in t}


def changes(instance: dg.DagsterInstance, now: dict[str, str]) -> dict[str, str]:
    """The partitions of `now` whose version differs from the one last recorded (or was never recorded)."""
    before = last_observed(instance)
    return {k: v for k, v in now.items() if before.get(k) != v}


def _events(changed: dict[str, str]) -> list[dg.AssetObservation]:
    return [dg.AssetObservation(asset_key=KEY, partition=k, tags={DATA_VERSION_TAG: v}) for k, v in sorted(changed.items())]


def record_observations(instance: dg.DagsterInstance, cfg: KunConfig, store: Store, sources: list[str] | None = None) -> dict[str, str]:
    """Observe the sources and record each partition whose version changed: what `kun run` does
    before it ingests, so its runs and the daemon agree. A source that cannot be listed is left to
    raw_corpus, which says why."""
    changed = changes(instance, observe(cfg, store, sources, errors=[]))
    for event in _events(changed):
        instance.report_runless_asset_event(event)
    return changed


def source_files(cfg: KunConfig) -> dg.AssetsDefinition:
    spec = dg.AssetSpec(
        SOURCE_FILES,
        group_name="sources",  # not "corpus": that group's "Materialize all" would include an observation
        partitions_def=corpus_partitions(cfg),
        kinds={"s3"} if any(is_s3(s.uri) for s in cfg.sources) else {"file"},
        description="The files of each source corpus (kun.yaml: sources), by shard. A partition's data version "
        "hashes the path, size and ETag or modification time of its files: a new, changed or removed file "
        "makes that shard's raw_corpus stale. Observed by the observe_sources sensor every "
        "deploy.observe_interval seconds.",
    )

    @dg.multi_observable_source_asset(specs=[spec], partitions_def=spec.partitions_def)
    def _observe(kun: KunResource) -> dg.DataVersionsByPartition:
        return dg.DataVersionsByPartition({k: dg.DataVersion(v) for k, v in observe(kun.config, kun.store).items()})

    return _observe


def observe_sources(cfg: KunConfig) -> dg.SensorDefinition:
    @dg.sensor(
        name="observe_sources",
        minimum_interval_seconds=cfg.deploy.observe_interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Lists every source's files and records the data version of each shard that changed.",
    )
    def _sensor(context: dg.SensorEvaluationContext, kun: KunResource):
        errors: list[str] = []
        now = observe(kun.config, kun.store, errors=errors, budget_s=TICK_BUDGET_S)
        for e in errors:
            context.log.warning(f"observe_sources: {e}")
        changed = changes(context.instance, now)
        if not changed:
            return dg.SkipReason(
                f"no source file changed in {len(now)} partition(s)" + (f"; {len(errors)} source(s) unreadable" if errors else "")
            )
        context.log.info(f"observe_sources: {len(changed)} partition(s) changed: {', '.join(sorted(changed)[:20])}")
        return dg.SensorResult(asset_events=_events(changed))

    return _sensor
