"""The whole graph, through `kun run`, on a wild corpus (tests/wild.py) for shard counts 1, 3 and 6:
every file in one shard, a few per shard, and shards left empty (2, 4 and 5 were dropped for CI
time, ~17 s each; tests/test_ui_scale.py and bench_scale.py run 1,000 shards). Every run succeeds, every planted bad row is quarantined with its reason, every valid row reaches
filtered_corpus, every source has a release (empty where everything was filtered), and every
partition of every dataset version has one schema, the empty ones included."""

import json

import dagster as dg
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from kun_dagster import cli, schemas, storage
from kun_dagster.config import load_config
from kun_dagster.store import upath

from . import wild
from .conftest import CORPUS, assert_fresh, given_models, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> wild.Wild:
    return wild.build(tmp_path_factory.mktemp("wild"))


def _read(base, asset):
    return pads.dataset(str(base / asset), partitioning="hive").to_table().to_pandas()


@pytest.mark.parametrize("shards", [1, 3, 6])
def test_kun_run_on_a_wild_corpus(shards, corpus, models_run, tmp_path, monkeypatch, capsys):
    limits = {"ingest.max_record_bytes": 256 * 1024, "filter.max_doc_chars": 5000}  # the hostile rows' bounds (tests/wild.py)
    cfg_file = write_config(tmp_path, sources=corpus.sources, shards=shards, **given_models(models_run), **limits)
    monkeypatch.setenv("KUN_CONFIG", str(cfg_file))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    rc = cli.main(["run", "--config", str(cfg_file), "--progress", "off"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Funnel (rows per stage)" in out and "Traceback" not in out + err
    cfg = load_config(cfg_file)
    base = upath(cfg.base_uri)

    quarantined = set()
    for stage in ("raw_corpus", "filtered_corpus"):
        q = _read(base, f"quarantine/{stage}")
        quarantined |= {(stage, r.source, r.file, int(r.row), r.reason) for r in q.itertuples()}
    planted = set(corpus.planted)
    assert planted <= quarantined, sorted(planted - quarantined)
    assert {q for q in quarantined if q[0] == "raw_corpus"} == {p for p in planted if p[0] == "raw_corpus"}  # no false positive

    filtered = _read(base, "filtered_corpus")
    assert set(corpus.valid) <= set(zip(filtered["source"], filtered["doc_id"]))
    assert filtered.groupby("source")["doc_id"].apply(lambda s: s.is_unique).all()

    for name in [s["name"] for s in corpus.sources]:
        rel = base / "release" / name
        lines = (rel / "train.jsonl").read_text(encoding="utf-8").splitlines()
        assert (rel / "README.md").is_file()
        assert [json.loads(json.loads(x)["metadata"])["source"] for x in lines] == [name] * len(lines)
        if name in corpus.all_filtered:
            assert lines == [] and "0 instruction/answer records" in (rel / "README.md").read_text(encoding="utf-8")

    # every (source, shard) of every stage is published, empty or not, each file with its version's schema
    for asset in CORPUS:
        want = storage.file_schema(schemas.arrow_schema(asset), base / asset / "source=x" / "shard=0")
        for name in [s["name"] for s in corpus.sources]:
            for shard in range(shards):
                part = storage.partition_dir(base, asset, {"source": name, "shard": str(shard)}) / storage.PART_NAME
                got = pq.read_schema(str(part))
                assert got.names[: len(want)] == want.names and all(got.field(f.name).type == f.type for f in want), (asset, name, shard)
        _read(base, asset)  # one dataset across every partition
    _read(base, "instruction_dataset")

    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        key = dg.AssetCheckKey(dg.AssetKey("instruction_dataset"), "retention")
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
        ev = latest.evaluation
        assert not ev.passed and "toolong" in ev.description and "too_many_tokens" in ev.description
        assert_fresh(cfg_file, instance)  # empty shards, an all-filtered source: every partition as fresh as its input
