"""What per-request sampling seeds cost on vLLM (models.<role>.vllm.seed_per_request).

With one engine-level stream, a row's sample depends on the other rows of its batch, so a partition
resumed from its checkpoints samples differently from an uninterrupted one. Per-request seeds make
each row's sample its own; vLLM then samples each seeded request with its own generator. This times
the label model's VLLMEngine.generate on the same labeling prompts both ways (alternating, best of
--reps), and checks what the setting is for: split into two batches, the seeded run samples the
same rows, the stream does not.

    .venv/bin/kun demo                    # the tiny models and the filtered corpus it reads
    .venv/bin/python bench/bench_seeds.py --docs 512 --out bench/results/seeds_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_vllm import engine_args, refs, workload  # noqa: E402
from kun_dagster import prompts, stages  # noqa: E402
from kun_dagster.config import load_config  # noqa: E402
from kun_dagster.llm import load_engine  # noqa: E402
from kun_dagster.llm.base import EngineSpec  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="kun.yaml")
    ap.add_argument("--docs", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    cfg = load_config(args.config)
    label = refs(cfg)["label"]
    params = stages.sampling_params(cfg)
    if args.max_tokens:
        params = type(params)(**{**params.__dict__, "max_tokens": args.max_tokens})
    settings = engine_args(cfg, "label")
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "docs": args.docs, "sampling": params.__dict__, "runs": {}}
    texts = workload(cfg, args.docs)["text"].tolist()
    for per_request in (False, True):
        spec = EngineSpec.of(label["path"], label["name"], backend="vllm", vllm={**settings, "seed_per_request": per_request})
        engine = load_engine(spec)
        ps = [prompts.render(engine.tokenizer, prompts.label_user(t)) for t in texts]
        engine.generate(ps[:16], params)  # warm-up: compile, first allocation
        best, tokens = None, 0
        for _ in range(args.reps):
            t0 = time.perf_counter()
            gens = engine.generate(ps, params)
            seconds = time.perf_counter() - t0
            tokens = sum(g.num_tokens for g in gens)
            best = seconds if best is None else min(best, seconds)
        half = len(ps) // 2
        split = engine.generate(ps[:half], params) + engine.generate(ps[half:], params)
        whole = engine.generate(ps, params)
        same = sum(a.text == b.text for a, b in zip(split, whole))
        name = "per_request" if per_request else "engine_stream"
        res["runs"][name] = {
            "output_tokens": tokens,
            "seconds": round(best, 3),
            "tokens_per_s": round(tokens / best, 1),
            "rows_equal_when_split": f"{same}/{len(ps)}",
        }
        print(name, res["runs"][name], flush=True)
        engine.close()
    a, b = res["runs"]["engine_stream"], res["runs"]["per_request"]
    res["per_request_over_stream_tokens_per_s"] = round(b["tokens_per_s"] / a["tokens_per_s"], 3)
    print(f"per-request seeds: {res['per_request_over_stream_tokens_per_s']}x the engine stream's tokens/s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
