"""Source-wide deduplication (dedup.py): minhash_signatures per partition, duplicate_clusters over
every shard of a source (or every source), deduped_corpus dropping all but one member of each."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .. import dedup, progress
from ..config import KunConfig
from ..corpus import quarantine_frame
from ..registry import CLUSTERS, DEDUPED, DUPLICATE_TEXT, LSH_BANDS, NEAR_DUPLICATE, SIGNATURES
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
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
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
        _checked(table, want)
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


# -- the banded path: the same clusters from one step per LSH band and a merge -------------------------
# cluster() above holds every signature of a cluster group (512 bytes a document at num_perm 128). A
# band's step holds 8 bytes of its bucket, 16 of text key, 8 of shingle count and ~20 of order per
# document, and the signatures of its candidates; the merge holds the keys, the order and every
# band's pairs. Documents are indexed by rank (source as listed, file, row), so a band's pairs mean
# the same documents to the merge whatever order the partitions come in.


def _read(part: pa.Table | PartitionTable, columns: list[str]) -> pa.Table:
    if isinstance(part, pa.Table):
        return part.select(columns)
    # source and shard live in the partition's path, not its files (storage.read_table appends them)
    return part.read([c for c in columns if c not in ("source", "shard")]).select(columns)


_BATCH = 16384  # signature rows read at a time (8 MiB at num_perm 128): a step never holds a shard's


def _batches(part: pa.Table | PartitionTable, column: str) -> Iterator[pa.Array]:
    """A column stored in the partition's files, _BATCH rows at a time."""
    got = part.select([column]).to_batches(_BATCH) if isinstance(part, pa.Table) else part.batches([column], _BATCH)
    for batch in got:
        yield batch.column(0)


def _checked(table: pa.Table, want: str) -> None:
    made = set(table.column("params").unique().to_pylist())
    if len(table) and made != {want}:
        raise DedupError(
            f"{CLUSTERS}: signatures were made with {sorted(made)}, kun.yaml asks for {want!r}: "
            f"re-materialize {SIGNATURES} for these partitions"
        )


class _Ranked:
    """The documents of every part, in rank order: which part and row each rank is, read from the
    location columns one part at a time."""

    def __init__(self, parts: list[pa.Table | PartitionTable], cfg: KunConfig):
        self.parts = parts
        listed = pa.array([s.name for s in cfg.sources])
        sources, files, rows, names = [], [], [], {}
        for part in parts:
            t = _read(part, ["source", "file", "row"])
            sources.append(
                pc.index_in(t.column("source").cast(pa.string()), value_set=listed).to_numpy(zero_copy_only=False).astype(np.int64)
            )
            coded = pc.dictionary_encode(t.column("file")).combine_chunks() if len(t) else None
            if coded is None:
                files.append(np.zeros(0, dtype=np.int64))
            else:
                ids = np.array([names.setdefault(f, len(names)) for f in coded.dictionary.to_pylist()], dtype=np.int64)
                files.append(ids[coded.indices.to_numpy(zero_copy_only=False)])
            rows.append(t.column("row").to_numpy())
        by_name = np.empty(len(names), dtype=np.int64)
        by_name[[names[f] for f in sorted(names)]] = np.arange(len(names))  # file names in sorted order
        self.sizes = np.array([len(r) for r in rows], dtype=np.int64)
        self.n = int(self.sizes.sum())
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
        # order[rank] = the document's index over the parts in the order given
        self.order = np.lexsort((cat(rows), by_name[cat(files)] if names else cat(files), cat(sources)))

    @cached_property
    def keys(self) -> np.ndarray:
        """Each document's exact-text key (two uint64), in rank order."""
        return self.column("text_key", _keys).reshape(-1, 2) if self.n else np.zeros((0, 2), dtype=np.uint64)

    @cached_property
    def shingles(self) -> np.ndarray:
        return self.column("shingles", lambda v: v.to_numpy(zero_copy_only=False))

    @cached_property
    def fingerprint(self) -> str:
        """What a band's pairs are valid for: the documents in rank order, by their text keys and
        shingle counts. A key is the text less its whitespace, which the shingles drop too, so the
        same keys mean the same signatures (under the same params, checked apart)."""
        h = hashlib.sha256(f"{self.n}".encode())
        h.update(np.ascontiguousarray(self.keys))  # hashed in place: no copy of 24 bytes a document
        h.update(np.ascontiguousarray(self.shingles, dtype=np.int64))
        return h.hexdigest()[:16]

    def column(self, name: str, read) -> np.ndarray:
        """`read(array)` of each batch of a column stored in the parts, concatenated, in rank order."""
        got = [read(values) for part in self.parts for values in _batches(part, name)]
        return np.concatenate(got)[self.order] if got else np.zeros(0)

    def locations(self, ranks: np.ndarray) -> pa.Table:
        """The LOCATION rows of the documents of these ranks, in their order, reading one part at a time."""
        where = self.order[ranks]
        starts = np.r_[0, np.cumsum(self.sizes)[:-1]]
        part_of = np.searchsorted(np.cumsum(self.sizes), where, side="right")
        pieces, at, done = [], np.empty(len(ranks), dtype=np.int64), 0
        for p in np.unique(part_of):
            mine = np.flatnonzero(part_of == p)
            pieces.append(_read(self.parts[p], LOCATION.names).cast(LOCATION).take(pa.array(where[mine] - starts[p])))
            at[mine] = np.arange(done, done + len(mine))
            done += len(mine)
        return pa.concat_tables(pieces).take(pa.array(at)) if pieces else LOCATION.empty_table()

    def signatures(self, ranks: np.ndarray, num_perm: int) -> np.ndarray:
        """The signature rows of the documents of these (sorted) ranks, one batch at a time."""
        where = self.order[ranks]
        out = np.empty((len(ranks), num_perm), dtype=np.uint32)
        start = 0
        for part in self.parts:
            for values in _batches(part, "signature"):
                mine = np.flatnonzero((where >= start) & (where < start + len(values)))
                if len(mine):
                    out[mine] = _fixed(values.take(pa.array(where[mine] - start)), 4 * num_perm, "signature").view("<u4")
                start += len(values)
        return out


