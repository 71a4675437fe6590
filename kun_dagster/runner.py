"""`kun run`'s loop: the declared jobs (registry.jobs) in order, each over the partitions Dagster's
stale resolver says are missing or stale, one run per contiguous range of the chosen sources'
keys (one model load per stage). What fails is printed as a person reads it, then RunFailed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from . import dedup, registry
from .partitions import GROUP

SAMPLE_ROWS = 5


class RunFailed(Exception):
    """A materialization failed; its report has been printed."""


def ranges(all_keys: list, wanted) -> list[list]:
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


def report(result, cfg, base, home: Path, debug: bool) -> None:
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


class Runner:
    """One `kun run`: makes what is missing or stale (everything, with `force`), job by job."""

    def __init__(self, defs, instance, cfg, home: Path, sources: list[str], debug: bool, log_level: str, force: bool):
        from .store import Store

        self.defs, self.instance, self.cfg, self.home, self.sources = defs, instance, cfg, home, sources
        self.debug, self.force = debug, force
        self.graph = defs.resolve_asset_graph()
        # Dagster's own console log stays quiet unless --debug: failures are reported, readably
        self.run_config = {"loggers": {"console": {"config": {"log_level": log_level if debug else "CRITICAL"}}}}
        self.store = Store.from_env(cfg.storage, os.environ)
        self.base = self.store.path(cfg.base_uri)

    def keys(self, asset: str) -> list:
        return self.graph.get(_key(asset)).partitions_def.get_partition_keys()

    def run(self, job: str, assets: list[str], what: str, keys_range: list | None = None, say: bool = True) -> None:
        from checks.recovery import worker_tags

        from .dagster_private import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

        t0 = time.time()
        tags = worker_tags()  # where this run's worker is: a later `kun run` or the daemon can tell when it died
        if keys_range:  # a key range (one run per source range) goes as the tags a single-run backfill sets
            tags.update({ASSET_PARTITION_RANGE_START_TAG: str(keys_range[0]), ASSET_PARTITION_RANGE_END_TAG: str(keys_range[-1])})
        result = self.defs.resolve_job_def(job).execute_in_process(
            instance=self.instance, asset_selection=[_key(a) for a in assets], tags=tags, run_config=self.run_config, raise_on_error=False
        )
        if not result.success:
            print(f"kun: {what} failed (run {result.run_id[:8]}):", file=sys.stderr)
            report(result, self.cfg, self.base, self.home, self.debug)
            raise RunFailed(what)
        if say:
            print(f"  {what}: done in {time.time() - t0:.0f}s", flush=True)

    def make(self, job: str, assets: list[str], what: str, keys: list | None = None, whole: bool = False, each: bool = False) -> None:
        """Run `assets` over `keys` (None: unpartitioned) where they are missing or stale, each
        contiguous range of those keys in one run; `whole`: over all of `keys` once any is (a
        source-wide step); `each`: one run per key, so each is kept as soon as it is made."""
        from automation.stale import to_make

        if self.force:
            return self.run(job, assets, what, keys)
        chosen, where = to_make(self.graph, self.instance, assets, keys)
        if not chosen:
            print(f"  {what}: up to date", flush=True)
            return None
        only = "" if chosen == assets else f" [{', '.join(chosen)}]"
        if keys is None or whole:
            return self.run(job, chosen, what + only, keys)
        if each:
            t0 = time.time()
            for k in where:
                self.run(job, chosen, f"{what}{only} [{k}]", [k], say=False)
            part = "" if len(where) == len(keys) else f" [{len(where)} of {len(keys)} partitions]"
            print(f"  {what}{only}{part}, a run each: done in {time.time() - t0:.0f}s", flush=True)
            return None
        stale = set(where)
        for sub in ranges(keys, stale.__contains__):
            part = "" if len(sub) == len(keys) else f" [{len(sub)} of {len(keys)} partitions: {sub[0]}..{sub[-1]}]"
            self.run(job, chosen, what + only + part, sub)
        return None

    def models(self, job: registry.Job) -> None:
        """The seed data and the given models are read every run (seconds): an edited seed file or a
        swapped checkpoint shows as a new data version; the trained models are made where stale."""
        if self.force:
            return self.run(job.name, list(job.assets), "seed data and models")
        given = [m for m in registry.MODELS if getattr(self.cfg.models, m.removesuffix("_model")).path]
        self.run(job.name, [registry.SEED_DATA, *given], ("seed data and given models" if given else "seed data") + " (read every run)")
        if trained := [m for m in registry.MODELS if m not in given]:
            self.make(job.name, trained, "trained models")
        return None

    def observe(self) -> None:
        """The source files' data versions first: raw_corpus records what it read, the daemon sees no change."""
        from automation import record_observations

        changed = record_observations(self.instance, self.cfg, self.store)
        print(f"  source files: {len(changed)} partition(s) new or changed since the last observation", flush=True)

    def by_source(self, job: registry.Job, what) -> None:
        """A partitioned job over the chosen sources, one run per contiguous range of their keys."""
        keys = self.keys(job.assets[0])
        source = (lambda k: k.keys_by_dimension["source"]) if hasattr(keys[0], "keys_by_dimension") else (lambda k: k)
        for sub in ranges(keys, lambda k: source(k) in self.sources):
            names = sorted({source(k) for k in sub}, key=self.sources.index)
            self.make(job.name, list(job.assets), what(sub, names), sub)

    def signatures(self, members: list[str], head: registry.Job) -> None:
        """A cluster group's sources that this run does not make: their signatures made first."""
        keys = self.keys(head.assets[0])
        others = {s for s in members if s not in self.sources}
        for sub in ranges(keys, lambda k: k.keys_by_dimension["source"] in others):
            self.make(head.name, list(head.assets), f"signatures of {', '.join(sorted({k.keys_by_dimension['source'] for k in sub}))}", sub)

    def bands(self, job: registry.Job, head: registry.Job) -> None:
        """dedup.mode: band_steps: each cluster group's LSH bands that are missing or stale, a run
        each as a backfill makes them: a band made before a kill is kept, the next run makes the rest."""
        keys = self.keys(job.assets[0])
        for name, members in dedup.cluster_groups(self.cfg, self.sources).items():
            self.signatures(members, head)
            mine = [k for k in keys if k.keys_by_dimension[GROUP] == dedup.group_key(name)]
            self.make(job.name, list(job.assets), f"{job.assets[0]} ({name})", mine, each=True)

    def clusters(self, job: registry.Job, head: registry.Job) -> None:
        """Each cluster group (dedup.cluster_groups: a source, or every source) over all its shards;
        a group's sources that this run does not make have their signatures made first (by the
        bands' step, where there is one)."""
        keys = self.keys(job.assets[0])
        for name, members in dedup.cluster_groups(self.cfg, self.sources).items():
            if not dedup.band_steps(self.cfg):
                self.signatures(members, head)
            mine = [k for k in keys if k.keys_by_dimension["source"] in members]
            self.make(job.name, list(job.assets), f"{job.assets[0]} ({name})", mine, whole=True)


