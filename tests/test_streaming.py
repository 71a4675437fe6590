"""raw_corpus and filtered_corpus in record batches: the same result as a whole shard at once,
with one batch in memory (storage.ParquetSink / PartitionBatches, corpus.iter_shard)."""

import gzip
import json
import math

import pandas as pd
from upath import UPath

from kun_dagster import stages, storage
from kun_dagster.config import SourceConfig
from kun_dagster.corpus import iter_shard
from kun_dagster.stages import StageContext

from .fakes import ScriptedEngine
from .test_stages import CFG, docs
from .wild import ingest_shard


class PerplexityByText(ScriptedEngine):
    PPL = {"复利是指利息计入本金。": 5.0, "蜜蜂的分工很细。": 6.0, "乱码乱码。": math.nan}

    def perplexity(self, texts):
        return [self.PPL[t] for t in texts]


def test_batched_filter_equals_the_whole_frame_and_finds_duplicates_across_batches(tmp_path):
    texts = [
        "复利是指利息计入本金。",
        "\x00  \n",
        "蜜蜂的分工很细。",
        "长" * 300,
        "复利是指利息计入本金。 ",
        "乱码乱码。",
        "蜜蜂的分工很细。",
    ]
    frame = docs(texts)
    whole = stages.filter_corpus(frame, StageContext(CFG, engine=PerplexityByText(), tokenizer=PerplexityByText().tokenizer))
    eng = PerplexityByText()
    sink = storage.ParquetSink(UPath(tmp_path) / "_staging" / "f" / "source=web" / "shard=0" / "rows.parquet")
    streamed = stages.filter_corpus(
        [frame.iloc[:3], frame.iloc[3:5], frame.iloc[5:]], StageContext(CFG, engine=eng, tokenizer=eng.tokenizer, sink=sink)
    )
    assert streamed.stats == whole.stats and streamed.stats["dropped"]["duplicate_text"] == 2  # d4 and d6 duplicate batch 1
    assert streamed.dropped.reset_index(drop=True).equals(whole.dropped.reset_index(drop=True))
    final = storage.partition_dir(UPath(tmp_path), "f", {"source": "web", "shard": "0"})
    storage.publish_staged(streamed.rows, final)
    back = storage.read_partition(final)
    pd.testing.assert_frame_equal(back, whole.rows[back.columns], check_dtype=False)
    assert streamed.rows.rows == len(whole.rows) == 2 and not streamed.rows.path.exists()


def test_sink_keeps_one_schema_and_skips_empty_batches(tmp_path):
    path = UPath(tmp_path) / "_staging" / "a" / "source=s" / "shard=1" / "rows.parquet"
    sink = storage.ParquetSink(path)
    sink.write(pd.DataFrame({"source": [], "doc_id": [], "title": []}))  # empty: must not fix title as string-of-nothing
    sink.write(pd.DataFrame({"source": "s", "doc_id": ["a", "b"], "title": [None, None], "n": [1, 2]}))
    sink.write(pd.DataFrame({"source": "s", "doc_id": ["c"], "title": ["标题"], "n": [3]}))
    staged = sink.close()
    assert staged.rows == 3 and staged.schema.names == ["doc_id", "title", "n"]  # partition column in the path only
    final = storage.partition_dir(UPath(tmp_path), "a", {"source": "s", "shard": "1"})
    storage.publish_staged(staged, final)
    batches = list(storage.PartitionBatches(final, rows=2))
    assert [len(b) for b in batches] == [2, 1] and batches[1]["title"].tolist() == ["标题"]
    assert batches[0].columns.tolist() == ["source", "shard", "doc_id", "title", "n"] and batches[0]["shard"].tolist() == [1, 1]
    empty = storage.ParquetSink(UPath(tmp_path) / "_staging" / "b" / "source=s" / "rows.parquet")
    empty.write(pd.DataFrame({"source": [], "doc_id": []}))
    assert empty.close().rows == 0 and pd.read_parquet(str(tmp_path / "_staging/b/source=s/rows.parquet")).columns.tolist() == ["doc_id"]


def test_iter_shard_batches_add_up_to_the_shard_and_a_truncated_file_keeps_its_first_rows(tmp_path):
    lines = [json.dumps({"id": f"d{i}", "text": f"第{i}段正文。"}, ensure_ascii=False) for i in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:7] + ["{bad"] + lines[7:]) + "\n")
    many = [
        json.dumps({"id": f"g{i}", "text": f"第{i}段，足够长的正文让解压后的数据超过一个读块。"}, ensure_ascii=False) for i in range(30000)
    ]
    whole_gz = gzip.compress(("\n".join(many) + "\n").encode())
    (tmp_path / "b.jsonl.gz").write_bytes(whole_gz[: len(whole_gz) * 3 // 4])  # cut mid-stream
    src = SourceConfig(name="t", uri="unused", format="jsonl", id_field="id")
    batches = list(iter_shard(src, str(tmp_path / "*.jsonl*"), 0, 1, batch_rows=1000))
    assert all(len(b.docs) <= 1000 for b in batches) and len(batches) > 3
    whole = ingest_shard(src, str(tmp_path / "*.jsonl*"), 0, 1)
    assert sum(len(b.docs) for b in batches) == len(whole.docs)
    assert pd.concat([b.quarantine for b in batches])["reason"].tolist() == whole.quarantine["reason"].tolist()
    a_ids = whole.docs[whole.docs["file"] == "a.jsonl"]["doc_id"].tolist()
    assert a_ids == [f"d{i}" for i in range(10)]
    unreadable = whole.quarantine[whole.quarantine["reason"] == "unreadable_file"]
    kept_b = whole.docs[whole.docs["file"] == "b.jsonl.gz"]
    assert unreadable["file"].tolist() == ["b.jsonl.gz"] and 0 < len(kept_b) < 30000
    assert unreadable["row"].iloc[0] == kept_b["row"].max() and "rows before it kept" in unreadable["detail"].iloc[0]
