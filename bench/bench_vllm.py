"""vLLM engine benchmark: labeling throughput (bench/README.md has the results).

On the same labeling prompts, output tokens/s of
  (a) a bare vllm.LLM.generate call,
  (b) our VLLMEngine.generate,
  (c) the labeled_pairs materialization (Dagster step: read deduped_corpus, label, write Parquet
      and quarantine), with and without the engine's start-up,
  (d) the transformers engine.
Scoring is bench_scoring.py's.

Needs the models of a materialized config (run `kun demo` first, or pass --config with model paths).
    python bench/bench_vllm.py --docs 512 --out bench/results/vllm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from kun_dagster import prompts, stages, storage  # noqa: E402
from kun_dagster.config import load_config  # noqa: E402
from kun_dagster.llm import SamplingParams, load_engine  # noqa: E402
from kun_dagster.llm.base import EngineSpec  # noqa: E402
from kun_dagster.store import upath


def workload(cfg, n: int) -> pd.DataFrame:
    """n filtered_corpus rows: the demo's real rows, cycled with a numbered head so no two prompts
    are equal (a repeated prompt would be served whole from vLLM's prefix cache)."""
    base = upath(cfg.base_uri)
    frames = [storage.read_partition(d) for d in sorted((base / "filtered_corpus").glob("source=*/shard=*"))]
    if not frames:
        sys.exit(f"no filtered_corpus under {base}: run `kun demo` (or materialize filtered_corpus) first")
    rows = pd.concat(frames, ignore_index=True)
    out = pd.concat([rows] * (n // len(rows) + 1), ignore_index=True).iloc[:n].copy()
    copy = out.index // len(rows)
    out["text"] = [f"（{c}）{t}" if c else t for c, t in zip(copy, out["text"])]
    out["doc_id"] = [f"{d}#{c}" for d, c in zip(out["doc_id"], copy)]
    return out.reset_index(drop=True)


def refs(cfg) -> dict:
    d = upath(cfg.base_uri) / "models" / "refs"
    try:
        return {r: json.loads((d / f"{r}_model.json").read_text()) for r in ("label", "chat")}
    except FileNotFoundError:
        sys.exit(f"no model references under {d}: run `kun demo` (or materialize the model assets) first")


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def engine_args(cfg, role: str) -> dict:
    return getattr(cfg.models, role).vllm.model_dump(exclude_none=True)


def bare_vllm(path: str, vllm_settings: dict, dtype: str, prompt_texts: list[str], params: SamplingParams) -> tuple[int, float, float]:
    """(a): vllm.LLM built the way our engine builds it, and one generate call on prompt strings."""
    import vllm

    from kun_dagster.llm.vllm_engine import VLLMEngine

    spec = EngineSpec.of(path, "bare", backend="vllm", dtype=dtype, vllm=vllm_settings)
    engine, start = timed(lambda: VLLMEngine(spec))  # same engine arguments; only the generate call differs
    llm = engine.llm
    sp = vllm.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
        max_tokens=params.max_tokens,
        stop=list(params.stop),
        stop_token_ids=engine.eos_ids,
    )
    outs, seconds = timed(lambda: llm.generate(prompt_texts, sp, use_tqdm=False))
    # counted as our engine counts: generated tokens without the closing EOS
    tokens = sum(len(o.outputs[0].token_ids) - (o.outputs[0].token_ids[-1:] in ([e] for e in engine.eos_ids)) for o in outs)
    engine.close()
    return tokens, seconds, start


def labeling_base(cfg_file: Path, cfg, docs: pd.DataFrame, label_ref: dict, prefix: str) -> Path:
    """A scratch folder for the labeled_pairs step alone: its kun.yaml (cfg_file's, the label model
    on vLLM, storage under data/), one deduped_corpus partition holding `docs` (the first source's
    shard 0) and the label model's reference."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    raw = yaml.safe_load(cfg_file.read_text())
    raw["storage"] = {"base_uri": str(tmp / "data")}
    for s in raw["sources"]:
        s["uri"] = cfg.resolve(s["uri"])
    raw["seed"]["uri"] = cfg.resolve(raw["seed"]["uri"])
    raw["models"]["label"]["backend"] = "vllm"
    (tmp / "kun.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    source = cfg.sources[0].name
    base = upath(str(tmp / "data"))
    storage.write_partition(
        storage.partition_dir(base, "deduped_corpus", {"source": source, "shard": "0"}), docs.assign(source=source, shard=0)
    )
    (tmp / "data/models/refs").mkdir(parents=True)
    (tmp / "data/models/refs/label_model.json").write_text(json.dumps(label_ref))
    return tmp


def materialize_labeled_pairs(cfg_file: Path, cfg, docs: pd.DataFrame, label_ref: dict) -> dict:
    """(c): the labeled_pairs step over one partition holding the workload, in a scratch base."""
    import dagster as dg

    import resources.llm as llm_resource
    from kun_dagster.definitions import build_definitions

    tmp = labeling_base(cfg_file, cfg, docs, label_ref, "kun-bench-")
    bench_cfg, source = tmp / "kun.yaml", cfg.sources[0].name

    starts, closes, produced, generating = [], [], [], []
    real_load = llm_resource.load_engine

    def load_and_time(spec):  # the engine's start-up (reported apart) and every token it generates
        engine, seconds = timed(lambda: real_load(spec))
        starts.append(seconds)
        generate = engine.generate

        def counting(prompt_texts, params):
            gens, seconds = timed(lambda: generate(prompt_texts, params))
            produced.append(sum(g.num_tokens for g in gens))
            generating.append(seconds)
            return gens

        close = engine.close
        engine.generate = counting
        engine.close = lambda: closes.append(timed(close)[1])
        return engine

    llm_resource.load_engine = load_and_time
    try:
        defs = build_definitions(bench_cfg)
        key = dg.MultiPartitionKey({"source": source, "source_shard": "0"})
        result, seconds = timed(
            lambda: dg.materialize(
                list(defs.assets),
                selection=["labeled_pairs"],
                partition_key=key,
                resources=defs.resources,
                instance=dg.DagsterInstance.ephemeral(),
                raise_on_error=True,
            )
        )
    finally:
        llm_resource.load_engine = real_load
    labeled = storage.partition_rows(storage.partition_dir(upath(str(tmp / "data")), "labeled_pairs", {"source": source, "shard": "0"}))
    return {
        "ok": result.success,
        "seconds": seconds,
        "engine_start_s": sum(starts),
        "engine_close_s": sum(closes),
        "rows": labeled,
        "output_tokens": sum(produced),
        "generate_s": sum(generating),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="kun.yaml")
    ap.add_argument("--docs", type=int, default=512, help="labeling prompts (the demo's filtered rows, cycled)")
    ap.add_argument("--max-tokens", type=int, default=None, help="labeling max_tokens (default: the config's)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: hf,materialize")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    cfg_file = Path(args.config).resolve()
    cfg = load_config(cfg_file)
    models = refs(cfg)
    docs = workload(cfg, args.docs)
    params = stages.sampling_params(cfg)
    if args.max_tokens:
        params = SamplingParams(**{**params.__dict__, "max_tokens": args.max_tokens})
    label_vllm = engine_args(cfg, "label")
    res: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "docs": len(docs),
        "sampling": params.__dict__,
        "vllm_settings": label_vllm,
        "dtype": args.dtype,
    }

    def report(name, tokens, seconds, **extra):
        res[name] = {"output_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1), **extra}
        print(f"{name:<34} {tokens:>7} tokens {seconds:8.2f} s {tokens / seconds:9.1f} tok/s", {k: v for k, v in extra.items()}, flush=True)

    label_spec = dict(path=models["label"]["path"], model_name=models["label"]["name"], dtype=args.dtype)
    hf = None
    if "hf" not in skip:  # first: vLLM's in-process CPU worker pins torch's thread count for the rest of the process
        hf, start = timed(lambda: load_engine(EngineSpec.of(**label_spec, backend="transformers", batch_size=cfg.models.label.batch_size)))
        tok = hf.tokenizer
        texts = [prompts.render(tok, prompts.label_user(t)) for t in docs["text"]]
        gens, seconds = timed(lambda: hf.generate(texts, params))
        report("d_transformers_engine", sum(g.num_tokens for g in gens), seconds, start_s=round(start, 2))
        hf.close()

    vl, start = timed(lambda: load_engine(EngineSpec.of(**label_spec, backend="vllm", vllm=label_vllm)))
    texts = [prompts.render(vl.tokenizer, prompts.label_user(t)) for t in docs["text"]]
    gens, seconds = timed(lambda: vl.generate(texts, params))
    report("b_our_vllm_engine", sum(g.num_tokens for g in gens), seconds, start_s=round(start, 2))
    vl.close()

    tokens, seconds, start = bare_vllm(label_spec["path"], label_vllm, args.dtype, texts, params)
    report("a_bare_vllm_generate", tokens, seconds, start_s=round(start, 2))

    if "materialize" not in skip:
        m = materialize_labeled_pairs(cfg_file, cfg, docs, models["label"])
        # Like (a) and (b), without the engine's start-up and shutdown (reported apart)
        report(
            "c_labeled_pairs_materialization",
            m["output_tokens"],
            m["seconds"] - m["engine_start_s"] - m["engine_close_s"],
            whole_step_s=round(m["seconds"], 2),
            engine_start_s=round(m["engine_start_s"], 2),
            engine_close_s=round(m["engine_close_s"], 2),
            rows_published=m["rows"],
            generate_s=round(m["generate_s"], 2),
            tokens_per_s_with_start=round(m["output_tokens"] / m["seconds"], 1),
        )
        res["c_over_a"] = round(res["c_labeled_pairs_materialization"]["tokens_per_s"] / res["a_bare_vllm_generate"]["tokens_per_s"], 3)
        print(f"(c)/(a) = {res['c_over_a']}  (target >= 0.9)")
    res["b_over_a"] = round(res["b_our_vllm_engine"]["tokens_per_s"] / res["a_bare_vllm_generate"]["tokens_per_s"], 3)
    print(f"(b)/(a) = {res['b_over_a']}")
    if "hf" not in skip:
        res["b_over_d"] = round(res["b_our_vllm_engine"]["tokens_per_s"] / res["d_transformers_engine"]["tokens_per_s"], 3)
        print(f"(b)/(d) = {res['b_over_d']}")

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
