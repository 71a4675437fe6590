"""The dataset versions: one registry entry per asset that holds data, in graph order.

Each entry is the one place for its asset's name, its Pandera schema (schemas.py), the reason
codes its quarantine may hold, and its WARN checks: name, description and how the figure is
measured against its bound in kun.yaml's `checks`. The Dagster checks (checks/quality.py), the
funnel (dataset.py), the CLI and the assets all read it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandera.pandas as pa
from upath import UPath

from . import corpus, quality, schemas, stages, storage
from .config import KunConfig
from .names import CLUSTERS, DATASET, DEDUPED, FILTERED, LABELED, POLISHED, RAW, SCORED, SIGNATURES, stage_of
from .stages import StageResult

# A WARN check's measure: the partition's figure against its bound, from the stage's result.
Measure = Callable[[KunConfig, StageResult, UPath], quality.Finding]


@dataclass(frozen=True)
class WarnCheck:
    name: str
    description: str
    measure: Measure


@dataclass(frozen=True)
class Version:
    name: str
    what: str  # what its rows are, for the funnel and the dataset card
    schema: type[pa.DataFrameModel]
    reasons: tuple[str, ...]  # the reason codes its quarantine may hold
    checks: tuple[WarnCheck, ...]


# -- the WARN checks ---------------------------------------------------------------------------------
def _rows_in(result: StageResult) -> int:
    return result.stats.get("rows_in") or 0


def _retention(asset: str) -> WarnCheck:
    return WarnCheck(
        "retention",
        f"Rows out / rows in of {asset} within checks.retention.{asset}.",
        lambda cfg, r, base: quality.within("retention", r.stats.get("retention"), *cfg.checks.retention[asset], "retention"),
    )


def _dropped_rate(name: str, code: str, bound: str, what: str, description: str) -> WarnCheck:
    """The share of rows in quarantined as `code`, at most checks.<bound>."""
    return WarnCheck(
        name,
        description,
        lambda cfg, r, base: quality.rate(name, r.stats.get("dropped", {}).get(code, 0), _rows_in(r), getattr(cfg.checks, bound), what),
    )


QUARANTINE_RATE = WarnCheck(
    "quarantine_rate",
    "Unreadable rows of the source at most checks.max_quarantine_rate.",
    lambda cfg, r, base: quality.rate(
        "quarantine_rate", storage.row_count(r.dropped), _rows_in(r), cfg.checks.max_quarantine_rate, "unreadable"
    ),
)
EMPTY_OUTPUT_RATE = _dropped_rate(
    "empty_output_rate", stages.EMPTY_GENERATION, "max_empty_rate", "empty", "Empty generations at most checks.max_empty_rate."
)


def _duplicate_rate(code: str) -> WarnCheck:
    return _dropped_rate(
        "duplicate_rate", code, "max_duplicate_rate", "duplicates", f"Exact duplicates dropped ({code}) at most checks.max_duplicate_rate."
    )


DEDUP_RATE = WarnCheck(
    "duplicate_rate",
    "Documents dropped as duplicates of documents in other shards (exact or near) at most checks.max_duplicate_rate.",
    lambda cfg, r, base: quality.rate(
        "duplicate_rate",
        sum(r.stats.get("dropped", {}).values()),
        _rows_in(r),
        cfg.checks.max_duplicate_rate,
        "duplicates across shards",
    ),
)


def _fallback(cfg: KunConfig, r: StageResult, base: UPath) -> quality.Finding:
    free = r.stats.get("scored_by", {}).get("freetext", 0)
    return quality.rate(
        "fallback_rate",
        free,
        _rows_in(r) if r.stats.get("fallback_rate") is not None else 0,
        cfg.checks.max_fallback_rate,
        "scored by free text (answer mass under score.min_answer_mass)",
    )


def _parse_failures(cfg: KunConfig, r: StageResult, base: UPath) -> quality.Finding:
    free = r.stats.get("scored_by", {}).get("freetext", 0)
    return quality.rate(
        "parse_failure_rate", r.stats.get("parse_failures", 0), free, cfg.checks.max_parse_failure_rate, "of the free-text replies unparsed"
    )


def _score_shift(cfg: KunConfig, r: StageResult, base: UPath) -> quality.Finding:
    """Scores of this partition against the source's other published scored_pairs partitions."""
    rows, earlier = r.rows, []
    for other in cfg.shard_keys() if len(rows) else []:
        d = storage.partition_dir(base, r.stats.get("asset", SCORED), {"source": rows["source"].iloc[0], "shard": other})
        if other != str(rows["shard"].iloc[0]) and storage.partition_rows(d):
            earlier.append(storage.read_partition(d, ["score"])["score"].to_numpy(dtype=float))
    return quality.score_shift(
        rows["score"].to_numpy(dtype=float), np.concatenate(earlier) if earlier else np.array([]), cfg.checks.max_score_shift
    )


