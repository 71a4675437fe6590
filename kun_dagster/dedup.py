"""Exact and near-duplicate detection over a whole source (or every source): MinHash signatures per
partition, then one clustering over all of them.

Signatures: the text is normalised (NFKC, case-folded, whitespace, punctuation and control
characters removed), cut into character n-gram shingles (Chinese has no word boundaries, so
Data-Juicer and datatrove use character n-grams for it), the shingles hashed in numpy over a whole
batch at once, and the MinHash of each document's hashes computed by rensa (Rust; bench/README.md
compares it with datasketch). A 16-byte hash of the text up to whitespace (text.text_key, the key
filtered_corpus dedups a partition by) finds exact duplicates.

Clustering: candidates share one LSH band (bands and rows derived from the threshold, so that a
pair at the threshold is a candidate with probability >= 0.99); a candidate pair is a
near-duplicate when its estimated Jaccard (the share of equal signature values) reaches the
threshold. Exact duplicates and near-duplicates are merged by connected components (union-find);
each component keeps its first member in (source as listed, file, row) order and drops the rest,
so the result does not depend on the order shards or files are read in.
"""

from __future__ import annotations

import functools
import sys
import unicodedata
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import rensa

from .registry import DUPLICATE_TEXT, NEAR_DUPLICATE
from .text import text_key

ALGORITHM = f"rensa.RMinHash v{rensa.RMinHash.ALGORITHM_VERSION}"  # signatures of another algorithm do not compare
CANDIDATE_RECALL = 0.99  # P(a pair at the threshold shares a band): LSH finds candidates, the estimate decides
KEPT = "kept"  # a cluster member that stays; the others go as DUPLICATE_TEXT or NEAR_DUPLICATE

EVERY_SOURCE = "every source"  # the one cluster group under dedup.scope: all


def across_sources(cfg) -> bool:
    """dedup.scope, read here alone: are duplicates looked for across sources (all) or within each (source)?"""
    return cfg.dedup.scope == "all"


def cluster_group(cfg, source: str) -> str:
    """The group a source's documents are clustered in: the source itself, or every source."""
    return EVERY_SOURCE if across_sources(cfg) else source


def band_steps(cfg) -> bool:
    """dedup.mode: band_steps: each LSH band of a cluster group is a partition (lsh_band_pairs)."""
    return cfg.dedup.mode == "band_steps"


GROUP_ALL = "all"  # EVERY_SOURCE as a partition key of lsh_band_pairs (scope: all has no other group)


def group_key(group: str) -> str:
    """A cluster group's partition key (the source's name, or GROUP_ALL)."""
    return GROUP_ALL if group == EVERY_SOURCE else group


def group_keys(cfg) -> list[str]:
    """Every cluster group's partition key, in config order."""
    return [GROUP_ALL] if across_sources(cfg) else [s.name for s in cfg.sources]


def cluster_groups(cfg, sources: list[str]) -> dict[str, list[str]]:
    """The cluster groups the given sources fall in, each with every source it holds (config order):
    clustering a group needs the signatures of all of them."""
    groups = dict.fromkeys(cluster_group(cfg, s) for s in sources)
    return {g: [s.name for s in cfg.sources if cluster_group(cfg, s.name) == g] for g in groups}


_PRIME = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: the rolling polynomial of a shingle's characters
_CHUNK = 4096  # documents hashed at a time: bounds the shingle arrays to a few tens of MB


@functools.cache
def _dropped() -> np.ndarray:
    """Per code point: is it whitespace, punctuation, a control or format character (Unicode
    categories Z, P, C)? A repost that changes only spacing or punctuation is the same text."""
    drop = np.zeros(sys.maxunicode + 1, dtype=bool)
    drop[[cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] in "ZPC" or chr(cp).isspace()]] = True
    return drop


def _strip(text: str) -> str:
    drop = _dropped()
    return "".join(c for c in text if not drop[ord(c)])


def normalise(text: str) -> str:
    """The text shingles are cut from: the characters of _dropped() removed, NFKC (full-width
    letters and digits as ASCII, compatibility forms folded), case-folded, and removed again (a
    compatibility form may hold punctuation: ℅ is c/o)."""
    return _strip(unicodedata.normalize("NFKC", _strip(text)).casefold())


