import gzip
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from kun_dagster.config import SourceConfig, load_config
from kun_dagster.corpus import CorpusError, list_files, shard_of

from .conftest import REPO
from .wild import ingest_shard


def _src(fmt, **kw):
    return SourceConfig(name="t", uri="unused", format=fmt, **kw)


def _all(source, uri):
    return ingest_shard(source, uri, 0, 1)


def test_jsonl_quarantines_each_bad_row_and_keeps_the_rest(tmp_path):
    lines = [
        json.dumps({"id": "a", "text": "第一段正文。"}, ensure_ascii=False).encode(),
        b'{"id": "b", "text": "broken',
        b'{"id": "c", "text": "' + "编码".encode("gbk") + b'"}',
        json.dumps({"id": "d", "text": "  "}).encode(),
        json.dumps({"id": "e"}).encode(),
        json.dumps({"text": "无编号"}, ensure_ascii=False).encode(),
        json.dumps({"id": "a", "text": "重复编号"}, ensure_ascii=False).encode(),
        b"[1, 2]",
        b"",
        json.dumps({"id": "f", "text": "最后一段。"}, ensure_ascii=False).encode(),
    ]
    (tmp_path / "x.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    got = _all(_src("jsonl", id_field="id"), str(tmp_path / "*.jsonl"))
    assert got.docs["doc_id"].tolist() == ["a", "f"]
    assert got.docs["row"].tolist() == [1, 10]
    q = got.quarantine.set_index("row")
    assert q["reason"].to_dict() == {
        2: "invalid_json",
        3: "invalid_encoding",
        4: "empty_text",
        5: "missing_text",
        6: "missing_id",
        7: "duplicate_id",
        8: "not_an_object",
    }
    assert set(q["file"]) == {"x.jsonl"}
    assert "not valid utf-8" in q.loc[3, "detail"] and "broken" in q.loc[2, "sample"]


def test_json_array_gzip_and_ids_default_to_file_and_row(tmp_path):
    recs = [{"content": "甲文。", "title": "甲"}, {"content": "乙文。", "title": "乙"}]
    with gzip.open(tmp_path / "w.json.gz", "wt", encoding="utf-8") as f:
        json.dump(recs, f, ensure_ascii=False)
    got = _all(_src("json", text_field="content", title_field="title"), str(tmp_path / "*.json.gz"))
    assert got.docs[["doc_id", "title", "text"]].values.tolist() == [["w.json.gz:1", "甲", "甲文。"], ["w.json.gz:2", "乙", "乙文。"]]


def test_whole_file_json_error_is_one_quarantine_row(tmp_path):
    (tmp_path / "bad.json").write_text('[{"content": "x"},', encoding="utf-8")
    (tmp_path / "good.json").write_text('{"data": [{"content": "好"}]}', encoding="utf-8")
    got = _all(_src("json", text_field="content"), str(tmp_path / "*.json"))
    assert got.docs["text"].tolist() == ["好"]
    assert got.quarantine[["file", "row", "reason"]].values.tolist() == [["bad.json", 0, "invalid_json"]]


def test_txt_paragraphs_parquet_and_zstd(tmp_path):
    (tmp_path / "a.txt").write_bytes("第一段。\n\n第二段。\n  \n".encode() + b"\xff\xfe\n\n" + "第三段。".encode())
    got = _all(_src("txt"), str(tmp_path / "*.txt"))
    assert got.docs["text"].tolist() == ["第一段。", "第二段。", "第三段。"]
    assert got.docs["row"].tolist() == [1, 2, 4]
    assert got.quarantine["reason"].tolist() == ["invalid_encoding"]
    pd.DataFrame({"text": ["一", "二"], "uid": [7, 8]}).to_parquet(tmp_path / "p.parquet")
    got = _all(_src("parquet", id_field="uid"), str(tmp_path / "*.parquet"))
    assert got.docs["doc_id"].tolist() == ["7", "8"]
    (tmp_path / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress('{"text": "压缩"}\n'.encode()))
    assert _all(_src("jsonl"), str(tmp_path / "*.jsonl.zst")).docs["text"].tolist() == ["压缩"]


def test_shards_are_stable_and_partition_the_files(tmp_path):
    for i in range(20):
        (tmp_path / f"f{i:02d}.jsonl").write_text(json.dumps({"text": f"文{i}"}, ensure_ascii=False))
    src, uri = _src("jsonl"), str(tmp_path / "*.jsonl")
    by_shard = [set(ingest_shard(src, uri, k, 4).files) for k in range(4)]
    assert set().union(*by_shard) == {f"f{i:02d}.jsonl" for i in range(20)}
    assert sum(len(s) for s in by_shard) == 20 and all(by_shard)
    (tmp_path / "new.jsonl").write_text('{"text": "新"}')  # adding a file never moves old ones
    assert all(by_shard[k] <= set(ingest_shard(src, uri, k, 4).files) for k in range(4))
    # stable across processes and machines (no per-process hash seed): another interpreter agrees
    out = subprocess.run(
        [sys.executable, "-c", "from kun_dagster.corpus import shard_of; print([shard_of(f'd/{i}.jsonl', 7) for i in range(50)])"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        check=True,
    )
    assert out.stdout.strip() == str([shard_of(f"d/{i}.jsonl", 7) for i in range(50)])
    assert len(set(json.loads(out.stdout))) == 7  # and it spreads files over every shard
    # relative to the glob root: the same corpus elsewhere keeps its shards
    _, files = list_files(str(tmp_path / "*.jsonl"))
    assert {rel for _, rel in files} >= {"f00.jsonl", "new.jsonl"}


def test_no_matching_file_is_an_error_naming_the_glob(tmp_path):
    with pytest.raises(CorpusError, match=r"source t: no file matches .*nothing-\*\.jsonl"):
        _all(_src("jsonl"), str(tmp_path / "nothing-*.jsonl"))


def test_demo_corpora_ingest_quarantines_exactly_the_planted_rows(planted):
    cfg = load_config(REPO / "kun.yaml", env={})
    rows, bad = 0, []
    for s in cfg.sources:
        for shard in range(cfg.shards):
            got = ingest_shard(s, cfg.resolve(s.uri), shard, cfg.shards)
            rows += len(got.docs)
            bad += [(s.name, r.file, r.row, r.reason) for r in got.quarantine.itertuples()]
    expected = sorted((p["source"], p["file"], p["row"], p["reason"]) for p in planted if p["stage"] == "raw_corpus")
    assert sorted(bad) == expected
    assert rows >= 150


def test_a_step_over_many_shards_lists_its_source_once(tmp_path, monkeypatch):
    """raw_corpus over a source's 8 shards in one run (a one-source backfill): one listing of the
    source for the step, not one per shard (a million keys on S3 take minutes to list)."""
    import dagster as dg

    from kun_dagster import corpus
    from kun_dagster.dagster_private import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
    from kun_dagster.definitions import build_definitions

    from .conftest import write_config

    (tmp_path / "web").mkdir()
    for i in range(40):
        (tmp_path / "web" / f"f{i:02d}.jsonl").write_text(json.dumps({"text": f"第{i}篇。" * 20}, ensure_ascii=False) + "\n")
    source = {"name": "web", "uri": str(tmp_path / "web" / "*.jsonl"), "format": "jsonl", "text_field": "text"}
    defs = build_definitions(write_config(tmp_path, sources=[source], shards=8))
    calls = []
    real = corpus._glob
    monkeypatch.setattr(corpus, "_glob", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    tags = {ASSET_PARTITION_RANGE_START_TAG: "web|0", ASSET_PARTITION_RANGE_END_TAG: "web|7"}
    result = dg.materialize(list(defs.assets), selection=["raw_corpus"], resources=defs.resources, tags=tags)
    assert result.success and calls == [source["uri"]]
    rows = sum(m.metadata["dagster/row_count"].value for m in result.asset_materializations_for_node("raw_corpus"))
    assert rows == 40  # every file read, each in its own shard


def test_a_source_with_a_manifest_reads_the_files_it_names_and_lists_nothing(tmp_path, monkeypatch):
    """sources[].manifest: the files come from the manifest (paths under the glob's folder, or
    whole), only those the glob matches; the store is never listed; a file the manifest leaves out
    is not read. A changed entry (its etag) makes only its own shard stale."""
    import dagster as dg

    from kun_dagster import corpus
    from kun_dagster.corpus import shard_versions
    from kun_dagster.dagster_private import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
    from kun_dagster.definitions import build_definitions

    from .conftest import write_config

    web = tmp_path / "web"
    (web / "2026-12").mkdir(parents=True)
    names = [f"2026-12/f{i:02d}.jsonl" for i in range(12)] + ["2026-12/文 件.jsonl"]
    for name in names + ["2026-12/unlisted.jsonl"]:
        (web / name).write_text(json.dumps({"text": f"{name}的正文。" * 20}, ensure_ascii=False) + "\n")
    entries = [{"path": n, "size": (web / n).stat().st_size, "etag": f"e-{n}"} for n in names[:-1]]
    entries += [
        {"path": str(web / names[-1]), "etag": "e-last"},
        {"path": "2026-12/notes.txt"},
        {"path": str(tmp_path / "elsewhere.jsonl")},
    ]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    source = {"name": "web", "uri": str(web / "*/*.jsonl"), "format": "jsonl", "manifest": "manifest.jsonl"}  # beside kun.yaml
    cfg_file = write_config(tmp_path, sources=[source], shards=4)
    defs = build_definitions(cfg_file)
    monkeypatch.setattr(corpus, "_glob", lambda *a, **k: pytest.fail("the store was listed"))
    tags = {ASSET_PARTITION_RANGE_START_TAG: "web|0", ASSET_PARTITION_RANGE_END_TAG: "web|3"}
    result = dg.materialize(list(defs.assets), selection=["raw_corpus"], resources=defs.resources, tags=tags)
    assert result.success
    rows = sum(m.metadata["dagster/row_count"].value for m in result.asset_materializations_for_node("raw_corpus"))
    assert rows == len(names)  # the 13 it names under the glob: not notes.txt, elsewhere.jsonl or unlisted.jsonl

    src = load_config(cfg_file).sources[0]
    manifest = str(tmp_path / "manifest.jsonl")
    before = shard_versions(src, src.uri, 4, manifest=manifest)
    entries[3]["etag"] = "changed"
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    after = shard_versions(src, src.uri, 4, manifest=manifest)
    assert {k for k in before if before[k] != after[k]} == {shard_of(names[3], 4)}
    (tmp_path / "bad.csv").write_text("file,size\na.jsonl,1\n")
    with pytest.raises(CorpusError, match="bad.csv: no 'path' column"):
        shard_versions(src, src.uri, 4, manifest=str(tmp_path / "bad.csv"))


def test_a_new_file_is_the_only_one_the_next_id_index_reads(tmp_path, monkeypatch):
    """Each file's ids are kept by what the file is (path, size, mtime): a source with one new file
    is indexed by reading that file alone, to the index a fresh read of every file gives; the entry
    of a removed file goes."""
    import tempfile

    from kun_dagster import corpus

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "src").mkdir()
    for i in range(6):
        (tmp_path / "src" / f"f{i}.jsonl").write_text(
            "".join(json.dumps({"id": f"d{(i * 3 + r) % 10}", "text": "正文"}) + "\n" for r in range(3))
        )
    src = SourceConfig(name="ids", uri=str(tmp_path / "src" / "*.jsonl"), format="jsonl", id_field="id")
    read = []
    real = corpus.documents
    monkeypatch.setattr(corpus, "documents", lambda fs, path, *a: read.append(Path(path).name) or real(fs, path, *a))

    def index():
        return corpus.id_index(src, *corpus._glob(src.uri, None))

    first = index()
    assert sorted(read) == [f"f{i}.jsonl" for i in range(6)] and first.kept_at
    read.clear()
    (tmp_path / "src" / "e.jsonl").write_text(json.dumps({"id": "d1", "text": "新的"}) + "\n")  # sorts first: it now keeps d1
    (tmp_path / "src" / "f5.jsonl").unlink()
    second = index()
    assert read == ["e.jsonl"]
    cached = len(list((tmp_path / "tmp" / "kun-ids").glob("*/*.npy")))
    assert cached == 6  # e and f0-f4: f5's entry went with it
    for f in (tmp_path / "tmp" / "kun-ids").glob("*/*.npy"):
        f.unlink()
    corpus._ID_INDEX.clear()
    fresh = index()
    assert (second.kept_at, second.files) == (fresh.kept_at, fresh.files) and second.kept_at != first.kept_at


def test_a_tick_out_of_time_reads_what_it_can_and_the_next_goes_on(tmp_path, monkeypatch):
    """The sensor's tick reads ids for a budget: past it, the source is left for the next tick
    (said, not recorded), which starts from the files already read; the versions it then records
    are those of an unbudgeted read."""
    import tempfile

    from kun_dagster import corpus
    from kun_dagster.corpus import IndexIncomplete, shard_versions

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "src").mkdir()
    for i in range(8):
        (tmp_path / "src" / f"f{i}.jsonl").write_text(json.dumps({"id": f"d{i % 3}", "text": "正文"}) + "\n")
    src = SourceConfig(name="ids", uri=str(tmp_path / "src" / "*.jsonl"), format="jsonl", id_field="id")
    with pytest.raises(IndexIncomplete, match="reading its ids, 0 of 8 files so far"):
        shard_versions(src, src.uri, 4, until=0)
    real, calls = corpus.documents, []
    monkeypatch.setattr(corpus, "documents", lambda *a: calls.append(a[1]) or real(*a))
    monkeypatch.setattr(corpus, "ID_READERS", 1)
    clock = iter(range(1000))  # each look at the clock a second later: files read at 0 and 1, then out of time
    monkeypatch.setattr(corpus.time, "monotonic", lambda: next(clock))
    with pytest.raises(IndexIncomplete, match="2 of 8"):
        shard_versions(src, src.uri, 4, until=1.5)
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    got = shard_versions(src, src.uri, 4, until=time.monotonic() + 60)
    corpus._ID_INDEX.clear()
    for f in (tmp_path / "tmp" / "kun-ids").glob("*/*.npy"):
        f.unlink()
    assert got == shard_versions(src, src.uri, 4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "文", "a ", "x" * 300, "7"]), max_size=8), min_size=1, max_size=5))
