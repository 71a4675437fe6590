"""What every stage shares: the protocol (rows, StageContext) -> StageResult, filter rules with
their reason codes, and the bookkeeping of dropped rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..config import KunConfig
from ..corpus import QUARANTINE_COLUMNS
from ..llm.base import Engine, EngineError, SamplingParams
from ..storage import FrameSink, Rows, Sink
from ..text import find_keyword, text_key

REPLACEMENT_CHAR = "\ufffd"

TRACE_COLUMNS = ["doc_id", "source", "shard", "file", "row"]


@dataclass
class StageResult:
    rows: Rows  # a frame, or the file a streaming stage wrote into staging
    dropped: pd.DataFrame
    stats: dict = field(default_factory=dict)


@dataclass
class StageContext:
    """What a stage needs besides its rows. Every stage is `stage(rows, ctx) -> StageResult`: rows
    are a frame, or batches of one streamed from storage (a raw partition reads its files instead);
    the asset side (assets/common.py: run_stage) builds the context per partition."""

    cfg: KunConfig
    engine: Engine | None = None  # the stage's model role, checkpointed per batch
    tokenizer: Any = None  # what the corpus filter counts tokens with (the label model's)
    sink: Sink = field(default_factory=FrameSink)  # where a streaming stage writes its rows
    quarantine: Sink = field(default_factory=FrameSink)  # ... and its quarantine rows (the ingest)
    partition: dict[str, str] = field(default_factory=dict)  # {"source": ..., "shard": ...}
    inputs: dict[str, Any] = field(default_factory=dict)  # its other inputs, by asset (deduped_corpus: the clusters)
    store: Any = None  # where the source files are (the ingest); None: the config's
    label: str = ""  # for progress lines

    def named(self, what: str) -> str:
        """The progress line's name: `what` (or the context's label) and the partition."""
        return f"{self.label or what} {'/'.join(self.partition.values())}".strip()


@dataclass(frozen=True)
class Rule:
    """A filter, as datatrove's: a row whose `column` fails is dropped as `code`. `test(value, cfg)`
    gives the drop's detail (a string, maybe empty), or None to keep the row."""

    code: str
    column: str
    test: Callable[[Any, KunConfig], str | None]


def apply_rules(df: pd.DataFrame, rules: Iterable[Rule], cfg: KunConfig, reason: pd.Series, detail: pd.Series) -> None:
    """Each rule in order over the rows no rule has dropped yet: the first that fires names the reason."""
    for rule in rules:
        alive = df.index[reason.isna()]
        for i, value in zip(alive, df.loc[alive, rule.column].tolist()):
            why = rule.test(value, cfg)
            if why is not None:
                reason[i], detail[i] = rule.code, why


def banned(column: str, key: str):
    """A rule's test: the text holds one of cfg.<key>.banned_keywords."""

    def test(text: str, cfg: KunConfig) -> str | None:
        kw = find_keyword(text, getattr(cfg, key).banned_keywords)
        return f"{column} contains {kw!r}" if kw else None

    return test


def empty(text: str, cfg: KunConfig) -> str | None:
    return "" if not text else None


def broken(column: str):
    return lambda text, cfg: f"{column} holds U+FFFD (bytes that are not UTF-8)" if REPLACEMENT_CHAR in text else None


def first_reason(rules: Iterable[Rule], row: dict, cfg: KunConfig) -> tuple[str, str] | None:
    """(reason, detail) of the first rule a row fails, None if it passes them all."""
    for rule in rules:
        why = rule.test(row[rule.column], cfg)
        if why is not None:
            return rule.code, why
    return None


def sampling_params(cfg: KunConfig) -> SamplingParams:
    s = cfg.sampling
    return SamplingParams(
        temperature=s.temperature, top_p=s.top_p, repetition_penalty=s.repetition_penalty, max_tokens=s.max_tokens, seed=s.seed
    )


def dropped_rows(df: pd.DataFrame, reasons: pd.Series, detail: pd.Series, sample_col: str) -> pd.DataFrame:
    """Quarantine rows (the ingest columns) for the rows of df whose reason is set."""
    mask = reasons.notna()
    out = df.loc[mask, [c for c in TRACE_COLUMNS if c in df]].copy()
    out["reason"] = reasons[mask]
    out["detail"] = detail[mask].fillna("")
    out["sample"] = df.loc[mask, sample_col].astype(str).str.slice(0, 200)
    return out.reindex(columns=QUARANTINE_COLUMNS)


def no_reasons(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per-row (reason, detail), None = keep; a stage fills them in as its rules fire."""
    return (pd.Series([None] * len(df), index=df.index, dtype=object), pd.Series([None] * len(df), index=df.index, dtype=object))


def mark_duplicates(
    df: pd.DataFrame, column: str, reason: pd.Series, detail: pd.Series, code: str, first: dict[bytes, str] | None = None
) -> None:
    """Drop every later row whose `column` equals (up to whitespace) an earlier kept row's; `first`
    (a 16-byte hash of each kept text -> its doc id) carries the kept texts across batches."""
    first = {} if first is None else first
    for i in df.index[reason.isna()]:
        key = text_key(df.at[i, column])
        if key in first:
            reason[i], detail[i] = code, f"same {column} as {first[key]}"
        else:
            first[key] = df.at[i, "doc_id"]


def batches(docs: pd.DataFrame | Iterable[pd.DataFrame]) -> tuple[Iterable[pd.DataFrame], int | None]:
    """A stage's input as batches (a frame is one), and its row count where known (for progress)."""
    if isinstance(docs, pd.DataFrame):
        return [docs], len(docs)
    return docs, getattr(docs, "total", None)


def summary(values, digits: int = 2) -> dict:
    arr = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if arr.size == 0:
        return {}
    q = np.percentile(arr, [0, 50, 90, 100])
    return {"min": round(q[0], digits), "p50": round(q[1], digits), "p90": round(q[2], digits), "max": round(q[3], digits)}


def stage_stats(n_in: int, result_rows: int, reasons, **extra) -> dict:
    counts = Counter(r for r in reasons if isinstance(r, str))
    return {
        "rows_in": n_in,
        "rows_out": result_rows,
        "retention": round(result_rows / n_in, 4) if n_in else None,
        "dropped": dict(sorted(counts.items())),
        **extra,
    }


def finish(df: pd.DataFrame, reason: pd.Series, detail: pd.Series, sample_col: str, extra=lambda kept: {}) -> StageResult:
    """The stage's result: the rows with no reason (kept), the others as quarantine rows, the
    counts, and `extra(kept)` figures."""
    kept = df[reason.isna()].reset_index(drop=True)
    return StageResult(
        rows=kept, dropped=dropped_rows(df, reason, detail, sample_col), stats=stage_stats(len(df), len(kept), reason, **extra(kept))
    )


ALL_EMPTY_MIN = 16  # prompts; fewer all empty: a small partition's chance (the step as a whole is checked: llm.base.Tally)


def require_text(gens, what: str, model: str) -> None:
    """A partition whose many generations all came back empty: the model or engine failed."""
    if len(gens) >= ALL_EMPTY_MIN and not any(g.text for g in gens):
        raise EngineError(f"{what}: model {model} returned empty text for all {len(gens)} prompts; nothing is published")