def _decode(codes: np.ndarray) -> list[str]:
    return codes.tobytes().decode("utf-32-le").split("\x00")


def _normalised_codes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the code points of every normalised text, concatenated; each text's length): `normalise`
    for a whole batch, the character drops in numpy. NUL separates the texts (it is never part
    of a normalised text). NFKC, which is slow, runs only on the texts it changes: after the
    drop, most Chinese text is already NFKC (its full-width punctuation, which is not, is gone)."""
    drop = _dropped()
    codes = np.frombuffer("\x00".join(t.replace("\x00", "") for t in texts).encode("utf-32-le"), dtype=np.uint32)
    stripped = _decode(codes[~drop[codes] | (codes == 0)])
    folded = "\x00".join(t if unicodedata.is_normalized("NFKC", t) else unicodedata.normalize("NFKC", t) for t in stripped).casefold()
    codes = np.frombuffer(folded.encode("utf-32-le"), dtype=np.uint32)
    doc = np.cumsum(codes == 0)
    keep = ~drop[codes]
    return codes[keep], np.bincount(doc[keep], minlength=len(texts)).astype(np.int64)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads a polynomial hash's bits over all 64."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def shingle_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(the 64-bit hashes of every document's character n-grams, one flat array; row offsets).
    A normalised text shorter than n is one shingle; an empty one has none. Vectorised: the
    polynomial hash of every window of the batch's characters in n numpy passes over contiguous
    slices, then the windows that stay inside one document are kept."""
    codes, lens = _normalised_codes(texts)
    total = len(codes)
    chars = np.concatenate([codes.astype(np.uint64), np.zeros(n, dtype=np.uint64)])
    h = np.zeros(total, dtype=np.uint64)
    for j in range(n):
        h = h * _PRIME + chars[j : j + total]
    ends = np.cumsum(lens)
    starts = ends - lens
    valid = np.arange(total) + n <= np.repeat(ends, lens)  # the window ends inside its document
    short = np.flatnonzero((lens > 0) & (lens < n))
    width = np.full(total, n, dtype=np.uint64)
    if len(short):  # one shingle of the whole text, hashed as a window padded with zeros
        pos, w = starts[short], lens[short]
        hs = np.zeros(len(short), dtype=np.uint64)
        for j in range(n):
            hs = hs * _PRIME + chars[np.minimum(pos + j, total)] * (j < w)
        h[pos], width[pos], valid[pos] = hs, w, True
    counts = np.where(lens >= n, lens - n + 1, (lens > 0).astype(np.int64))
    offsets = np.zeros(len(texts) + 1, dtype=np.uint64)
    np.cumsum(counts, out=offsets[1:])
    return _mix(h[valid] ^ width[valid]), offsets