def test_the_id_index_spilled_to_disk_keeps_the_first_copy_of_every_repeated_id(files):
    """corpus.id_index spills (id hash, file, row) to bucket files and reads them back one at a
    time; with tiny buffers and few buckets (every spill path taken) it equals the rule written
    plainly: the first (file, row) of each id that occurs more than once, and every file it is in."""
    import tempfile
    from unittest import mock

    from kun_dagster import corpus

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(corpus, "ID_BUFFER", 2), mock.patch.object(corpus, "ID_BUCKETS", 3):
        for i, ids in enumerate(files):
            lines = [json.dumps({"id": x, "text": "正文"}, ensure_ascii=False) for x in ids]
            (Path(tmp) / f"f{i}.jsonl").write_text("\n".join(lines) + "\n" if lines else "")
        fs, root, found = corpus._glob(f"{tmp}/*.jsonl", None)
        index = corpus.id_index(_src("jsonl", id_field="id"), fs, root, found)
    first, where, count = {}, {}, Counter(x for ids in files for x in ids)
    for i, ids in enumerate(files):
        for row, x in enumerate(ids):
            first.setdefault(x, (f"f{i}.jsonl", row + 1))  # a JSONL row is its line number
            where.setdefault(x, set()).add(f"f{i}.jsonl")
    repeated = [x for x in first if count[x] > 1]
    assert index.kept_at == {corpus.id_hash(d): first[d] for d in repeated}
    assert index.files == {corpus.id_hash(d): where[d] for d in repeated}
