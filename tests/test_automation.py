"""Staleness and Declarative Automation, in-process: the whole graph materialized on copies of two
demo sources, then a kun.yaml change, a prompt change or a new source file, and what Dagster (and
the graph-wide view in automation/stale.py) calls stale, and what the automation conditions
request. tests/test_automation_daemon.py runs the same under `dagster dev`'s daemon."""

import contextlib
import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from automation import record_observations
from automation.sources import last_observed, observe, observe_sources
from kun_dagster import prompts
from kun_dagster.config import SourceConfig, load_config
from kun_dagster.corpus import shard_of, shard_versions
from kun_dagster.dagster_private import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from kun_dagster.definitions import build_definitions
from kun_dagster.store import Store
from resources import KunResource

from .conftest import CORPUS, MODELS, REPO, given_models, write_config
from .stale import stale_partitions

SOURCES = ["wudao", "skypile"]
NEW_FILE = "wudao_03.json"  # shard_of("wudao_03.json", 2) == 1: beside wudao_01.json
NEW_DOCS = [
    {
        "id": "wd-new-1",
        "title": "蜂蜜保存",
        "content": "蜂蜜应放在阴凉干燥处密封保存，避免用湿勺子取用，否则容易发酵变质。结晶是正常现象，放入温水中隔水加热即可恢复流动。",
    },
    {
        "id": "wd-new-2",
        "title": "晾衣技巧",
        "content": "深色衣服晾晒时要翻面，避免阳光直射导致褪色；羊毛衫应平铺晾干，挂起来会被拉长变形。雨天室内晾衣可以开除湿机加快干燥。",
    },
]


def corpora(tmp: Path) -> list[dict]:
    """Copies of the demo's wudao and skypile folders (files can be added), as kun.yaml sources."""
    cfg = load_config(REPO / "kun.yaml")
    out = []
    for s in cfg.sources:
        if s.name in SOURCES:
            folder = tmp / "corpora" / s.name
            shutil.copytree(REPO / "demo" / "corpora" / s.name, folder)
            out.append({**s.model_dump(exclude_defaults=True), "uri": str(folder / Path(s.uri).name)})
    return out


def add_file(tmp: Path) -> str:
    """A new wudao file with two new documents; returns the partition it falls in."""
    (tmp / "corpora" / "wudao" / NEW_FILE).write_text(json.dumps(NEW_DOCS, ensure_ascii=False), encoding="utf-8")
    return f"wudao|{shard_of(NEW_FILE, 2)}"


def configure(tmp: Path, models_run, name: str, **overrides) -> Path:
    """A kun.yaml in its own folder (the world's, or a changed copy) over the world's corpora and storage."""
    (tmp / name).mkdir(exist_ok=True)
    sources = json.loads((tmp / "sources.json").read_text())
    return write_config(
        tmp / name, sources=sources, shards=2, **given_models(models_run), **{"storage.base_uri": str(tmp / "data")}, **overrides
    )


def materialize(defs, instance, selection, keys=None) -> None:
    tags = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]} if keys else None
    assert dg.materialize(list(defs.assets), selection=selection, resources=defs.resources, instance=instance, tags=tags).success


def materialize_as_kun_run(defs, instance, cfg, assets: list[str]) -> None:
    """The models, the sources observed, then `assets` (of CORPUS, in graph order) over every
    partition as `kun run` runs them: one run before the clusters, the clusters one source per run,
    one run after."""
    materialize(defs, instance, MODELS)
    record_observations(instance, cfg, Store(cfg.storage))
    keys = [str(k) for k in defs.resolve_asset_graph().get(dg.AssetKey("raw_corpus")).partitions_def.get_partition_keys()]
    signed = assets.index("duplicate_clusters")
    materialize(defs, instance, assets[:signed], keys)
    for source in SOURCES:
        materialize(defs, instance, ["duplicate_clusters"], [k for k in keys if k.startswith(source)])
    materialize(defs, instance, assets[signed + 1 :], keys)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(request, models_run, tmp_path_factory):
    """The whole graph of two sources x two shards materialized once, as `kun run` does it, on an
    instance in memory (SQLite) and on PostgreSQL: the conditions read the same from both."""
    tmp = tmp_path_factory.mktemp("automation")
    (tmp / "sources.json").write_text(json.dumps(corpora(tmp)))
    cfg_file = configure(tmp, models_run, "world")
    defs = build_definitions(cfg_file)
    if request.param == "sqlite":
        instance = contextlib.nullcontext(dg.DagsterInstance.ephemeral())
    else:
        url = request.getfixturevalue("postgres").database()
        instance = dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}})
    with instance as instance:
        cfg = load_config(cfg_file)
        materialize_as_kun_run(defs, instance, cfg, CORPUS)
        assert len(last_observed(instance)) == 4  # the first observation: every partition
        materialize(defs, instance, ["instruction_dataset", "dataset_card"], SOURCES)
        yield {"tmp": tmp, "defs": defs, "instance": instance, "cfg": cfg, "models_run": models_run}


