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

import dataclasses

import dagster as dg
import numpy as np
import pandas as pd

from kun_dagster import quality, schemas, storage
from kun_dagster.stages import StageResult

from .tables import table

SCHEMA = "schema"
WARN = {
    "raw_corpus": ["retention", "quarantine_rate"],
    "filtered_corpus": ["retention", "duplicate_rate"],
    "labeled_pairs": ["retention", "empty_output_rate"],
    "scored_pairs": ["fallback_rate", "parse_failure_rate", "score_distribution"],
    "polished_pairs": ["keep_rate", "retention", "empty_output_rate", "duplicate_rate", "faithfulness"],
    "instruction_dataset": ["retention"],
}
DATASET_SCHEMA = "Blocking: the records match COIG-CQIA's schema (+ provenance); on failure nothing is released."
DESCRIPTIONS = {
    SCHEMA: "Blocking: the partition matches its Pandera schema; on failure nothing is published and nothing downstream runs.",
    "retention": "Rows out / rows in within checks.retention (polished_pairs: of the rows kept by score; instruction_dataset: "
                 "records per document read, with the stages that dropped most).",
    "keep_rate": "The share of scored rows that reach score.threshold, within checks.keep_rate.",
    "quarantine_rate": "Unreadable rows of the source at most checks.max_quarantine_rate.",
    "duplicate_rate": "Exact duplicates dropped at most checks.max_duplicate_rate.",
    "empty_output_rate": "Empty generations at most checks.max_empty_rate.",
    "fallback_rate": "*_choice: rows scored by free text because the chat model put under score.min_answer_mass on the "
                     "answers, at most checks.max_fallback_rate (a high rate: the model rarely answers in the format).",
    "parse_failure_rate": "Free-text score replies that name no answer, at most checks.max_parse_failure_rate of them.",
    "score_distribution": "Scores against the source's published partitions: KS statistic at most checks.max_score_shift.",
    "faithfulness": "Answers sharing under checks.min_overlap of their character bigrams with their source text "
                    "(likely hallucinated) at most checks.max_unfaithful_rate.",
}


def specs(asset: str) -> list[dg.AssetCheckSpec]:
    """The blocking schema check, then the asset's WARN checks."""
    schema = DATASET_SCHEMA if asset == "instruction_dataset" else DESCRIPTIONS[SCHEMA]
    return [dg.AssetCheckSpec(SCHEMA, asset=asset, blocking=True, description=schema)] + [
        dg.AssetCheckSpec(name, asset=asset, description=DESCRIPTIONS[name]) for name in WARN.get(asset, [])
    ]




def _findings(kun, asset: str, key, result: StageResult) -> list[quality.Finding]:
    c, st = kun.config.checks, result.stats
    n_in, dropped = st.get("rows_in") or 0, st.get("dropped", {})
    found = []
    if asset == "polished_pairs":
        found.append(quality.within("keep_rate", st.get("keep_rate"), *c.keep_rate, "kept by score"))
    if asset == "scored_pairs":
        free = st.get("scored_by", {}).get("freetext", 0)
        found.append(quality.rate("fallback_rate", free, n_in if st.get("fallback_rate") is not None else 0, c.max_fallback_rate,
                                  "scored by free text (answer mass under score.min_answer_mass)"))
        found.append(quality.rate("parse_failure_rate", st.get("parse_failures", 0), free, c.max_parse_failure_rate,
                                  "of the free-text replies unparsed"))
        found.append(_score_shift(kun, result.rows))
    else:
        found.append(quality.within("retention", st.get("retention"), *c.retention[asset], "retention"))
    if asset == "raw_corpus":
        found.append(quality.rate("quarantine_rate", len(result.dropped), n_in, c.max_quarantine_rate, "unreadable"))
    if asset in ("filtered_corpus", "polished_pairs"):
        code = "duplicate_text" if asset == "filtered_corpus" else "duplicate_output"
        found.append(quality.rate("duplicate_rate", dropped.get(code, 0), n_in, c.max_duplicate_rate, "duplicates"))
    if asset in ("labeled_pairs", "polished_pairs"):
        found.append(quality.rate("empty_output_rate", dropped.get("empty_generation", 0), n_in, c.max_empty_rate, "empty"))
    if asset == "polished_pairs":
        rows = result.rows
        finding, low = quality.faithfulness(rows["output"].tolist(), rows["text"].tolist(), c.min_overlap, c.max_unfaithful_rate)
        sample = rows.iloc[low[:5]]["doc_id"].tolist()
        found.append(dataclasses.replace(finding, detail=finding.detail + (f"; e.g. {sample}" if sample else "")))
    return found


