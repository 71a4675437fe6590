"""What Dagster costs at many partitions: `kun run` over the demo corpora cut into N shards per
source (3 x N partitions, most of them empty), from nothing and then with nothing changed, on the
instance storage a deployment picks: SQLite (one machine) or PostgreSQL (a throwaway server of
Debian's postgresql with its default durability, as tests/postgres.py starts it). The models are
given (a `kun demo`'s), one round, no evaluation: what is measured is the graph's bookkeeping.

    .venv/bin/kun demo    # once: the models
    .venv/bin/python bench/bench_scale.py --shards 2 100 --storage sqlite postgres --out bench/results/scale.json
    .venv/bin/python bench/bench_scale.py --shards 1000 --storage sqlite --out bench/results/scale_1000.json

Per run: wall seconds, the CLI's "whole graph materialized in" seconds and its per-step lines,
and the event-log rows the instance holds after it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.postgres import Postgres, instance_yaml, wait_ready  # noqa: E402


def config(work: Path, shards: int, models: Path) -> Path:
    cfg = yaml.safe_load((REPO / "kun.yaml").read_text())
    for s in cfg["sources"]:
        s["uri"] = str(REPO / s["uri"])
    cfg["seed"]["uri"] = str(REPO / cfg["seed"]["uri"])
    cfg["storage"] = {"base_uri": str(work / "data")}
    cfg["shards"] = shards
    cfg["iterations"], cfg["evaluation"] = 1, {"enabled": False}
    for role in ("base", "label", "chat"):
        cfg["models"][role]["path"] = str(models / role)
        cfg["models"][role]["backend"] = "transformers"
    path = work / "kun.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def events(storage: str, home: Path, pg: Postgres | None, url: str | None) -> int:
    if storage == "postgres":
        import psycopg2

        with psycopg2.connect(pg.dsn(url.rsplit("/", 1)[1])) as conn, conn.cursor() as cur:
            cur.execute("select count(*) from event_logs")
            return cur.fetchone()[0]
    import sqlite3

    dbs = [p for p in (home / "history" / "runs").glob("*.db") if p.name != "index.db"]
    return sum(sqlite3.connect(p).execute("select count(*) from event_logs").fetchone()[0] for p in dbs)


def kun_run(cfg: Path, home: Path) -> dict:
    argv = [str(Path(sys.executable).parent / "kun"), "run", "--config", str(cfg), "--dagster-home", str(home), "--progress", "off"]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"kun run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    graph = re.search(r"whole graph materialized in (\d+)s", done.stdout)
    steps = [line.strip() for line in done.stdout.splitlines() if line.startswith("  ") and (": done in" in line or "up to date" in line)]
    return {"wall_seconds": round(wall, 1), "graph_seconds": int(graph.group(1)), "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=int, nargs="+", default=[2, 100])
    p.add_argument("--storage", nargs="+", default=["sqlite"], choices=["sqlite", "postgres"])
    p.add_argument("--models", type=Path, default=REPO / ".kun" / "data" / "models", help="a kun demo's models folder")
    p.add_argument("--out")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kun-scale-"))
    pg = None
    if "postgres" in a.storage:
        pg = Postgres(55400 + (int(time.time()) % 100), fast=False)
        wait_ready(pg)
    results = []
    try:
        for storage in a.storage:
            for shards in a.shards:
                work = root / f"{storage}-{shards}"
                work.mkdir()
                cfg = config(work, shards, a.models.resolve())
                url = pg.database() if storage == "postgres" else None
                instance_yaml(work / "dh", url)
                row = {"storage": storage, "shards": shards, "partitions": 3 * shards}
                row["from_nothing"] = kun_run(cfg, work / "dh")
                row["events_after_first"] = events(storage, work / "dh", pg, url)
                row["nothing_changed"] = kun_run(cfg, work / "dh")
                print(json.dumps(row), flush=True)
                results.append(row)
    finally:
        if pg is not None:
            pg.stop()
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
