"""The registry: one spec per asset, in graph order, and every per-asset table derived from it.

A spec is the one place for an asset's name, its UI group, how it is partitioned, whether it
exists once per round, its Pandera schema (by name, in schemas.py), the reason codes its
quarantine may hold (defined here), its WARN checks and their default bounds, the kun.yaml keys and prompts that
shape it (its code version), the engine role it runs, and whether the daemon automates it. The
assets, the checks, the code versions, the automation, the funnel, the card and the CLI read it.

A leaf: it imports no other module of the project but the two helpers its WARN checks measure with
(quality, storage), so every module may import it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from upath import UPath

from . import quality, storage

# -- the reason codes: every code a quarantine row may carry, with what it means (the specs list
# which asset's quarantine may hold which; the stages and the ingest emit them) ------------------------
# raw_corpus: reading the source files (corpus.py)
INVALID_ENCODING = "invalid_encoding"  # bytes that are not valid in the source's encoding
INVALID_UNICODE = "invalid_unicode"  # a lone surrogate (a JSON \\ud83d escape): no UTF-8 can hold it
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"  # the text field is absent or null
TEXT_NOT_STRING = "text_not_string"  # a number, a list, an object
EMPTY_TEXT = "empty_text"  # nothing but spaces, control characters, escapes
MISSING_ID = "missing_id"  # absent, null, empty, or not a string or number
DUPLICATE_ID = "duplicate_id"  # an earlier document of the source has this id (the detail names where)
EMPTY_FILE = "empty_file"  # zero bytes: no records (one row, so the file is seen)
UNREADABLE_FILE = "unreadable_file"  # the file itself broke (a corrupt archive): the rows after it cannot be read
RECORD_TOO_LARGE = "record_too_large"  # over ingest.max_record_bytes; the rest of the file is read
FILE_TOO_LARGE = "file_too_large"  # a whole-file JSON over ingest.max_file_bytes
ROW_GROUP_TOO_LARGE = "row_group_too_large"  # a Parquet row group whose columns read are over ingest.max_file_bytes
RECORD_ERROR = "record_error"  # a record no rule expected broke the reader; the rest of the file is read

# the corpus filters and dedup
EMPTY_AFTER_CLEAN = "empty_after_clean"
TEXT_TOO_LONG = "text_too_long"  # over filter.max_doc_chars: dropped before it is tokenized
TOO_MANY_TOKENS = "too_many_tokens"
HIGH_PERPLEXITY = "high_perplexity"
PERPLEXITY_UNDEFINED = "perplexity_undefined"
DUPLICATE_TEXT = "duplicate_text"  # the same text up to whitespace as a document kept before it
NEAR_DUPLICATE = "near_duplicate"  # a MinHash near-duplicate of a document its cluster keeps

# the LLM stages and the release
EMPTY_GENERATION = "empty_generation"
BANNED_KEYWORD = "banned_keyword"
PROMPT_OVER_BUDGET = "prompt_over_budget"
TOO_SHORT = "too_short"
REPEATED_PHRASE = "repeated_phrase"
REPEATED_INSTRUCTION = "repeated_instruction"  # a repeated line that does not open the instruction: Kun drops it
DUPLICATE_OUTPUT = "duplicate_output"
BROKEN_TEXT = "broken_text"  # U+FFFD: the model emitted bytes that are not UTF-8
HELDOUT_OVERLAP = "heldout_overlap"  # the record (or its document) holds a held-out seed's answer: the evaluation's test item
# Every code above (the constants defined so far are exactly they): what the specs' `reasons` draw on.
REASONS = frozenset(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str) and v == k.lower())


# -- the asset names ---------------------------------------------------------------------------------
SEED_DATA, BASE_MODEL, LABEL_MODEL, CHAT_MODEL = "seed_data", "base_model", "label_model", "chat_model"
RAW, FILTERED, DEDUPED, LABELED, SCORED, POLISHED, DATASET = (
    "raw_corpus",
    "filtered_corpus",
    "deduped_corpus",
    "labeled_pairs",
    "scored_pairs",
    "polished_pairs",
    "instruction_dataset",
)
# The dedup indices (dedup.py): a MinHash signature per document, and the clusters over a whole
# source that deduped_corpus drops by. They hold data but are not dataset versions (no funnel row).
SIGNATURES, CLUSTERS = "minhash_signatures", "duplicate_clusters"
# dedup.mode: band_steps: one LSH band's candidate pairs of a cluster group per partition, which
# duplicate_clusters merges (stages.deduped.band and merge)
LSH_BANDS = "lsh_band_pairs"
EVALUATION = "evaluation"
# The release folder (release/{source}: train.jsonl, README.md, manifest.json), one writer for all of it.
CARD = "dataset_card"
# The source corpora's files, observed per source x shard (automation/sources.py): raw_corpus's input.
SOURCE_FILES = "source_files"

# How an asset is partitioned (assets/partitions.py builds the definitions).
SOURCE_SHARD, SOURCE, GROUP_BAND = "source x shard", "source", "cluster group x band"


# -- the WARN checks ---------------------------------------------------------------------------------
# A WARN check's measure: the partition's figure against its bound (cfg: the KunConfig, whose
# `checks` hold the bounds), from the stage's result (a stages.StageResult: rows, dropped, stats).
Measure = Callable[[Any, Any, UPath], quality.Finding]


@dataclass(frozen=True)
class WarnCheck:
    name: str
    description: str
    measure: Measure


def _rows_in(result) -> int:
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
    "empty_output_rate", EMPTY_GENERATION, "max_empty_rate", "empty", "Empty generations at most checks.max_empty_rate."
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


def _fallback(cfg, r, base: UPath) -> quality.Finding:
    free = r.stats.get("scored_by", {}).get("freetext", 0)
    return quality.rate(
        "fallback_rate",
        free,
        _rows_in(r) if r.stats.get("fallback_rate") is not None else 0,
        cfg.checks.max_fallback_rate,
        "scored by free text (answer mass under score.min_answer_mass)",
    )


def _parse_failures(cfg, r, base: UPath) -> quality.Finding:
    free = r.stats.get("scored_by", {}).get("freetext", 0)
    return quality.rate(
        "parse_failure_rate", r.stats.get("parse_failures", 0), free, cfg.checks.max_parse_failure_rate, "of the free-text replies unparsed"
    )


def _score_shift(cfg, r, base: UPath) -> quality.Finding:
    """Scores of this partition against the source's other published scored_pairs partitions."""
    rows, earlier = r.rows, []
    for other in cfg.shard_keys() if len(rows) else []:
        d = storage.partition_dir(base, r.stats.get("asset", SCORED), {"source": rows["source"].iloc[0], "shard": other})
        if other != str(rows["shard"].iloc[0]) and storage.partition_rows(d):
            earlier.append(storage.read_partition(d, ["score"])["score"].to_numpy(dtype=float))
    return quality.score_shift(
        rows["score"].to_numpy(dtype=float), np.concatenate(earlier) if earlier else np.array([]), cfg.checks.max_score_shift
    )