def materialize_all(defs, instance, cfg, home: Path, sources: list[str], debug: bool, log_level: str, force: bool) -> None:
    """The declared jobs in order: the models, the source files observed, each source's corpus
    partitions, the release, each later round, the evaluation. Only what is missing or stale is
    made (Dagster's code and data versions), unless `force`: a run after a kill, a new threshold
    or a new file re-makes what they touched and nothing else. Raises RunFailed after printing."""
    r = Runner(defs, instance, cfg, home, sources, debug, log_level, force)
    jobs = registry.jobs(cfg.iterations, cfg.evaluation.enabled, dedup.band_steps(cfg))
    head = next(j for j in jobs if j.step.job == "corpus_head")
    corpus = lambda sub, names: f"{len(sub)} corpus partition(s) ({', '.join(names)})"  # noqa: E731
    for job in jobs:
        step, k = job.step.job, job.round
        if step == "models":
            r.models(job)
            r.observe()
        elif step == "corpus_head":
            r.by_source(job, lambda sub, names: corpus(sub, names) + ": ingest, filter, sign")
        elif step == "bands":
            r.bands(job, head)
        elif job.step.whole_source:
            r.clusters(job, head)
        elif step in ("corpus_tail", "rescore"):
            r.by_source(job, lambda sub, names, k=k: ("" if k == 1 else f"round {k}: ") + corpus(sub, names))
        elif step in ("release", "card"):
            r.by_source(job, lambda sub, names, asset=job.assets[0]: f"{asset} ({', '.join(sub)})")
        elif step == "retrain":
            data = "kept segments, Humpback's tags" if cfg.round_data == "segments" else "release"
            r.make(job.name, list(job.assets), f"round {k}: {job.assets[0]} (seeds + round {k - 1}'s {data})")
        else:
            r.make(job.name, list(job.assets), f"{job.assets[0]} ({job.step.what})")


def _key(asset: str):
    import dagster as dg

    return dg.AssetKey(asset)


def print_funnel(cfg, sources: list[str]) -> None:
    from . import storage
    from .store import Store

    base = Store.from_env(cfg.storage, os.environ).path(cfg.base_uri)
    stages = list(registry.CORPUS)
    last = registry.in_round(registry.DATASET, cfg.iterations)
    if cfg.iterations > 1:
        print(
            f"\nRound {cfg.iterations} of {cfg.iterations}: scored and polished by {registry.in_round(registry.CHAT_MODEL, cfg.iterations)}"
        )
    head = f"{'source':<10}" + "".join(f"{s:>17}" for s in stages) + f"{'kept':>8}{'final':>8}{'quarantined':>13}"
    print("\nFunnel (rows per stage):\n" + head)
    for name in sources:  # as the release recorded it
        stats = storage.read_stats(storage.partition_dir(base, last, {"source": name}))
        if stats is None:
            print(f"{name:<10}  not released")
            continue
        f, final = stats["funnel"], stats["rows_out"]
        q = sum(sum(v.values()) for v in f["quarantined"].values())
        print(f"{name:<10}" + "".join(f"{f['rows'][a]:>17}" for a in stages) + f"{f['kept_by_score']:>8}{final:>8}{q:>13}")
        for asset, reasons in f["quarantined"].items():
            if reasons:
                print(f"{'':<10}  {asset} quarantined: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    print(f"\nDataset: {base}/{last}/source=*/part-0.parquet")
    print(f"         {base}/release/<source>/train.jsonl and README.md (dataset card)")
    print(f"Quarantine: {base}/quarantine/<stage>/source=*/shard=*/")
