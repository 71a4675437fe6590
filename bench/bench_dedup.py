"""Source-wide dedup: MinHash libraries compared, then the chosen path at 100k and 1M documents.

Documents are Chinese text made from the demo paragraphs' sentences (6-12 sentences each, about
300-500 characters, so unrelated documents share some sentences, as templated web pages do), with
10% planted near-duplicates (one sentence replaced or added) and 5% exact copies (spacing changed).

  compare: on --docs documents, signatures by datasketch (MinHash.bulk over UTF-8 shingles, its
           sha1 hashing), rensa (RMinHash over str shingles) and ours (numpy shingle hashes, rensa's
           digest matrix); then candidate search by datasketch MinHashLSH, rensa RMinHashLSH and ours
           (numpy banding, verified, union-find). Reports docs/s, seconds, and the recall of the
           planted near-duplicates each finds.
  scale:   the stages as the assets run them: stages.sign streaming --docs documents into 8 shard
           files (Parquet, like minhash_signatures), then stages.cluster over all of them, each
           phase in its own process for its peak RSS.
  banded:  on the same signatures, the dedup.mode: band_steps path: stages.band_pairs once per LSH
           band (lsh_band_pairs' step) and stages.merge_bands (duplicate_clusters' under band_steps),
           each in its own process (peak RSS), against stages.cluster in one step: same rows? Then
           dedup.mode: banded, every band and the merge in one process.
  assets:  on the same signatures, the band_steps path through Dagster as users run it: each
           lsh_band_pairs partition materialized in a process of its own, then duplicate_clusters
           over every shard (the merge); each process's peak RSS, Dagster's own included.

  .venv/bin/python bench/bench_dedup.py compare --docs 20000 --out bench/results/dedup_compare.json
  .venv/bin/python bench/bench_dedup.py scale --docs 100000 1000000 --out bench/results/dedup_scale.json
  .venv/bin/python bench/bench_dedup.py banded --docs 1000000 --out bench/results/dedup_banded.json
  .venv/bin/python bench/bench_dedup.py assets --docs 1000000 --out bench/results/dedup_band_steps.json
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "demo"))

from kun_dagster import dedup, stages, storage  # noqa: E402
from kun_dagster.config import parse_config  # noqa: E402
from kun_dagster.registry import SIGNATURES  # noqa: E402
from kun_dagster.schemas import INDEXES  # noqa: E402
from kun_dagster.stages import StageContext, deduped  # noqa: E402
from kun_dagster.store import upath  # noqa: E402

CFG = parse_config({"sources": [{"name": "web", "uri": "x", "format": "jsonl"}], "seed": {"uri": "s"}}, env={})
SHARDS = 8


def sentences() -> list[str]:
    import paragraphs_a
    import paragraphs_b
    import paragraphs_c

    texts = []
    for mod in (paragraphs_a, paragraphs_b, paragraphs_c):
        for name in dir(mod):
            for item in getattr(mod, name) if isinstance(getattr(mod, name), list) else []:
                texts += [x for x in (item if isinstance(item, (list, tuple)) else [item]) if isinstance(x, str)]
    out = [s + "。" for t in texts for s in t.split("。") if len(s) >= 8]
    return sorted(set(out))


def make_docs(n: int, seed: int, pool: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """n documents; returns the texts and the planted near-duplicate pairs (original, copy)."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(len(pool), size=rng.integers(6, 13), replace=False) for _ in range(n)]
    texts = ["".join(pool[i] for i in p) for p in picks]
    planted = []
    for i in range(0, n, 20):  # 1 in 20: an exact copy with changed spacing, 2 in 20: a near-duplicate
        if i + 2 >= n:
            break
        texts[i + 1] = " ".join(texts[i][k : k + 40] for k in range(0, len(texts[i]), 40))
        p = list(picks[i])
        p[rng.integers(len(p))] = rng.integers(len(pool))  # one sentence replaced, or one added
        if rng.random() < 0.5:
            p.append(rng.integers(len(pool)))
        texts[i + 2] = "".join(pool[j] for j in p)
        planted.append((i, i + 2))
    return texts, planted