def _faithfulness(cfg, r, base: UPath) -> quality.Finding:
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


def _release_retention(cfg, r, base: UPath) -> quality.Finding:
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


def _one_version(cfg, r, base: UPath) -> quality.Finding:
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


# -- the specs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    name: str
    group: str  # the UI's asset group (a later round's stages are one group, round<k>)
    partitions: str | None = None  # SOURCE_SHARD, SOURCE, GROUP_BAND, or None (one output)
    per_round: bool = False  # exists once per round (<name>_round<k> for k >= 2)
    # kun.yaml keys and prompt names that shape its output (code_versions.py); a later round's
    # chat model has its own keys (it is always trained)
    shapes: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    later_shapes: tuple[str, ...] | None = None
    engine: str | None = None  # the model role whose engine it runs ("label", "chat"): its settings shape it too
    automation: str | None = None  # the deploy.automation level that automates it ("corpus" or "all"); None: never
    awaits: tuple[str, ...] = ()  # inputs it re-runs after only when their content moved (automation)
    # dataset versions (a funnel row, a schema, a quarantine):
    what: str = ""  # what its rows are, for the funnel and the card
    schema: str | None = None  # its Pandera model in schemas.py
    reasons: tuple[str, ...] = ()  # the reason codes its quarantine may hold
    checks: tuple[WarnCheck, ...] = ()
    retention: tuple[float, float] | None = None  # checks.retention.<name>'s default bounds

    @property
    def is_version(self) -> bool:
        return self.schema is not None


