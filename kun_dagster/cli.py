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

from . import progress, runner
from .secrets import mask_uris

OK, FAILED, BAD_INPUT = 0, 1, 2


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
        # Every step runs in this process and writes thousands of events: hold the instance's
        # connections open (dagster-postgres opens one per query by default: 21 ms an event against
        # 11 ms pooled, bench/README.md). SQLite storages ignore it.
        instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=4)
        from checks.recovery import recover  # runs of this host killed earlier: failed, their gpu slots freed

        recover(instance, lambda line: print(f"kun {cmd}: {line}", flush=True))
        try:
            runner.materialize_all(defs, instance, cfg, home, sources, args.debug, args.log_level, args.force)
        except runner.RunFailed:
            return FAILED
    print(f"kun {cmd}: whole graph materialized in {time.time() - t0:.0f}s")
    runner.print_funnel(cfg, sources)
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
