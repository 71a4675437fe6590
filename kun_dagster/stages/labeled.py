"""labeled_pairs: the label model writes the instruction each text answers."""

from __future__ import annotations

import pandas as pd

from .. import prompts
from ..registry import (
    BANNED_KEYWORD,
    BROKEN_TEXT,
    EMPTY_GENERATION,
    LABELED,
)
from .common import (
    Rule,
    StageContext,
    StageResult,
    apply_rules,
    banned,
    broken,
    empty,
    finish,
    no_reasons,
    require_text,
    sampling_params,
    summary,
)

# Kun's instruction filter, in order: the first rule a row fails names its reason.
INSTRUCTION_RULES = (
    Rule(EMPTY_GENERATION, "instruction", empty),
    Rule(BROKEN_TEXT, "instruction", broken("instruction")),
    Rule(BANNED_KEYWORD, "instruction", banned("instruction", "label")),  # context the reader will not have
)


def label(docs: pd.DataFrame, ctx: StageContext) -> StageResult:
    """The label model writes the instruction each text answers; instructions that point at
    context the reader will not have (banned keywords) are dropped. The instruction is kept as the
    model wrote it, less trailing whitespace (Kun's instruction filter): scoring reads it raw."""
    df, engine, cfg = docs.copy(), ctx.engine, ctx.cfg
    keep_system = prompts.system_of(engine, cfg)
    gens = engine.generate(
        [prompts.render(engine.tokenizer, prompts.label_user(t), keep_system=keep_system) for t in df["text"]], sampling_params(cfg)
    )
    require_text(gens, LABELED, engine.model_name)
    df["instruction"] = pd.Series([g.text.rstrip() for g in gens], index=df.index, dtype=object)
    df["label_tokens"] = [g.num_tokens for g in gens]
    df["label_finish"] = [g.finish_reason for g in gens]
    reason, detail = no_reasons(df)
    apply_rules(df, INSTRUCTION_RULES, cfg, reason, detail)
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
