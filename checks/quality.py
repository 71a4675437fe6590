"""The asset checks of every partitioned dataset version, run inside the asset's own step:

- `schema` (blocking, ERROR): the partition against its Pandera schema (kun_dagster.schemas).
  When it fails the step publishes nothing (the old version of each partition stays) and fails,
  so no stage downstream runs on a broken shape.
- statistical checks (WARN): retention, quarantine / duplicate / empty-output / parse-failure
  rates, the score distribution against the source's published partitions, the faithfulness of
  polished answers to their source text (kun_dagster.quality).

A run covers one or many partitions (single-run backfills), so each check gives one result per
run, with every partition's figure in its metadata and the failing ones named.
"""

import dagster as dg
import pandas as pd

from kun_dagster import quality, registry, schemas, storage
from ui import table

SCHEMA = "schema"
DATASET_SCHEMA = "Blocking: the records match COIG-CQIA's schema (+ provenance); on failure nothing is released."
PARTITION_SCHEMA = "Blocking: the partition matches its Pandera schema; on failure nothing is published and nothing downstream runs."


def specs(asset: str) -> list[dg.AssetCheckSpec]:
    """The blocking schema check, then the asset's WARN checks (kun_dagster.versions)."""
    schema = DATASET_SCHEMA if registry.stage_of(asset) == registry.DATASET else PARTITION_SCHEMA
    return [dg.AssetCheckSpec(SCHEMA, asset=asset, blocking=True, description=schema)] + [
        dg.AssetCheckSpec(c.name, asset=asset, description=c.description) for c in registry.get(asset).checks
    ]


def schema_check(asset: str, violations: dict[str, schemas.Violations]) -> dg.AssetCheckResult:
    """The blocking schema check's result over the run's partitions: failure count, failing checks
    by partition, a sample of failing rows."""
    bad = {k: v for k, v in violations.items() if not v.passed}
    md = {
        "partitions": len(violations),
        "failures": sum(v.failures for v in bad.values()),
        "failing_partitions": dg.MetadataValue.json(sorted(bad)),
        "by_check": dg.MetadataValue.json({k: v.by_check for k, v in bad.items()}),
    }
    if bad:
        md["failing_checks"] = table(
            pd.DataFrame(
                [(k, check, n) for k, v in bad.items() for check, n in v.by_check.items()], columns=["partition", "check", "failures"]
            ),
            rows=None,
        )
        md["sample_failing_rows"] = table(next(iter(bad.values())).sample)
    return dg.AssetCheckResult(
        asset_key=asset,
        check_name=SCHEMA,
        passed=not bad,
        metadata=md,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"{md['failures']} schema failure(s) in {sorted(bad)}" if bad else None,
    )


def evaluate(context: dg.AssetExecutionContext, kun, asset: str, results: dict) -> list[dg.AssetCheckResult]:
    """Every check's result for the partitions of one run; the schema's comes first."""
    cfg = kun.config
    out = [
        schema_check(
            asset, {str(k): schemas.validate(asset, storage.batches_of(r.rows, cfg.storage.batch_rows), cfg) for k, r in results.items()}
        )
    ]
    by_check: dict[str, dict[str, quality.Finding]] = {}
    for key, result in results.items():
        for f in registry.findings(asset, cfg, result, kun.base):
            by_check.setdefault(f.check, {})[str(key)] = f
    out += warn_results(asset, by_check)
    log_failures(context, asset, out)
    return out


def warn_results(asset: str, by_check: dict[str, dict[str, quality.Finding]]) -> list[dg.AssetCheckResult]:
    """One WARN result per check over the run's partitions: the failing ones named, every figure in a table."""
    out = []
    for name, per in by_check.items():
        failing = sorted(k for k, f in per.items() if not f.passed)
        out.append(
            dg.AssetCheckResult(
                asset_key=asset,
                check_name=name,
                passed=not failing,
                severity=dg.AssetCheckSeverity.WARN,
                description="; ".join(f"{k}: {per[k].detail}" for k in failing) or None,
                metadata={
                    "bound": next(iter(per.values())).bound,
                    "partitions": len(per),
                    "failing": len(failing),  # numbers: plotted
                    "failing_partitions": dg.MetadataValue.json(failing),
                    "values": dg.MetadataValue.json({k: f.value for k, f in per.items()}),
                    "by_partition": table(
                        pd.DataFrame(
                            [(k, f.value, "pass" if f.passed else "FAIL", f.detail) for k, f in per.items()],
                            columns=["partition", "value", "result", "detail"],
                        ),
                        rows=None,
                        width=200,
                    ),
                },
            )
        )
    return out


def log_failures(context, asset: str, results: list[dg.AssetCheckResult]) -> None:
    for r in results:
        if not r.passed:
            log = context.log.error if r.severity == dg.AssetCheckSeverity.ERROR else context.log.warning
            log(f"{asset} check {r.check_name} failed: {r.description}")


def gate(context: dg.AssetExecutionContext, kun, asset: str, results: dict, publish=None):
    """Yield the asset's output only when its schema passed, then every check result (a failed
    blocking check fails the step: nothing of it is published, nothing downstream runs).
    `publish`: what else the asset writes (the release files), done before the output is recorded,
    so a failure there leaves the asset unrecorded and the next run makes it again."""
    check_results = evaluate(context, kun, asset, results)
    if check_results[0].passed:
        if publish is not None:
            publish()
        yield dg.Output(results)
    yield from check_results
