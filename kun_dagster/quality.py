"""Statistical quality checks on a stage's partition: each returns a Finding (passed, the figure,
its bound). They warn rather than block: a low retention or a shifted score distribution is worth
a look, not proof of a broken partition (the Pandera schemas are that)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Finding:
    check: str
    passed: bool
    value: float | None
    bound: str
    detail: str = ""


def within(check: str, value: float | None, lo: float, hi: float, what: str) -> Finding:
    ok = value is None or lo <= value <= hi
    return Finding(check, ok, value, f"[{lo}, {hi}]", f"{what} {value} is {'within' if ok else 'outside'} [{lo}, {hi}]")


def rate(check: str, count: int, total: int, max_rate: float, what: str) -> Finding:
    value = round(count / total, 4) if total else None
    ok = value is None or value <= max_rate
    return Finding(check, ok, value, f"<= {max_rate}", f"{count} of {total} rows {what} ({value})")


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b))))


def score_shift(scores: np.ndarray, earlier: np.ndarray, max_ks: float) -> Finding:
    """This partition's scores against the same source's earlier partitions (KS statistic)."""
    scores, earlier = scores[~np.isnan(scores)], earlier[~np.isnan(earlier)]
    if not len(scores) or not len(earlier):
        return Finding("score_distribution", True, None, f"KS <= {max_ks}", "no earlier scores of this source to compare with")
    ks = round(ks_statistic(scores, earlier), 4)
    return Finding(
        "score_distribution",
        ks <= max_ks,
        ks,
        f"KS <= {max_ks}",
        f"KS {ks} against {len(earlier)} earlier scores (mean {np.mean(earlier):.3f} -> {np.mean(scores):.3f})",
    )


def _bigrams(text: str) -> set[str]:
    t = "".join(text.split())
    return {t[i : i + 2] for i in range(len(t) - 1)}


def overlap(answer: str, source: str) -> float:
    """Share of the answer's character bigrams found in its source text (Chinese has no spaces,
    so characters, not words): a polished answer rewrites its text, so it shares most of them."""
    a = _bigrams(answer)
    return len(a & _bigrams(source)) / len(a) if a else 0.0


def faithfulness(answers: list[str], sources: list[str], min_overlap: float, max_unfaithful_rate: float) -> tuple[Finding, list[int]]:
    """Answers sharing less than `min_overlap` of their bigrams with their source are likely
    hallucinated; the check warns when more than `max_unfaithful_rate` of them are."""
    scores = [overlap(a, s) for a, s in zip(answers, sources)]
    low = [i for i, v in enumerate(scores) if v < min_overlap]
    f = rate(
        "faithfulness", len(low), len(scores), max_unfaithful_rate, f"share less than {min_overlap} of their bigrams with their source"
    )
    return f, low