def stale_keys(view: dict) -> dict[str, set]:
    return {asset: set(parts) for asset, parts in view.items()}


def evaluate(defs, instance, cursor=None):
    return dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)


def requested(result) -> dict[str, set[str]]:
    graph_keys = {r.key for r in result.results if r.true_subset.size}
    return {k.to_user_string(): set(map(str, result.get_requested_partitions(k))) for k in graph_keys}


# -- the source files' data versions ------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    names=st.sets(st.from_regex(r"[a-z]{1,8}(/[a-z]{1,6})?\.jsonl", fullmatch=True), min_size=1, max_size=8),
    new=st.from_regex(r"[a-z]{1,8}\.jsonl", fullmatch=True),
    shards=st.integers(1, 5),
)
def test_a_new_file_changes_only_its_shards_version(tmp_path_factory, names, new, shards):
    root = tmp_path_factory.mktemp("files")
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text('{"text": "x"}\n')
    source = SourceConfig(name="s", uri=str(root / "**" / "*.jsonl"), format="jsonl")
    before = shard_versions(source, source.uri, shards)
    assert before == shard_versions(source, source.uri, shards) and set(before) == set(range(shards))  # listing only: stable
    if new in names:
        return
    (root / new).write_text('{"text": "y"}\n')
    after = shard_versions(source, source.uri, shards)
    assert {s for s in after if after[s] != before[s]} == {shard_of(new, shards)}
    (root / new).write_text('{"text": "a longer text"}\n')  # the same file rewritten: a new size and mtime
    assert {s for s, v in shard_versions(source, source.uri, shards).items() if v != after[s]} == {shard_of(new, shards)}


def test_a_tick_out_of_time_leaves_the_sources_it_did_not_reach_to_the_next(tmp_path, monkeypatch):
    """The sensor's tick has TICK_BUDGET_S in all: past it, a source is not listed and is said; the
    sources are taken from a start that moves each minute, so each is first in turn."""
    import automation.sources as sources

    cfg = load_config(write_config(tmp_path))
    store = Store(cfg.storage)
    errors: list[str] = []
    assert observe(cfg, store, errors=errors, budget_s=0) == {}
    assert sorted(e.split(":")[0] for e in errors) == sorted(f"source {s.name}" for s in cfg.sources)
    assert all("not listed in this tick" in e for e in errors)
    assert len(observe(cfg, store, errors=[], budget_s=60)) == len(cfg.sources) * cfg.shards
    firsts = []
    for minute in range(len(cfg.sources)):
        monkeypatch.setattr(sources.time, "time", lambda m=minute: 60.0 * m)
        errors = []
        observe(cfg, store, errors=errors, budget_s=0)
        firsts.append(errors[0].split(":")[0])
    assert sorted(firsts) == sorted(f"source {s.name}" for s in cfg.sources)


def test_the_sensor_records_only_the_partitions_whose_files_changed(world, tmp_path):
    cfg, instance = world["cfg"], dg.DagsterInstance.ephemeral()
    kun = KunResource(config_path=str(cfg.origin))
    sensor = observe_sources(cfg)
    first = sensor(dg.build_sensor_context(instance=instance, resources={"kun": kun}))
    assert {e.partition for e in first.asset_events} == {"wudao|0", "wudao|1", "skypile|0", "skypile|1"}
    for e in first.asset_events:
        instance.report_runless_asset_event(e)
    assert last_observed(instance) == observe(cfg, Store(cfg.storage))
    again = sensor(dg.build_sensor_context(instance=instance, resources={"kun": kun}))
    assert isinstance(again, dg.SkipReason) and "no source file changed" in again.skip_message
    assert sensor.minimum_interval_seconds == cfg.deploy.observe_interval


