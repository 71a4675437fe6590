"""What resumable fine-tuning costs: the same SFT with a Trainer checkpoint every `save_steps`
optimizer steps (model, optimizer, scheduler and RNG states) against none.

    .venv/bin/kun demo     # the tiny base under .kun/data/models/base
    .venv/bin/python bench/bench_training.py --save-steps 0 50 10 --out bench/results/training_resume_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from kun_dagster import training
from kun_dagster.config import TrainSettings

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default=str(REPO / ".kun" / "data" / "models" / "base"))
    p.add_argument("--save-steps", type=int, nargs="+", default=[0, 50, 10])
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--out")
    a = p.parse_args()
    seeds, _ = training.load_seeds(str(REPO / "demo" / "seed" / "coig_cqia_seed.jsonl"), None, True)
    examples = training.chat_examples(seeds)
    results = []
    for every in a.save_steps:
        settings = TrainSettings(epochs=a.epochs, learning_rate=2e-3, batch_size=8, max_length=512, save_steps=every)
        work = Path(tempfile.mkdtemp())
        t0 = time.perf_counter()
        report = training.fine_tune(a.base, work / "chat", examples, settings, "chat")
        seconds = time.perf_counter() - t0
        weights = sum(f.stat().st_size for f in (work / "chat").glob("*.safetensors"))
        results.append(
            {
                "save_steps": every,
                "seconds": round(seconds, 2),
                "examples": len(examples),
                "epochs": a.epochs,
                "last_logged_step": report.loss_curve[-1][0] if report.loss_curve else None,
                "weights_mib": round(weights / 2**20, 2),
            }
        )
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
