"""Hostile input at ingest: lines nested 100k deep, numbers of 5,000 digits, a line longer than
any record may be, a gzip that expands to one huge line, CR-only line ends, oversized whole-file
JSON and Parquet row groups. Every line is a document or a quarantine row with its reason, the good
rows around a poison one are kept, and memory stays bounded by the ingest limits."""

import gzip
import json
import tracemalloc

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kun_dagster import corpus
from kun_dagster.config import IngestConfig, SourceConfig

from .wild import ingest_shard

LIMITS = IngestConfig(max_record_bytes=64 * 1024, max_file_bytes=256 * 1024)


def _src(fmt, **kw):
    return SourceConfig(name="t", uri="unused", format=fmt, **kw)


def _good(i: int) -> bytes:
    return json.dumps({"id": f"g{i}", "text": f"第{i}段正文。"}, ensure_ascii=False).encode()


POISON = {
    "nested": b'{"id": "n", "text": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nested_unclosed": b"[" * 100_000,
    "digits_in_text_record": b'{"id": "d", "text": "\xe5\xa4\xa7\xe6\x95\xb0\xe3\x80\x82", "n": ' + b"9" * 5000 + b"}",
    "digits_as_id": b'{"id": ' + b"7" * 5000 + b', "text": "\xe7\xbc\x96\xe5\x8f\xb7\xe3\x80\x82"}',
    "too_large": json.dumps({"id": "big", "text": "长" * 120_000}, ensure_ascii=False).encode(),  # 360 KB
    "float_overflow": b'{"id": "f", "text": "\xe6\xb5\xae\xe7\x82\xb9\xe3\x80\x82", "x": 1e99999}',
}


def test_each_poison_line_costs_itself_only_and_every_line_is_counted(tmp_path):
    lines = []
    for i, poison in enumerate(POISON.values()):
        lines += [_good(2 * i), poison, _good(2 * i + 1)]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    limits = IngestConfig(max_record_bytes=300 * 1024)  # the nested lines (200 KB) are read; the 360 KB one is not
    got = ingest_shard(_src("jsonl", id_field="id"), str(tmp_path / "*.jsonl"), 0, 1, limits=limits)
    good = {f"g{i}" for i in range(2 * len(POISON))}
    assert good <= set(got.docs["doc_id"])  # every good line around every poison line is kept
    assert len(got.docs) + len(got.quarantine) == len(lines)  # and every line is a document or a reason
    q = dict(zip(got.quarantine["row"], got.quarantine["reason"], strict=True))
    rows = {name: 3 * i + 2 for i, name in enumerate(POISON)}
    assert q == {rows["nested"]: "invalid_json", rows["nested_unclosed"]: "invalid_json", rows["too_large"]: "record_too_large"}
    detail = got.quarantine.set_index("row")["detail"]
    assert "nested too deeply" in detail[rows["nested"]] and "max_record_bytes" in detail[rows["too_large"]]
    # a 5,000-digit number is kept as its digits: the record is still a document, its id the digits
    assert "7" * 5000 in set(got.docs["doc_id"]) and "d" in set(got.docs["doc_id"]) and "f" in set(got.docs["doc_id"])