def _keys(values: pa.Array) -> np.ndarray:
    return _fixed(values, 16, "text_key").view(">u8").astype(np.uint64)


def prepare(parts: Iterable[pa.Table | PartitionTable], ctx: StageContext) -> _Ranked:
    """The parts checked against the config's signature parameters, in rank order: what every band
    and the merge of a cluster group start from (made once where they run in one step)."""
    parts = list(parts)
    for part in parts:
        _checked(_read(part, ["params"]), params(ctx.cfg))
    return _Ranked(parts, ctx.cfg)


def band(parts: Iterable[pa.Table | PartitionTable], k: int, ctx: StageContext, ranked: _Ranked | None = None) -> pd.DataFrame:
    """Band k's share of the clustering over every signature partition given: its LSH candidate
    pairs, as ranks (a < b in rank), and which are near-duplicates (`ok`). `ranked`: the parts
    already prepared (the step's other bands share it)."""
    d = ctx.cfg.dedup
    ranked = ranked or prepare(parts, ctx)
    n_bands, rows = dedup.bands(d.threshold, d.num_perm)
    if not 0 <= k < n_bands:
        raise DedupError(f"{CLUSTERS}: band {k} of {n_bands} (dedup.threshold {d.threshold}, num_perm {d.num_perm})")
    if not d.near:  # exact duplicates alone need no band
        return pd.DataFrame({"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64), "ok": np.zeros(0, bool)})
    bucket = ranked.column("signature", lambda v: dedup.band_key(_fixed(v, 4 * d.num_perm, "signature").view("<u4"), k, rows))
    rank = np.arange(ranked.n)
    a, b, ok = dedup.band_step(bucket, ranked.keys, ranked.shingles, rank, lambda docs: ranked.signatures(docs, d.num_perm), d.threshold)
    return pd.DataFrame({"a": a, "b": b, "ok": ok})


def _band_rule(cfg: KunConfig) -> str:
    """What decides a band's pairs besides its documents: which pairs are near-duplicates."""
    d = cfg.dedup
    n_bands, rows = dedup.bands(d.threshold, d.num_perm)
    return f"near={d.near} threshold={d.threshold} bands={n_bands}x{rows}"


def band_pairs(parts: Iterable[pa.Table | PartitionTable], k: int, ctx: StageContext, ranked: _Ranked | None = None) -> StageResult:
    """Band k as a partition of its own (dedup.mode: band_steps): band()'s pairs, with the
    fingerprint of the documents they index and the rule they were found by (merge_bands checks
    both), and the band's figures."""
    t0, d = time.perf_counter(), ctx.cfg.dedup
    ranked = ranked or prepare(parts, ctx)
    pairs = band(parts, k, ctx, ranked)
    n_bands, rows = dedup.bands(d.threshold, d.num_perm)
    stats = {
        "band": k,
        "bands": n_bands,
        "rows_per_band": rows,
        "documents": ranked.n,
        "candidate_pairs": len(pairs),
        "near_pairs": int(pairs["ok"].sum()),
        "documents_fingerprint": ranked.fingerprint,
        "rule": _band_rule(ctx.cfg),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return StageResult(rows=pairs, dropped=quarantine_frame([]), stats=stats)


def merge_bands(
    parts: Iterable[pa.Table | PartitionTable], bands: Mapping[int, tuple[pd.DataFrame, dict | None]], ctx: StageContext
) -> StageResult:
    """The clusters from every band's published pairs (band_pairs: {band: (pairs, its stats)}),
    once each band is checked to be there, made from these documents (ranks index documents, so
    pairs made from other signatures, a shard re-signed since, would join other documents) and by
    this config's rule (a pair's `ok` is its Jaccard against dedup.threshold)."""
    t0, d = time.perf_counter(), ctx.cfg.dedup
    parts = list(parts)
    ranked = prepare(parts, ctx)
    n_bands, _ = dedup.bands(d.threshold, d.num_perm)
    missing = sorted(set(range(n_bands)) - set(bands))
    if missing:
        raise DedupError(f"{CLUSTERS}: {LSH_BANDS} bands {missing} of {n_bands} not given: materialize {LSH_BANDS} for this cluster group")
    rule = _band_rule(ctx.cfg)
    other = sorted(k for k, (_, stats) in bands.items() if (stats or {}).get("rule") != rule)
    if other:
        raise DedupError(
            f"{CLUSTERS}: {LSH_BANDS} bands {other} were made under another rule than kun.yaml's ({rule}): "
            f"re-materialize {LSH_BANDS} for this cluster group, then {CLUSTERS}"
        )
    made = {k: (stats or {}).get("documents_fingerprint") for k, (_, stats) in bands.items()}
    stale = sorted(k for k, fp in made.items() if fp != ranked.fingerprint)
    if stale:
        raise DedupError(
            f"{CLUSTERS}: {LSH_BANDS} bands {stale} were made from other signatures than the {ranked.n} documents there are now "
            f"(a shard re-signed since): re-materialize {LSH_BANDS} for this cluster group, then {CLUSTERS}"
        )
    result = merge(parts, [bands[k][0] for k in range(n_bands)], ctx, ranked)
    result.stats["seconds"] = round(time.perf_counter() - t0, 2)
    result.stats["mode"] = "band_steps"
    return result


def merge(
    parts: Iterable[pa.Table | PartitionTable], bands: Iterable[pd.DataFrame], ctx: StageContext, ranked: _Ranked | None = None
) -> StageResult:
    """The clusters cluster() makes, from every band's pairs (band()) and the partitions' keys."""
    cfg = ctx.cfg
    t0, d = time.perf_counter(), cfg.dedup
    ranked = ranked or prepare(parts, ctx)
    ranked.__dict__.pop("shingles", None)  # the bands' (and the fingerprint's): the merge needs only the keys
    n = ranked.n
    if not n:
        return StageResult(rows=pd.DataFrame(columns=INDEXES[CLUSTERS].names), dropped=quarantine_frame([]), stats=_stats(0, None, t0))
    keys = ranked.keys
    rank = np.arange(n)
    pairs = [b for b in bands if len(b)]
    a, b, ok = (
        np.concatenate([p[c].to_numpy() for p in pairs]) if pairs else np.zeros(0, t)
        for c, t in (("a", np.int64), ("b", np.int64), ("ok", bool))
    )
    exact = dedup.exact_edges(keys, rank) if d.exact or d.near else None
    sim = lambda i, j: dedup.rows_jaccard(lambda docs: ranked.signatures(docs, d.num_perm), i, j)  # noqa: E731
    found = dedup.merge(n, keys, rank, exact, (a, b, ok), dedup.bands(d.threshold, d.num_perm), sim)
    members = np.flatnonzero(np.bincount(found.keeper, minlength=n)[found.keeper] > 1)
    loc = ranked.locations(members)  # the members' only
    compact = dedup.Clusters(np.searchsorted(members, found.keeper[members]), found.reason[members], found.jaccard[members], 0, found.bands)
    return StageResult(rows=dedup.frame(loc, members, compact), dropped=quarantine_frame([]), stats=_stats(n, found, t0))


def clusters(parts: Iterable[pa.Table | PartitionTable], ctx: StageContext) -> StageResult:
    """A cluster group's clusters, by dedup.mode: in one step (cluster(): the group's signatures in
    one matrix, ~0.9 KB a document at its peak), or band by band and then merged (band() for each
    band, merge(): the same clusters, each phase ~0.26 KB a document, about 4x the CPU;
    bench/README.md). auto: banded past dedup.one_step_max_docs documents. (band_steps: each band
    is a partition of its own, band_pairs, and merge_bands the clusters step.)"""
    parts, d = list(parts), ctx.cfg.dedup
    n = sum(p.num_rows for p in parts)
    banded = d.mode == "banded" or (d.mode == "auto" and n > d.one_step_max_docs)
    if banded:
        t0, ranked = time.perf_counter(), prepare(parts, ctx)  # checked and ranked once for every band
        n_bands, _ = dedup.bands(d.threshold, d.num_perm)
        pairs = [band(parts, k, ctx, ranked) for k in range(n_bands)]  # one band's bucket at a time
        result = merge(parts, pairs, ctx, ranked)
        result.stats["seconds"] = round(time.perf_counter() - t0, 2)
    else:
        result = cluster(parts, ctx)
    result.stats["mode"] = "banded" if banded else "one_step"
    return result


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