_MODELS = "models"
SPECS: tuple[Spec, ...] = (
    Spec(SEED_DATA, _MODELS, shapes=("seed",), automation="all"),
    Spec(BASE_MODEL, _MODELS, shapes=("models.base.path", "models.base.tiny", "sources", "shards"), automation="all"),
    Spec(
        LABEL_MODEL,
        _MODELS,
        shapes=("models.label.path", "models.label.train", "models.keep_default_system"),
        prompts=("label",),
        automation="all",
    ),
    Spec(
        CHAT_MODEL,
        _MODELS,
        per_round=True,
        shapes=("models.chat.path", "models.chat.train", "models.keep_default_system"),
        later_shapes=("models.chat.train", "models.keep_default_system", "round_data", "score.threshold"),
        automation="all",
    ),
    Spec(
        RAW,
        "corpus",
        SOURCE_SHARD,
        shapes=("sources", "shards", "ingest"),
        automation="corpus",
        what="documents read",
        schema="RawCorpus",
        reasons=(
            INVALID_ENCODING,
            INVALID_UNICODE,
            INVALID_JSON,
            NOT_AN_OBJECT,
            MISSING_TEXT,
            TEXT_NOT_STRING,
            EMPTY_TEXT,
            MISSING_ID,
            DUPLICATE_ID,
            EMPTY_FILE,
            UNREADABLE_FILE,
            RECORD_TOO_LARGE,
            FILE_TOO_LARGE,
            ROW_GROUP_TOO_LARGE,
            RECORD_ERROR,
        ),
        checks=(_retention(RAW), QUARANTINE_RATE),
        retention=(0.8, 1.0),
    ),
    Spec(
        FILTERED,
        "corpus",
        SOURCE_SHARD,
        shapes=("filter", "dedup.exact"),  # + the perplexity role's engine where the filter is on (code_versions.py)
        automation="corpus",
        what="after cleaning, token-limit, exact dedup within the shard and perplexity filters",
        schema="FilteredCorpus",
        reasons=(EMPTY_AFTER_CLEAN, TEXT_TOO_LONG, TOO_MANY_TOKENS, DUPLICATE_TEXT, PERPLEXITY_UNDEFINED, HIGH_PERPLEXITY),
        checks=(_retention(FILTERED), _duplicate_rate(DUPLICATE_TEXT)),
        retention=(0.3, 1.0),
    ),
    Spec(SIGNATURES, "corpus", SOURCE_SHARD, shapes=("dedup.ngram", "dedup.num_perm", "dedup.seed"), automation="corpus"),
    Spec(
        LSH_BANDS,
        "corpus",
        GROUP_BAND,  # only under dedup.mode: band_steps
        shapes=("dedup.near", "dedup.threshold", "dedup.scope", "sources"),  # exact copies leave LSH whatever dedup.exact says
        automation="corpus",
    ),
    Spec(
        CLUSTERS,
        "corpus",
        SOURCE_SHARD,  # made for a whole source at once (single-run backfill)
        shapes=("dedup.exact", "dedup.near", "dedup.threshold", "dedup.scope", "sources"),
        automation="corpus",
    ),
    Spec(
        DEDUPED,
        "corpus",
        SOURCE_SHARD,
        automation="corpus",
        awaits=(CLUSTERS,),
        what="duplicates of documents in other shards removed: exact and near",
        schema="DedupedCorpus",
        reasons=(DUPLICATE_TEXT, NEAR_DUPLICATE),
        checks=(_retention(DEDUPED), DEDUP_RATE),
        retention=(0.5, 1.0),
    ),
    Spec(
        LABELED,
        "pairs",
        SOURCE_SHARD,
        shapes=("label.banned_keywords", "sampling"),
        prompts=("label",),
        engine="label",
        automation="all",
        what="instructions written, keyword filter passed",
        schema="LabeledPairs",
        reasons=(EMPTY_GENERATION, BROKEN_TEXT, BANNED_KEYWORD),
        checks=(_retention(LABELED), EMPTY_OUTPUT_RATE),
        retention=(0.7, 1.0),
    ),
    Spec(
        SCORED,
        "pairs",
        SOURCE_SHARD,
        per_round=True,
        shapes=("score.method", "score.min_answer_mass", "score.exact", "score.decision", "sampling"),
        prompts=("point", "humpback"),
        engine="chat",
        automation="all",
        what="instructions scored (all rows kept with their score)",
        schema="ScoredPairs",
        checks=(FALLBACK_RATE, PARSE_FAILURE_RATE, SCORE_DISTRIBUTION),
    ),
    Spec(
        POLISHED,
        "pairs",
        SOURCE_SHARD,
        per_round=True,
        shapes=("score.threshold", "polish", "label.whitespace_run", "sampling", "tags", "score.min_answer_mass"),
        prompts=("answer", "tag_task_type", "tag_domain"),
        engine="chat",
        automation="all",
        what="kept by score.threshold, polished, output filters passed",
        schema="PolishedPairs",
        reasons=(
            EMPTY_AFTER_CLEAN,
            REPEATED_INSTRUCTION,
            PROMPT_OVER_BUDGET,
            EMPTY_GENERATION,
            BROKEN_TEXT,
            BANNED_KEYWORD,
            TOO_SHORT,
            REPEATED_PHRASE,
            DUPLICATE_OUTPUT,
        ),
        checks=(KEEP_RATE, _retention(POLISHED), EMPTY_OUTPUT_RATE, _duplicate_rate(DUPLICATE_OUTPUT), FAITHFULNESS),
        retention=(0.5, 1.0),
    ),
    Spec(
        DATASET,
        "dataset",
        SOURCE,
        per_round=True,
        shapes=("dataset", "polish.dedup_outputs", "tags.task_types", "dedup.threshold", "dedup.num_perm", "dedup.seed"),
        automation="all",
        what="COIG-CQIA records released (as polished; answers repeated across shards and held-out seed answers dropped)",
        schema="InstructionDataset",
        reasons=(DUPLICATE_OUTPUT, HELDOUT_OVERLAP),
        checks=(RELEASE_RETENTION, ONE_VERSION),
        retention=(0.01, 1.0),
    ),
    Spec(
        EVALUATION,
        "dataset",
        per_round=True,
        shapes=("evaluation", "models.chat.train", "models.keep_default_system", "sampling.repetition_penalty"),
        prompts=("judge",),
        engine="chat",
    ),
    Spec(
        CARD,
        "dataset",
        SOURCE,
        per_round=True,
        # where it is written (release/{source} is the last round's), and the card's own lines
        shapes=("iterations", "score.method", "score.threshold", "score.min_answer_mass", "dedup.threshold"),
        automation="all",
    ),
)
BY_NAME = {s.name: s for s in SPECS}

