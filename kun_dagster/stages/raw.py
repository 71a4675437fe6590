"""raw_corpus: every document of a shard's files, read in batches; unreadable rows quarantined."""

from __future__ import annotations

import pandas as pd

from .. import progress
from ..config import KunConfig
from ..corpus import iter_shard
from ..names import RAW
from ..storage import FrameSink, Sink
from ..store import Store
from .common import (
    StageResult,
    stage_stats,
)


def ingest(
    cfg: KunConfig, source_name: str, shard: int, store: Store | None = None, sink: Sink | None = None, label: str = RAW
) -> StageResult:
    """Every document of the source's files that fall in `shard`, read and written `batch_rows` at a
    time into `sink` (default: one in-memory frame); unreadable rows quarantined."""
    source = cfg.source(source_name)
    uri = cfg.resolve(source.uri)
    sink = sink or FrameSink()
    n_docs, bad, files = 0, [], []
    with progress.task(f"{label} {source_name}/{shard}", unit="docs") as bar:
        for got in iter_shard(source, uri, shard, cfg.shards, (store or Store(cfg.storage)).options(uri), cfg.storage.batch_rows):
            sink.write(got.docs)
            n_docs, files = n_docs + len(got.docs), got.files
            bad.append(got.quarantine)
            bar.update(len(got.docs) + len(got.quarantine))
    quarantine = pd.concat(bad, ignore_index=True)
    return StageResult(
        rows=sink.close(), dropped=quarantine, stats=stage_stats(n_docs + len(quarantine), n_docs, quarantine["reason"], files=len(files))
    )


def corpus_texts(cfg: KunConfig, limit: int, store: Store | None = None) -> list[str]:
    """Up to `limit` documents across every source and shard (the tiny base's pre-training text)."""
    texts: list[str] = []
    for source in cfg.sources:
        for shard in range(cfg.shards):
            texts += ingest(cfg, source.name, shard, store, label="base_model texts").rows["text"].tolist()
            if len(texts) >= limit:
                return texts[:limit]
    return texts
