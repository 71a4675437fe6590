"""labeled_pairs: the label model writes the instruction each text answers."""

from __future__ import annotations

import pandas as pd

from .. import prompts
from ..config import KunConfig
from ..llm.base import Engine
from ..registry import (
    BANNED_KEYWORD,
    BROKEN_TEXT,
    EMPTY_GENERATION,
    LABELED,
)
from ..text import find_keyword
from .common import (
    REPLACEMENT_CHAR,
    StageResult,
    finish,
    no_reasons,
    require_text,
    sampling_params,
    summary,
)


def label(docs: pd.DataFrame, engine: Engine, cfg: KunConfig) -> StageResult:
    """The label model writes the instruction each text answers; instructions that point at
    context the reader will not have (banned keywords) are dropped. The instruction is kept as the
    model wrote it, less trailing whitespace (Kun's instruction filter): scoring reads it raw."""
    df = docs.copy()
    keep_system = prompts.system_of(engine, cfg)
    gens = engine.generate(
        [prompts.render(engine.tokenizer, prompts.label_user(t), keep_system=keep_system) for t in df["text"]], sampling_params(cfg)
    )
    require_text(gens, LABELED, engine.model_name)
    df["instruction"] = pd.Series([g.text.rstrip() for g in gens], index=df.index, dtype=object)
    df["label_tokens"] = [g.num_tokens for g in gens]
    df["label_finish"] = [g.finish_reason for g in gens]
    reason, detail = no_reasons(df)
    reason[df["instruction"].str.len() == 0] = EMPTY_GENERATION
    broken = reason.isna() & df["instruction"].str.contains(REPLACEMENT_CHAR, regex=False)
    reason[broken], detail[broken] = BROKEN_TEXT, "instruction holds U+FFFD (bytes that are not UTF-8)"
    for i in df.index[reason.isna()]:
        kw = find_keyword(df.at[i, "instruction"], cfg.label.banned_keywords)
        if kw:
            reason[i], detail[i] = BANNED_KEYWORD, f"instruction contains {kw!r}"
    return finish(
        df,
        reason,
        detail,
        "instruction",
        lambda kept: {
            "instruction_tokens": summary(kept["label_tokens"], 0),
            "truncated_at_max_tokens": int((df["label_finish"] == "length").sum()),
        },
    )