# -- derived tables ----------------------------------------------------------------------------------
MODELS = tuple(s.name for s in SPECS if s.group == _MODELS and s.name != SEED_DATA)  # the model assets
VERSIONS = tuple(s for s in SPECS if s.is_version)  # the dataset versions, in graph order
CORPUS = tuple(s.name for s in VERSIONS if s.partitions == SOURCE_SHARD)  # the funnel's stages, in graph order
# Every source x shard asset in graph order, the dedup indices included: what one run of a source materializes.
PARTITIONED = tuple(s.name for s in SPECS if s.partitions == SOURCE_SHARD)
ROUND_STAGES = tuple(s.name for s in SPECS if s.per_round)
RETENTION = {s.name: s.retention for s in SPECS if s.retention}  # checks.retention's defaults
AWAITS = {s.name: s.awaits for s in SPECS if s.awaits}
AUTOMATED = {
    "off": (),
    "corpus": tuple(s.name for s in SPECS if s.automation == "corpus"),
    "all": tuple(s.name for s in SPECS if s.automation),
}


# -- rounds ------------------------------------------------------------------------------------------
# Humpback's rounds (config `iterations`): round 1 is the graph; round k >= 2 re-trains the chat
# model and re-scores the same labeled_pairs, so the per-round stages exist once per round, named
# <stage>_round<k> (docs/ARCHITECTURE.md: why not a dimension).
_ROUND = "_round"


def in_round(stage: str, k: int) -> str:
    """The asset name of a per-round stage in round k (round 1 keeps the plain name)."""
    if stage not in ROUND_STAGES:
        raise ValueError(f"{stage} is not a per-round stage ({', '.join(ROUND_STAGES)})")
    return stage if k == 1 else f"{stage}{_ROUND}{k}"


def round_asset(asset: str, k: int) -> str:
    """An asset as round k reads or makes it: a per-round stage's round-k name, any other as it is."""
    return in_round(asset, k) if asset in ROUND_STAGES else asset


