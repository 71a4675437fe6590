"""Source-wide deduplication (dedup.py): minhash_signatures per partition, duplicate_clusters over
every shard of a source (or every source), deduped_corpus dropping all but one member of each."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .. import dedup, progress
from ..config import KunConfig
from ..corpus import quarantine_frame
from ..registry import CLUSTERS, DEDUPED, DUPLICATE_TEXT, NEAR_DUPLICATE, SIGNATURES
from ..schemas import INDEXES, LOCATION
from ..storage import PartitionTable
from ..text import text_key
from .common import StageContext, StageResult, batches, dropped_rows, no_reasons, stage_stats, summary


class DedupError(ValueError):
    """Signatures that cannot be clustered together; the message says which and what to re-run."""


def params(cfg: KunConfig) -> str:
    """What a signature depends on: signatures made otherwise do not compare."""
    d = cfg.dedup
    return f"{dedup.ALGORITHM} ngram={d.ngram} num_perm={d.num_perm} seed={d.seed}"


def sign(docs: pd.DataFrame | Iterable[pd.DataFrame], ctx: StageContext) -> StageResult:
    """A MinHash signature and an exact-text key per document, batch by batch."""
    d, sink, made = ctx.cfg.dedup, ctx.sink, params(ctx.cfg)
    n, shingles, t0 = 0, [], time.perf_counter()
    stream, total = batches(docs)
    with progress.task(ctx.named(SIGNATURES), total=total, unit="docs") as bar:
        for batch in stream:
            texts = batch["text"].astype(str).tolist()
            sig, count = dedup.signatures(texts, d.ngram, d.num_perm, d.seed)
            out = batch[LOCATION.names].reset_index(drop=True)
            out["shingles"] = count
            out["params"] = made
            out["text_key"] = [text_key(t) for t in texts]
            out["signature"] = [s.astype("<u4").tobytes() for s in sig]
            sink.write(out)
            n += len(batch)
            shingles.append(count)
            bar.update(len(batch))
    seconds = time.perf_counter() - t0
    return StageResult(
        rows=sink.close(),
        dropped=quarantine_frame([]),
        stats=stage_stats(
            n,
            n,
            [],
            shingles=summary(np.concatenate(shingles) if shingles else [], 0),
            no_shingles=int(sum((c == 0).sum() for c in shingles)),
            docs_per_second=round(n / seconds, 1) if n and seconds else None,
            params=made,
        ),
    )


def _fixed(column: pa.ChunkedArray, width: int, what: str) -> np.ndarray:
    """A binary column whose values are all `width` bytes as an (n, width) uint8 matrix, chunk by
    chunk from the Arrow buffers (no Python object per value; no 2 GiB limit of one binary array)."""
    out = np.empty((len(column), width), dtype=np.uint8)
    at = 0
    for chunk in column.chunks:
        if chunk.null_count:
            raise DedupError(f"{SIGNATURES}: {chunk.null_count} empty {what} value(s)")
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        if len(chunk) and not (np.diff(offsets) == width).all():
            raise DedupError(f"{SIGNATURES}: {what} values are not all {width} bytes; re-materialize {SIGNATURES}")
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]] if len(chunk) else np.zeros(0, np.uint8)
        out[at : at + len(chunk)] = data.reshape(-1, width)
        at += len(chunk)
    return out


def cluster(parts: Iterable[pa.Table | PartitionTable], ctx: StageContext) -> StageResult:
    """Clusters of exact and near-duplicates over every signature partition given (all shards of a
    source, or of every source): the members of each cluster with more than one, the kept one first,
    each dropped one with the kept one's location and its estimated Jaccard to it. Partitions are
    read one at a time into one signature matrix; locations stay Arrow (bench/README.md: memory)."""
    cfg = ctx.cfg
    t0, d, want = time.perf_counter(), cfg.dedup, params(cfg)
    parts = list(parts)
    n = sum(p.num_rows for p in parts)
    sig = np.empty((n, d.num_perm), dtype=np.uint32)
    keys = np.empty((n, 2), dtype=np.uint64)
    shingles = np.empty(n, dtype=np.int64)
    locations, at = [], 0
    for part in parts:
        table = part if isinstance(part, pa.Table) else part.read()
        if not len(table):
            continue
        made = set(table.column("params").unique().to_pylist())
        if made != {want}:
            raise DedupError(
                f"{CLUSTERS}: signatures were made with {sorted(made)}, kun.yaml asks for {want!r}: "
                f"re-materialize {SIGNATURES} for these partitions"
            )
        k = len(table)
        sig[at : at + k] = _fixed(table.column("signature"), 4 * d.num_perm, "signature").view("<u4")
        keys[at : at + k] = _fixed(table.column("text_key"), 16, "text_key").view(">u8")
        shingles[at : at + k] = table.column("shingles").to_numpy()
        locations.append(table.select(LOCATION.names).cast(LOCATION))
        at += k
    if not n:
        return StageResult(rows=pd.DataFrame(columns=INDEXES[CLUSTERS].names), dropped=quarantine_frame([]), stats=_stats(0, None, t0))
    loc = pa.concat_tables(locations)
    listed = pc.index_in(loc.column("source"), value_set=pa.array([s.name for s in cfg.sources]))  # scope all: the first listed keeps
    by = pc.sort_indices(
        loc.append_column("_source", listed),
        sort_keys=[("_source", "ascending"), ("file", "ascending"), ("row", "ascending")],
    ).to_numpy()
    rank = np.empty(n, dtype=np.int64)
    rank[by] = np.arange(n)
    found = dedup.cluster(sig, keys, shingles, rank, exact=d.exact, near=d.near, threshold=d.threshold)
    del sig
    return StageResult(rows=dedup.frame(loc, rank, found), dropped=quarantine_frame([]), stats=_stats(n, found, t0))


def _stats(n: int, found: dedup.Clusters | None, t0: float) -> dict:
    sizes = dedup.sizes(found.keeper) if found is not None else np.zeros(0, dtype=np.int64)
    reasons = pd.Series(found.reason if found is not None else [], dtype=object).value_counts()
    return {
        "documents": n,
        "clusters": int(len(sizes)),
        "largest_cluster": int(sizes[0]) if len(sizes) else 0,
        "duplicates": {DUPLICATE_TEXT: int(reasons.get(DUPLICATE_TEXT, 0)), NEAR_DUPLICATE: int(reasons.get(NEAR_DUPLICATE, 0))},
        "candidate_pairs": found.candidates if found is not None else 0,
        "bands": found.bands[0] if found is not None else None,
        "rows_per_band": found.bands[1] if found is not None else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _kept_at(m: pd.DataFrame) -> pd.Series:
    return (
        m["kept_doc_id"].astype(str)
        + " ("
        + m["kept_source"]
        + " shard "
        + m["kept_shard"].astype(str)
        + ", "
        + m["kept_file"]
        + " row "
        + m["kept_row"].astype(str)
        + ")"
    )


def dedupe(docs: pd.DataFrame | Iterable[pd.DataFrame], ctx: StageContext) -> StageResult:
    """The partition less every document its cluster drops (its duplicate_clusters rows, the
    context's input), quarantined as duplicate_text or near_duplicate with the kept document's location."""
    members, sink = ctx.inputs[CLUSTERS], ctx.sink
    gone = members[members["role"] != dedup.KEPT]
    kept = _kept_at(gone)
    detail = np.where(
        gone["role"] == DUPLICATE_TEXT,
        "same text as " + kept,
        "near-duplicate of " + kept + ", estimated Jaccard " + gone["jaccard"].map("{:.2f}".format),
    )
    why: Mapping[str, tuple[str, str]] = dict(zip(gone["doc_id"], zip(gone["role"], detail, strict=True), strict=True))
    n_in, reasons, dropped = 0, [], []
    stream, total = batches(docs)
    with progress.task(ctx.named(DEDUPED), total=total, unit="docs") as bar:
        for batch in stream:
            df = batch.reset_index(drop=True)
            reason, detail = no_reasons(df)
            hit = df["doc_id"].map(why)
            mask = hit.notna()
            reason[mask] = [r for r, _ in hit[mask]]
            detail[mask] = [t for _, t in hit[mask]]
            sink.write(df[~mask].reset_index(drop=True))
            dropped.append(dropped_rows(df, reason, detail, "text"))
            reasons += reason[mask].tolist()
            n_in += len(df)
            bar.update(len(df))
    return StageResult(
        rows=sink.close(),
        dropped=pd.concat(dropped, ignore_index=True) if dropped else quarantine_frame([]),
        stats=stage_stats(n_in, n_in - len(reasons), reasons),
    )