def test_a_gzip_that_expands_to_a_huge_line_is_one_quarantine_row_in_bounded_memory(tmp_path):
    """200 MB of one line from a gzip of about 200 KB, between good lines: Python's heap grows by
    a few times max_record_bytes, not by the line (bench/README.md has the whole run's RSS at 700 MB)."""
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(_good(1) + b"\n" + b'{"text": "')
        chunk = b"a" * 2**20
        for _ in range(200):
            f.write(chunk)
        f.write(b'"}\n' + _good(2) + b"\n")
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        got = ingest_shard(_src("jsonl", id_field="id"), str(tmp_path / "*.jsonl.gz"), 0, 1, limits=LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert got.docs["doc_id"].tolist() == ["g1", "g2"]
    assert got.quarantine[["row", "reason"]].values.tolist() == [[2, "record_too_large"]]
    assert got.quarantine["sample"].iloc[0].startswith('{"text": "aaa')


def test_cr_only_and_mixed_line_ends_are_lines(tmp_path):
    (tmp_path / "mac.jsonl").write_bytes(_good(1) + b"\r" + _good(2) + b"\r\n" + _good(3) + b"\n" + _good(4) + b"\r")
    got = ingest_shard(_src("jsonl", id_field="id"), str(tmp_path / "*.jsonl"), 0, 1, limits=LIMITS)
    assert got.docs[["doc_id", "row"]].values.tolist() == [["g1", 1], ["g2", 2], ["g3", 3], ["g4", 4]]
    assert got.quarantine.empty


def test_txt_paragraphs_over_the_limit_are_quarantined_and_the_rest_read(tmp_path):
    huge = "长句。" * 30_000  # 270 KB in one paragraph over three lines
    text = f"第一段。\n\n{huge}\n{huge}\n{huge}\n\n第三段。\r\r第四段。\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    got = ingest_shard(_src("txt"), str(tmp_path / "*.txt"), 0, 1, limits=LIMITS)
    assert got.docs[["row", "text"]].values.tolist() == [[1, "第一段。"], [3, "第三段。"], [4, "第四段。"]]
    assert got.quarantine[["row", "reason", "doc_id"]].values.tolist() == [[2, "record_too_large", ""]]


def test_whole_file_json_over_the_limit_is_one_row_and_the_other_files_are_read(tmp_path):
    with gzip.open(tmp_path / "big.json.gz", "wt", encoding="utf-8") as f:
        json.dump([{"text": "大文件。" * 100} for _ in range(1000)], f, ensure_ascii=False)  # ~1.2 MB decompressed
    (tmp_path / "small.json").write_text(json.dumps([{"text": "小文件。"}], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    got = ingest_shard(_src("json"), str(tmp_path / "*.json*"), 0, 1, limits=LIMITS)
    assert got.docs["text"].tolist() == ["小文件。"]
    q = got.quarantine.set_index("file")
    assert q.loc["big.json.gz", "reason"] == "file_too_large" and q.loc["deep.json", "reason"] == "invalid_json"
    assert "nested too deeply" in q.loc["deep.json", "detail"]


def test_parquet_reads_only_the_columns_it_needs_and_bounds_each_row_group(tmp_path):
    n = 64
    table = pa.table(
        {
            "text": [f"第{i}段。" for i in range(n)],
            "uid": list(range(n)),
            "blob": [b"\0" * 50_000 for _ in range(n)],  # 3.2 MB no field reads: never loaded
        }
    )
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=16, compression="none")
    got = ingest_shard(_src("parquet", id_field="uid"), str(tmp_path / "*.parquet"), 0, 1, limits=LIMITS)
    assert got.docs["doc_id"].tolist() == [str(i) for i in range(n)] and got.quarantine.empty
    assert corpus._columns(table.column_names, _src("parquet", id_field="uid", text_field="meta.content")) == ["uid"]

    # a row group whose text column alone is over max_file_bytes: each of its rows quarantined, the other groups read
    texts = ["短。"] * 16 + ["长" * 30_000 + str(i) for i in range(16)] + ["短。"] * 16  # the middle group: 1.4 MB of text
    pq.write_table(pa.table({"text": texts}), tmp_path / "b.parquet", row_group_size=16, compression="none")
    got = ingest_shard(_src("parquet"), str(tmp_path / "b.parquet"), 0, 1, limits=LIMITS)
    assert got.docs["row"].tolist() == list(range(1, 17)) + list(range(33, 49))
    assert got.quarantine["row"].tolist() == list(range(17, 33))
    assert set(got.quarantine["reason"]) == {"row_group_too_large"}
    assert "rows 17-32" in got.quarantine["detail"].iloc[0]


def test_parquet_record_over_the_limit_is_quarantined_alone(tmp_path):
    pq.write_table(pa.table({"text": ["一。", "长" * 30_000, "三。"]}), tmp_path / "c.parquet")
    limits = IngestConfig(max_record_bytes=64 * 1024, max_file_bytes=2**20)
    got = ingest_shard(_src("parquet"), str(tmp_path / "c.parquet"), 0, 1, limits=limits)
    assert got.docs["row"].tolist() == [1, 3] and got.quarantine[["row", "reason"]].values.tolist() == [[2, "record_too_large"]]


def test_a_quarantined_record_keeps_its_own_id(tmp_path):
    lines = [b'{"id": "keep-me", "text": null}', b'{"id": 42, "text": [1, 2]}', b'{"id": "e", "text": "  "}']
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines))
    got = ingest_shard(_src("jsonl", id_field="id"), str(tmp_path / "*.jsonl"), 0, 1, limits=LIMITS)
    assert got.quarantine[["doc_id", "reason"]].values.tolist() == [
        ["keep-me", "missing_text"],
        ["42", "text_not_string"],
        ["e", "empty_text"],
    ]
    got = ingest_shard(_src("jsonl"), str(tmp_path / "*.jsonl"), 0, 1, limits=LIMITS)  # ids are file:row
    assert got.quarantine["doc_id"].tolist() == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"]


def test_a_shard_of_bad_lines_is_streamed_in_batches(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b"not json\n" * 2500)
    batches = list(corpus.iter_shard(_src("jsonl"), str(tmp_path / "*.jsonl"), 0, 1, None, 1000, LIMITS))
    assert [len(b.quarantine) for b in batches] == [1000, 1000, 500]


