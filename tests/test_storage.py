import pandas as pd
import pyarrow.dataset as pads
import pytest
from upath import UPath

from kun_dagster import storage


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