def _rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _shingle_lists(texts: list[str], n: int) -> list[list[str]]:
    out = []
    for t in texts:
        norm = dedup.normalise(t)
        out.append([norm[i : i + n] for i in range(max(len(norm) - n + 1, 1))])
    return out


def compare(n: int) -> dict:
    import datasketch
    import rensa

    d = CFG.dedup
    texts, planted = make_docs(n, 0, sentences())
    res = {"docs": n, "mean_chars": round(float(np.mean([len(t) for t in texts])), 1), "num_perm": d.num_perm, "ngram": d.ngram}
    t0 = time.perf_counter()
    grams = _shingle_lists(texts, d.ngram)
    res["python_shingling_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    ds = datasketch.MinHash.bulk([[g.encode("utf-8") for g in gs] for gs in grams], num_perm=d.num_perm, seed=d.seed)
    res["datasketch_sig_docs_per_s"] = round(n / (time.perf_counter() - t0 + res["python_shingling_s"]))
    t0 = time.perf_counter()
    rm = rensa.RMinHash.digest_matrix_from_token_sets(grams, d.num_perm, d.seed)
    rm_rows = np.array(rm.to_rows(), dtype=np.uint32)
    res["rensa_str_sig_docs_per_s"] = round(n / (time.perf_counter() - t0 + res["python_shingling_s"]))
    t0 = time.perf_counter()
    sig, count = dedup.signatures(texts, d.ngram, d.num_perm, d.seed)
    res["ours_sig_docs_per_s"] = round(n / (time.perf_counter() - t0))

    # Each estimator against the true Jaccard of the planted pairs' shingle sets
    def true_j(a, b):
        x, y = set(grams[a]), set(grams[b])
        return len(x & y) / len(x | y)

    truth = np.array([true_j(a, b) for a, b in planted])
    res["planted_true_jaccard"] = {"min": round(truth.min(), 3), "mean": round(truth.mean(), 3), "max": round(truth.max(), 3)}
    for name, est in (
        ("datasketch", [ds[a].jaccard(ds[b]) for a, b in planted]),
        ("rensa_str", [(rm_rows[a] == rm_rows[b]).mean() for a, b in planted]),
        ("ours", [(sig[a] == sig[b]).mean() for a, b in planted]),
    ):
        res[f"{name}_jaccard_mean_abs_error"] = round(float(np.mean(np.abs(np.array(est) - truth))), 4)
    above = [(a, b) for (a, b), j in zip(planted, truth, strict=True) if j >= d.threshold]
    res["planted_above_threshold"] = len(above)

    # Candidate search. datasketch: its own (b, r) for the threshold; rensa: bands must divide num_perm
    t0 = time.perf_counter()
    lsh = datasketch.MinHashLSH(threshold=d.threshold, num_perm=d.num_perm)
    with lsh.insertion_session() as s:
        for i, m in enumerate(ds):
            s.insert(i, m)
    found = sum(b in lsh.query(ds[a]) for a, b in above)
    res["datasketch_lsh"] = {
        "seconds": round(time.perf_counter() - t0, 2),
        "bands_rows": [lsh.b, lsh.r],
        "recall": round(found / len(above), 4),
    }
    b, r = dedup.bands(d.threshold, d.num_perm)
    for bands in (16, 32):
        t0 = time.perf_counter()
        rl = rensa.RMinHashLSH(d.threshold, d.num_perm, bands)
        mhs = rensa.RMinHash.from_token_sets(grams, d.num_perm, d.seed)
        rl.insert_many(mhs, 0)
        cands = rl.query_all(mhs)
        found = sum(b_ in set(cands[a]) for a, b_ in above)
        res[f"rensa_lsh_{bands}_bands"] = {
            "seconds": round(time.perf_counter() - t0, 2),
            "candidates": int(sum(len(c) - 1 for c in cands) // 2),
            "recall_unverified": round(found / len(above), 4),
        }
    t0 = time.perf_counter()
    keys = dedup.text_keys(texts)
    c = dedup.cluster(sig, keys, count, np.arange(n), exact=True, near=True, threshold=d.threshold)
    found = sum(c.keeper[b_] == c.keeper[a] for a, b_ in above)
    hit = np.array([c.keeper[b_] == c.keeper[a] for a, b_ in planted])
    bins = [(0.0, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 1.01)]
    res["ours_found_by_true_jaccard"] = {
        f"{lo}-{min(hi, 1.0)}": f"{int(hit[(truth >= lo) & (truth < hi)].sum())}/{int(((truth >= lo) & (truth < hi)).sum())}"
        for lo, hi in bins
    }
    res["ours_cluster"] = {
        "seconds": round(time.perf_counter() - t0, 2),
        "bands_rows": list(c.bands),
        "candidates": c.candidates,
        "recall": round(found / len(above), 4),
        "dropped": pd.Series(c.reason).value_counts().to_dict(),
    }
    return res


def _sign_phase(n: int, out: Path) -> dict:
    """stages.sign over SHARDS shards of n / SHARDS documents each, streamed in batch_rows batches
    into Parquet as minhash_signatures writes them; document generation is timed apart."""
    pool, batch, gen = sentences(), CFG.storage.batch_rows, [0.0]

    def batches(shard: int, count: int):
        for start in range(0, count, batch):
            g0 = time.perf_counter()
            texts, _ = make_docs(min(batch, count - start), shard * n + start, pool)
            rows = np.arange(start, start + len(texts))
            df = pd.DataFrame(
                {"doc_id": [f"{shard}-{r}" for r in rows], "source": "web", "shard": shard, "file": f"{shard}.jsonl", "row": rows}
            )
            df["text"] = texts
            gen[0] += time.perf_counter() - g0
            yield df

    t0 = time.perf_counter()
    for k in range(SHARDS):
        sink = storage.ParquetSink(upath(str(out / f"source=web/shard={k}")) / storage.PART_NAME, INDEXES[SIGNATURES])
        stages.sign(batches(k, n // SHARDS), StageContext(CFG, sink=sink))
    seconds = time.perf_counter() - t0 - gen[0]
    size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    return {
        "docs": n,
        "sign_seconds": round(seconds, 1),
        "docs_per_s": round(n / seconds),
        "bytes_per_doc": round(size / n, 1),
        "peak_rss_mib": _rss_mib(),
    }


def _tables(out: Path) -> list:
    """The signature partitions, as the clustering asset gets them."""
    return [storage.PartitionTable(upath(str(d))) for d in sorted((out / "source=web").iterdir())]


def _cluster_phase(out: Path, keep: bool = False) -> dict:
    t0 = time.perf_counter()
    tables = _tables(out)
    read = time.perf_counter() - t0
    result = stages.cluster(tables, StageContext(CFG))
    if keep:  # for the banded path's merge to compare with
        result.rows.to_parquet(out / "one_step.parquet")
    st = result.stats
    return {
        "read_seconds": round(read, 1),
        "cluster_seconds": st["seconds"],
        "clusters": st["clusters"],
        "largest_cluster": st["largest_cluster"],
        "duplicates": st["duplicates"],
        "candidate_pairs": st["candidate_pairs"],
        "peak_rss_mib": _rss_mib(),
    }


def _band_phase(out: Path, k: int) -> dict:
    """One band's step (stages.band_pairs, as lsh_band_pairs runs it) over every shard, its pairs
    and stats written for the merge."""
    t0 = time.perf_counter()
    result = deduped.band_pairs(_tables(out), k, StageContext(CFG))
    seconds = time.perf_counter() - t0
    (out / "bands").mkdir(exist_ok=True)
    result.rows.to_parquet(out / "bands" / f"{k}.parquet")
    (out / "bands" / f"{k}.json").write_text(json.dumps(result.stats))
    return {"band": k, "seconds": round(seconds, 2), "pairs": len(result.rows), "peak_rss_mib": _rss_mib()}


def _banded_step_phase(out: Path) -> dict:
    """duplicate_clusters' step under dedup.mode: banded (stages.clusters): every band, then the
    merge, in this one process."""
    cfg = CFG.model_copy(update={"dedup": CFG.dedup.model_copy(update={"mode": "banded"})})
    result = deduped.clusters(_tables(out), StageContext(cfg))
    one = pd.read_parquet(out / "one_step.parquet")
    return {
        "seconds": result.stats["seconds"],
        "peak_rss_mib": _rss_mib(),
        "same_rows_as_one_step": bool(one.equals(result.rows.reset_index(drop=True))),
    }


def _merge_phase(out: Path) -> dict:
    t0 = time.perf_counter()
    bands = {int(f.stem): (pd.read_parquet(f), json.loads(f.with_suffix(".json").read_text())) for f in (out / "bands").glob("*.parquet")}
    result = deduped.merge_bands(_tables(out), bands, StageContext(CFG))  # as duplicate_clusters runs it under band_steps
    seconds = time.perf_counter() - t0
    one = pd.read_parquet(out / "one_step.parquet")
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": _rss_mib(),
        "same_rows_as_one_step": bool(one.equals(result.rows.reset_index(drop=True))),
        "rows": len(result.rows),
    }


def _kun_yaml(out: Path) -> Path:
    """A kun.yaml whose minhash_signatures are the bench's (web, SHARDS shards), under band_steps."""
    base = out / "kun"
    if not base.exists():
        base.mkdir()
        (base / SIGNATURES).symlink_to(out, target_is_directory=True)  # {base}/minhash_signatures/source=web/shard=k
    cfg = {
        "sources": [{"name": "web", "uri": str(out / "none" / "*.jsonl"), "format": "jsonl"}],
        "seed": {"uri": str(out / "seed.jsonl")},
        "shards": SHARDS,
        "storage": {"base_uri": str(base)},
        "dedup": {"mode": "band_steps"},
    }
    path = out / "kun.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _vm_rss_mib() -> float:
    return round(int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024, 1)


def _asset_phase(out: Path, asset: str, band: int | None) -> dict:
    """One materialization as Dagster runs it (in this process): one band of lsh_band_pairs, or
    duplicate_clusters over every shard."""
    import dagster as dg

    from kun_dagster.dagster_private import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
    from kun_dagster.definitions import build_definitions

    defs = build_definitions(_kun_yaml(out))
    keys = [f"web|{band}"] if band is not None else [f"web|{k}" for k in range(SHARDS)]
    baseline = _vm_rss_mib()  # Dagster, the code location and its imports
    t0 = time.perf_counter()
    result = dg.materialize(
        list(defs.assets),
        selection=[asset],
        resources=defs.resources,
        instance=dg.DagsterInstance.ephemeral(),
        tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
    )
    got = {
        "asset": asset,
        "band": band,
        "seconds": round(time.perf_counter() - t0, 2),
        "baseline_rss_mib": baseline,
        "peak_rss_mib": _rss_mib(),
    }
    assert result.success
    if band is None:
        base = out / "kun" / "duplicate_clusters" / "source=web"
        rows = pd.concat([storage.read_partition(upath(str(d))) for d in sorted(base.iterdir())], ignore_index=True)
        one = pd.read_parquet(out / "one_step.parquet")
        by = ["file", "row"]
        same = rows.sort_values(by).reset_index(drop=True)[one.columns].astype(one.dtypes.to_dict())
        got["same_rows_as_one_step"] = bool(same.equals(one.sort_values(by).reset_index(drop=True)))
        got["rows"] = len(rows)
    return got


def _phase(mode: str, n: int, tmp: str, *extra: str) -> dict:
    """One phase in a process of its own: its peak RSS is its own."""
    cmd = [sys.executable, __file__, mode, "--docs", str(n), "--dir", tmp, *extra]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def _band_path(n: int, band: str, merge: str, also: str | None = None) -> dict:
    """The signatures and the one step, then each band's phase and the merge's on them, each in a
    process of its own (peak RSS each); `also`: one more phase on the same signatures."""
    with tempfile.TemporaryDirectory() as tmp:
        sign = _phase("_sign", n, tmp)
        one = _phase("_cluster", n, tmp, "--keep")
        n_bands, _ = dedup.bands(CFG.dedup.threshold, CFG.dedup.num_perm)
        steps = [_phase(band, n, tmp, "--band", str(k)) for k in range(n_bands)]
        merged = _phase(merge, n, tmp)
        extra = {"banded_in_one_process": _phase(also, n, tmp)} if also else {}
    out = {
        "docs": n,
        "sign": sign,
        "one_step": one,
        "bands": n_bands,
        "band_step_seconds": {"max": max(s["seconds"] for s in steps), "sum": round(sum(s["seconds"] for s in steps), 1)},
        "band_step_peak_rss_mib": {"max": max(s["peak_rss_mib"] for s in steps), "min": min(s["peak_rss_mib"] for s in steps)},
        "merge": merged,
        **extra,
    }
    if "pairs" in steps[0]:
        out["band_pairs"] = sum(s["pairs"] for s in steps)
    if "baseline_rss_mib" in steps[0]:
        out["dagster_baseline_rss_mib"] = max(s["baseline_rss_mib"] for s in steps)
    return out


def banded(n: int) -> dict:
    """The banded path against the one-step one on the same signatures: each band's step and the
    merge in processes of their own, whether the clusters are the same, then banded in one process."""
    return _band_path(n, "_band", "_merge", "_banded_step")


def assets(n: int) -> dict:
    """The band_steps path through Dagster: every band a materialization in its own process, then the
    clusters (the merge); peak RSS per step, against the one step on the same signatures."""
    return _band_path(n, "_asset", "_asset")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "mode", choices=["compare", "scale", "banded", "assets", "_sign", "_cluster", "_band", "_merge", "_banded_step", "_asset"]
    )
    ap.add_argument("--band", type=int)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--docs", type=int, nargs="+", default=[20000])
    ap.add_argument("--dir")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.mode == "_sign":
        print(json.dumps(_sign_phase(a.docs[0], Path(a.dir))))
        return
    if a.mode == "_cluster":
        print(json.dumps(_cluster_phase(Path(a.dir), a.keep)))
        return
    if a.mode == "_band":
        print(json.dumps(_band_phase(Path(a.dir), a.band)))
        return
    if a.mode == "_merge":
        print(json.dumps(_merge_phase(Path(a.dir))))
        return
    if a.mode == "_banded_step":
        print(json.dumps(_banded_step_phase(Path(a.dir))))
        return
    if a.mode == "_asset":
        print(json.dumps(_asset_phase(Path(a.dir), "lsh_band_pairs" if a.band is not None else "duplicate_clusters", a.band)))
        return
    if a.mode == "compare":
        results = compare(a.docs[0])
    elif a.mode == "banded":
        results = [banded(n) for n in a.docs]
    elif a.mode == "assets":
        results = [assets(n) for n in a.docs]
    else:
        results = []
        for n in a.docs:
            with tempfile.TemporaryDirectory() as tmp:
                sign = _phase("_sign", n, tmp)
                results.append({**{f"sign_{k}" if k == "peak_rss_mib" else k: v for k, v in sign.items()}, **_phase("_cluster", n, tmp)})
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps(results, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