def _score_shift(kun, rows: pd.DataFrame) -> quality.Finding:
    """Scores of this partition against the source's other published scored_pairs partitions."""
    earlier = []
    for other in kun.config.shard_keys() if len(rows) else []:
        d = storage.partition_dir(kun.base, "scored_pairs", {"source": rows["source"].iloc[0], "shard": other})
        if other != str(rows["shard"].iloc[0]) and storage.partition_rows(d):
            earlier.append(storage.read_partition(d, ["score"])["score"].to_numpy(dtype=float))
    return quality.score_shift(rows["score"].to_numpy(dtype=float), np.concatenate(earlier) if earlier else np.array([]),
                               kun.config.checks.max_score_shift)


def schema_check(asset: str, violations: dict[str, schemas.Violations]) -> dg.AssetCheckResult:
    """The blocking schema check's result over the run's partitions: failure count, failing checks
    by partition, a sample of failing rows."""
    bad = {k: v for k, v in violations.items() if not v.passed}
    md = {"partitions": len(violations), "failures": sum(v.failures for v in bad.values()),
          "failing_partitions": dg.MetadataValue.json(sorted(bad)),
          "by_check": dg.MetadataValue.json({k: v.by_check for k, v in bad.items()})}
    if bad:
        md["failing_checks"] = table(pd.DataFrame([(k, check, n) for k, v in bad.items() for check, n in v.by_check.items()],
                                                  columns=["partition", "check", "failures"]), rows=None)
        md["sample_failing_rows"] = table(next(iter(bad.values())).sample)
    return dg.AssetCheckResult(asset_key=asset, check_name=SCHEMA, passed=not bad, metadata=md, severity=dg.AssetCheckSeverity.ERROR,
                               description=f"{md['failures']} schema failure(s) in {sorted(bad)}" if bad else None)


def evaluate(context: dg.AssetExecutionContext, kun, asset: str, results: dict) -> list[dg.AssetCheckResult]:
    """Every check's result for the partitions of one run; the schema's comes first."""
    cfg = kun.config
    out = [schema_check(asset, {str(k): schemas.validate(asset, storage.batches_of(r.rows, cfg.storage.batch_rows), cfg) for k, r in results.items()})]
    by_check: dict[str, dict[str, quality.Finding]] = {}
    for key, result in results.items():
        for f in _findings(kun, asset, key, result):
            by_check.setdefault(f.check, {})[str(key)] = f
    out += warn_results(asset, by_check)
    log_failures(context, asset, out)
    return out


def warn_results(asset: str, by_check: dict[str, dict[str, quality.Finding]]) -> list[dg.AssetCheckResult]:
    """One WARN result per check over the run's partitions: the failing ones named, every figure in a table."""
    out = []
    for name, per in by_check.items():
        failing = sorted(k for k, f in per.items() if not f.passed)
        out.append(dg.AssetCheckResult(
            asset_key=asset, check_name=name, passed=not failing, severity=dg.AssetCheckSeverity.WARN,
            description="; ".join(f"{k}: {per[k].detail}" for k in failing) or None,
            metadata={"bound": next(iter(per.values())).bound, "partitions": len(per), "failing": len(failing),  # numbers: plotted
                      "failing_partitions": dg.MetadataValue.json(failing),
                      "values": dg.MetadataValue.json({k: f.value for k, f in per.items()}),
                      "by_partition": table(pd.DataFrame([(k, f.value, "pass" if f.passed else "FAIL", f.detail) for k, f in per.items()],
                                                         columns=["partition", "value", "result", "detail"]), rows=None, width=200)}))
    return out


def log_failures(context, asset: str, results: list[dg.AssetCheckResult]) -> None:
    for r in results:
        if not r.passed:
            log = context.log.error if r.severity == dg.AssetCheckSeverity.ERROR else context.log.warning
            log(f"{asset} check {r.check_name} failed: {r.description}")


def gate(context: dg.AssetExecutionContext, kun, asset: str, results: dict):
    """Yield the asset's output only when its schema passed, then every check result (a failed
    blocking check fails the step: nothing of it is published, nothing downstream runs)."""
    check_results = evaluate(context, kun, asset, results)
    if check_results[0].passed:
        yield dg.Output(results)
    yield from check_results
