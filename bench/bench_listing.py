"""Listing a source at scale (issue 32, point 1): what one observe_sources tick costs for a source
of N objects on a real S3 endpoint (moto's server on loopback), listed from the bucket (LIST, 1,000
keys a request) or read from an S3 Inventory report (manifest.json and its CSV.gz data file), with
and without ids (a source with `id_field` reads every file once per listing for its id index).

Each case runs `corpus.shard_versions` (what the sensor calls per source) in a fresh process with
its own $TMPDIR: a first tick (nothing known: every file read for the id index), a tick with
nothing changed (the index kept per source in the sensor's process), and, when the bucket is
listed, a tick after one object was added (a new listing: the id index reads that file alone,
the others' ids kept on local disk). Peak RSS is the process's.

    python bench/bench_listing.py --objects 100000 --out bench/results/listing_100k.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402

CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}

CASE = """
import json, resource, sys, time
from kun_dagster import corpus
from kun_dagster.config import SourceConfig
job = json.loads(sys.argv[1])
source = SourceConfig(name="web", uri=job["uri"], format="jsonl", id_field=job["id_field"])
options = {"client_kwargs": {"endpoint_url": job["endpoint"]}}
times = []
def tick():
    t = time.perf_counter()
    versions = corpus.shard_versions(source, source.uri, job["shards"], options, manifest=job["manifest"])
    times.append(round(time.perf_counter() - t, 2))
    return versions
before = tick()
tick()
out = {"first_s": times[0], "unchanged_s": times[1]}
if not job["manifest"]:  # one object added: a new listing, the id index reads that file alone
    import boto3
    boto3.client("s3", endpoint_url=job["endpoint"], region_name="us-east-1").put_object(
        Bucket="kun", Key=f"corpus/00/new-{job['id_field']}.jsonl", Body=b'{"id": "d1", "text": "new"}')
    after = tick()
    out["one_new_file_s"] = times[2]
    out["shards_changed"] = sum(before[k] != after[k] for k in before)
print(json.dumps({**out, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ.update(CREDS)
    import boto3

    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
                s3.create_bucket(Bucket="kun")
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        started = time.perf_counter()

        def put(i: int) -> None:
            key = f"corpus/{i % 100:02d}/f{i:07d}.jsonl"
            s3.put_object(
                Bucket="kun",
                Key=key,
                Body=json.dumps({"id": f"d{i % (args.objects - 100)}", "text": f"第{i}篇。"}, ensure_ascii=False).encode(),
            )

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(put, range(args.objects)))
        upload = time.perf_counter() - started
        rows = []  # the inventory AWS would write: CSV, gzipped, no header, keys URL-encoded
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="kun", Prefix="corpus/"):
            rows += [f"kun,{urllib.parse.quote_plus(o['Key'])},{o['Size']},{o['ETag'].strip(chr(34))}" for o in page["Contents"]]
        s3.put_object(Bucket="kun", Key="inventory/data/part-0.csv.gz", Body=gzip.compress("\n".join(rows).encode()))
        manifest = {
            "destinationBucket": "arn:aws:s3:::kun",
            "fileFormat": "CSV",
            "fileSchema": "Bucket, Key, Size, ETag",
            "files": [{"key": "inventory/data/part-0.csv.gz"}],
        }
        s3.put_object(Bucket="kun", Key="inventory/manifest.json", Body=json.dumps(manifest).encode())

        out = {
            "machine": f"{platform.machine()}, {os.cpu_count()} vCPU",
            "objects": args.objects,
            "shards": args.shards,
            "upload_s": round(upload, 1),
            "cases": {},
        }
        for listing in ("list", "inventory"):
            for ids in (None, "id"):
                job = {
                    "uri": "s3://kun/corpus/*/*.jsonl",
                    "endpoint": endpoint,
                    "shards": args.shards,
                    "id_field": ids,
                    "manifest": "s3://kun/inventory/manifest.json" if listing == "inventory" else None,
                }
                tmp = tempfile.mkdtemp(prefix="kun-bench-listing-")  # each case its own id cache: none starts warm
                env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": tmp}
                got = subprocess.run([sys.executable, "-c", CASE, json.dumps(job)], capture_output=True, text=True, env=env)
                shutil.rmtree(tmp, ignore_errors=True)
                if got.returncode:
                    sys.exit(got.stderr[-3000:])
                row = json.loads(got.stdout.strip().splitlines()[-1])
                out["cases"][f"{listing}, {'ids' if ids else 'no ids'}"] = row
                print(listing, ids, row, flush=True)
    finally:
        moto.terminate()
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