def test_a_corrupt_archive_keeps_the_rows_before_the_break(tmp_path):
    data = gzip.compress(b"\n".join(_good(i) for i in range(2000)) + b"\n")
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    got = ingest_shard(_src("jsonl", id_field="id"), str(tmp_path / "*.jsonl.gz"), 0, 1, limits=LIMITS)
    assert len(got.docs) > 100 and got.quarantine["reason"].tolist() == ["unreadable_file"]
    assert f"after row {got.docs['row'].max()}" in got.quarantine["detail"].iloc[0]


def test_a_dictionary_page_repeating_one_large_text_is_never_made_into_strings(tmp_path):
    """One 100 KB text on 20 rows of a dictionary-encoded column: the row group is small on disk and
    in its statistics, and each row is quarantined from its size alone."""
    texts = ["好。"] + ["长" * 40_000] * 20 + ["好。"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet", use_dictionary=True)
    assert pq.ParquetFile(tmp_path / "d.parquet").metadata.row_group(0).total_byte_size < 256 * 1024
    got = ingest_shard(_src("parquet"), str(tmp_path / "d.parquet"), 0, 1, limits=LIMITS)
    assert got.docs["row"].tolist() == [1, 22] and got.quarantine["row"].tolist() == list(range(2, 22))
    assert set(got.quarantine["reason"]) == {"record_too_large"} and got.quarantine["sample"].iloc[0] == "120,000 bytes of text"


# -- keys, keywords and paths a hostile config, bucket or tag can hold ------------------------------------


def test_an_empty_keyword_is_refused_and_no_keywords_is_no_check():
    from pydantic import ValidationError

    from kun_dagster import schemas

    from .test_schemas import CFG, labeled

    with pytest.raises(ValidationError, match="empty keyword would match every text"):
        CFG.model_validate({**CFG.model_dump(), "label": {"banned_keywords": ["新闻", " "]}})
    off = CFG.model_copy(update={"label": CFG.label.model_copy(update={"banned_keywords": []})})
    assert schemas.validate("labeled_pairs", labeled(), off).passed
    assert "no_banned_keyword" not in str(schemas.schema("labeled_pairs", off))


def test_a_remote_checkpoint_key_that_leaves_the_cache_is_refused(tmp_path):
    import uuid

    import fsspec

    from kun_dagster import model_store
    from kun_dagster.store import Store

    root = f"memory://evil-{uuid.uuid4().hex[:8]}/m"
    fs = fsspec.filesystem("memory")
    fs.pipe({f"{root}/config.json": b"{}"})
    listing = {"config.json": [2, "x"], "../../../outside.txt": [1, "x"]}
    (tmp_path / "cache").mkdir()
    original = model_store._listing
    try:
        model_store._listing = lambda store, uri: (fs, root.split("://")[1], listing)
        with pytest.raises(model_store.ModelError, match="outside the model cache"):
            model_store.local_copy(root, tmp_path / "cache", Store())
    finally:
        model_store._listing = original
        fs.rm(root.rsplit("/", 1)[0], recursive=True)
    assert not list(tmp_path.rglob("outside.txt")) and not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("key", ["../../etc|0", "wudao|../1", "wudao|1/..", "Wudao|0", "wudao|01", "wudao|99999", "a b"])
def test_a_partition_key_that_is_no_source_and_shard_builds_no_path(key):
    from kun_dagster.partitions import PartitionKeyError, hive

    with pytest.raises(PartitionKeyError):
        hive(key)
    assert hive("wudao|3") == {"source": "wudao", "shard": "3"} and hive("sky_pile2") == {"source": "sky_pile2"}


# -- secrets ------------------------------------------------------------------------------------------


def test_published_config_is_the_data_keys_with_secrets_masked(tmp_path):
    import yaml

    from kun_dagster import secrets
    from kun_dagster.code_versions import published_config
    from kun_dagster.config import load_config

    from .conftest import write_config

    cfg = load_config(
        write_config(
            tmp_path,
            **{
                "storage.storage_options": {"token": "tok-SECRET-1", "anon": False},
                "models.chat.vllm.engine_kwargs": {"hf_token": "hf-SECRET-2"},
                "models.label.path": "https://alice:pw-SECRET-3@models.example.com/label",
                "deploy.k8s": {"env_secrets": ["kun"], "api_key": "k8s-SECRET-4"},
            },
        )
    )
    text = yaml.safe_dump(published_config(cfg), allow_unicode=True)
    assert "SECRET" not in text and "https://alice:***@models.example.com/label" in text
    assert "storage" not in published_config(cfg) and "deploy" not in published_config(cfg)
    assert published_config(cfg)["score"]["threshold"] == cfg.score.threshold and "max_tokens" in published_config(cfg)["sampling"]
    found = secrets.secret_values(cfg, {"AWS_SECRET_ACCESS_KEY": "aws-SECRET-5", "AWS_ACCESS_KEY_ID": "AKIA-SECRET-6"})
    assert found == {"tok-SECRET-1", "hf-SECRET-2", "pw-SECRET-3", "k8s-SECRET-4", "aws-SECRET-5", "AKIA-SECRET-6"}
    said = "failed: s3://b/k?token=tok-SECRET-1 (AKIA-SECRET-6) via postgresql://kun:pg-SECRET-7@db/kun"
    assert secrets.redact(said, found) == "failed: s3://b/k?token=*** (***) via postgresql://kun:***@db/kun"


def test_store_scrub_covers_storage_options_and_the_access_key_id():
    from kun_dagster.config import StorageConfig
    from kun_dagster.store import Store

    store = Store(
        StorageConfig(storage_options={"client_kwargs": {"aws_session_token": "sess-SECRET"}}), {"key": "AKIA-ID", "secret": "sec-SECRET"}
    )
    assert store.scrub("AKIA-ID sec-SECRET sess-SECRET") == "*** *** ***"


# -- the release: all or none ------------------------------------------------------------------------


def test_a_release_that_fails_mid_write_changes_nothing_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from kun_dagster import card, dataset, storage
    from kun_dagster.store import upath

    coig = {"instruction": "问", "input": "", "output": "答", "task_type": {"major": ["问答"], "minor": ["其他"]}, "domain": ["其他"]}
    rec = {**coig, "answer_from": "llm", "human_verified": False, "copyright": "c", **dict.fromkeys(dataset.PROVENANCE_COLUMNS, "x")}
    recs = pd.DataFrame([rec])
    a, b = upath(str(tmp_path / "a")), upath(str(tmp_path / "b"))
    card.publish_releases({a: (recs, "card a"), b: (recs, "card b")}, "run-1")
    assert card.verify_release(a) == [] and json.loads((a / "manifest.json").read_text())["rows"] == 1
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    real, calls = storage.write_staged, []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) == 3:  # b's train.jsonl: a's two files are already staged
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(storage, "write_staged", full_disk)
    with pytest.raises(OSError, match="No space left"):
        card.publish_releases({a: (pd.concat([recs] * 2), "card a2"), b: (recs, "card b2")}, "run-2")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # a is untouched too
    (b / "train.jsonl").write_text("edited\n")
    assert card.verify_release(b) == [f"{b / 'train.jsonl'}: not the bytes the manifest names"]


