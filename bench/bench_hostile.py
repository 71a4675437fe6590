"""A corpus nobody wrote, with hostile records: what `kun run` keeps, what it quarantines, and its
peak memory, with and without a gzip that expands to one huge line; and whether a credential
planted in the config reaches any file under the data folder or DAGSTER_HOME.

The corpus: a.jsonl of 15 good lines, one line nested 100,000 deep and one with a 5,000-digit
number; bomb.jsonl.gz (~0.7 MB) holding a good line, one line of `--bomb-mb` MB, a good line.
The models are given (a finished `kun demo`'s .kun/data/models), so the run is the corpus graph.

    .venv/bin/kun demo            # once, for the models
    .venv/bin/python bench/bench_hostile.py --models .kun/data/models --out bench/results/hostile_cpu.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds
import yaml

REPO = Path(__file__).resolve().parents[1]
SECRET = "PLANTED-bench-secret-5b1d"


def good(i: int, tag: str = "g") -> bytes:
    text = f"  这是第{i}段正常的中文文本，讲述天气与城市的故事，长度适中，可以被标注。" * 3
    return json.dumps({"id": f"{tag}{i}", "text": text}, ensure_ascii=False).encode()


def corpus(src: Path, bomb_mb: int) -> None:
    src.mkdir(parents=True)
    lines = [good(i) for i in range(5)] + [b'{"id": "nested", "text": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"]
    lines += [good(i) for i in range(5, 10)] + [
        b'{"id": "digits", "text": "\xe5\xa4\xa7\xe6\x95\xb0\xe5\xad\x97\xe7\x9a\x84\xe8\xae\xb0\xe5\xbd\x95\xe3\x80\x82", "n": '
        + b"9" * 5000
        + b"}"
    ]
    lines += [good(i) for i in range(10, 15)]
    (src / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    if bomb_mb:
        with gzip.open(src / "bomb.jsonl.gz", "wb", compresslevel=9) as f:
            f.write(good(1, "bomb-good-") + b'\n{"id": "bomb", "text": "')
            for _ in range(bomb_mb):
                f.write(b"a" * 2**20)
            f.write(b'"}\n' + good(2, "bomb-good-") + b"\n")


def run(work: Path, models: Path, bomb_mb: int) -> dict:
    corpus(work / "src", bomb_mb)
    cfg = yaml.safe_load((REPO / "kun.yaml").read_text())
    cfg["sources"] = [{"name": "web", "uri": str(work / "src" / "*"), "format": "jsonl", "id_field": "id"}]
    cfg["seed"]["uri"] = str(REPO / cfg["seed"]["uri"])
    cfg["shards"] = 1
    cfg["storage"] = {"base_uri": str(work / "data"), "storage_options": {"token": SECRET}}
    cfg["filter"]["perplexity_max"] = 1e5
    for role in ("base", "label", "chat"):
        cfg["models"][role]["path"] = str(models / role)
    (work / "kun.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    env = {**os.environ, "DAGSTER_HOME": str(work / "home")}
    kun = Path(sys.executable).parent / "kun"
    t0 = time.perf_counter()
    done = subprocess.run(
        [str(kun), "run", "--config", str(work / "kun.yaml"), "--progress", "off"], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # MiB, the largest child so far
    raw = ds.dataset(str(work / "data" / "raw_corpus"), partitioning="hive").to_table().to_pandas()
    q = ds.dataset(str(work / "data" / "quarantine" / "raw_corpus"), partitioning="hive").to_table().to_pandas()
    files = [p for root in (work / "data", work / "home") for p in root.rglob("*") if p.is_file()]
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    return {
        "bomb_mb": bomb_mb,
        "rc": done.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak),
        "documents": len(raw),
        "quarantined": q[["file", "row", "reason"]].to_dict(orient="records"),
        "lines_in": 17 + (3 if bomb_mb else 0),
        "files_searched_for_the_secret": len(files),
        "files_holding_the_secret": leaks,
        "stderr_tail": done.stderr[-500:] if done.returncode else "",
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True, help="a finished kun demo's models folder (base, label, chat)")
    p.add_argument("--bomb-mb", type=int, default=700)
    p.add_argument("--out")
    a = p.parse_args()
    models = Path(a.models).resolve()
    # the run without the bomb first: RUSAGE_CHILDREN's peak only grows, so the second figure is max(both)
    out = {"runs": [run(Path(tempfile.mkdtemp(prefix="kun-hostile-")), models, mb) for mb in (0, a.bomb_mb)]}
    out["bomb_adds_mib"] = out["runs"][1]["peak_rss_mib"] - out["runs"][0]["peak_rss_mib"]
    print(json.dumps(out, indent=2, ensure_ascii=False))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