def _faithfulness(cfg: KunConfig, r: StageResult, base: UPath) -> quality.Finding:
    rows, c = r.rows, cfg.checks
    finding, low = quality.faithfulness(rows["output"].tolist(), rows["text"].tolist(), c.min_overlap, c.max_unfaithful_rate)
    sample = rows.iloc[low[:5]]["doc_id"].tolist()
    return dataclasses.replace(finding, detail=finding.detail + (f"; e.g. {sample}" if sample else ""))


KEEP_RATE = WarnCheck(
    "keep_rate",
    "The share of scored rows that reach score.threshold, within checks.keep_rate.",
    lambda cfg, r, base: quality.within("keep_rate", r.stats.get("keep_rate"), *cfg.checks.keep_rate, "kept by score"),
)
FALLBACK_RATE = WarnCheck(
    "fallback_rate",
    "*_choice: rows scored by free text because the chat model put under score.min_answer_mass on the "
    "answers, at most checks.max_fallback_rate (a high rate: the model rarely answers in the format).",
    _fallback,
)
PARSE_FAILURE_RATE = WarnCheck(
    "parse_failure_rate", "Free-text score replies that name no answer, at most checks.max_parse_failure_rate of them.", _parse_failures
)
SCORE_DISTRIBUTION = WarnCheck(
    "score_distribution", "Scores against the source's published partitions: KS statistic at most checks.max_score_shift.", _score_shift
)
FAITHFULNESS = WarnCheck(
    "faithfulness",
    "Answers sharing under checks.min_overlap of their character bigrams with their source text "
    "(likely hallucinated) at most checks.max_unfaithful_rate.",
    _faithfulness,
)


def _release_retention(cfg: KunConfig, r: StageResult, base: UPath) -> quality.Finding:
    """Records per document read, and where the rest went: an empty release is a result, and this
    says why (the stage reasons that dropped most). stats["funnel"] is dataset.funnel's."""
    fun, n_records, value = r.stats["funnel"], r.stats["rows_out"], r.stats["retention"]
    docs = fun["rows"][RAW]
    finding = quality.within("retention", value, *cfg.checks.retention[DATASET], "records per document read")
    losses = Counter({f"{asset}: {reason}": n for asset, reasons in fun["quarantined"].items() for reason, n in reasons.items()})
    not_kept = fun["rows"][SCORED] - fun["kept_by_score"]
    if not_kept:
        losses[f"{SCORED}: below the score threshold"] = not_kept
    top = ", ".join(f"{k} {n}" for k, n in losses.most_common(3))
    return dataclasses.replace(
        finding, detail=f"{n_records} records from {docs} documents read ({value})" + (f"; most dropped at {top}" if top else "")
    )


RELEASE_RETENTION = WarnCheck(
    "retention",
    "Records per document read within checks.retention.instruction_dataset, with the stages that dropped most.",
    _release_retention,
)


def _one_version(cfg: KunConfig, r: StageResult, base: UPath) -> quality.Finding:
    mixed = r.stats.get("mixed_versions") or []
    return quality.Finding(
        "one_version",
        not mixed,
        len(mixed),
        "0 mixed",
        "; ".join(mixed[:5]) or "every stage made under one code version (the current one) and one version of each model",
    )


ONE_VERSION = WarnCheck(
    "one_version",
    "The release was made from partitions of one code version per stage (the current one) and one version of each "
    "model; else the dataset card lists what is mixed, and the UI marks the stale partitions.",
    _one_version,
)

