"""The probability paths on real vocabularies: what the fast path reads against the exact one.

For each vocabulary (Qwen's real BPE from its published ranks, a SentencePiece model with a dummy
prefix trained here, and Qwen's with 【好 merged into one token) and each question the project
asks by probability (Kun's 【好】/【差】, Humpback's 得分：1-5, a tag's letters, the judge's 1/2),
on a tiny random model of that vocabulary:
  - whether the fast path is taken (Answers.fast: each first differing token stands for its answer);
  - the largest gap between what the fast path reads and log P(opening + first differing token)
    computed by hand from encode(prompt + answer): the fast path's own correctness;
  - fast against exact (every answer token): the largest gap in log-probability, and how many of
    the rows' decisions (the most likely answer) differ. Random weights leave the answers' tails
    (】 after 【好) far from certain, so the values differ; a trained model writes them at ~1.

    python bench/bench_vocab.py --rows 64 --backends transformers vllm --out bench/results/vocab_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from kun_dagster import prompts, scoring  # noqa: E402
from kun_dagster.evaluation import JUDGE_CHOICES, judge_user  # noqa: E402
from kun_dagster.llm import load_engine  # noqa: E402
from kun_dagster.llm.base import Answers, EngineSpec, encode  # noqa: E402
from kun_dagster.tagging import letters  # noqa: E402
from tests import vocab  # noqa: E402
from tests.demo_texts import texts  # noqa: E402


def asks(tok, instructions: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """question -> (prompts, answers), as the stages render them."""
    return {
        "kun": prompts.choice_prompts(tok, [prompts.point_user(s) for s in instructions], scoring.KUN.choices),
        "humpback": prompts.choice_prompts(tok, [prompts.humpback_user(s, "答案。") for s in instructions], scoring.HUMPBACK.choices),
        "tag (26 letters)": prompts.choice_prompts(
            tok, [prompts.tag_user("domain", s, "答。", [f"领域{i}" for i in range(26)]) for s in instructions], letters(26)
        ),
        "judge": prompts.choice_prompts(tok, [judge_user(s, "一", "二") for s in instructions], JUDGE_CHOICES),
    }


def by_hand(engine, prompt: str, answer: str, tokens: int) -> float:
    """log P(the answer's first `tokens` tokens | prompt), over encode(prompt + answer), by one
    forward pass of the transformers model."""
    import torch

    head, whole = encode(engine.tokenizer, [prompt, prompt + answer], special=False)
    ids = whole[len(head) :][:tokens]
    with torch.inference_mode():
        logits = engine.model(torch.tensor([head + ids]), logits_to_keep=len(ids) + 1).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return float(sum(logp[i, t].item() for i, t in enumerate(ids)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--backends", nargs="+", default=["transformers"], choices=["transformers", "vllm"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    instructions = [t.split("。")[0][:40] + "？" for t in texts()][: args.rows]
    merged = vocab.qwen()
    merged.add_tokens(["【好"])
    vocabs = {
        "qwen": (vocab.qwen(), "qwen2"),
        "qwen+【好": (merged, "qwen2"),
        "sentencepiece": (vocab.sentencepiece(), "llama"),
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (tok, kind) in vocabs.items():
            path = vocab.tiny_model(tok, Path(tmp) / name.replace("+", "_"), kind=kind)
            for backend in args.backends:
                engine = load_engine(EngineSpec.of(str(path), name, backend=backend, dtype="float32"))
                hf = engine if backend == "transformers" else None
                for question, (ps, answers) in asks(engine.tokenizer, instructions).items():
                    a = Answers.after(engine.tokenizer, ps[0], answers)
                    fast, exact = engine.choice_logprobs(ps, answers), engine.choice_logprobs(ps, answers, exact=True)
                    row = {
                        "vocabulary": name,
                        "backend": backend,
                        "question": question,
                        "rows": len(ps),
                        "fast_path_taken": bool(a.fast),
                        "max_abs_logprob_fast_vs_exact": round(float(np.abs(fast - exact).max()), 4),
                        "decisions_differ": int((fast.argmax(axis=1) != exact.argmax(axis=1)).sum()),
                    }
                    if hf is not None and a.fast:  # what the fast path reads, by hand, on 8 rows
                        hand = np.array([[by_hand(hf, p, c, len(a.common) + 1) for c in answers] for p in ps[:8]])
                        row["max_abs_logprob_fast_vs_by_hand"] = round(float(np.abs(fast[:8] - hand).max()), 5)
                    results.append(row)
                    print(json.dumps(row, ensure_ascii=False), flush=True)
                engine.close()
    out = {"machine": platform.platform(), "cpus": os.cpu_count(), "results": results}
    if args.out:
        args.out.write_text(json.dumps(out, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()