def signatures(texts: list[str], ngram: int, num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(MinHash signatures, one row of num_perm uint32 per text; shingles per text). A text with
    no shingles (nothing but punctuation) has a meaningless signature: clustering skips it."""
    sigs, counts = [np.zeros((0, num_perm), dtype=np.uint32)], [np.zeros(0, dtype=np.int64)]
    for i in range(0, len(texts), _CHUNK):
        hashes, offsets = shingle_hashes(texts[i : i + _CHUNK], ngram)
        matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets, num_perm, seed)
        sigs.append(np.array(matrix.to_rows(), dtype=np.uint32).reshape(-1, num_perm))
        counts.append(np.diff(offsets).astype(np.int64))
    return np.concatenate(sigs), np.concatenate(counts)


def text_keys(texts: list[str]) -> np.ndarray:
    """text.text_key of each text as two uint64 columns (what `cluster` compares)."""
    return np.frombuffer(b"".join(text_key(t) for t in texts), dtype=">u8").reshape(-1, 2).astype(np.uint64)


def bands(threshold: float, num_perm: int, recall: float = CANDIDATE_RECALL) -> tuple[int, int]:
    """(bands, rows per band): the fewest bands (so the fewest spurious candidates) for which a
    pair of Jaccard `threshold` shares at least one band with probability >= recall."""
    for b in range(1, num_perm + 1):
        r = num_perm // b
        if 1 - (1 - threshold**r) ** b >= recall:
            return b, r
    return num_perm, 1


def jaccard(sig: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Estimated Jaccard of the pairs (a[i], b[i]): the share of equal MinHash values."""
    out = np.empty(len(a), dtype=np.float64)
    for i in range(0, len(a), chunk):
        out[i : i + chunk] = (sig[a[i : i + chunk]] == sig[b[i : i + chunk]]).mean(axis=1)
    return out


def _band_key(band: np.ndarray) -> np.ndarray:
    h = np.zeros(len(band), dtype=np.uint64)
    for col in band.T:
        h = _mix(h ^ col.astype(np.uint64))
    return h


def _star_edges(keys: list[np.ndarray], rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each group of equal keys (columns of `keys`, compared together), an edge from its
    first member by rank to every other member: union-find needs no more than this star."""
    order = np.lexsort((rank, *reversed(keys)))
    same = np.ones(len(order), dtype=bool)
    same[0:1] = False
    for k in keys:
        ks = k[order]
        same[1:] &= ks[1:] == ks[:-1]
    head = order[np.maximum.accumulate(np.where(same, 0, np.arange(len(order))))]
    return head[same], order[same]


def candidate_pairs(sig: np.ndarray, idx: np.ndarray, rank: np.ndarray, n_bands: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of the rows `idx` of `sig` sharing a band (star edges per bucket, each pair once),
    as positions in `idx`. One band's columns are copied at a time, never the matrix."""
    heads, members = [], []
    for k in range(n_bands):
        a, b = _star_edges([_band_key(sig[idx, k * rows : (k + 1) * rows])], rank[idx])
        heads.append(a)
        members.append(b)
    return unique_pairs(np.concatenate(heads), np.concatenate(members))


@dataclass
class Clusters:
    """One entry per document: the index of its component's keeper (itself where it is kept or
    alone), its reason when dropped (None when kept), its estimated Jaccard to the keeper."""

    keeper: np.ndarray
    reason: np.ndarray
    jaccard: np.ndarray
    candidates: int  # LSH candidate pairs verified
    bands: tuple[int, int]


def components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected components of the undirected graph on 0..n-1 with edges src[i]-dst[i]: each node's
    label is the smallest node of its component. Vectorized union-find: every root is hooked onto
    the smallest root it shares an edge with, then pointers jump (parent = parent[parent]) until
    every node points at its root; rounds repeat, over the edges still joining two roots, until
    none does (each round hooks at least one root, so it ends)."""
    parent = np.arange(n)
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    while len(src):
        a, b = parent[src], parent[dst]
        differ = a != b
        if not differ.any():
            break
        a, b = a[differ], b[differ]
        low = np.minimum(a, b)
        np.minimum.at(parent, a, low)  # a root only ever points at a smaller root: no cycle
        np.minimum.at(parent, b, low)
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
        src, dst = src[differ], dst[differ]
    return parent


def exact_edges(keys: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges between documents of equal text key, from each group's first by rank."""
    if not len(rank):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return _star_edges([keys[:, 0], keys[:, 1]], rank)


def lsh_alive(n: int, followers: np.ndarray, shingles: np.ndarray) -> np.ndarray:
    """Which documents go through LSH: one per exact text (its lowest rank; equal texts follow it),
    and none without a shingle."""
    alive = np.ones(n, dtype=bool)
    alive[followers] = False
    return alive & (shingles > 0)


def band_key(sig: np.ndarray, band: int, rows: int) -> np.ndarray:
    """Each document's bucket in one band: a 64-bit hash of that band's `rows` signature values."""
    return _band_key(sig[:, band * rows : (band + 1) * rows])


def band_candidates(band_key: np.ndarray, rank: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One band's candidate pairs among the alive documents (star edges per bucket), as document
    indices, the first of each pair the lower-ranked."""
    idx = np.flatnonzero(alive)
    if len(idx) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    a, b = _star_edges([band_key[idx]], rank[idx])
    return idx[a], idx[b]


def unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pair once (a pair may share several bands)."""
    if not len(a):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def rows_jaccard(signatures_of, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of the pairs (a[i], b[i]), reading only their documents' signatures:
    `signatures_of(docs)` gives the rows of the sorted document indices `docs`."""
    if not len(a):
        return np.zeros(0)
    docs = np.unique(np.r_[a, b])
    return jaccard(signatures_of(docs), np.searchsorted(docs, a), np.searchsorted(docs, b))


def band_step(band_key: np.ndarray, keys: np.ndarray, shingles: np.ndarray, rank: np.ndarray, signatures_of, threshold: float):
    """One band's share of the clustering, as a step of its own: its candidate pairs (a, b) and
    which are near-duplicates (estimated Jaccard >= threshold). It holds, per document, the band's
    bucket, the text key, the shingle count and the rank (40 bytes), and the signatures of its
    candidates only (`signatures_of`, rows_jaccard). merge() over every band's output gives what
    cluster() gives in one step."""
    _, followers = exact_edges(keys, rank)
    a, b = band_candidates(band_key, rank, lsh_alive(len(rank), followers, shingles))
    return a, b, rows_jaccard(signatures_of, a, b) >= threshold


def cluster(
    sig: np.ndarray,
    keys: np.ndarray,
    shingles: np.ndarray,
    rank: np.ndarray,
    *,
    exact: bool,
    near: bool,
    threshold: float,
) -> Clusters:
    """Connected components of exact duplicates (equal text keys) and near-duplicates (LSH
    candidates with estimated Jaccard >= threshold); each keeps its member of lowest rank. The
    whole signature matrix in one step; merge() is the same rule from per-band steps."""
    n = len(rank)
    b, r = bands(threshold, sig.shape[1])
    a, d = exact_edges(keys, rank)
    ca, cb = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if near:
        idx = np.flatnonzero(lsh_alive(n, d, shingles))
        if len(idx) > 1:
            pa_, pb_ = candidate_pairs(sig, idx, rank, b, r)
            ca, cb = idx[pa_], idx[pb_]
    ok = jaccard(sig, ca, cb) >= threshold
    return merge(n, keys, rank, (a, d) if exact or near else None, (ca, cb, ok), (b, r), lambda i, j: jaccard(sig, i, j))


def merge(
    n: int,
    keys: np.ndarray,
    rank: np.ndarray,
    exact_pairs: tuple[np.ndarray, np.ndarray] | None,
    candidates: tuple[np.ndarray, np.ndarray, np.ndarray],
    banding: tuple[int, int],
    similarity,
) -> Clusters:
    """Clusters from their edges: the exact pairs (None: exact duplicates are not looked for) and the
    LSH candidates (a, b, verified: estimated Jaccard >= threshold), from one step or from every
    band's (a pair met in several bands counts once). `similarity(i, j)` is the estimated Jaccard of
    documents i and j (for the dropped near-duplicates and their keepers only)."""
    ca, cb, ok = candidates
    src, dst = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    if exact_pairs is not None:  # equal texts are also near-duplicates (Jaccard 1); named duplicate_text below
        src.append(exact_pairs[0])
        dst.append(exact_pairs[1])
    src.append(ca[ok])
    dst.append(cb[ok])
    label = components(n, np.concatenate(src), np.concatenate(dst))
    first = np.lexsort((rank, label))  # by component, then rank: the first of each component keeps
    keeper_of = np.empty(n, dtype=np.int64)
    starts = np.r_[True, label[first][1:] != label[first][:-1]] if n else np.zeros(0, dtype=bool)
    keeper_of[first] = first[np.maximum.accumulate(np.where(starts, np.arange(n), 0))] if n else first
    same_text = (keys == keys[keeper_of]).all(axis=1) if n else np.zeros(0, dtype=bool)
    dropped = keeper_of != np.arange(n)
    reason = np.full(n, None, dtype=object)
    reason[dropped & same_text] = DUPLICATE_TEXT
    reason[dropped & ~same_text] = NEAR_DUPLICATE
    sim = np.ones(n)
    near_rows = np.flatnonzero(dropped & ~same_text)
    sim[near_rows] = similarity(near_rows, keeper_of[near_rows])
    return Clusters(keeper_of, reason, sim, len(unique_pairs(ca, cb)[0]), banding)


def sizes(keeper: np.ndarray) -> np.ndarray:
    """Members per cluster of more than one document, largest first."""
    counts = np.bincount(keeper, minlength=len(keeper))
    return np.sort(counts[counts > 1])[::-1]


def frame(locations: pa.Table, rank: np.ndarray, c: Clusters) -> pd.DataFrame:
    """The members of every cluster of more than one document: its rows (kept or dropped with a
    reason), the kept document's location and the estimated Jaccard to it. `locations` (one row per
    document: schemas.LOCATION) stays Arrow: only the members become Python rows."""
    members = np.flatnonzero(np.bincount(c.keeper, minlength=len(c.keeper))[c.keeper] > 1)
    kept = c.keeper[members]
    columns = locations.column_names
    out = locations.take(pa.array(members, type=pa.int64())).to_pandas()
    # clusters numbered by their keeper's rank, so the table is the same whatever the input order
    out.insert(0, "cluster", np.unique(rank[kept], return_inverse=True)[1].astype(np.int64))
    out["role"] = [x or KEPT for x in c.reason[members]]
    out["jaccard"] = c.jaccard[members].round(4)
    keeper = locations.take(pa.array(kept, type=pa.int64())).to_pandas()
    for col in columns:
        out[f"kept_{col}"] = keeper[col].to_numpy()
    return out.sort_values(["cluster", "role", "source", "file", "row"], key=_kept_first).reset_index(drop=True)


def _kept_first(col: pd.Series) -> pd.Series:
    return col.map({KEPT: 0, DUPLICATE_TEXT: 1, NEAR_DUPLICATE: 2}) if col.name == "role" else col


def keepers(
    texts: list[str], threshold: float, rank: np.ndarray | None = None, ngram: int = 5, num_perm: int = 128, seed: int = 1
) -> np.ndarray:
    """Each text's cluster keeper (its index): exact and near-duplicates (the corpus dedup's rule,
    estimated Jaccard of character `ngram`-grams >= threshold) share one, the member of lowest rank."""
    if not texts:
        return np.zeros(0, dtype=np.int64)
    sig, count = signatures(texts, ngram, num_perm, seed)
    rank = np.arange(len(texts)) if rank is None else np.asarray(rank)
    return cluster(sig, text_keys(texts), count, rank, exact=True, near=True, threshold=threshold).keeper


def containment(texts: list[str], references: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each text, the largest share of one reference's character n-grams (of the normalised
    text) that the text holds, and which reference (-1: none shares any): how much of a held-out
    answer a record carries, however it was reworded around it."""
    best, which = np.zeros(len(texts)), np.full(len(texts), -1, dtype=np.int64)
    if not texts or not references:
        return best, which
    ref_hashes, ref_offsets = shingle_hashes(references, n)
    sizes = np.diff(ref_offsets).astype(np.int64)
    owner = np.repeat(np.arange(len(references)), sizes)
    pairs = pd.DataFrame({"h": ref_hashes, "ref": owner}).drop_duplicates()
    distinct = pairs.groupby("ref").size().reindex(range(len(references)), fill_value=0).to_numpy()
    index = pairs.groupby("h")["ref"].apply(list).to_dict()
    for i in range(0, len(texts), _CHUNK):
        hashes, offsets = shingle_hashes(texts[i : i + _CHUNK], n)
        offsets = offsets.astype(np.int64)
        for j in range(len(offsets) - 1):
            shared: dict[int, int] = {}
            for h in set(hashes[offsets[j] : offsets[j + 1]].tolist()):
                for ref in index.get(h, ()):
                    shared[ref] = shared.get(ref, 0) + 1
            if shared:
                ref, k = max(shared.items(), key=lambda kv: (kv[1] / distinct[kv[0]], -kv[0]))
                best[i + j], which[i + j] = k / distinct[ref], ref
    return best, which


def diversity(texts: list[str], ngram: int, num_perm: int, threshold: float, seed: int = 1, top: int = 5) -> dict:
    """How varied a set of texts (a release's instructions) is: the share of distinct texts (up to
    whitespace), and the largest clusters of near-duplicates (the same rule as the corpus dedup)."""
    if not texts:
        return {"texts": 0, "distinct_ratio": None, "near_duplicate_clusters": 0, "largest": []}
    keys = text_keys(texts)
    members = np.bincount(keepers(texts, threshold, None, ngram, num_perm, seed), minlength=len(texts))
    biggest = [int(k) for k in np.argsort(-members, kind="stable")[:top] if members[k] > 1]
    return {
        "texts": len(texts),
        "distinct_ratio": round(len(np.unique(keys, axis=0)) / len(texts), 4),
        "near_duplicate_clusters": int((members > 1).sum()),
        "largest": [{"size": int(members[k]), "example": texts[k]} for k in biggest],
    }