# -- the registry ------------------------------------------------------------------------------------
VERSIONS: tuple[Version, ...] = (
    Version(
        RAW,
        "documents read",
        schemas.RawCorpus,
        (
            corpus.INVALID_ENCODING,
            corpus.INVALID_UNICODE,
            corpus.INVALID_JSON,
            corpus.NOT_AN_OBJECT,
            corpus.MISSING_TEXT,
            corpus.TEXT_NOT_STRING,
            corpus.EMPTY_TEXT,
            corpus.MISSING_ID,
            corpus.DUPLICATE_ID,
            corpus.EMPTY_FILE,
            corpus.UNREADABLE_FILE,
            corpus.RECORD_TOO_LARGE,
            corpus.FILE_TOO_LARGE,
            corpus.ROW_GROUP_TOO_LARGE,
            corpus.RECORD_ERROR,
        ),
        (_retention(RAW), QUARANTINE_RATE),
    ),
    Version(
        FILTERED,
        "after cleaning, token-limit, exact dedup within the shard and perplexity filters",
        schemas.FilteredCorpus,
        (
            stages.EMPTY_AFTER_CLEAN,
            stages.TEXT_TOO_LONG,
            stages.TOO_MANY_TOKENS,
            stages.DUPLICATE_TEXT,
            stages.PERPLEXITY_UNDEFINED,
            stages.HIGH_PERPLEXITY,
        ),
        (_retention(FILTERED), _duplicate_rate(stages.DUPLICATE_TEXT)),
    ),
    Version(
        DEDUPED,
        "duplicates of documents in other shards removed: exact and near",
        schemas.DedupedCorpus,
        (stages.DUPLICATE_TEXT, stages.NEAR_DUPLICATE),
        (_retention(DEDUPED), DEDUP_RATE),
    ),
    Version(
        LABELED,
        "instructions written, keyword filter passed",
        schemas.LabeledPairs,
        (stages.EMPTY_GENERATION, stages.BROKEN_TEXT, stages.BANNED_KEYWORD),
        (_retention(LABELED), EMPTY_OUTPUT_RATE),
    ),
    Version(
        SCORED,
        "instructions scored (all rows kept with their score)",
        schemas.ScoredPairs,
        (),
        (FALLBACK_RATE, PARSE_FAILURE_RATE, SCORE_DISTRIBUTION),
    ),
    Version(
        POLISHED,
        "kept by score.threshold, polished, output filters passed",
        schemas.PolishedPairs,
        (
            stages.EMPTY_AFTER_CLEAN,
            stages.REPEATED_INSTRUCTION,
            stages.PROMPT_OVER_BUDGET,
            stages.EMPTY_GENERATION,
            stages.BROKEN_TEXT,
            stages.BANNED_KEYWORD,
            stages.TOO_SHORT,
            stages.REPEATED_PHRASE,
            stages.DUPLICATE_OUTPUT,
        ),
        (KEEP_RATE, _retention(POLISHED), EMPTY_OUTPUT_RATE, _duplicate_rate(stages.DUPLICATE_OUTPUT), FAITHFULNESS),
    ),
    Version(
        DATASET,
        "COIG-CQIA records released (under the threshold and keywords now in force; answers repeated across shards dropped)",
        schemas.InstructionDataset,
        (stages.BELOW_THRESHOLD, stages.BANNED_KEYWORD, stages.DUPLICATE_OUTPUT),
        (RELEASE_RETENTION, ONE_VERSION),
    ),
)
BY_NAME = {v.name: v for v in VERSIONS}
CORPUS = tuple(v.name for v in VERSIONS if v.name != DATASET)  # partitioned by source x shard, in graph order
# Every source x shard asset in graph order, the dedup indices included: what one run of a source materializes.
PARTITIONED = (RAW, FILTERED, SIGNATURES, CLUSTERS) + CORPUS[CORPUS.index(DEDUPED) :]


def get(asset: str) -> Version:
    """The registry entry of an asset, a later round's (scored_pairs_round2) being its stage's."""
    return BY_NAME[stage_of(asset)]


def find(asset: str) -> Version | None:
    return BY_NAME.get(stage_of(asset))


def findings(asset: str, cfg: KunConfig, result: StageResult, base: UPath) -> list[quality.Finding]:
    """Every WARN check of one partition (or, for instruction_dataset, one source)."""
    result.stats.setdefault("asset", asset)  # the score distribution compares with the same round's partitions
    return [c.measure(cfg, result, base) for c in get(asset).checks]
