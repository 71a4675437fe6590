"""Dedup through Dagster: the clusters asset reads every shard's signatures through its partition
mapping (with dedup.scope: all, every source's), its metadata says what it found, and
deduped_corpus quarantines the copies naming the kept location."""

import json
import re

import dagster as dg
import pyarrow.dataset as pads
import pytest

from automation import record_observations
from kun_dagster import cli, stages
from kun_dagster.config import load_config
from kun_dagster.dagster_private import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from kun_dagster.definitions import build_definitions
from kun_dagster.store import Store, upath

from .conftest import MODELS, given_models, write_config

pytestmark = pytest.mark.slow

DEDUP = ["raw_corpus", "filtered_corpus", "minhash_signatures", "duplicate_clusters", "deduped_corpus"]
PAGE = "长江是中国第一长河，全长约六千三百公里，流经青海、西藏、四川、云南、重庆、湖北、湖南、江西、安徽、江苏和上海。" * 2


def _filler(i: int) -> str:
    """A text like no other: 80 CJK characters from a stride through the block."""
    return "".join(chr(0x4E00 + (i * 7919 + j * 104729) % 20000) for j in range(80)) + "。"


def _source(tmp, name: str, texts: list[str]) -> dict:
    folder = tmp / name
    folder.mkdir()
    for i, chunk in enumerate((texts[:3], texts[3:])):  # rows 1-3 of {name}_0.jsonl, then of {name}_1.jsonl
        (folder / f"{name}_{i}.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chunk))
    return {"name": name, "uri": str(folder / "*.jsonl"), "format": "jsonl"}


def _config(tmp_path, models_run, scope: str, mode: str = "auto", **more):
    web = [_filler(i) for i in range(6)]
    news = [_filler(10 + i) for i in range(6)]
    web[4] = PAGE  # web_1.jsonl row 2
    news[1] = "转载：" + PAGE + "（完）"  # news_0.jsonl row 2: a near-duplicate
    news[5] = "  " + PAGE.replace("，", " ，") + "\n"  # news_1.jsonl row 3: the same text up to whitespace
    sources = [_source(tmp_path, "web", web), _source(tmp_path, "news", news)]
    overrides = {**given_models(models_run), "sources": sources, "shards": 2, "dedup.scope": scope, "dedup.mode": mode, **more}
    overrides["filter.perplexity_max"] = None
    return write_config(tmp_path, **overrides)


def _quarantine(cfg_file):
    base = upath(load_config(cfg_file).base_uri)
    q = pads.dataset(str(base / "quarantine" / "deduped_corpus"), partitioning="hive").to_table().to_pandas()
    return q.sort_values(["source", "file", "row"]).reset_index(drop=True)


def _run(tmp_path, models_run, scope: str, mode: str = "auto"):
    cfg_file = _config(tmp_path, models_run, scope, mode)
    defs = build_definitions(cfg_file)
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize(
        list(defs.assets), selection=MODELS, resources=defs.resources, instance=instance
    ).success  # the given models' refs
    if mode != "band_steps":  # one run, every partition
        assert _materialize(defs, instance, DEDUP, "raw_corpus").success
    else:  # the bands' partitions are another range: signatures, then every band in one run, then the clusters
        assert _materialize(defs, instance, DEDUP[:3], "raw_corpus").success
        assert _materialize(defs, instance, ["lsh_band_pairs"], "lsh_band_pairs").success
        assert _materialize(defs, instance, DEDUP[3:], "raw_corpus").success
    return instance, _quarantine(cfg_file)


def _materialize(defs, instance, selection: list[str], keys_of: str, keys: list | None = None):
    """`selection` over a range of `keys_of`'s partitions in one run (all of them, or `keys`)."""
    keys = keys or defs.resolve_asset_graph().get(dg.AssetKey(keys_of)).partitions_def.get_partition_keys()
    tags = {ASSET_PARTITION_RANGE_START_TAG: str(keys[0]), ASSET_PARTITION_RANGE_END_TAG: str(keys[-1])}
    return dg.materialize(
        list(defs.assets), selection=selection, resources=defs.resources, instance=instance, tags=tags, raise_on_error=False
    )


def _metadata(instance, key: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("duplicate_clusters"), asset_partitions=[key]), limit=1
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


@pytest.mark.parametrize("mode", ["auto", "banded", "band_steps"])
def test_scope_all_drops_copies_across_sources_and_the_first_source_listed_keeps(tmp_path, models_run, mode):
    """The same clusters in one step (auto, at this size) and band by band (dedup.mode: banded)."""
    instance, q = _run(tmp_path, models_run, "all", mode)
    assert q[["source", "file", "row", "reason"]].values.tolist() == [
        ["news", "news_0.jsonl", 2, "near_duplicate"],
        ["news", "news_1.jsonl", 3, "duplicate_text"],
    ]
    assert q["detail"].str.contains(r"web_1\.jsonl:2 \(web shard \d, web_1\.jsonl row 2\)").all()
    for key in ("web|0", "web|1", "news|0", "news|1"):  # each partition shows the whole clustering's figures
        md = _metadata(instance, key)
        assert (md["documents"], md["clusters"], md["largest_cluster"]) == (12, 1, 3)
        assert md["mode"] == ("one_step" if mode == "auto" else mode)


def test_scope_source_keeps_each_sources_first_copy(tmp_path, models_run):
    instance, q = _run(tmp_path, models_run, "source")
    # web's page stays; within news, the repost (news_0 row 2) is first, and the copy is near it
    assert q[["source", "file", "row", "reason"]].values.tolist() == [["news", "news_1.jsonl", 3, "near_duplicate"]]
    assert "near-duplicate of news_0.jsonl:2 (news shard" in q.at[0, "detail"]
    assert (_metadata(instance, "web|0")["clusters"], _metadata(instance, "news|0")["clusters"]) == (0, 1)


@pytest.mark.parametrize("mode", ["auto", "band_steps"])
def test_kun_run_of_one_source_under_scope_all_signs_the_other_sources_first(tmp_path, models_run, monkeypatch, capsys, mode):
    cfg_file = _config(tmp_path, models_run, "all", mode, **({"dedup.num_perm": 32} if mode == "band_steps" else {}))  # 9 bands
    monkeypatch.setenv("KUN_CONFIG", str(cfg_file))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert cli.main(["run", "--config", str(cfg_file), "--source", "news", "--progress", "off"]) == cli.OK, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "signatures of web: done" in out
    if mode == "band_steps":  # the one group's bands, over both sources
        assert "lsh_band_pairs (every source), a run each: done" in out
        bands = upath(load_config(cfg_file).base_uri) / "lsh_band_pairs" / "group=all"
        assert sorted(p.name for p in bands.iterdir()) == [f"band={k}" for k in range(9)]
    q = _quarantine(cfg_file)
    assert q[["source", "reason"]].values.tolist() == [["news", "near_duplicate"], ["news", "duplicate_text"]]
    base = upath(load_config(cfg_file).base_uri)
    assert (base / "minhash_signatures" / "source=web").exists() and not (base / "deduped_corpus" / "source=web").exists()


def _web_keys(defs, asset: str) -> list:
    return [k for k in defs.resolve_asset_graph().get(dg.AssetKey(asset)).partitions_def.get_partition_keys() if str(k).startswith("web|")]


def test_band_steps_resume_after_a_kill_and_refuse_clusters_of_stale_bands(tmp_path, models_run, monkeypatch, capsys):
    """dedup.mode: band_steps end to end: `kun run` makes each source's bands, a run each, then
    the clusters. After a new file, a run killed at web's sixth band keeps the five made; a
    clusters step given bands of other signatures fails naming what to re-run; the next `kun run`
    makes the other 4 bands alone and finds the new copy (num_perm 32: 9 bands)."""
    cfg_file = _config(tmp_path, models_run, "source", "band_steps", **{"dedup.num_perm": 32})
    monkeypatch.setenv("KUN_CONFIG", str(cfg_file))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    run = lambda: cli.main(["run", "--config", str(cfg_file), "--progress", "off"])  # noqa: E731
    assert run() == cli.OK, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "lsh_band_pairs (web), a run each: done" in out and "lsh_band_pairs (news), a run each: done" in out
    assert _quarantine(cfg_file)[["source", "file", "row", "reason"]].values.tolist() == [["news", "news_1.jsonl", 3, "near_duplicate"]]
    instance = dg.DagsterInstance.get()
    assert _metadata(instance, "news|0")["mode"] == "band_steps"

    (tmp_path / "web" / "web_2.jsonl").write_text(json.dumps({"text": "转载：" + PAGE}, ensure_ascii=False) + "\n")
    made = stages.band_pairs

    def killed(parts, k, ctx, ranked=None):
        if k == 5 and ranked.n == 7:  # web's sixth band, once web has its new document
            raise KeyboardInterrupt  # what a kill leaves: the run dead mid-step
        return made(parts, k, ctx, ranked)

    monkeypatch.setattr(stages, "band_pairs", killed)
    assert run() != cli.OK
    assert "lsh_band_pairs (web) [web|5] failed" in capsys.readouterr().err
    monkeypatch.setattr(stages, "band_pairs", made)

    defs = build_definitions(cfg_file)
    failed = _materialize(defs, instance, ["duplicate_clusters"], "raw_corpus", _web_keys(defs, "raw_corpus"))
    (failure,) = [e.event_specific_data.user_failure_data.description for e in failed.all_events if e.is_step_failure]
    assert re.search(r"lsh_band_pairs bands \[5, 6, 7, 8\] were made from other signatures .* re-materialize lsh_band_pairs", failure)

    assert run() == cli.OK, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "lsh_band_pairs (web) [4 of 9 partitions], a run each: done" in out and "lsh_band_pairs (news): up to date" in out
    assert _quarantine(cfg_file)[["source", "file", "row", "reason"]].values.tolist() == [
        ["news", "news_1.jsonl", 3, "near_duplicate"],
        ["web", "web_2.jsonl", 1, "near_duplicate"],
    ]
    assert run() == cli.OK
    out = capsys.readouterr().out
    assert "done in" not in out.replace("(read every run): done", "")  # everything else up to date

    # the daemon, tick by tick: a new news file's shard; then news' bands, its clusters and the
    # shard's deduped_corpus in one backfill, which runs them in that order (Dagster holds a child of
    # another partitions definition or backfill policy until its parents are made); then nothing
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    (tmp_path / "news" / "news_2.jsonl").write_text(json.dumps({"text": _filler(99)}, ensure_ascii=False) + "\n")
    cfg = load_config(cfg_file)
    (key,) = record_observations(instance, cfg, Store(cfg.storage))
    seen = []
    for _ in range(4):
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        asked = {r.key.to_user_string(): sorted(map(str, tick.get_requested_partitions(r.key))) for r in tick.results if r.true_subset.size}
        seen.append(asked)
        for asset in DEDUP[:3] + ["lsh_band_pairs"] + DEDUP[3:]:  # in graph order, each band its own run as a backfill makes it
            for sub in [[k] for k in asked.get(asset, [])] if asset == "lsh_band_pairs" else [asked[asset]] if asset in asked else []:
                assert _materialize(defs, instance, [asset], asset, sub).success
    news = [
        k for k in map(str, defs.resolve_asset_graph().get(dg.AssetKey("raw_corpus")).partitions_def.get_partition_keys()) if "news" in k
    ]
    head = {a: [key] for a in DEDUP[:3]}
    assert seen == [head, {"lsh_band_pairs": [f"news|{b}" for b in range(9)], "duplicate_clusters": news, "deduped_corpus": [key]}, {}, {}]


def _web_keys(defs, asset: str) -> list:
    return [k for k in defs.resolve_asset_graph().get(dg.AssetKey(asset)).partitions_def.get_partition_keys() if str(k).startswith("web|")]