# -- staleness ---------------------------------------------------------------------------------------


def test_after_a_run_nothing_is_stale_and_two_ticks_request_nothing(world):
    assert stale_partitions(world["defs"], world["instance"]) == {}
    first = evaluate(world["defs"], world["instance"])
    second = evaluate(world["defs"], world["instance"], first.cursor)
    assert first.total_requested == 0 and second.total_requested == 0


def test_a_changed_threshold_stales_the_stage_applying_it_and_the_release_not_the_scorer(world):
    defs = build_definitions(configure(world["tmp"], world["models_run"], "threshold", **{"score.threshold": 0.7}))
    view = stale_partitions(defs, world["instance"])
    assert stale_keys(view) == {
        "polished_pairs": {"wudao|0", "wudao|1", "skypile|0", "skypile|1"},
        "instruction_dataset": set(SOURCES),
        "dataset_card": set(SOURCES),
    }
    assert view["polished_pairs"]["wudao|0"] == ["code version changed"]
    assert "scored_pairs" not in view  # nothing re-scores
    # automation corpus: a polish setting is the LLM stages', which the daemon leaves to the user
    assert evaluate(defs, world["instance"]).total_requested == 0


def test_a_changed_label_prompt_stales_labeling_and_everything_downstream(world, monkeypatch):
    real = prompts.templates()
    monkeypatch.setattr(prompts, "templates", lambda: {**real, "labelPrompt": real["labelPrompt"] + "请用中文回答。"})
    view = stale_partitions(build_definitions(world["cfg"].origin), world["instance"])
    every = {"wudao|0", "wudao|1", "skypile|0", "skypile|1"}
    assert stale_keys(view) == {  # the label model is a given checkpoint here: used as it is, whatever the prompt
        "labeled_pairs": every,
        "scored_pairs": every,
        "polished_pairs": every,
        "instruction_dataset": set(SOURCES),
        "dataset_card": set(SOURCES),
    }
    assert view["labeled_pairs"]["wudao|1"][0] == "code version changed"
    assert view["scored_pairs"]["wudao|1"] == ["upstream stale: labeled_pairs wudao|1"]


def test_automation_off_requests_nothing_and_has_no_sensor(world):
    defs = build_definitions(configure(world["tmp"], world["models_run"], "off", **{"deploy.automation": "off"}))
    graph = defs.resolve_asset_graph()
    assert all(graph.get(k).automation_condition is None for k in graph.get_all_asset_keys())
    assert "kun_automation" not in {s.name for s in defs.sensors} and "observe_sources" in {s.name for s in defs.sensors}


def test_a_new_file_stales_only_its_shard_and_automation_requests_only_that(world):
    """Runs last in this module: it adds a file to the world's corpus."""
    defs, instance, cfg = world["defs"], world["instance"], world["cfg"]
    tick = evaluate(defs, instance)
    key = add_file(world["tmp"])
    other = "wudao|0" if key == "wudao|1" else "wudao|1"
    assert record_observations(instance, cfg, Store(cfg.storage)) == {key: observe(cfg, Store(cfg.storage))[key]}

    view = stale_partitions(defs, instance)
    assert view["raw_corpus"] == {key: ["upstream data changed: source_files " + key]}
    shard_only = {
        "raw_corpus",
        "filtered_corpus",
        "minhash_signatures",
        "deduped_corpus",
        "labeled_pairs",
        "scored_pairs",
        "polished_pairs",
    }
    assert stale_keys(view) == {
        **{a: {key} for a in shard_only},
        "duplicate_clusters": {key, other},  # the source-wide index: re-clustered with the new documents
        "instruction_dataset": {"wudao"},
        "dataset_card": {"wudao"},
    }

    # Tick by tick, as the daemon goes (each tick's requests are one backfill; deploy.automation corpus
    # leaves the LLM stages to the user): the shard's ingest, filter and signatures first ...
    tick = evaluate(defs, instance, tick.cursor)
    assert requested(tick) == {a: {key} for a in ("raw_corpus", "filtered_corpus", "minhash_signatures")}
    materialize(defs, instance, ["raw_corpus", "filtered_corpus", "minhash_signatures"], [key])
    # ... then the source's clusters, and the shard's deduped_corpus after them
    tick = evaluate(defs, instance, tick.cursor)
    assert requested(tick) == {"duplicate_clusters": {key, other}, "deduped_corpus": {key}}
    materialize(defs, instance, ["duplicate_clusters"], ["wudao|0", "wudao|1"])
    materialize(defs, instance, ["deduped_corpus"], [key])
    for _ in range(2):  # the clusters of the other shard did not change: its deduped_corpus stays as it is
        tick = evaluate(defs, instance, tick.cursor)
        assert tick.total_requested == 0
    view = stale_partitions(defs, instance)
    assert stale_keys(view) == {
        "labeled_pairs": {key},
        "scored_pairs": {key},
        "polished_pairs": {key},
        "instruction_dataset": {"wudao"},
        "dataset_card": {"wudao"},
    }
    assert view["labeled_pairs"][key] == [f"upstream data changed: deduped_corpus {key}"]


