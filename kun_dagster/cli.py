"""`kun`: run the whole graph from the shell on your config (run) or on the embedded default (demo),
and check a config before a long run (validate).

Exit codes: 0 done, 1 a stage or a blocking check failed, 2 bad config or input.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from . import progress
from .secrets import mask_uris

OK, FAILED, BAD_INPUT = 0, 1, 2
SAMPLE_ROWS = 5


class RunFailed(Exception):
    """A materialization failed; its report has been printed."""


def _ranges(all_keys: list, wanted) -> list[list]:
    """The wanted keys as contiguous runs of `all_keys` (a single-run backfill needs a key range)."""
    out: list[list] = []
    last = -2
    for i, k in enumerate(all_keys):
        if wanted(k):
            if i == last + 1:
                out[-1].append(k)
            else:
                out.append([k])
            last = i
    return out


def _error_text(err) -> str:
    """What the step's own code said: the first error in the chain that is not Dagster's wrapper."""
    while (err.cls_name or "").startswith("Dagster") and getattr(err, "cause", None) is not None:
        err = err.cause
    return err.message.strip()


def _report(result, cfg, base, home: Path, debug: bool) -> None:
    """What failed, as a person reads it: asset, partitions, the check or error, counts, up to 5
    offending rows with file:row, then where the quarantine and the UI are."""
    import dagster as dg

    from .secrets import redact, secret_values

    hidden = secret_values(cfg) if cfg is not None else set()
    say = lambda line="": print(redact(line, hidden), file=sys.stderr)  # noqa: E731 - no credential reaches a terminal or a CI log
    for ev in result.get_asset_check_evaluations():
        if ev.passed or ev.severity != dg.AssetCheckSeverity.ERROR:
            continue
        md = ev.metadata
        parts = md.get("failing_partitions")
        say(
            f"  {ev.asset_key.to_user_string()}: blocking check `{ev.check_name}` failed"
            + (f" in {', '.join(parts.value)}" if parts else "")
            + (f": {ev.description}" if ev.description else "")
        )
        failing = md.get("failing_checks")
        for rec in (failing.value.records if failing else [])[:10]:
            say(f"      {rec.data['partition']}: {rec.data['check']} x {rec.data['failures']}")
        sample = md.get("sample_failing_rows")
        for rec in (sample.value.records if sample else [])[:SAMPLE_ROWS]:
            d = rec.data
            where = f"{d.get('file')}:{d.get('row')}" if d.get("file") is not None else f"doc {d.get('doc_id')}"
            say(
                f"      {where}  doc_id={d.get('doc_id')}  "
                + "  ".join(f"{k}={str(v)[:40]!r}" for k, v in d.items() if k in ("text", "instruction", "output", "score"))
            )
    for ev in result.all_events:
        if not ev.is_step_failure:
            continue
        err = ev.event_specific_data.error
        if "DagsterAssetCheckFailedError" in (err.cls_name or "") + err.message:
            continue  # reported above, with its rows
        failure = ev.event_specific_data.user_failure_data
        text = failure.description if failure and failure.description else _error_text(err)
        say(f"  step {ev.step_key} failed: {text}")
        if debug:
            say(err.to_string())
    say(f"  quarantine: {base}/quarantine/<stage>/source=*/shard=*/")
    say(
        f"  in the UI:  DAGSTER_HOME={home} dagster dev -w workspace.yaml, then Runs -> {result.run_id[:8]}"
        + ("" if debug else "   (tracebacks: --debug)")
    )


def _materialize_all(defs, instance, cfg, home: Path, sources: list[str], debug: bool, log_level: str, force: bool) -> None:
    """Models first, then each source's corpus partitions in one run per contiguous key range (one
    model load per stage), then the dataset, its rounds and evaluations. Only what is missing or
    stale is made (Dagster's code and data versions), unless `force`: a run after a kill, a new
    threshold or a new file re-makes what they touched and nothing else. Raises RunFailed after
    printing what failed."""
    import dagster as dg

    from automation import record_observations
    from automation.stale import to_make
    from checks.recovery import worker_tags

    from . import registry

    # dg.materialize takes one partition key; a key range (one run per source) goes as the tags a
    # single-run backfill sets, which Dagster names only internally
    from .dagster_private import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
    from .registry import CHAT_MODEL, CLUSTERS, EVALUATION, MODELS, SEED_DATA, SIGNATURES, in_round
    from .store import Store

    graph = defs.resolve_asset_graph()
    assets = list(defs.assets)
    # Dagster's own console log stays quiet unless --debug: failures are reported below, readably
    run_config = {"loggers": {"console": {"config": {"log_level": log_level if debug else "CRITICAL"}}}}
    store = Store.from_env(cfg.storage, os.environ)
    base = store.path(cfg.base_uri)
    made: set[tuple[str, object]] = set()  # (asset, partition key) made by this kun run

    def run(keys: list[str], what: str, keys_range: list | None = None) -> None:
        t0 = time.time()
        tags = worker_tags()  # where this run's worker is: a later `kun run` or the daemon can tell when it died
        if keys_range:
            tags.update({ASSET_PARTITION_RANGE_START_TAG: str(keys_range[0]), ASSET_PARTITION_RANGE_END_TAG: str(keys_range[-1])})
        result = dg.materialize(
            assets, selection=keys, instance=instance, resources=defs.resources, tags=tags, run_config=run_config, raise_on_error=False
        )
        if not result.success:
            print(f"kun: {what} failed (run {result.run_id[:8]}):", file=sys.stderr)
            _report(result, cfg, base, home, debug)
            raise RunFailed(what)
        made.update((a, pk) for a in keys for pk in keys_range or [None])
        print(f"  {what}: done in {time.time() - t0:.0f}s", flush=True)

    def make(keys: list[str], what: str, partitions: list | None = None, whole: bool = False, inputs_made: bool = False) -> None:
        """Run the assets `keys` over `partitions` (a key range; None: unpartitioned) where they are
        missing or stale, each contiguous range of those partitions in one run; `whole`: over all of
        `partitions` once any is, or once this kun run made any of its inputs (`inputs_made`: a
        source-wide step, whose inputs Dagster's resolver stops reading at 100 partitions)."""
        if force or (whole and inputs_made):
            return run(keys, what, partitions)
        chosen, where = to_make(graph, instance, keys, partitions)
        if not chosen:
            print(f"  {what}: up to date", flush=True)
            return
        only = "" if chosen == keys else f" [{', '.join(chosen)}]"
        if partitions is None or whole:
            return run(chosen, what + only, partitions)
        stale = set(where)
        for sub in _ranges(partitions, stale.__contains__):
            part = "" if len(sub) == len(partitions) else f" [{len(sub)} of {len(partitions)} partitions: {sub[0]}..{sub[-1]}]"
            run(chosen, what + only + part, sub)

    if force:
        run([SEED_DATA, *MODELS], "seed data and models")
    else:
        # Re-read every time (seconds): an edited seed file or a swapped given checkpoint shows as a
        # new data version (content hash, fingerprint), which makes what was made from it stale.
        given = [f"{role}_model" for role in ("base", "label", "chat") if getattr(cfg.models, role).path]
        run([SEED_DATA, *given], ("seed data and given models" if given else "seed data") + " (read every run)")
        if trained := [k for k in MODELS if k not in given]:
            make(trained, "trained models")
    # the source files' data versions first: raw_corpus records what it read, the daemon sees no change
    changed = record_observations(instance, cfg, store)
    print(f"  source files: {len(changed)} partition(s) new or changed since the last observation", flush=True)
    corpus_keys = graph.get(dg.AssetKey(registry.RAW)).partitions_def.get_partition_keys()
    signed = registry.PARTITIONED.index(SIGNATURES) + 1
    head, tail = list(registry.PARTITIONED[:signed]), list(registry.PARTITIONED[signed + 1 :])  # around the clusters
    others = [s for s in cfg.sources if s.name not in sources]
    if cfg.dedup.scope == "all" and others:  # duplicates across sources: every source's signatures are needed
        for keys in _ranges(corpus_keys, lambda k: k.keys_by_dimension["source"] not in sources):
            names = sorted({k.keys_by_dimension["source"] for k in keys})
            make(head, f"signatures of {', '.join(names)}", keys)
    # Each contiguous range of sources in one run per step group (one model load per stage); the
    # clusters one source per run, so that their content data version is one source's
    # (docs/ARCHITECTURE.md, departure 27).
    ranges = [
        (keys, sorted({k.keys_by_dimension["source"] for k in keys}, key=sources.index))
        for keys in _ranges(corpus_keys, lambda k: k.keys_by_dimension["source"] in sources)
    ]
    for keys, names in ranges:
        what = f"{len(keys)} corpus partition(s) ({', '.join(names)})"
        make(head, f"{what}: ingest, filter, sign", keys)
        if cfg.dedup.scope == "all":
            signed_now = any((SIGNATURES, k) in made for k in corpus_keys)
            make([CLUSTERS], f"{CLUSTERS} (every source)", corpus_keys, whole=True, inputs_made=signed_now)
        else:
            for name in names:
                mine = [k for k in keys if k.keys_by_dimension["source"] == name]
                signed_now = any((SIGNATURES, k) in made for k in mine)
                make([CLUSTERS], f"{CLUSTERS} ({name})", mine, whole=True, inputs_made=signed_now)
        make(tail, what, keys)  # dedupe and the LLM stages
    source_keys = graph.get(dg.AssetKey(registry.DATASET)).partitions_def.get_partition_keys()
    for k in range(1, cfg.iterations + 1):  # Humpback's rounds: round k's chat model re-scores the same labeled pairs
        if k > 1:
            data = "kept segments, Humpback's tags" if cfg.round_data == "segments" else "release"
            make([in_round(CHAT_MODEL, k)], f"round {k}: {in_round(CHAT_MODEL, k)} (seeds + round {k - 1}'s {data})")
            for keys, names in ranges:
                stages = [in_round(registry.SCORED, k), in_round(registry.POLISHED, k)]
                make(stages, f"round {k}: {len(keys)} corpus partition(s) ({', '.join(names)})", keys)
        for keys in _ranges(source_keys, lambda s: s in sources):
            make([in_round(registry.DATASET, k)], f"{in_round(registry.DATASET, k)} ({', '.join(keys)})", keys)
        if cfg.evaluation.enabled:
            make([in_round(EVALUATION, k)], f"{in_round(EVALUATION, k)} (fine-tune on seeds / seeds + release, judge)")


def _print_funnel(cfg, sources: list[str]) -> None:
    from . import dataset, registry, storage
    from .registry import CHAT_MODEL, in_round
    from .store import Store

    base = Store.from_env(cfg.storage, os.environ).path(cfg.base_uri)
    stages = list(registry.CORPUS)
    last = in_round(registry.DATASET, cfg.iterations)
    if cfg.iterations > 1:
        print(f"\nRound {cfg.iterations} of {cfg.iterations}: scored and polished by {in_round(CHAT_MODEL, cfg.iterations)}")
    head = f"{'source':<10}" + "".join(f"{s:>17}" for s in stages) + f"{'kept':>8}{'final':>8}{'quarantined':>13}"
    print("\nFunnel (rows per stage):\n" + head)
    for name in sources:
        f = dataset.funnel(base, name, cfg.shard_keys(), cfg.score.threshold, cfg.iterations)
        final = storage.partition_rows(storage.partition_dir(base, last, {"source": name}))
        q = sum(sum(v.values()) for v in f["quarantined"].values())
        print(f"{name:<10}" + "".join(f"{f['rows'][a]:>17}" for a in stages) + f"{f['kept_by_score']:>8}{final:>8}{q:>13}")
        for asset, reasons in f["quarantined"].items():
            if reasons:
                print(f"{'':<10}  {asset} quarantined: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    print(f"\nDataset: {base}/{last}/source=*/part-0.parquet")
    print(f"         {base}/release/<source>/train.jsonl and README.md (dataset card)")
    print(f"Quarantine: {base}/quarantine/<stage>/source=*/shard=*/")


def _load(args: argparse.Namespace):
    """(config file, config), or None after saying why (exit 2)."""
    from .config import ConfigError, config_path, load_config

    cfg_file = config_path(args.config)
    try:
        return cfg_file, load_config(cfg_file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return None


def _preflight(cfg, offline: bool) -> bool:
    from .preflight import problems

    found = problems(cfg, offline=offline)
    for p in found:
        print(f"{cfg.origin}: {p}", file=sys.stderr)
    return not found


FULL_DEMO = {"KUN__iterations": "2", "KUN__evaluation": "on"}  # what `kun demo --full` adds to kun.yaml


@contextlib.contextmanager
def _defaults(env: dict[str, str]):
    """Set the variables the caller has not set, for the time of the block: the steps run in this
    process and read them; a caller that goes on (a test, a notebook) gets its environment back."""
    added = [key for key in env if key not in os.environ]
    os.environ.update({key: env[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def run(args: argparse.Namespace, demo: bool = False) -> int:
    # --full as environment overrides, so that every read of the config (steps included) sees them
    with _defaults(FULL_DEMO if demo and args.full else {}):
        return _run(args, demo)


def _run(args: argparse.Namespace, demo: bool) -> int:
    from dagster import DagsterInstance

    loaded = _load(args)
    if loaded is None or not _preflight(loaded[1], args.offline):
        return BAD_INPUT
    cfg_file, cfg = loaded
    known = [s.name for s in cfg.sources]
    sources = list(dict.fromkeys(args.source or known))
    if unknown := [s for s in sources if s not in known]:
        print(f"{cfg.origin}: no source named {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return BAD_INPUT
    os.environ["KUN_CONFIG"] = str(cfg_file)
    # Steps run in this process: vLLM's engine (where installed) starts in it too, in seconds,
    # instead of in a new process that imports torch again.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not args.debug:  # vLLM's engine log (hundreds of lines per load) only with --debug; errors still show
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        warnings.filterwarnings("ignore", category=FutureWarning)
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(args.dagster_home).resolve())))
    home.mkdir(parents=True, exist_ok=True)
    instance_yaml = Path(__file__).resolve().parents[1] / "dagster.yaml"  # the gpu pool, run queue, retries
    if instance_yaml.is_file() and not (home / "dagster.yaml").exists():
        shutil.copy(instance_yaml, home / "dagster.yaml")
    elif instance_yaml.is_file() and "run_monitoring" not in (home / "dagster.yaml").read_text():
        print(
            f"kun: {home / 'dagster.yaml'} predates run monitoring (dead runs failed, their gpu slots freed); "
            f"to get it: cp {instance_yaml} {home}/",
            file=sys.stderr,
        )
    progress.show(progress.mode(args.progress, sys.stdout.isatty(), sys.stderr.isatty()))
    from .definitions import build_definitions

    defs = build_definitions(cfg_file)
    cmd = "demo" if demo else "run"
    print(f"kun {cmd}: config {cfg_file}, sources {', '.join(sources)}, storage {mask_uris(cfg.base_uri)}, DAGSTER_HOME {home}", flush=True)
    t0 = time.time()
    with DagsterInstance.get() as instance:
        from checks.recovery import recover  # runs of this host killed earlier: failed, their gpu slots freed

        recover(instance, lambda line: print(f"kun {cmd}: {line}", flush=True))
        try:
            _materialize_all(defs, instance, cfg, home, sources, args.debug, args.log_level, args.force)
        except RunFailed:
            return FAILED
    print(f"kun {cmd}: whole graph materialized in {time.time() - t0:.0f}s")
    _print_funnel(cfg, sources)
    print(f"\nSee it in the UI: DAGSTER_HOME={home} dagster dev -w workspace.yaml")
    return OK


def validate(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None or not _preflight(loaded[1], args.offline):
        return BAD_INPUT
    cfg = loaded[1]
    print(f"{cfg.origin}: ok ({len(cfg.sources)} sources x {cfg.shards} shards, storage {mask_uris(cfg.base_uri)})")
    return OK


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="dagster")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    p = argparse.ArgumentParser(prog="kun", description="The Kun instruction-data pipeline on Dagster.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def graph_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="kun.yaml (default: $KUN_CONFIG or ./kun.yaml)")
        sp.add_argument("--source", action="append", help="only this source (repeatable); default: every source")
        sp.add_argument("--dagster-home", default=".dagster_home", help="where runs are recorded, unless $DAGSTER_HOME is set")
        sp.add_argument("--force", action="store_true", help="make every asset again, also those that are up to date")
        sp.add_argument(
            "--progress",
            choices=["auto", "bars", "lines", "off", "on"],
            default="auto",
            help="bars on stderr, or plain lines on stdout at least every 30 s (auto: bars on a terminal, lines in a log; on: bars)",
        )
        sp.add_argument("--offline", action="store_true", help="skip the checks that need the network (remote sources, models, store)")
        sp.add_argument("--debug", action="store_true", help="Dagster's own log and full tracebacks")
        sp.add_argument("--log-level", default="INFO", help="Dagster console log level with --debug")

    r = sub.add_parser("run", help="check the config, then materialize the whole graph (or --source NAME ...) and print the funnel")
    graph_options(r)
    r.set_defaults(fn=run)
    d = sub.add_parser("demo", help="kun run on the embedded default: demo corpora, tiny models trained here")
    graph_options(d)
    d.add_argument("--full", action="store_true", help="also Humpback's second round and the evaluation (iterations 2, evaluation on)")
    d.set_defaults(fn=lambda a: run(a, demo=True))
    v = sub.add_parser("validate", help="check a config: keys, source globs, seed file, given models, store")
    v.add_argument("--config")
    v.add_argument("--offline", action="store_true", help="skip the checks that need the network")
    v.set_defaults(fn=validate)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
