"""`kun`: run the whole graph from the shell (demo), check a config (validate)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path


def _materialize_all(defs, instance, log_level: str, reuse_models: bool = False) -> None:
    """Models first, then every corpus partition in one run (one model load per stage), then the dataset."""
    import dagster as dg
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    graph = defs.resolve_asset_graph()
    assets = list(defs.assets)
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}

    def run(keys: list[str], what: str, keys_range: list[str] | None = None) -> None:
        t0 = time.time()
        tags = {ASSET_PARTITION_RANGE_START_TAG: keys_range[0], ASSET_PARTITION_RANGE_END_TAG: keys_range[-1]} if keys_range else None
        result = dg.materialize(assets, selection=keys, instance=instance, resources=defs.resources, tags=tags, run_config=run_config)
        if not result.success:
            raise SystemExit(f"kun demo: {what} failed; see the run {result.run_id} in the Dagster UI")
        print(f"  {what}: done in {time.time() - t0:.0f}s", flush=True)

    model_assets = ["seed_data", "base_model", "label_model", "chat_model"]
    if reuse_models and all(instance.get_latest_materialization_event(dg.AssetKey(k)) for k in model_assets):
        print("  seed data and models: reusing the last materialization", flush=True)
    else:
        run(model_assets, "seed data and models")
    corpus_keys = graph.get(dg.AssetKey("raw_corpus")).partitions_def.get_partition_keys()
    run(["raw_corpus", "filtered_corpus", "labeled_pairs", "scored_pairs", "polished_pairs"],
        f"{len(corpus_keys)} corpus partitions", corpus_keys)
    sources = graph.get(dg.AssetKey("instruction_dataset")).partitions_def.get_partition_keys()
    run(["instruction_dataset"], f"instruction_dataset for {len(sources)} sources", sources)


def _print_funnel(cfg) -> None:
    from kun_dagster import dataset, storage

    base = storage.Store.from_env(cfg.storage, os.environ).path(cfg.base_uri)
    stages = [a for a, _ in dataset.STAGES]
    head = f"{'source':<10}" + "".join(f"{s:>17}" for s in stages) + f"{'kept':>8}{'final':>8}{'quarantined':>13}"
    print("\nFunnel (rows per stage):\n" + head)
    for s in cfg.sources:
        f = dataset.funnel(base, s.name, cfg.shard_keys())
        final = storage.partition_rows(storage.partition_dir(base, "instruction_dataset", {"source": s.name}))
        q = sum(sum(v.values()) for v in f["quarantined"].values())
        print(f"{s.name:<10}" + "".join(f"{f['rows'][a]:>17}" for a in stages) + f"{f['kept_by_score']:>8}{final:>8}{q:>13}")
        for asset, reasons in f["quarantined"].items():
            if reasons:
                print(f"{'':<10}  {asset} quarantined: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    print(f"\nDataset: {base}/instruction_dataset/source=*/part-0.parquet")
    print(f"         {base}/release/<source>/train.jsonl and README.md (dataset card)")
    print(f"Quarantine: {base}/quarantine/<stage>/source=*/shard=*/")


def demo(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from .config import config_path, load_config

    cfg_file = config_path(args.config)
    os.environ["KUN_CONFIG"] = str(cfg_file)
    # The demo runs its steps in this process: vLLM's engine (where installed) starts in it too,
    # in seconds, instead of in a new process that imports torch again.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(args.dagster_home).resolve())))
    home.mkdir(parents=True, exist_ok=True)
    instance_yaml = Path(__file__).resolve().parents[1] / "dagster.yaml"  # the gpu pool, run queue, retries
    if instance_yaml.is_file() and not (home / "dagster.yaml").exists():
        shutil.copy(instance_yaml, home / "dagster.yaml")
    cfg = load_config(cfg_file)
    from .definitions import build_definitions

    defs = build_definitions(cfg_file)
    print(f"kun demo: config {cfg_file}, storage {cfg.base_uri}, DAGSTER_HOME {home}", flush=True)
    t0 = time.time()
    with DagsterInstance.get() as instance:
        _materialize_all(defs, instance, args.log_level, args.reuse_models)
    print(f"kun demo: whole graph materialized in {time.time() - t0:.0f}s")
    _print_funnel(cfg)
    print(f"\nSee it in the UI: DAGSTER_HOME={home} dagster dev -w workspace.yaml")
    return 0


def validate(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{cfg.origin}: ok ({len(cfg.sources)} sources x {cfg.shards} shards, storage {cfg.base_uri})")
    return 0


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="dagster")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    p = argparse.ArgumentParser(prog="kun", description="The Kun instruction-data pipeline on Dagster.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="materialize the whole graph for every partition and print the funnel")
    d.add_argument("--config", help="kun.yaml (default: $KUN_CONFIG or ./kun.yaml)")
    d.add_argument("--dagster-home", default=".dagster_home", help="where runs are recorded, unless $DAGSTER_HOME is set")
    d.add_argument("--reuse-models", action="store_true", help="skip the model assets if this DAGSTER_HOME has them")
    d.add_argument("--log-level", default="WARNING", help="Dagster console log level")
    d.set_defaults(fn=demo)
    v = sub.add_parser("validate", help="load and check a config")
    v.add_argument("--config")
    v.set_defaults(fn=validate)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
