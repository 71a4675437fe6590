"""filtered_corpus: cleaned text within the token limit, perplexity under the reference model, exact duplicates out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import pandas as pd

from .. import progress
from ..config import KunConfig
from ..corpus import quarantine_frame
from ..llm.base import Engine, encode
from ..registry import (
    DUPLICATE_TEXT,
    EMPTY_AFTER_CLEAN,
    FILTERED,
    HIGH_PERPLEXITY,
    PERPLEXITY_UNDEFINED,
    TEXT_TOO_LONG,
    TOO_MANY_TOKENS,
)
from ..storage import FrameSink, Sink
from ..text import clean_text
from .common import (
    StageResult,
    batches,
    dropped_rows,
    mark_duplicates,
    no_reasons,
    stage_stats,
    summary,
)


def filter_corpus(
    docs: pd.DataFrame | Iterable[pd.DataFrame],
    tokenizer,
    ppl_engine: Engine | None,
    cfg: KunConfig,
    sink: Sink | None = None,
    label: str = FILTERED,
) -> StageResult:
    """Clean, then drop: empty, over the token limit (label model's tokenizer), exact duplicates,
    perplexity above the threshold (reference model). Dedup runs before perplexity to save work.
    `docs` may be batches (a partition streamed from storage): each is filtered and written to
    `sink` in turn, duplicates found across batches; memory holds one batch and a hash per text."""
    sink = sink or FrameSink()
    seen: dict[bytes, str] = {}
    n_in, counts, tokens, ppls, dropped = 0, Counter(), [], [], []
    stream, total = batches(docs)
    with progress.task(label, total=total, unit="docs") as bar:
        for batch in stream:
            kept, reason, out = _filter_batch(batch, tokenizer, ppl_engine, cfg, seen)
            sink.write(kept)
            n_in += len(batch)
            counts.update(r for r in reason if isinstance(r, str))
            tokens.append(kept["n_tokens"].to_numpy())
            ppls.append(kept["perplexity"].to_numpy())
            dropped.append(out)
            bar.update(len(batch))
    return StageResult(
        rows=sink.close(),
        dropped=pd.concat(dropped, ignore_index=True) if dropped else quarantine_frame([]),
        stats=stage_stats(
            n_in,
            n_in - sum(counts.values()),
            counts.elements(),
            tokens=summary(np.concatenate(tokens) if tokens else [], 0),
            perplexity=summary(np.concatenate(ppls) if ppls else []),
        ),
    )


def _token_counts(tokenizer, texts: list[str], chunk: int = 1000) -> list[int]:
    """Token counts of many texts; a fast tokenizer's encodings (offsets, strings) are large, so
    they are made `chunk` texts at a time and only their lengths kept."""
    return [len(ids) for i in range(0, len(texts), chunk) for ids in encode(tokenizer, texts[i : i + chunk], special=False)]


def _filter_batch(
    docs: pd.DataFrame, tokenizer, ppl_engine: Engine | None, cfg: KunConfig, seen: dict
) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
    df = docs.copy()
    df["text"] = df["text"].map(clean_text).astype(object)  # object even when empty, for .str
    reason, detail = no_reasons(df)
    chars = df["text"].str.len()
    reason[chars == 0] = EMPTY_AFTER_CLEAN
    long = chars > cfg.filter.max_doc_chars
    reason[long] = TEXT_TOO_LONG
    detail[long] = chars[long].map(lambda n: f"{n:,} characters > filter.max_doc_chars {cfg.filter.max_doc_chars:,}")

    texts = df["text"].where(~long, "").tolist()  # a text over the limit is never tokenized (a tokenizer's memory grows with it)
    df["n_tokens"] = pd.Series(_token_counts(tokenizer, texts), index=df.index, dtype="int64")
    over = reason.isna() & (df["n_tokens"] > cfg.filter.max_tokens)
    reason[over] = TOO_MANY_TOKENS
    detail[over] = df.loc[over, "n_tokens"].map(lambda n: f"{n} tokens > {cfg.filter.max_tokens}")

    if cfg.dedup.exact:  # within the partition, before perplexity; deduped_corpus does it across shards
        mark_duplicates(df, "text", reason, detail, DUPLICATE_TEXT, seen)

    df["perplexity"] = np.nan
    if cfg.filter.perplexity_max is not None and ppl_engine is not None:
        alive = df.index[reason.isna()]
        if len(alive):
            df.loc[alive, "perplexity"] = ppl_engine.perplexity(df.loc[alive, "text"].tolist())
        ppl = df.loc[alive, "perplexity"]
        undefined = alive[ppl.isna().to_numpy()]
        high = alive[(ppl > cfg.filter.perplexity_max).to_numpy()]
        reason[undefined] = PERPLEXITY_UNDEFINED
        reason[high] = HIGH_PERPLEXITY
        detail[high] = df.loc[high, "perplexity"].map(lambda p: f"perplexity {p:.1f} > {cfg.filter.perplexity_max}")
    return df[reason.isna()].reset_index(drop=True), reason, dropped_rows(df, reason, detail, "text")
