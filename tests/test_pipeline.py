"""The whole graph on the tiny models, every partition of the demo corpora, through Dagster."""

import json
import re
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.dataset as pads
import pytest

from kun_dagster import dataset, storage
from kun_dagster.config import KUN_INSTRUCTION_KEYWORDS, load_config
from kun_dagster.dagster_private import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from kun_dagster.store import upath

from .conftest import CORPUS, figures

pytestmark = pytest.mark.slow


def _materialize(run, selection, keys=None, partition_key=None):
    defs = run["defs"]
    tags = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]} if keys else None
    return dg.materialize(
        list(defs.assets), selection=selection, resources=defs.resources, instance=run["instance"], tags=tags, partition_key=partition_key
    )


@pytest.fixture(scope="module")
def graph(models_run):
    defs = models_run["defs"]
    keys = defs.resolve_asset_graph().get(dg.AssetKey("raw_corpus")).partitions_def.get_partition_keys()
    assert _materialize(models_run, CORPUS, keys).success  # one run, all partitions
    assert _materialize(models_run, ["instruction_dataset", "dataset_card"], ["wudao", "wanjuan"]).success  # skypile left out
    cfg = load_config(models_run["cfg_file"])
    return {**models_run, "cfg": cfg, "base": upath(cfg.base_uri), "keys": keys}


def _read(g, asset):
    return pads.dataset(str(g["base"] / asset), partitioning="hive").to_table().to_pandas()


def test_every_final_record_traces_to_a_source_document(graph):
    final = _read(graph, "instruction_dataset")
    raw = _read(graph, "raw_corpus")
    assert len(final) > 0 and set(final["source"]) <= {"wudao", "wanjuan"}
    joined = final.merge(raw, on=["source", "doc_id"], how="left", suffixes=("", "_raw"), indicator=True)
    assert (joined["_merge"] == "both").all()
    assert (joined["file"] == joined["file_raw"]).all() and (joined["row"] == joined["row_raw"]).all()
    assert final["label_model"].eq("kun-label").all() and final["chat_model"].eq("kun-chat").all()
    assert final["output"].str.len().ge(20).all() and final["input"].eq("").all()
    assert {"major", "minor"} == set(final["task_type"].iloc[0])


def test_no_instruction_holds_a_banned_keyword(graph):
    for asset in ("labeled_pairs", "polished_pairs", "instruction_dataset"):
        instructions = _read(graph, asset)["instruction"]
        assert not any(kw in s for s in instructions for kw in KUN_INSTRUCTION_KEYWORDS), asset
    labeled = _read(graph, "labeled_pairs")
    assert len(labeled) > 0 and labeled["instruction"].str.len().gt(0).all()


def test_quarantine_holds_exactly_the_planted_bad_rows(graph, planted):
    found = []
    for asset in ("raw_corpus", "filtered_corpus", "deduped_corpus"):
        q = _read(graph, f"quarantine/{asset}")
        found += [(asset, r.source, r.file, int(r.row), r.reason) for r in q.itertuples()]
    expected = [(p["stage"], p["source"], p["file"], p["row"], p["reason"]) for p in planted]
    assert sorted(found) == sorted(expected)


def test_scored_set_keeps_every_row_with_a_score(graph):
    labeled, scored = _read(graph, "labeled_pairs"), _read(graph, "scored_pairs")
    assert sorted(scored["doc_id"]) == sorted(labeled["doc_id"])
    unparsed = scored["score"].isna()  # a free-text reply that names no answer: NaN, never a made-up score
    assert scored.loc[~unparsed, "score"].between(0, 1).all() and (scored.loc[unparsed, "score_rule"] == "freetext").all()
    assert "keep" not in scored  # polish applies the threshold
    # the demo chat model answers in the format: its rows are scored by probability, by its own judgement
    prob = scored["score_rule"] == "probability"
    assert prob.mean() >= 0.9 and (scored.loc[prob, "answer_mass"] >= 0.5).all() and 0 < (scored["score"] >= 0.5).mean() < 1
    assert np.allclose(scored.loc[prob, "score"], scored.loc[prob, "p_good"] / scored.loc[prob, "answer_mass"])
    assert scored.loc[prob, "score_reply"].isna().all() and scored.loc[~prob, "score_reply"].notna().all()


def test_metadata_reports_rows_schema_and_stage_figures(graph):
    inst = graph["instance"]
    key = dg.MultiPartitionKey({"source": "skypile", "source_shard": "0"})
    records = inst.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("filtered_corpus"), asset_partitions=[key]), limit=1
    ).records
    md = records[0].asset_materialization.metadata
    rows = storage.partition_rows(storage.partition_dir(graph["base"], "filtered_corpus", {"source": "skypile", "shard": "0"}))
    assert md["dagster/row_count"].value == rows and md["quarantined"].value == 1
    assert figures(md["dropped"]) == {"duplicate_text": 1}  # a table in the UI
    assert "dagster/column_schema" not in md  # declared once, on the asset: the UI's Columns tab
    declared = graph["defs"].resolve_asset_graph().get(dg.AssetKey("filtered_corpus")).metadata["dagster/column_schema"]
    assert {"doc_id", "text", "n_tokens", "perplexity"} <= {c.name for c in declared.columns}
    read = pads.dataset(str(graph["base"] / "filtered_corpus"), partitioning="hive").schema.names  # as a reader sees it
    assert sorted(c.name for c in declared.columns) == sorted(read)
    assert records[0].asset_materialization.partition == key
    scored = inst.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("scored_pairs"), asset_partitions=[key]), limit=1
    ).records
    scored_md = scored[0].asset_materialization.metadata
    assert sum(figures(scored_md["histogram"]).values()) == scored_md["rows_in"].value


