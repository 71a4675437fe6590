"""raw_corpus: every document of a shard's files, read in batches; unreadable rows quarantined."""

from __future__ import annotations

from collections import Counter

from .. import progress
from ..config import KunConfig
from ..corpus import iter_shard
from ..registry import RAW
from ..storage import FrameSink, Sink
from ..store import Store
from .common import (
    StageResult,
    stage_stats,
)


def ingest(
    cfg: KunConfig,
    source_name: str,
    shard: int,
    store: Store | None = None,
    sink: Sink | None = None,
    label: str = RAW,
    quarantine: Sink | None = None,
) -> StageResult:
    """Every document of the source's files that fall in `shard`, read and written `batch_rows` at a
    time into `sink`, its unreadable rows into `quarantine` alike (default: in-memory frames): a
    shard of a million bad lines holds one batch of them."""
    source = cfg.source(source_name)
    uri = cfg.resolve(source.uri)
    sink, quarantine = sink or FrameSink(), quarantine or FrameSink()
    n_docs, reasons, files = 0, Counter(), []
    with progress.task(f"{label} {source_name}/{shard}", unit="docs") as bar:
        options = (store or Store(cfg.storage)).options(uri)
        for got in iter_shard(source, uri, shard, cfg.shards, options, cfg.storage.batch_rows, cfg.ingest):
            sink.write(got.docs)
            quarantine.write(got.quarantine)
            n_docs, files = n_docs + len(got.docs), got.files
            reasons.update(got.quarantine["reason"])
            bar.update(len(got.docs) + len(got.quarantine))
    n_bad = sum(reasons.values())
    return StageResult(
        rows=sink.close(), dropped=quarantine.close(), stats=stage_stats(n_docs + n_bad, n_docs, reasons.elements(), files=len(files))
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
