"""Scores for the point stage, and what each one means.

Kun's rule: the chat model replies to the point prompt, and an instruction is kept iff the reply
contains 【好】 and not 【差】. Generating and parsing a reply per row is slow, so the default reads
the decision from the probabilities of the two replies: P(【好】) and P(【差】) as the reply's
opening. That stands for Kun's rule only where the model would actually open its reply with one of
them: their sum, the answer mass, says how much of the model's reply distribution the two answers
cover. Rows with answer_mass >= score.min_answer_mass are scored by probability; the rest by Kun's
rule itself (generate, then parse), in the same step. Renormalising over the two answers alone, as
an earlier version did, made a model that would write neither answer look certain (score 1.0 on a
mass of e^-59).

Which decision the probabilities make (`score.decision`):
- `mode` (the default): score = P(【好】) / answer_mass, kept at score >= threshold (0.5: P(【好】) >=
  P(【差】)). That is the most likely outcome of Kun's rule, a different rule from Kun's own: Kun
  keeps on one reply sampled at temperature 0.5, and a row at P(【好】) = 0.6 is kept by the mode
  every time and by Kun about two times in three (bench/README.md, on the demo's chat model: 77.4%
  kept by the mode, 64.0% by Kun's generate-and-parse, 62.0% by `sampled`).
- `sampled`: the verdict of one reply drawn from the two answers at the sampling temperature,
  q = P(【好】)^(1/T) / (P(【好】)^(1/T) + P(【差】)^(1/T)), with a uniform seeded by the run's seed
  and the row's prompt: Kun's rule in distribution (top_p and the repetition penalty left out),
  with no generation. The score is then 1.0 or 0.0, as a parsed reply's.

Humpback's rule is the same shape: the 5-point prompt, the reply parsed for its final `得分：N`
(Score: N). Its prompt asks for the reasons first, so the probability path reads the five replies
that open with the score, `得分：1` .. `得分：5` (the prompt's own format): their mass is how often
the model skips the reasons and scores at once. Where it does (mass >= min_answer_mass), the
most likely digit (mode) or a drawn one (sampled) is the score; elsewhere the reply is generated,
reasons and all, and parsed: Humpback's own rule. (Until issue 28 the path forced a `得分：`
prefix and read the digit after it: a mass near 1 for every row, so the guard never fired and
the reasons Humpback asks for were never written.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import prompts
from .llm.base import request_seed
from .prompts import KUN_BAD, KUN_GOOD

PROBABILITY, FREETEXT = "probability", "freetext"  # the rule that scored a row (column score_rule)
SCORE_RULES = (PROBABILITY, FREETEXT)


def parse_kun_reply(reply: str) -> float:
    """Kun's rule: kept iff the reply contains 【好】 and not 【差】. 1.0 good, 0.0 bad, NaN when the
    reply says neither (a parse failure)."""
    good, bad = KUN_GOOD in reply, KUN_BAD in reply
    if good and not bad:
        return 1.0
    if bad:
        return 0.0
    return math.nan


_HUMPBACK_SCORE = re.compile(r"(?:得分|分数|评分|Score)\s*[:：]\s*[<＜]?\s*([1-5])(?![0-9])", re.IGNORECASE)


def parse_humpback_reply(reply: str) -> float:
    """Humpback's rule: the reasoning, then `得分：N` (Score: N) on the last line; the last such N,
    NaN when the reply has none."""
    found = _HUMPBACK_SCORE.findall(reply)
    return float(found[-1]) if found else math.nan


@dataclass(frozen=True)
class Rule:
    """How a method asks the chat model and reads its answer."""

    name: str
    choices: tuple[str, ...]  # the replies the probability path reads, at the reply's opening
    values: tuple[float, ...]  # the score each of them gives
    user: Callable[[str, str], str]  # (instruction, text) -> the user turn
    parse: Callable[[str], float]  # a free-text reply -> its score, NaN when it has none


KUN = Rule("kun", (KUN_GOOD, KUN_BAD), (1.0, 0.0), lambda instruction, text: prompts.point_user(instruction), parse_kun_reply)
HUMPBACK = Rule("humpback", prompts.HUMPBACK_ANSWERS, (1.0, 2.0, 3.0, 4.0, 5.0), prompts.humpback_user, parse_humpback_reply)


def rule(method: str) -> Rule:
    return HUMPBACK if method.startswith("humpback") else KUN


def uses_probability(method: str) -> bool:
    return method.endswith("_choice")


def from_logprobs(logprobs: np.ndarray, r: Rule, draws: np.ndarray | None = None, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Per row: answer_mass (the probability that the reply opens with one of the answers) and the
    score the probability path gives. Kun: p_good = P(【好】), p_bad = P(【差】). With no `draws`
    (decision `mode`): Kun's score = p_good / answer_mass (0.5: the model is as likely to write
    either), Humpback's the most likely digit (it keeps at k on that). With `draws` (a uniform in
    [0, 1) per row; decision `sampled`): the answer one reply drawn at `temperature` would give.
    No threshold here: polish applies it."""
    p = np.exp(np.asarray(logprobs, dtype=float).reshape(-1, len(r.choices)))
    mass = p.sum(axis=1)
    values = np.array(r.values)
    if draws is None and r is KUN:
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(mass > 0, p[:, 0] / np.where(mass > 0, mass, 1), np.nan)
    elif draws is None:
        score = np.where(mass > 0, values[p.argmax(axis=1)], np.nan)
    else:
        score = np.where(mass > 0, values[drawn(p, draws, temperature)], np.nan)
    good, bad = (p[:, 0], p[:, 1]) if r is KUN else (np.full(len(p), np.nan),) * 2
    return {"p_good": good, "p_bad": bad, "answer_mass": mass, "score": score}


def tempered(p: np.ndarray, temperature: float) -> np.ndarray:
    """Per row, the probability that a reply drawn at `temperature` gives each answer, among the
    answers: p_c^(1/T) / sum p^(1/T), in log space (P(【好】) can be 1e-40). A row with no mass at
    all is NaN (its caller scores it NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log(p) / temperature
        z -= z.max(axis=1, keepdims=True)
        q = np.exp(z)
        return q / q.sum(axis=1, keepdims=True)


def drawn(p: np.ndarray, draws: np.ndarray, temperature: float) -> np.ndarray:
    """Per row, the answer a reply drawn at `temperature` gives (tempered), chosen by the row's
    uniform. Temperature 0 is the most likely answer."""
    if temperature <= 0:
        return p.argmax(axis=1)
    with np.errstate(invalid="ignore"):
        cdf = np.cumsum(tempered(p, temperature), axis=1)
    return np.minimum((np.asarray(draws)[:, None] >= cdf).sum(axis=1), p.shape[1] - 1)


def uniforms(seed: int, prompts: list[str]) -> np.ndarray:
    """A uniform in [0, 1) per row from the run's seed and the row's prompt (as vLLM seeds each
    request): the same row draws the same verdict in any batch, on any engine."""
    return np.array([request_seed(seed, p) for p in prompts], dtype=float) / 2**31


def keep(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Rows whose score reaches the threshold; NaN (unparsed) never does."""
    s = np.asarray(scores, dtype=float)
    return np.where(np.isnan(s), False, s >= threshold)
