"""The id index of a source with id_field (corpus.id_index, issue 32 point 1): its peak memory and
time over N documents, 10% of them carrying an id another one has.

The index finds the ids more than one document carries (ingest keeps the first copy, quarantines
the rest as duplicate_id). Run it with PYTHONPATH at a checkout to measure that code:
    .venv/bin/python bench/bench_ids.py --docs 2000000 --out bench/results/ids.json
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE = """
import json, resource, sys, time
from kun_dagster import corpus
from kun_dagster.config import SourceConfig
src = SourceConfig(name="t", uri=sys.argv[1], format="jsonl", id_field="id")
fs, root, found = corpus._glob(src.uri, None)
list(corpus.documents(fs, next(iter(found)), "x", src))  # the imports and one file's read: the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
index = corpus.id_index(src, fs, root, found)
print(json.dumps({"seconds": round(time.perf_counter() - t, 1), "repeated_ids": len(index.kept_at),
                  "baseline_rss_mib": round(base), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def make(folder: Path, n: int, files: int = 20) -> None:
    rng, per = random.Random(1), n // files
    for f in range(files):
        with (folder / f"part-{f:02d}.jsonl").open("w") as out:
            for r in range(per):
                i = f * per + r
                doc_id = f"doc-{rng.randrange(n)}" if rng.random() < 0.1 else f"doc-{i:09d}-{'x' * 20}"
                out.write(json.dumps({"id": doc_id, "text": "短文"}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2_000_000)
    ap.add_argument("--out")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make(Path(tmp), a.docs)
        t = time.perf_counter()
        got = subprocess.run([sys.executable, "-c", MEASURE, f"{tmp}/*.jsonl"], capture_output=True, text=True, check=True)
        res = {"docs": a.docs, **json.loads(got.stdout), "wall_s": round(time.perf_counter() - t, 1)}
    res["index_bytes_per_doc"] = round((res["peak_rss_mib"] - res["baseline_rss_mib"]) * 2**20 / a.docs, 1)
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
