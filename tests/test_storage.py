import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from upath import UPath

from kun_dagster import storage
from kun_dagster.store import Store


def test_partition_roundtrip_columns_live_in_the_path(tmp_path):
    base = UPath(tmp_path)
    d0 = storage.partition_dir(base, "raw_corpus", {"source": "wudao", "shard": "0"})
    d1 = storage.partition_dir(base, "raw_corpus", {"source": "wudao", "shard": "1"})
    assert str(d0).endswith("raw_corpus/source=wudao/shard=0")
    storage.write_partition(d0, pd.DataFrame({"doc_id": ["a", "b"], "source": "wudao", "shard": 0, "text": ["x", "y"]}))
    storage.write_partition(d1, pd.DataFrame({"doc_id": ["c"], "source": "wudao", "shard": 1, "text": ["z"]}))
    back = storage.read_partition(d0)
    assert back.columns.tolist() == ["source", "shard", "doc_id", "text"]
    assert back["shard"].dtype == "int64" and back["doc_id"].tolist() == ["a", "b"]
    table = pads.dataset(str(base / "raw_corpus"), partitioning="hive").to_table()
    assert sorted(table.column("doc_id").to_pylist()) == ["a", "b", "c"]
    assert set(table.column_names) == {"doc_id", "text", "source", "shard"}
    assert storage.partition_rows(d0) == 2 and storage.partition_rows(base / "missing") == 0


def test_republishing_replaces_and_leaves_no_temp_files(tmp_path):
    d = storage.partition_dir(UPath(tmp_path), "a", {"source": "s", "shard": "0"})
    storage.write_partition(d, pd.DataFrame({"x": [1, 2, 3]}))
    (d / "part-1.parquet").write_bytes((d / "part-0.parquet").read_bytes())  # a part of an older, larger write
    storage.write_partition(d, pd.DataFrame({"x": [9]}))
    assert sorted(p.name for p in d.iterdir()) == ["part-0.parquet"]
    assert storage.read_partition(d)["x"].tolist() == [9]


def test_failed_publish_keeps_the_old_version(tmp_path, monkeypatch):
    d = storage.partition_dir(UPath(tmp_path), "a", {"source": "s", "shard": "0"})
    storage.write_partition(d, pd.DataFrame({"x": [1]}))

    def boom(self, target):
        raise OSError("disk gone")

    monkeypatch.setattr(type(d), "rename", boom)
    with pytest.raises(OSError, match="disk gone"):
        storage.write_partition(d, pd.DataFrame({"x": [2]}))
    monkeypatch.undo()
    assert storage.read_partition(d)["x"].tolist() == [1]
    assert [p.name for p in d.iterdir()] == ["part-0.parquet"]


def test_unpublished_partition_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no published partition"):
        storage.read_partition(UPath(tmp_path) / "nothing" / "source=x")


def test_empty_partition_keeps_string_columns(tmp_path):
    d = UPath(tmp_path) / "q" / "source=s"
    storage.write_partition(d, pd.DataFrame(columns=["reason", "detail"]))
    assert storage.to_table(pd.DataFrame(columns=["reason"])).schema.field("reason").type == "string"
    assert storage.read_partition(d).columns.tolist() == ["source", "reason", "detail"]


def test_store_options_per_uri():
    from kun_dagster.config import StorageConfig

    settings = StorageConfig(
        s3={"endpoint_url": "http://minio:9000", "region": "eu-west-1", "path_style": True, "max_attempts": 4},
        storage_options={"client_kwargs": {"verify": False}},
    )
    store = Store(settings, {"key": "id", "secret": "s3cr3t"})
    opts = store.options("s3://bucket/kun")
    assert opts["client_kwargs"] == {"verify": False, "endpoint_url": "http://minio:9000", "region_name": "eu-west-1"}
    assert opts["config_kwargs"]["s3"] == {"addressing_style": "path"}
    assert opts["config_kwargs"]["retries"] == {"max_attempts": 4, "mode": "standard"}
    assert opts["key"] == "id" and opts["secret"] == "s3cr3t"
    assert store.options("/local/data") == {} and store.options("file:///x") == {}
    assert store.options("gs://b/x") == {"client_kwargs": {"verify": False}}  # other stores: storage_options only
    assert settings.storage_options == {"client_kwargs": {"verify": False}}  # not mutated
    assert "s3cr3t" not in repr(store)


def test_store_errors_name_the_endpoint_and_hide_the_secret():
    from kun_dagster.config import StorageConfig

    store = Store(StorageConfig(s3={"endpoint_url": "http://minio:9000"}), {"key": "id", "secret": "s3cr3t"})
    denied = store.describe(PermissionError("signature s3cr3t does not match"), "s3://b/kun")
    assert "refused the credentials" in denied and "http://minio:9000" in denied and "s3cr3t" not in denied
    assert "$AWS_SECRET_ACCESS_KEY (values not shown)" in denied
    assert "does not exist" in store.describe(FileNotFoundError("NoSuchBucket"), "s3://b/kun")
    down = store.describe(ConnectionError("Could not connect"), "s3://b/kun")
    assert down.startswith("cannot reach s3://b/kun at endpoint http://minio:9000 after 10 attempts")
    env = Store.from_env(StorageConfig(s3={"secret_access_key_env": "MY_SECRET"}), {"MY_SECRET": "x", "AWS_ACCESS_KEY_ID": "k"})
    assert env.credentials == {"secret": "x", "key": "k"}


