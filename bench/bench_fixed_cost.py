"""One run's fixed cost (issue 31, point 4): a single-partition `dagster asset materialize --select
labeled_pairs` as a whole process, against a bare vLLM process on the same prompts.

- bare: `python -c` that imports vllm, builds vllm.LLM with the arguments our engine gives it
  (llm.vllm_engine.llm_args), generates the partition's prompts (the same token ids and per-request
  seeds as labeled_pairs sends) in one call, and exits.
- dagster: the CLI on a scratch base holding one deduped_corpus partition of those documents and
  the label model's reference, a fresh SQLite instance, the config's label model on vLLM.
Both are timed from spawn to exit; the Dagster run is split by its event log's timestamps (run
start, step start, the engine's "loading" and "ready" lines, step success, run success, exit).

Needs a materialized config (`kun demo`, or pass --config):
    python bench/bench_fixed_cost.py --config kun.yaml --docs 2000 --out bench/results/fixed_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench.bench_vllm import labeling_base, workload  # noqa: E402
from kun_dagster import model_store, prompts, stages  # noqa: E402
from kun_dagster.config import load_config  # noqa: E402
from kun_dagster.llm.base import EngineSpec, encode, request_seed  # noqa: E402

BARE = """
import json, sys, time
t = {"spawned": float(sys.argv[2])}
job = json.load(open(sys.argv[1]))
import vllm
t["imported"] = time.time()
llm = vllm.LLM(**job["args"])
t["engine_ready"] = time.time()
base = vllm.SamplingParams(**job["sampling"])
params = []
for seed in job["seeds"]:
    one = base.clone()
    one.seed = seed
    params.append(one)
outs = llm.generate([vllm.TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params, use_tqdm=False)
t["generated"] = time.time()
t["output_tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
print("BARE " + json.dumps(t), flush=True)
"""


def prepare(cfg_file: Path, n: int) -> tuple[Path, dict]:
    """A scratch folder: kun.yaml (label model on vLLM, base under it), one deduped_corpus
    partition of n documents, the label model's reference, and the bare process's job."""
    cfg = load_config(cfg_file)
    docs = workload(cfg, n)
    label = str(Path(cfg.models_dir) / "label")
    tmp = labeling_base(cfg_file, cfg, docs, model_store.ref("label", label, label, "trained"), "kun-fixed-")
    source = cfg.sources[0].name

    from transformers import AutoTokenizer

    from kun_dagster.llm.vllm_engine import llm_args

    bench_cfg = load_config(tmp / "kun.yaml")
    params = stages.sampling_params(bench_cfg)
    tok = AutoTokenizer.from_pretrained(label)
    texts = [prompts.render(tok, prompts.label_user(t)) for t in docs["text"]]
    spec = EngineSpec(path=label, model_name="kun-label", settings=bench_cfg.models.label)
    job = {
        "args": llm_args(spec),
        "prompts": encode(tok, texts, special=False),
        "seeds": [request_seed(params.seed, p) for p in texts],
        "sampling": {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "repetition_penalty": params.repetition_penalty,
            "max_tokens": params.max_tokens,
            "stop": list(params.stop),
            "skip_special_tokens": False,
        },
    }
    (tmp / "bare.json").write_text(json.dumps(job))
    return tmp, {"source": source, "docs": len(docs), "prompt_tokens": sum(map(len, job["prompts"]))}


def run_bare(tmp: Path) -> dict:
    spawned = time.time()
    out = subprocess.run([sys.executable, "-c", BARE, str(tmp / "bare.json"), str(spawned)], capture_output=True, text=True, check=True)
    exited = time.time()
    t = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("BARE "))[5:])
    return {
        "whole_process_s": round(exited - spawned, 2),
        "import_vllm_s": round(t["imported"] - spawned, 2),
        "engine_start_s": round(t["engine_ready"] - t["imported"], 2),
        "generate_s": round(t["generated"] - t["engine_ready"], 2),
        "exit_s": round(exited - t["generated"], 2),
        "output_tokens": t["output_tokens"],
    }


def run_dagster(tmp: Path, source: str) -> dict:
    import dagster as dg

    home = tmp / f"home-{time.time_ns()}"
    home.mkdir()
    (home / "dagster.yaml").write_text((Path(__file__).resolve().parents[1] / "dagster.yaml").read_text())
    env = {**os.environ, "KUN_CONFIG": str(tmp / "kun.yaml"), "DAGSTER_HOME": str(home)}
    argv = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "kun_dagster.definitions"]
    argv += ["--select", "labeled_pairs", "--partition", f"{source}|0"]
    spawned = time.time()
    subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    exited = time.time()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        logs = instance.all_logs(run.run_id)

    def at(pred) -> float:
        return next(e.timestamp for e in logs if pred(e))

    def typed(kind: str):
        return lambda e: e.dagster_event is not None and e.dagster_event.event_type_value == kind

    def says(text: str):
        return lambda e: text in (e.user_message or "")

    marks = {
        "spawned": spawned,
        "run_start": at(typed("PIPELINE_START")),
        "step_start": at(typed("STEP_START")),
        "engine_loading": at(says("loading label model")),
        "engine_ready": at(says("model kun-label ready in")),
        "step_success": at(typed("STEP_SUCCESS")),
        "engine_closed": at(says("model kun-label closed in")),
        "run_success": at(typed("PIPELINE_SUCCESS")),
        "exited": exited,
    }
    names = list(marks)
    phases = {f"{a}->{b}": round(marks[b] - marks[a], 2) for a, b in zip(names, names[1:])}
    return {"whole_process_s": round(exited - spawned, 2), "phases_s": phases}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="kun.yaml")
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each, alternating")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tmp, info = prepare(Path(args.config).resolve(), args.docs)
    res: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", **info}
    res["bare"], res["dagster"] = [], []
    for _ in range(args.repeat):
        res["bare"].append(run_bare(tmp))
        print("bare   ", res["bare"][-1], flush=True)
        res["dagster"].append(run_dagster(tmp, info["source"]))
        print("dagster", res["dagster"][-1], flush=True)
    best = {k: min(r["whole_process_s"] for r in res[k]) for k in ("bare", "dagster")}
    res["dagster_minus_bare_s"] = round(best["dagster"] - best["bare"], 2)
    print(f"whole process: bare {best['bare']} s, dagster {best['dagster']} s, difference {res['dagster_minus_bare_s']} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
