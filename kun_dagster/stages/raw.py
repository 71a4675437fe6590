"""raw_corpus: every document of a shard's files, read in batches; unreadable rows quarantined."""

from __future__ import annotations

from collections import Counter

from .. import progress
from ..config import KunConfig
from ..corpus import iter_shard, listing
from ..registry import RAW
from ..store import Store
from .common import (
    StageContext,
    StageResult,
    stage_stats,
)

LISTINGS = "listings"  # StageContext.inputs: {source: corpus.Listing}, shared by every partition of a step


def ingest(rows: None, ctx: StageContext) -> StageResult:
    """Every document of the source's files that fall in the partition's shard (`rows`: none, the
    partition reads its files), read and written `batch_rows` at a time into the context's sink,
    its unreadable rows into its quarantine alike: a shard of a million bad lines holds one batch of them.
    The source is listed once per step: the partitions of a step share ctx.inputs[LISTINGS]."""
    cfg, source_name, shard = ctx.cfg, ctx.partition["source"], int(ctx.partition["shard"])
    source = cfg.source(source_name)
    uri = cfg.resolve(source.uri)
    n_docs, reasons, files = 0, Counter(), []
    with progress.task(ctx.named(RAW), unit="docs") as bar:
        options = (ctx.store or Store(cfg.storage)).options(uri)
        listings = ctx.inputs.get(LISTINGS, {})
        if source_name not in listings:
            listings[source_name] = listing(source, uri, options, cfg.manifest(source))
        listed = listings[source_name]
        for got in iter_shard(source, uri, shard, cfg.shards, options, cfg.storage.batch_rows, cfg.ingest, listed):
            ctx.sink.write(got.docs)
            ctx.quarantine.write(got.quarantine)
            n_docs, files = n_docs + len(got.docs), got.files
            reasons.update(got.quarantine["reason"])
            bar.update(len(got.docs) + len(got.quarantine))
    n_bad = sum(reasons.values())
    return StageResult(
        rows=ctx.sink.close(),
        dropped=ctx.quarantine.close(),
        stats=stage_stats(n_docs + n_bad, n_docs, reasons.elements(), files=len(files)),
    )


def corpus_texts(cfg: KunConfig, limit: int, store: Store | None = None) -> list[str]:
    """Up to `limit` documents across every source and shard (the tiny base's pre-training text)."""
    texts: list[str] = []
    listings: dict = {}  # each source listed once
    for source in cfg.sources:
        for shard in range(cfg.shards):
            where = {"source": source.name, "shard": str(shard)}
            ctx = StageContext(cfg, store=store, partition=where, inputs={LISTINGS: listings}, label="base_model texts")
            texts += ingest(None, ctx).rows["text"].tolist()
            if len(texts) >= limit:
                return texts[:limit]
    return texts