def test_remove_tree_prunes_the_empty_folders_it_leaves(tmp_path):
    base = UPath(tmp_path)
    a = storage.staging_dir(base, "labeled_pairs", {"source": "s", "shard": "0"})
    b = storage.staging_dir(base, "labeled_pairs", {"source": "s", "shard": "1"})
    for d in (a, b):
        (d / "generate-000000-x.parquet").parent.mkdir(parents=True)
        (d / "generate-000000-x.parquet").write_bytes(b"x")
    storage.remove_tree(a, prune_up_to=base / storage.STAGING)
    assert not a.exists() and b.exists()  # the sibling keeps its parents
    storage.remove_tree(b, prune_up_to=base / storage.STAGING)
    assert not (base / storage.STAGING).exists() and base.exists()
    storage.remove_tree(b, prune_up_to=base / storage.STAGING)  # nothing there: fine


def test_an_empty_partition_has_its_versions_full_schema_and_reads_as_one_empty_batch(tmp_path):
    from kun_dagster import schemas

    base = UPath(tmp_path)
    part = {"source": "web", "shard": "3"}
    d = storage.partition_dir(base, "labeled_pairs", part)
    storage.write_partition(d, pd.DataFrame(), schemas.arrow_schema("labeled_pairs"))  # a stage that saw no rows at all
    back = storage.read_partition(d)
    assert set(back.columns) == set(schemas.empty_frame("labeled_pairs").columns) and len(back) == 0
    assert back["label_tokens"].dtype == "int64" and back["perplexity"].dtype == "float64"
    batches = list(storage.PartitionBatches(d, 100))
    assert len(batches) == 1 and list(batches[0].columns) == list(back.columns)
    sink = storage.ParquetSink(storage.staging_dir(base, "raw_corpus", part) / "rows.parquet", schemas.arrow_schema("raw_corpus"))
    sink.write(pd.DataFrame())
    staged = sink.close()
    assert staged.rows == 0 and staged.schema.names == ["doc_id", "file", "row", "title", "text"]  # source, shard: in the path
    full = storage.partition_dir(base, "labeled_pairs", {"source": "web", "shard": "4"})
    storage.write_partition(
        full,
        schemas.empty_frame("labeled_pairs").pipe(
            lambda f: pd.concat(
                [
                    f,
                    pd.DataFrame(
                        {
                            "doc_id": ["a"],
                            "source": ["web"],
                            "shard": [4],
                            "file": ["f"],
                            "row": [1],
                            "title": [None],
                            "text": ["正文"],
                            "n_tokens": [2],
                            "perplexity": [3.0],
                            "instruction": ["问"],
                            "label_tokens": [1],
                            "label_finish": ["stop"],
                        }
                    ),
                ]
            )
        ),
        schemas.arrow_schema("labeled_pairs"),
    )
    both = pads.dataset(str(base / "labeled_pairs"), partitioning="hive").to_table()  # one schema across empty and full
    assert both.num_rows == 1 and both.schema.field("title").type == "string"


def test_one_reading_of_partition_keys_for_assets_and_the_io_manager():
    import dagster as dg

    from kun_dagster.partitions import hive

    key = dg.MultiPartitionKey({"source_shard": "3", "source": "wudao"})
    assert hive(key) == hive("wudao/3", sep="/") == {"source": "wudao", "shard": "3"}  # storage order, storage names
    assert hive("skypile") == {"source": "skypile"}


def test_a_streamed_partition_holds_a_batch_not_the_file(tmp_path):
    """PartitionBatches (the streamed stages' input) and PartitionTable.batches (the dedup steps')
    read a part file a batch at a time: pyarrow's default pre-buffered every row group's columns
    first, so the Python file object held the whole shard's bytes."""
    directory = UPath(tmp_path) / "filtered_corpus" / "source=web" / "shard=0"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(str(directory / "part-0.parquet"), pa.schema([("doc_id", pa.string()), ("text", pa.string())])) as w:
        for g in range(16):  # 16 row groups of ~0.5 MB of random CJK text: little for zstd to save
            texts = ["".join(map(chr, rng.integers(0x4E00, 0x9FFF, 400))) for _ in range(400)]
            w.write_table(pa.table({"doc_id": [f"{g}-{i}" for i in range(400)], "text": texts}))
    size = (directory / "part-0.parquet").stat().st_size
    assert size > 6 * 2**20
    for read in (
        lambda: [len(df) for df in storage.PartitionBatches(directory, 200)],
        lambda: [b.num_rows for b in storage.PartitionTable(directory).batches(["text"], 200)],
    ):
        tracemalloc.start()
        try:
            assert sum(read()) == 16 * 400
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < size / 4, f"{peak:,} bytes held reading a {size:,}-byte file"
