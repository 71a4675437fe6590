"""The Kun stages as plain functions, one protocol: stage(rows, StageContext) -> StageResult (rows
kept, rows dropped with their reasons, stats); filters are lists of Rules with their reason codes.

No Dagster here: assets/ calls these once per partition. Every dropped row carries a reason code
(and its doc id), so nothing disappears without a count. One module per stage, named after the
dataset version it makes (raw, filtered, deduped, labeled, scored, polished); common.py holds what they share.
"""

from ..registry import (
    BANNED_KEYWORD,
    BROKEN_TEXT,
    DUPLICATE_OUTPUT,
    DUPLICATE_TEXT,
    EMPTY_AFTER_CLEAN,
    EMPTY_GENERATION,
    HIGH_PERPLEXITY,
    NEAR_DUPLICATE,
    PERPLEXITY_UNDEFINED,
    PROMPT_OVER_BUDGET,
    REPEATED_INSTRUCTION,
    REPEATED_PHRASE,
    TEXT_TOO_LONG,
    TOO_MANY_TOKENS,
    TOO_SHORT,
)
from .common import (
    Rule,
    StageContext,
    StageResult,
    sampling_params,
)
from .deduped import DedupError, band_pairs, cluster, clusters, dedupe, merge_bands, sign
from .filtered import filter_corpus
from .labeled import label
from .polished import output_reason, polish
from .raw import corpus_texts, ingest
from .scored import score

__all__ = [
    "BANNED_KEYWORD",
    "BROKEN_TEXT",
    "DUPLICATE_OUTPUT",
    "DUPLICATE_TEXT",
    "EMPTY_AFTER_CLEAN",
    "EMPTY_GENERATION",
    "HIGH_PERPLEXITY",
    "NEAR_DUPLICATE",
    "PERPLEXITY_UNDEFINED",
    "PROMPT_OVER_BUDGET",
    "REPEATED_INSTRUCTION",
    "REPEATED_PHRASE",
    "TEXT_TOO_LONG",
    "TOO_MANY_TOKENS",
    "TOO_SHORT",
    "DedupError",
    "Rule",
    "StageContext",
    "StageResult",
    "band_pairs",
    "cluster",
    "clusters",
    "corpus_texts",
    "dedupe",
    "filter_corpus",
    "ingest",
    "label",
    "merge_bands",
    "output_reason",
    "polish",
    "sampling_params",
    "score",
    "sign",
]