def test_dataset_card_and_jsonl_match_the_parquet(graph):
    for source in ("wudao", "wanjuan"):
        rel = graph["base"] / "release" / source
        lines = [json.loads(x) for x in (rel / "train.jsonl").read_text(encoding="utf-8").splitlines()]
        parquet = storage.read_partition(storage.partition_dir(graph["base"], "instruction_dataset", {"source": source}))
        assert [json.loads(r["metadata"])["doc_id"] for r in lines] == parquet["doc_id"].tolist()
        assert all(list(r) == dataset.CQIA_COLUMNS for r in lines)
        card = (rel / "README.md").read_text(encoding="utf-8")
        assert re.search(rf"^\| instruction_dataset +\| +{len(lines)} \|", card, re.M) and "| raw_corpus" in card and "```yaml" in card
        n_scored = storage.partition_rows(
            storage.partition_dir(graph["base"], "scored_pairs", {"source": source, "shard": "0"})
        ) + storage.partition_rows(storage.partition_dir(graph["base"], "scored_pairs", {"source": source, "shard": "1"}))
        by = re.search(r"scored by (.*?) *\|", card).group(1)
        assert sum(int(n) for n in re.findall(r": (\d+)", by)) == n_scored and "probability" in by
    assert not (graph["base"] / "release" / "skypile").exists()


def test_a_released_file_loads_with_coig_cqias_features(graph, tmp_path, monkeypatch):
    """train.jsonl as a loader built on COIG-CQIA's features reads it: its nine columns and types,
    the provenance and the tag rules inside `metadata` (a JSON string); a record with one more
    top-level key is refused by the same loader, so the check can fail."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    from datasets import Features, List, Value

    text = Value("string")
    cqia = Features(
        {
            "instruction": text,
            "input": text,
            "output": text,
            "task_type": {"major": List(text), "minor": List(text)},
            "domain": List(text),
            "metadata": text,
            "answer_from": text,
            "human_verified": Value("bool"),
            "copyright": text,
        }
    )
    release = graph["base"] / "release" / "wudao" / "train.jsonl"
    loaded = datasets.Dataset.from_json(str(release), features=cqia, cache_dir=str(tmp_path / "cache"))
    assert len(loaded) == len(release.read_text(encoding="utf-8").splitlines()) > 0
    meta = json.loads(loaded[0]["metadata"])
    assert set(meta) == set(dataset.PROVENANCE_COLUMNS) and meta["source"] == "wudao"
    assert meta["task_minor_rule"] in ("probability", "freetext", "undetermined", "off")
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({**json.loads(release.read_text(encoding="utf-8").splitlines()[0]), "source": "wudao"}) + "\n")
    with pytest.raises(datasets.exceptions.DatasetGenerationError):
        datasets.Dataset.from_json(str(extra), features=cqia, cache_dir=str(tmp_path / "cache2"))


def test_rematerializing_a_partition_replaces_it(graph):
    part = {"source": "wudao", "shard": "0"}
    before = {a: storage.read_partition(storage.partition_dir(graph["base"], a, part)) for a in CORPUS}
    key = dg.MultiPartitionKey({"source": "wudao", "source_shard": "0"})
    assert _materialize(graph, CORPUS, partition_key=key).success
    for asset in CORPUS:
        d = storage.partition_dir(graph["base"], asset, part)
        after = storage.read_partition(d)
        assert len(after) == len(before[asset]) and after["doc_id"].is_unique, asset
        assert sorted(p.name for p in d.iterdir()) == [storage.STATS, "part-0.parquet"], asset  # nothing half-written left
    assert storage.read_partition(storage.partition_dir(graph["base"], "quarantine/filtered_corpus", part))["reason"].tolist() == [
        "too_many_tokens"
    ]


def test_models_are_trained_and_their_loss_falls(models_run):
    inst = models_run["instance"]
    for name in ("base_model", "label_model", "chat_model"):
        rec = inst.fetch_materializations(dg.AssetKey(name), limit=1).records[0]
        curve = rec.asset_materialization.metadata["loss_curve"].value
        assert len(curve) >= 2 and curve[-1][1] < curve[0][1], (name, curve)
        ref = models_run["refs"][name]
        assert (Path(ref["path"]) / "config.json").is_file() and ref["card"]["examples"] > 0
    assert models_run["refs"]["label_model"]["card"]["examples"] == 104  # 106 seeds less 2 multiple-choice items


def test_a_failing_model_publishes_nothing(graph):
    from resources import LLMResource

    from .fakes import ScriptedEngine

    class SilentLLM(LLMResource):
        def engine(self, model):
            return ScriptedEngine(replies=[""] * 1000)  # the model answers every prompt with nothing

    keys = [k for k in graph["keys"] if k.keys_by_dimension["source"] == "wudao"]
    dirs = [
        storage.partition_dir(graph["base"], a, {"source": "wudao", "shard": str(k.keys_by_dimension["source_shard"])})
        for a in ("labeled_pairs", "quarantine/labeled_pairs")
        for k in keys
    ]
    before = [(d / "part-0.parquet").read_bytes() for d in dirs]
    defs = graph["defs"]
    result = dg.materialize(
        list(defs.assets),
        selection=["labeled_pairs"],
        resources={**defs.resources, "label_llm": SilentLLM(kun=defs.resources["kun"], role="label")},
        instance=graph["instance"],
        raise_on_error=False,
        tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
    )
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert "returned empty text for all" in failure.event_specific_data.error.message
    assert [(d / "part-0.parquet").read_bytes() for d in dirs] == before
