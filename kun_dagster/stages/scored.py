"""scored_pairs: the chat model scores each instruction alone (scoring.py says what the score means)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import prompts, scoring
from ..corpus import quarantine_frame
from ..registry import SCORED
from .common import (
    StageContext,
    StageResult,
    require_text,
    sampling_params,
    summary,
)


def score(pairs: pd.DataFrame, ctx: StageContext) -> StageResult:
    """Every row comes out with its score and the rule that scored it (scoring.py); no keep flag:
    polish applies score.threshold, so a new threshold needs no re-scoring.

    *_choice: one probability read per row (the answers' shared opening, then the token where
    they differ); rows where the model puts less than min_answer_mass on the answers are scored by
    the method's own free-text rule, generated in the same step. *_freetext: every row generated
    and parsed."""
    engine, cfg = ctx.engine, ctx.cfg
    sc, tok, keep_system = cfg.score, engine.tokenizer, prompts.system_of(engine, cfg)
    rule = scoring.rule(sc.method)
    df = pairs.copy().reset_index(drop=True)
    users = [rule.user(s, t) for s, t in zip(df["instruction"], df["text"])]
    for col in ("p_good", "p_bad", "answer_mass"):
        df[col] = np.nan
    df["score"] = np.nan
    df["score_rule"] = scoring.FREETEXT
    df["score_reply"] = None
    if scoring.uses_probability(sc.method) and len(df):
        rendered, answers = prompts.choice_prompts(tok, users, rule.choices, keep_system=keep_system)
        lp = engine.choice_logprobs(rendered, answers, exact=sc.exact)
        draws = scoring.uniforms(cfg.sampling.seed, rendered) if sc.decision == "sampled" else None
        for col, values in scoring.from_logprobs(lp, rule, draws, cfg.sampling.temperature).items():
            df[col] = values
        df.loc[df["answer_mass"] >= sc.min_answer_mass, "score_rule"] = scoring.PROBABILITY
    free = df.index[df["score_rule"] == scoring.FREETEXT]
    if len(free):
        gens = engine.generate([prompts.render(tok, users[i], keep_system=keep_system) for i in free], sampling_params(cfg))
        require_text(gens, SCORED, engine.model_name)
        df.loc[free, "score_reply"] = pd.Series([g.text for g in gens], index=free, dtype=object)
        df.loc[free, "score"] = [rule.parse(g.text) for g in gens]
    df["score"] = df["score"].astype(float)
    df["score_method"] = sc.method
    hist, edges = np.histogram(df["score"].dropna(), bins=10, range=sc.scale)
    by_rule = df["score_rule"].value_counts()
    stats = {
        "rows_in": len(df),
        "rows_out": len(df),
        "scored_by": {r: int(by_rule.get(r, 0)) for r in scoring.SCORE_RULES},
        "fallback_rate": round(len(free) / len(df), 4) if len(df) and scoring.uses_probability(sc.method) else None,
        "answer_mass": summary(df["answer_mass"], 4),
        "parse_failures": int(df.loc[free, "score"].isna().sum()),
        "histogram": {f"{edges[i]:.1f}-{edges[i + 1]:.1f}": int(h) for i, h in enumerate(hist)},
    }
    return StageResult(rows=df, dropped=quarantine_frame([]), stats=stats)
