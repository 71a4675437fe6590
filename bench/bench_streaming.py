"""raw_corpus + filtered_corpus on one large shard: peak RSS and documents/s, through Dagster.

    .venv/bin/python bench/bench_streaming.py --docs 10000 100000 --out bench/results/streaming.json

A synthetic JSONL source (Chinese paragraphs from the demo, varied so that texts differ, 1 in 50
an exact duplicate, 1 in 200 a bad row), one shard, models given by path (a tiny Qwen2 with no
pre-training: the tokenizer is what filtered_corpus needs). Perplexity is off: it is engine-bound
and measured by bench_vllm.py; this measures the corpus path itself. Each size runs in a fresh
process (the model assets in one, the two corpus assets in another) and reports that process's
peak RSS (ru_maxrss) and each asset's step time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUN = """
import json, resource, sys, time
import dagster as dg
from kun_dagster.definitions import build_definitions
defs = build_definitions(sys.argv[1])
instance = dg.DagsterInstance.ephemeral()
t0 = time.time()
result = dg.materialize(list(defs.assets), selection=sys.argv[2].split(","), resources=defs.resources, instance=instance,
                        partition_key=sys.argv[3] if len(sys.argv) > 3 else None)
steps = {e.step_key: e.event_specific_data.duration_ms / 1000 for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
print(json.dumps({"success": result.success, "seconds": round(time.time() - t0, 2), "steps": steps,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def _paragraphs() -> list[str]:
    sys.path.insert(0, str(REPO / "demo"))
    from paragraphs_a import WUDAO
    from paragraphs_b import WANJUAN
    from paragraphs_c import SKYPILE

    def text(p):
        return p[1] if isinstance(p, tuple) else p["text"] if isinstance(p, dict) else p

    return [text(p) for p in WUDAO + WANJUAN + SKYPILE]


def write_corpus(path: Path, n: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    paras = _paragraphs()
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            if i % 200 == 199:
                f.write("{not json\n")
                continue
            if i % 50 == 49:
                body = paras[i % len(paras)]  # an exact duplicate of a base paragraph
            else:
                a, b = rng.sample(paras, 2)
                body = f"{a[: rng.randint(40, len(a))]}（第{i}篇）{b[: rng.randint(40, len(b))]}"
            f.write(json.dumps({"id": f"d{i}", "text": body}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def _run(args: list[str], code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}  # which checkout's kun_dagster, assets and resources run
    out = subprocess.run([sys.executable, "-c", RUN, *args], cwd=code, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"run failed: {out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--code", type=Path, default=REPO, help="the checkout to run (e.g. a git worktree of an older commit)")
    ap.add_argument("--set", action="append", default=[], help="extra config key=value (YAML), e.g. filter.dedup=false")
    args = ap.parse_args()

    from kun_dagster.config import TinyBaseSettings
    from kun_dagster.training import build_tiny_base

    tmp = Path(tempfile.mkdtemp(prefix="kun-bench-stream-"))
    model = build_tiny_base(_paragraphs(), tmp / "model", TinyBaseSettings(pretrain_epochs=0)).path
    results = []
    for n in args.docs:
        work = tmp / f"n{n}"
        (work / "src").mkdir(parents=True)
        size = write_corpus(work / "src" / "docs.jsonl", n)
        cfg = yaml.safe_load((REPO / "kun.yaml").read_text())
        cfg.update(sources=[{"name": "web", "uri": str(work / "src" / "*.jsonl"), "format": "jsonl", "id_field": "id"}], shards=1)
        cfg["seed"]["uri"] = str(REPO / cfg["seed"]["uri"])
        cfg["storage"] = {"base_uri": str(work / "data")}
        cfg["filter"]["perplexity_max"] = None
        for role in ("base", "label", "chat"):
            cfg["models"][role]["path"] = model
        for item in args.set:
            key, value = item.split("=", 1)
            node = cfg
            *path, last = key.split(".")
            for p in path:
                node = node.setdefault(p, {})
            node[last] = yaml.safe_load(value)
        (work / "kun.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
        _run([str(work / "kun.yaml"), "seed_data,base_model,label_model,chat_model"], args.code)
        got = _run([str(work / "kun.yaml"), "raw_corpus,filtered_corpus", "web|0"], args.code)
        assert got["success"], got
        raw, filtered = got["steps"]["raw_corpus"], got["steps"]["filtered_corpus"]
        row = {
            "docs": n,
            "source_mib": round(size / 2**20, 1),
            "peak_rss_mib": got["peak_rss_mib"],
            "raw_corpus_s": round(raw, 2),
            "filtered_corpus_s": round(filtered, 2),
            "raw_docs_per_s": round(n / raw),
            "filtered_docs_per_s": round(n / filtered),
            "run_s": got["seconds"],
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    if len(results) >= 2:
        print(
            f"peak RSS {results[-1]['docs']} / {results[0]['docs']} docs: {results[-1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.2f}x"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "machine": "2 vCPU, no GPU",
                    "time": time.strftime("%Y-%m-%d"),
                    "args": sys.argv[1:],
                    "code": subprocess.run(
                        ["git", "-C", str(args.code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
                    ).stdout.strip(),
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
