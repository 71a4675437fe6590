"""Scoring benchmark: the default kun_choice against Kun's own free-text rule, on the same
instructions and the same engine (bench/README.md has the results).

Runs the scored_pairs stage (stages.score, no Dagster around it) over the label model's real
instructions with:
  - kun_choice: answer probabilities in one decode step per shared-opening token, free text only
    for rows under score.min_answer_mass (the default);
  - kun_choice with score.decision sampled: the verdict one reply drawn from the same
    probabilities would give (Kun's rule in distribution);
  - kun_choice with score.exact: every answer token summed from prompt logprobs;
  - kun_freetext at Kun's max_tokens (1024): generate, then parse.
and reports seconds, the ratio, the fallback count, both keep rates and where the probability
decision and the free-text decision differ on the same rows.

Needs a materialized config (run `kun demo` first, or pass --config with model paths):
    python bench/bench_scoring.py --out bench/results/scoring_cpu.json
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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kun_dagster import scoring, stages, storage  # noqa: E402
from kun_dagster.config import ScoreConfig, load_config  # noqa: E402
from kun_dagster.llm import load_engine  # noqa: E402
from kun_dagster.llm.base import EngineSpec  # noqa: E402
from kun_dagster.stages import StageContext  # noqa: E402
from kun_dagster.store import upath


def instructions(cfg, n: int | None) -> pd.DataFrame:
    """labeled_pairs rows as published (the label model's instructions, raw as the scorer reads
    them), cycled to n rows; each copy after the first ends with its number, so no two prompts are
    equal (a repeated prompt would be served whole from vLLM's prefix cache)."""
    base = upath(cfg.base_uri)
    frames = [storage.read_partition(d) for d in sorted((base / "labeled_pairs").glob("source=*/shard=*"))]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if rows.empty:
        sys.exit(f"no labeled_pairs under {base}: run `kun demo` first")
    rows = rows.drop_duplicates("instruction")
    n = n or len(rows)
    out = pd.concat([rows] * (n // len(rows) + 1), ignore_index=True).iloc[:n].copy()
    copy = out.index // len(rows)
    out["instruction"] = [f"{s}（{c}）" if c else s for c, s in zip(copy, out["instruction"])]
    out["doc_id"] = [f"{d}#{c}" for d, c in zip(out["doc_id"], copy)]
    return out.reset_index(drop=True)


def expected_agreement(rows: pd.DataFrame, temperature: float) -> float:
    """The share of rows where one sampled reply at `temperature` would make the decision the
    probabilities make, if the reply were one of the two answers: max(q, 1 - q) per row, q being
    P(【好】) among the two answers sharpened by the temperature (top_p and the repetition penalty
    left out). What the observed agreement should come near if the number means Kun's rule."""
    q = scoring.tempered(rows[["p_good", "p_bad"]].to_numpy(), temperature)[:, 0]
    return float(np.mean(np.maximum(q, 1 - q)))


def with_score(cfg, **score):
    """cfg with score keys changed, validated (the threshold takes the method's default when None)."""
    return cfg.model_copy(update={"score": ScoreConfig.model_validate({**cfg.score.model_dump(), **score})})


def reset_cache(engine) -> None:
    llm = getattr(engine, "llm", None)
    if llm is not None and not llm.reset_prefix_cache():
        sys.exit("vLLM would not reset its prefix cache")


def expected_keep(rows: pd.DataFrame, temperature: float) -> float:
    """The keep rate one sampled reply per row would give (same simplification as above)."""
    return float(np.mean(scoring.tempered(rows[["p_good", "p_bad"]].to_numpy(), temperature)[:, 0]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="kun.yaml")
    ap.add_argument("--rows", type=int, default=None, help="at most this many instructions (default: all)")
    ap.add_argument("--backend", default="vllm")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kun-max-tokens", type=int, default=1024)
    ap.add_argument("--engine-kwargs", default="{}", help='JSON, e.g. {"block_size": 32}')
    ap.add_argument("--repeat", type=int, default=3, help="runs of each method; the median is reported")
    ap.add_argument("--out")
    args = ap.parse_args()

    cfg = load_config(args.config)
    pairs = instructions(cfg, args.rows)
    ref = json.loads((upath(cfg.base_uri) / "models" / "refs" / "chat_model.json").read_text())
    vllm = {**cfg.models.chat.vllm.model_dump(exclude_none=True)}
    vllm["engine_kwargs"] = {**vllm.get("engine_kwargs", {}), **json.loads(args.engine_kwargs)}
    engine = load_engine(
        EngineSpec.of(ref["path"], ref["name"], backend=args.backend, dtype=args.dtype, batch_size=cfg.models.chat.batch_size, vllm=vllm)
    )
    free_cfg = with_score(
        cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"max_tokens": args.kun_max_tokens})}),
        method="kun_freetext",
        threshold=None,
    )
    choice_cfg = cfg.model_copy(update={"sampling": free_cfg.sampling})  # its fallback rows generate at Kun's max_tokens too
    stages.score(pairs.head(4), StageContext(choice_cfg, engine=engine))  # warm every path's kernels
    stages.score(pairs.head(4), StageContext(free_cfg, engine=engine))

    res = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "backend": engine.backend,
        "model": ref["name"],
        "rows": len(pairs),
        "kun_max_tokens": args.kun_max_tokens,
        "engine_kwargs": vllm["engine_kwargs"],
    }
    runs = {}
    methods = (
        ("kun_choice", choice_cfg),
        ("kun_choice_sampled", with_score(choice_cfg, decision="sampled")),
        ("kun_choice_exact", with_score(choice_cfg, exact=True)),
        ("kun_freetext", free_cfg),
    )
    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    for _ in range(args.repeat):  # interleaved, each from a cold prefix cache: no method reads another's KV
        for name, run_cfg in methods:
            reset_cache(engine)
            t = time.perf_counter()
            out = stages.score(pairs, StageContext(run_cfg, engine=engine))
            times[name].append(time.perf_counter() - t)
            runs[name] = (out, float(np.median(times[name])))
    for name, run_cfg in methods:
        out = runs[name][0]
        st = out.stats
        out.rows["keep"] = scoring.keep(out.rows["score"].to_numpy(dtype=float), run_cfg.score.threshold)  # as polish applies it
        res[name] = {
            "seconds": round(runs[name][1], 3),
            "runs_s": [round(x, 3) for x in times[name]],
            "kept": int(out.rows["keep"].sum()),
            "keep_rate": round(float(out.rows["keep"].mean()), 4) if len(out.rows) else None,
            "scored_by": st["scored_by"],
            "parse_failures": st["parse_failures"],
            "answer_mass": st["answer_mass"],
        }
        print(name, res[name])
    free_rows, choice_rows = runs["kun_freetext"][0].rows, runs["kun_choice"][0].rows
    res["speedup_choice_over_freetext"] = round(runs["kun_freetext"][1] / runs["kun_choice"][1], 2)
    res["speedup_exact_over_freetext"] = round(runs["kun_freetext"][1] / runs["kun_choice_exact"][1], 2)
    prob = choice_rows["score_rule"] == "probability"
    both = prob & free_rows["score"].notna()
    agree = choice_rows.loc[both, "keep"] == free_rows.loc[both, "keep"]
    res["agreement_on_probability_rows"] = {
        "rows": int(both.sum()),
        "agree": int(agree.sum()),
        "rate": round(float(agree.mean()), 4) if both.any() else None,
        "expected_under_sampling": round(expected_agreement(choice_rows[both], cfg.sampling.temperature), 4) if both.any() else None,
    }
    res["keep_rate_expected_under_sampling"] = round(expected_keep(choice_rows[prob], cfg.sampling.temperature), 4) if prob.any() else None
    sampled_rows = runs["kun_choice_sampled"][0].rows
    res["sampled_vs_freetext"] = {  # decision: sampled against Kun's own sampled replies, on the rows both decide
        "keep_rate_sampled": round(float(sampled_rows.loc[both, "keep"].mean()), 4) if both.any() else None,
        "keep_rate_freetext": round(float(free_rows.loc[both, "keep"].mean()), 4) if both.any() else None,
        "keep_rate_mode": round(float(choice_rows.loc[both, "keep"].mean()), 4) if both.any() else None,
    }
    exact_rows = runs["kun_choice_exact"][0].rows
    res["fast_vs_exact"] = {
        "max_abs_score_diff": round(float(np.nanmax(np.abs(exact_rows["score"] - choice_rows["score"]))), 6) if prob.any() else None,
        "keep_differs": int((exact_rows["keep"] != choice_rows["keep"]).sum()),
    }
    free_len = [len(r or "") for r in free_rows["score_reply"]]
    res["freetext_reply_chars"] = {"median": float(np.median(free_len)), "max": int(max(free_len))}
    print(
        json.dumps(
            {k: v for k, v in res.items() if not isinstance(v, dict) or k.startswith(("speed", "agree", "fast", "free", "sampled"))},
            ensure_ascii=False,
        )
    )
    engine.close()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
