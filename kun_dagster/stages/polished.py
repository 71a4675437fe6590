"""polished_pairs: rows reaching the score threshold, rewritten into answers, through Kun's output filters."""

from __future__ import annotations

import pandas as pd

from .. import prompts, scoring, tagging
from ..config import KunConfig
from ..llm.base import Engine
from ..registry import (
    BANNED_KEYWORD,
    BROKEN_TEXT,
    DUPLICATE_OUTPUT,
    EMPTY_AFTER_CLEAN,
    EMPTY_GENERATION,
    POLISHED,
    PROMPT_OVER_BUDGET,
    REPEATED_INSTRUCTION,
    REPEATED_PHRASE,
    TOO_SHORT,
)
from ..text import repair_instruction, starts_with_repeated_phrase
from .common import (
    Rule,
    StageContext,
    StageResult,
    apply_rules,
    banned,
    broken,
    empty,
    finish,
    first_reason,
    mark_duplicates,
    no_reasons,
    require_text,
    sampling_params,
    summary,
)

# Kun's output filter, in order, over the answer as generated.
OUTPUT_RULES = (
    Rule(EMPTY_GENERATION, "output", empty),
    Rule(BROKEN_TEXT, "output", broken("output")),
    Rule(BANNED_KEYWORD, "output", banned("output", "polish")),
    Rule(
        TOO_SHORT,
        "output",
        lambda s, cfg: f"{len(s)} characters < {cfg.polish.min_output_chars}" if len(s) < cfg.polish.min_output_chars else None,
    ),
    Rule(
        REPEATED_PHRASE,
        "output",
        lambda s, cfg: (
            f"opens with a phrase repeated {cfg.polish.max_phrase_repeats}+ times"
            if starts_with_repeated_phrase(s, cfg.polish.max_phrase_repeats, cfg.polish.min_phrase_chars)
            else None
        ),
    ),
)


def output_reason(output: str, cfg: KunConfig) -> tuple[str, str] | None:
    """Kun's output filter: (reason, detail) to drop, or None to keep."""
    return first_reason(OUTPUT_RULES, {"output": output}, cfg)


def polish(scored: pd.DataFrame, ctx: StageContext) -> StageResult:
    """Rows whose score reaches score.threshold (applied here, so a new threshold re-runs only this
    stage, not the scorer); the chat model rewrites each kept text into an answer to its
    instruction (answer polishment). The answer is released as the model wrote it, stripped: Kun's
    repeated-line repair is for instructions (text.repair_instruction); in an answer it would cut code's
    second `}`, a poem's refrain, and shrink a loop that the repeated-phrase filter must drop."""
    engine, cfg = ctx.engine, ctx.cfg
    keep = scoring.keep(scored["score"].to_numpy(dtype=float), cfg.score.threshold)
    df = scored[keep].drop(columns=["score_reply"], errors="ignore").reset_index(drop=True)
    # Kun's instruction repair, after scoring (the scorer saw what the point prompt's 【差】 examples
    # teach it to reject) and before the answer prompt
    repaired = [repair_instruction(s, cfg.label.whitespace_run) for s in df["instruction"]]
    reason, detail = no_reasons(df)
    for i, r in zip(df.index, repaired):
        if r is None:
            reason[i], detail[i] = REPEATED_INSTRUCTION, "its longest repeated line does not open it (Kun drops it)"
        elif not r:
            reason[i] = EMPTY_AFTER_CLEAN
    df["instruction"] = pd.Series(
        [df.at[i, "instruction"] if r is None else r for i, r in zip(df.index, repaired)], index=df.index, dtype=object
    )
    built = [
        None
        if reason[i] is not None
        else prompts.answer_prompt(engine.tokenizer, t, s, cfg.polish.prompt_token_budget, prompts.system_of(engine, cfg))
        for i, t, s in zip(df.index, df["text"], df["instruction"])
    ]
    for i, b in enumerate(built):
        if b is None and reason[i] is None:
            reason[i], detail[i] = PROMPT_OVER_BUDGET, f"the text alone fills the {cfg.polish.prompt_token_budget}-token budget"
    todo = [i for i in df.index if reason[i] is None]
    gens = engine.generate([built[i][0] for i in todo], sampling_params(cfg))
    require_text(gens, POLISHED, engine.model_name)
    df["output"] = pd.Series("", index=df.index, dtype=object)
    df["instruction_truncated"], df["polish_tokens"], df["polish_finish"] = False, 0, ""
    for i, g in zip(todo, gens):
        df.at[i, "output"] = g.text.strip()  # as generated: Kun never edits an answer, its filters read it raw
        df.at[i, "instruction_truncated"] = built[i][1]
        df.at[i, "polish_tokens"] = g.num_tokens
        df.at[i, "polish_finish"] = g.finish_reason
    apply_rules(df, OUTPUT_RULES, cfg, reason, detail)
    if cfg.polish.dedup_outputs:
        mark_duplicates(df, "output", reason, detail, DUPLICATE_OUTPUT)
    tag_stats = _tag(df, reason, engine, cfg)
    return finish(
        df,
        reason,
        detail,
        "output",
        lambda kept: {
            "not_kept_by_score": int(len(scored) - len(df)),
            "keep_rate": round(len(df) / len(scored), 4) if len(scored) else None,
            "threshold": cfg.score.threshold,
            "output_chars": summary(kept["output"].astype(str).str.len(), 0),
            "truncated_at_max_tokens": int((df["polish_finish"] == "length").sum()),
            **tag_stats,
        },
    )


def _tag(df: pd.DataFrame, reason: pd.Series, engine: Engine, cfg: KunConfig) -> dict:
    """The COIG-CQIA tags of the rows kept (tagging.py); with tags off, today's constants."""
    df["task_minor"] = pd.Series([[f"kun:{s}"] for s in df["source"]], index=df.index, dtype=object)
    df["domain"] = tagging.DEFAULT_DOMAIN
    df["task_minor_rule"] = df["domain_rule"] = tagging.OFF
    kept = df.index[reason.isna()]
    if not cfg.tags.enabled or not len(kept):
        return {}
    got = tagging.tag(engine, df.loc[kept, "instruction"].tolist(), df.loc[kept, "output"].tolist(), cfg, sampling_params(cfg))
    for column, values in got["columns"].items():
        df.loc[kept, column] = pd.Series(values, index=kept, dtype=object)
    return got["stats"]