def test_the_card_records_the_versions_and_flags_a_release_of_mixed_versions(world):
    """Runs after the new-file test: one partition re-polished under a new config, then released."""
    base, instance = Path(world["cfg"].base_uri), world["instance"]
    card = (base / "release" / "wudao" / "README.md").read_text()
    assert "## Versions" in card and "Every stage's partitions were made under one code version" in card
    before = {p.name: p.read_bytes() for p in (base / "release" / "wudao").iterdir()}
    budget = {"polish.prompt_token_budget": 1000}  # shapes polish, not what the release's schema verifies
    defs = build_definitions(configure(world["tmp"], world["models_run"], "budget", **budget))
    materialize(defs, instance, ["polished_pairs"], ["wudao|0"])
    # the UI's single-asset materialization of the release over a stale shard: blocked, nothing written
    failed = release(defs, instance)
    assert not failed.success and "not released" in str(failed.get_step_failure_events()[0].event_specific_data.error.message)
    assert {p.name: p.read_bytes() for p in (base / "release" / "wudao").iterdir()} == before
    # released flagged when the user says so, the records as polishment made them
    defs = build_definitions(configure(world["tmp"], world["models_run"], "budget", **budget, **{"dataset.mixed_versions": "warn"}))
    materialize(defs, instance, ["instruction_dataset", "dataset_card"], ["wudao"])
    card = (base / "release" / "wudao" / "README.md").read_text()
    assert "**Mixed registry.**" in card and "polished_pairs: 2 code versions" in card
    records = [json.loads(line) for line in (base / "release" / "wudao" / "train.jsonl").read_text().splitlines()]
    polished = pd.read_parquet(base / "polished_pairs" / "source=wudao")
    assert sorted(json.loads(r["metadata"])["doc_id"] for r in records) == sorted(polished["doc_id"])  # none re-filtered
    check = instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(dg.AssetKey("instruction_dataset"), "one_version"))
    assert check is not None and not check.event.asset_check_evaluation.passed
    # the threshold is polish's alone: where a shard was polished under a lower one, the release's schema
    # (the threshold now in force) refuses it, flagged or not, and nothing is released
    polished_1 = pd.read_parquet(base / "polished_pairs" / "source=wudao" / "shard=1")["score"]
    raised = min(float(polished_1.max()) + 1e-6, 1.0)  # wudao|1 holds rows under it
    assert (polished_1 < raised).any()
    threshold = {"score.threshold": raised, "dataset.mixed_versions": "warn"}
    defs = build_definitions(configure(world["tmp"], world["models_run"], "threshold", **budget, **threshold))
    released = {p.name: p.read_bytes() for p in (base / "release" / "wudao").iterdir()}
    materialize(defs, instance, ["polished_pairs"], ["wudao|0"])
    failed = release(defs, instance)
    schema = instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(dg.AssetKey("instruction_dataset"), "schema"))
    assert not failed.success and not schema.event.asset_check_evaluation.passed
    assert f"score: greater_than_or_equal_to({raised})" in json.dumps(schema.event.asset_check_evaluation.metadata["by_check"].value)
    assert {p.name: p.read_bytes() for p in (base / "release" / "wudao").iterdir()} == released


def release(defs, instance):
    """The UI's materialization of wudao's release and card, as one run."""
    return dg.materialize(
        defs.assets,
        selection=["instruction_dataset", "dataset_card"],
        partition_key="wudao",
        instance=instance,
        resources=defs.resources,
        raise_on_error=False,
    )