def test_ids_stay_unique_per_source_when_a_file_that_sorts_first_repeats_one(tmp_path):
    """An added file that sorts before the one keeping an id now keeps it: the older file's shard
    gets a new version too (so it is ingested again and drops its copy), not only the new file's."""
    from kun_dagster.corpus import shard_of, shard_versions

    shards = 4
    old = "m.jsonl"
    new = next(f"a{i}.jsonl" for i in range(100) if shard_of(f"a{i}.jsonl", shards) != shard_of(old, shards))
    (tmp_path / old).write_bytes(_good(1) + b"\n" + json.dumps({"id": "k", "text": "旧文件的正文。"}, ensure_ascii=False).encode())
    src = SourceConfig(name="s", uri=str(tmp_path / "*.jsonl"), format="jsonl", id_field="id")
    before = shard_versions(src, src.uri, shards, limits=LIMITS)
    (tmp_path / new).write_bytes(json.dumps({"id": "k", "text": "新文件的正文。"}, ensure_ascii=False).encode())
    after = shard_versions(src, src.uri, shards, limits=LIMITS)
    assert {s for s in after if after[s] != before[s]} == {shard_of(new, shards), shard_of(old, shards)}
    kept = {s: ingest_shard(src, src.uri, s, shards, limits=LIMITS) for s in (shard_of(new, shards), shard_of(old, shards))}
    assert kept[shard_of(new, shards)].docs["doc_id"].tolist() == ["k"]
    assert kept[shard_of(old, shards)].docs["doc_id"].tolist() == ["g1"]
    assert kept[shard_of(old, shards)].quarantine[["doc_id", "reason"]].values.tolist() == [["k", "duplicate_id"]]
    assert shard_versions(src, src.uri, shards, limits=LIMITS) == after  # stable while nothing changes


def test_helm_values_hold_no_database_password():
    import yaml

    from .conftest import REPO

    values = yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text())
    pg = values["postgresql"]
    assert "postgresqlPassword" not in pg and values["generatePostgresqlPasswordSecret"] is False
    assert pg["existingSecret"] == values["global"]["postgresqlSecretName"]
