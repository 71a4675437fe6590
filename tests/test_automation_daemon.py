"""Automation under `dagster dev`'s daemon, as users run it: the corpus group materialized (as
`kun run` leaves it), then the daemon's ticks. Nothing changed: its ticks launch nothing. A new
file in one shard: the observe_sources sensor records that shard's new version, and the
automation sensor (deploy.automation: corpus) materializes that shard's partitions and the
source's clusters, one source per run, and nothing else; then it is quiet again. With automation
off, the same file is observed and nothing runs."""

import json
import time
from datetime import datetime

import dagster as dg
import pytest

from automation.sources import last_observed, observe
from kun_dagster.config import load_config
from kun_dagster.definitions import build_definitions
from kun_dagster.store import Store

from .conftest import CORPUS, MODELS, dagster_dev, free_port, graphql, wait_for
from .postgres import instance_yaml
from .test_automation import add_file, configure, corpora, materialize_as_kun_run

pytestmark = pytest.mark.slow
GROUP = CORPUS[: CORPUS.index("deduped_corpus") + 1]  # what deploy.automation: corpus keeps fresh
TICKS = """{ sensorOrError(sensorSelector: {repositoryLocationName: "kun", repositoryName: "__repository__", sensorName: "%s"})
  { ... on Sensor { sensorState { ticks(limit: 100) { status timestamp } } } } }"""

STALE = """{ assetNodeOrError(assetKey: {path: ["raw_corpus"]}) { ... on AssetNode { staleStatus(partition: "%s")
  staleCauses(partition: "%s") { category reason } } } }"""


def ticks(url: str, sensor: str, since: float) -> int:
    got = graphql(url, TICKS % sensor)["sensorOrError"]
    return sum(t["timestamp"] > since for t in (got.get("sensorState") or {}).get("ticks") or [])


def materialized_since(instance: dg.DagsterInstance, since: float) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for asset in (*MODELS, *CORPUS, "instruction_dataset"):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), after_timestamp=since), limit=1000
        ).records
        if records:
            out[asset] = {r.partition_key for r in records}
    return out


# automation on, on PostgreSQL (production's instance storage); off, on SQLite
@pytest.mark.parametrize("mode,storage_url", [("corpus", "postgres"), ("off", "sqlite")], indirect=["storage_url"])
def test_the_daemon_keeps_the_corpus_fresh_and_only_where_files_changed(mode, storage_url, models_run, tmp_path):
    (tmp_path / "sources.json").write_text(json.dumps(corpora(tmp_path)))
    cfg_file = configure(tmp_path, models_run, "cfg", **{"deploy.automation": mode, "deploy.observe_interval": 3})
    cfg = load_config(cfg_file)
    home = tmp_path / "dagster_home"
    instance_yaml(home, storage_url)
    defs = build_definitions(cfg_file)
    with dg.DagsterInstance.from_config(str(home)) as instance:  # as `kun run` leaves it: observed, then materialized
        materialize_as_kun_run(defs, instance, cfg, GROUP)

    port, log = free_port(), tmp_path / "dagster-dev.log"
    with (
        dagster_dev({"DAGSTER_HOME": str(home), "KUN_CONFIG": str(cfg_file)}, log, port) as url,
        dg.DagsterInstance.from_config(str(home)) as instance,
    ):
        start, before = time.time(), instance.get_runs_count()  # the runs above
        if mode == "corpus":  # nothing changed: two ticks, no run
            wait_for("two automation ticks", lambda: ticks(url, "kun_automation", start) >= 2, 180, log)
            assert instance.get_runs_count() == before and not instance.get_backfills()

        dropped = time.time()
        key = add_file(tmp_path)
        other = "wudao|0" if key == "wudao|1" else "wudao|1"
        new = observe(cfg, Store(cfg.storage))[key]
        wait_for("the new file's observation", lambda: last_observed(instance).get(key) == new, 120, log)

        if mode == "off":
            # What the asset's partition view asks the webserver (Dagster UI's AssetPartitionStaleQuery)
            for key_ in (key, other):
                node = graphql(url, STALE % (key_, key_))["assetNodeOrError"]
                assert node["staleStatus"] == ("STALE" if key_ == key else "FRESH"), node
            causes = graphql(url, STALE % (key, key))["assetNodeOrError"]["staleCauses"]
            assert [(c["category"], c["reason"]) for c in causes] == [("DATA", "has a new data version")], (
                causes
            )  # the root cause: source_files
            time.sleep(10)  # ticks of the observe sensor come and go; no automation sensor exists to act on them
            assert instance.get_runs_count() == before and not instance.get_backfills() and materialized_since(instance, dropped) == {}
            return

        def settled() -> bool:  # the shard's partitions and the source's clusters materialized, every backfill done
            got = materialized_since(instance, dropped)
            backfills = instance.get_backfills()
            return got.get("deduped_corpus") and got.get("duplicate_clusters") and all(b.status.value != "REQUESTED" for b in backfills)

        wait_for("the daemon's runs for the new file", settled, 600, log, every=5)
        quiet = time.time()
        wait_for("two more automation ticks", lambda: ticks(url, "kun_automation", quiet) >= 2, 180, log)
        runs = instance.get_runs(filters=dg.RunsFilter(created_after=datetime.fromtimestamp(dropped)))
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [(r.run_id[:8], r.status) for r in runs]
        assert materialized_since(instance, dropped) == {
            **{a: {key} for a in ("raw_corpus", "filtered_corpus", "minhash_signatures", "deduped_corpus")},
            "duplicate_clusters": {key, other},
        }
        for r in runs:  # each run covers one source's partitions: a single-run backfill's key range, or one key
            span = {
                r.tags.get(t) for t in ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end", "dagster/partition")
            } - {None}
            assert span and all(k.startswith("wudao|") for k in span), r.tags
        assert len(runs) <= 3, [sorted(r.asset_selection or []) for r in runs]  # ingest+filter+sign, clusters, dedupe
