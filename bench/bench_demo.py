"""Where `kun demo`'s minutes go: the demo from an empty store and DAGSTER_HOME, in a copy of the
repository (so the checkout's own .kun/ is untouched), timed as a user sees it (wall), with the
CLI's own per-step lines, each trained model's steps and seconds (its kun_model.json), and what
the demo shows of the method: the share of scored rows the chat model answered in 【好】/【差】
(score_rule probability) and the records per source.

    .venv/bin/python bench/bench_demo.py --out bench/results/demo_cpu.json
    .venv/bin/python bench/bench_demo.py --full --out bench/results/demo_full_cpu.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds

REPO = Path(__file__).resolve().parents[1]
COPY = ["kun.yaml", "dagster.yaml", "workspace.yaml", "demo"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true", help="kun demo --full: two rounds and the evaluation")
    p.add_argument("--out")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kun-demo-"))
    for name in COPY:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, work / name)
    kun = Path(sys.executable).parent / "kun"
    argv = [str(kun), "demo", "--progress", "off", *(["--full"] if a.full else [])]
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"kun demo failed ({done.returncode}):\n{done.stderr[-4000:]}")
    steps = [{"step": m.group(1), "seconds": int(m.group(2))} for m in re.finditer(r"^  (.+): done in (\d+)s$", done.stdout, re.MULTILINE)]
    data = work / ".kun" / "data"
    models = {}
    for card in sorted((data / "models").glob("*/kun_model.json")):
        c = json.loads(card.read_text())
        models[card.parent.name] = {
            "seconds": c["seconds"],
            "steps": c["loss_curve"][-1][0] if c.get("loss_curve") else None,
            "examples": c["examples"],
            "final_loss": c["loss_curve"][-1][1] if c.get("loss_curve") else None,
        }
    scored = ds.dataset(data / "scored_pairs", partitioning="hive").to_table(columns=["score_rule", "answer_mass"]).to_pandas()
    records = {s.name.split("=", 1)[1]: ds.dataset(s).count_rows() for s in sorted((data / "instruction_dataset").glob("source=*"))}
    result = {
        "command": " ".join(["kun", *argv[1:]]),
        "wall_seconds": round(wall, 1),
        "steps": steps,
        "models": models,
        "scored_rows": len(scored),
        "scored_by_probability": int((scored["score_rule"] == "probability").sum()),
        "answer_mass_median": round(float(scored["answer_mass"].median()), 3),
        "records": records,
    }
    print(json.dumps(result, ensure_ascii=False, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
