"""Scores for the point stage.

Kun scores the instruction alone, binary 【好】/【差】. Reading the probability of each answer string
as the continuation of the prompt (choice_probs) gives every row a score and no reply to parse.
Kun's own free-text parse and Humpback's 1-5 pair scoring are options.
"""

from __future__ import annotations

import math

import numpy as np

from .prompts import KUN_BAD, KUN_GOOD


def kun_choice_score(probs: np.ndarray) -> np.ndarray:
    """P(【好】) from choice_probs over (【好】, 【差】)."""
    return probs[:, 0]


def humpback_expected_score(probs: np.ndarray) -> np.ndarray:
    """Expected 1-5 score from choice_probs over ('1'..'5')."""
    return probs @ np.arange(1, probs.shape[1] + 1, dtype=float)


def parse_kun_reply(reply: str) -> float:
    """Kun's rule: kept iff the reply contains 【好】 and not 【差】. 1.0 good, 0.0 bad, NaN when the
    reply says neither (a parse failure)."""
    good, bad = KUN_GOOD in reply, KUN_BAD in reply
    if good and not bad:
        return 1.0
    if bad:
        return 0.0
    return math.nan


def keep(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Rows whose score reaches the threshold; NaN (unparsed) never does."""
    s = np.asarray(scores, dtype=float)
    return np.where(np.isnan(s), False, s >= threshold)
