"""What every stage shares: the reason codes, StageResult, and the bookkeeping of dropped rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..config import KunConfig
from ..corpus import QUARANTINE_COLUMNS
from ..llm.base import EngineError, SamplingParams
from ..storage import Rows
from ..text import text_key

REPLACEMENT_CHAR = "\ufffd"

TRACE_COLUMNS = ["doc_id", "source", "shard", "file", "row"]


@dataclass
class StageResult:
    rows: Rows  # a frame, or the file a streaming stage wrote into staging
    dropped: pd.DataFrame
    stats: dict = field(default_factory=dict)


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
