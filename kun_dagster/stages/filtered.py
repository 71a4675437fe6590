"""filtered_corpus: cleaned text within the token limit, perplexity under the reference model, exact duplicates out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import pandas as pd

from .. import progress
from ..corpus import quarantine_frame
from ..llm.base import encode
from ..registry import (
    DUPLICATE_TEXT,
    EMPTY_AFTER_CLEAN,
    FILTERED,
    HIGH_PERPLEXITY,
    PERPLEXITY_UNDEFINED,
    TEXT_TOO_LONG,
    TOO_MANY_TOKENS,
)
from ..text import clean_text
from .common import (
    Rule,
    StageContext,
    StageResult,
    apply_rules,
    batches,
    dropped_rows,
    empty,
    mark_duplicates,
    no_reasons,
    stage_stats,
    summary,
)


def filter_corpus(docs: pd.DataFrame | Iterable[pd.DataFrame], ctx: StageContext) -> StageResult:
    """Clean, then drop: empty, over the token limit (the context's tokenizer: the label model's),
    exact duplicates, perplexity above the threshold (the context's engine: the reference model).
    Dedup runs before perplexity to save work. `docs` may be batches (a partition streamed from
    storage): each is filtered and written to the sink in turn, duplicates found across batches;
    memory holds one batch and a hash per text."""
    seen: dict[bytes, str] = {}
    n_in, counts, tokens, ppls, dropped = 0, Counter(), [], [], []
    stream, total = batches(docs)
    with progress.task(ctx.named(FILTERED), total=total, unit="docs") as bar:
        for batch in stream:
            kept, reason, out = _filter_batch(batch, ctx, seen)
            ctx.sink.write(kept)
            n_in += len(batch)
            counts.update(r for r in reason if isinstance(r, str))
            tokens.append(kept["n_tokens"].to_numpy())
            ppls.append(kept["perplexity"].to_numpy())
            dropped.append(out)
            bar.update(len(batch))
    return StageResult(
        rows=ctx.sink.close(),
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


# The corpus filters, each over what the step before it computed: the cleaned text, its tokens
# (a text over max_doc_chars is never tokenized: a tokenizer's memory grows with it), its perplexity.
TEXT_RULES = (
    Rule(EMPTY_AFTER_CLEAN, "text", empty),
    Rule(
        TEXT_TOO_LONG,
        "text",
        lambda t, cfg: (
            f"{len(t):,} characters > filter.max_doc_chars {cfg.filter.max_doc_chars:,}" if len(t) > cfg.filter.max_doc_chars else None
        ),
    ),
)
TOKEN_RULES = (
    Rule(TOO_MANY_TOKENS, "n_tokens", lambda n, cfg: f"{n} tokens > {cfg.filter.max_tokens}" if n > cfg.filter.max_tokens else None),
)
PERPLEXITY_RULES = (
    Rule(PERPLEXITY_UNDEFINED, "perplexity", lambda p, cfg: "" if p != p else None),  # NaN
    Rule(
        HIGH_PERPLEXITY,
        "perplexity",
        lambda p, cfg: f"perplexity {p:.1f} > {cfg.filter.perplexity_max}" if p > cfg.filter.perplexity_max else None,
    ),
)


def _filter_batch(docs: pd.DataFrame, ctx: StageContext, seen: dict) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
    cfg, df = ctx.cfg, docs.copy()
    df["text"] = df["text"].map(clean_text).astype(object)  # object even when empty, for .str
    reason, detail = no_reasons(df)
    apply_rules(df, TEXT_RULES, cfg, reason, detail)
    texts = df["text"].where(reason != TEXT_TOO_LONG, "").tolist()
    df["n_tokens"] = pd.Series(_token_counts(ctx.tokenizer, texts), index=df.index, dtype="int64")
    apply_rules(df, TOKEN_RULES, cfg, reason, detail)
    if cfg.dedup.exact:  # within the partition, before perplexity; deduped_corpus does it across shards
        mark_duplicates(df, "text", reason, detail, DUPLICATE_TEXT, seen)
    df["perplexity"] = np.nan
    if cfg.filter.perplexity_max is not None and ctx.engine is not None:
        alive = df.index[reason.isna()]
        if len(alive):
            df.loc[alive, "perplexity"] = ctx.engine.perplexity(df.loc[alive, "text"].tolist())
        apply_rules(df, PERPLEXITY_RULES, cfg, reason, detail)
    return df[reason.isna()].reset_index(drop=True), reason, dropped_rows(df, reason, detail, "text")