def split_round(asset: str) -> tuple[str, int]:
    """(stage, round) of an asset name: scored_pairs_round2 -> (scored_pairs, 2); others round 1."""
    stage, sep, k = asset.rpartition(_ROUND)
    if sep and k.isdigit() and stage in ROUND_STAGES and int(k) >= 2:
        return stage, int(k)
    return asset, 1


def stage_of(asset: str) -> str:
    return split_round(asset)[0]


def group(asset: str) -> str:
    """An asset's UI group: its spec's, a later round's stages together in round<k>."""
    stage, k = split_round(asset)
    return BY_NAME[stage].group if k == 1 else f"round{k}"


# -- the step groups: the declared jobs, in the order `kun run` walks them ----------------------------
@dataclass(frozen=True)
class Step:
    """A group of assets made together: a job in the UI, one run per source range in `kun run`."""

    job: str
    stages: tuple[str, ...]  # in graph order; a per-round stage as round k's asset
    what: str
    rounds: str = "first"  # "first": round 1 only; "later": rounds 2.. (one job each); "each": every round
    whole_source: bool = False  # made over every shard of a source at once (dedup's clusters)
    when: str | None = None  # a config switch it needs ("evaluation", "band_steps")


STEPS = (
    Step("models", (SEED_DATA, BASE_MODEL, LABEL_MODEL, CHAT_MODEL), "the seed data, the base, the label and the chat model"),
    Step("corpus_head", (RAW, FILTERED, SIGNATURES), "ingest, filter and sign each shard"),
    Step(
        "bands",
        (LSH_BANDS,),
        "each LSH band's candidate pairs over every shard of a source (dedup.scope all: of every source)",
        when="band_steps",
    ),
    Step("clusters", (CLUSTERS,), "duplicate clusters over every shard of a source (dedup.scope all: of every source)", whole_source=True),
    Step("corpus_tail", (DEDUPED, LABELED, SCORED, POLISHED), "dedupe, label, score and polish each shard"),
    Step("retrain", (CHAT_MODEL,), "round k's chat model (Humpback's M_{k-1}), trained on round k-1's data", rounds="later"),
    Step("rescore", (SCORED, POLISHED), "the same labeled pairs scored and polished by round k's chat model", rounds="later"),
    Step("release", (DATASET,), "each source's records, gated", rounds="each"),
    Step(
        "evaluate", (EVALUATION,), "the release's worth: seeds-only and seeds + release models compared", rounds="each", when="evaluation"
    ),
    Step("card", (CARD,), "each source's release folder: train.jsonl, the dataset card, the manifest", rounds="each"),
)


@dataclass(frozen=True)
class Job:
    """A step of one round: its job's name and its assets' names."""

    name: str
    assets: tuple[str, ...]
    step: Step
    round: int


def jobs(iterations: int, evaluation: bool, band_steps: bool = False) -> list[Job]:
    """Every step's job, rounds expanded, in the order `kun run` makes them: the models and the
    corpus, round 1's release (and evaluation), then each later round's model, pairs, release.
    The evaluation's and the bands' jobs exist where their switch is on."""
    switches = {"evaluation": evaluation, "band_steps": band_steps}
    out = []
    for k in range(1, iterations + 1):
        for step in STEPS:
            if {"first": k != 1, "later": k == 1, "each": False}[step.rounds] or (step.when and not switches[step.when]):
                continue
            name = step.job if k == 1 else f"{step.job}_round{k}"
            out.append(Job(name, tuple(round_asset(a, k) for a in step.stages), step, k))
    return out


# -- lookups -----------------------------------------------------------------------------------------
def spec(asset: str) -> Spec:
    """The spec of an asset, a later round's (scored_pairs_round2) being its stage's."""
    return BY_NAME[stage_of(asset)]


def get(asset: str) -> Spec:
    """The spec of a dataset version (KeyError for an asset that holds no dataset version)."""
    s = spec(asset)
    if not s.is_version:
        raise KeyError(asset)
    return s


def find(asset: str) -> Spec | None:
    """The spec of a dataset version, None for any other asset."""
    s = BY_NAME.get(stage_of(asset))
    return s if s is not None and s.is_version else None


def findings(asset: str, cfg, result, base: UPath) -> list[quality.Finding]:
    """Every WARN check of one partition (or, for instruction_dataset, one source)."""
    result.stats.setdefault("asset", asset)  # the score distribution compares with the same round's partitions
    return [c.measure(cfg, result, base) for c in get(asset).checks]
