"""The final dataset: COIG-CQIA records with provenance, the stage funnel, what the card reports."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd

from . import dedup, registry, scoring, storage, tagging
from .config import KunConfig
from .registry import DUPLICATE_OUTPUT, HELDOUT_OVERLAP
from .stages import StageResult
from .stages.common import dropped_rows, mark_duplicates, no_reasons

COIG_COLUMNS = ["instruction", "input", "output", "task_type", "domain", "answer_from", "human_verified", "copyright"]
PROVENANCE_COLUMNS = [
    "source", "doc_id", "file", "row", "score", "score_method", "score_rule", "label_model", "chat_model", "task_minor_rule", "domain_rule",
]  # fmt: skip
# A released record: COIG-CQIA's columns in its order, the provenance in `metadata` (a JSON string, as
# CQIA's records carry theirs), so a loader built on CQIA's features reads train.jsonl as it is.
CQIA_COLUMNS = ["instruction", "input", "output", "task_type", "domain", "metadata", "answer_from", "human_verified", "copyright"]
# Instructions are a sentence: 3-grams, as 5-grams of 15 characters are too few to estimate a Jaccard.
INSTRUCTION_NGRAM = 3


def records(polished: pd.DataFrame, cfg: KunConfig, label_model: str, chat_model: str) -> pd.DataFrame:
    """COIG-CQIA records (instruction, input, output, task_type, domain, ...) plus provenance;
    typed like any other, also when there are none (a source whose rows were all filtered). Rows
    polished before tags existed get the constants (the schema then fails them when tags are on:
    their polished_pairs partitions are stale, and the UI says so)."""
    d = cfg.dataset
    if "task_minor" not in polished:
        polished = polished.assign(task_minor=[[f"kun:{s}"] for s in polished["source"]], domain=tagging.DEFAULT_DOMAIN)
    if "task_minor_rule" not in polished:
        polished = polished.assign(task_minor_rule=tagging.OFF, domain_rule=tagging.OFF)
    out = pd.DataFrame(
        {
            "instruction": polished["instruction"].astype(str),
            "input": "",
            "output": polished["output"].astype(str),
            "task_type": pd.Series([task_type(m, cfg) for m in polished["task_minor"]], index=polished.index, dtype=object),
            "domain": pd.Series([[x] for x in polished["domain"]], index=polished.index, dtype=object),
            "answer_from": d.answer_from,
            "human_verified": False,
            "copyright": d.copyright,
            "source": polished["source"].astype(str),
            "doc_id": polished["doc_id"].astype(str),
            "file": polished["file"].astype(str),
            "row": polished["row"].astype("int64"),
            "score": polished["score"].astype(float),
            "score_method": polished["score_method"].astype(str),
            "score_rule": polished["score_rule"].astype(str),
            "label_model": label_model,
            "chat_model": chat_model,
            "task_minor_rule": polished["task_minor_rule"].astype(str),
            "domain_rule": polished["domain_rule"].astype(str),
        }
    )
    return out.sort_values(["source", "doc_id"]).reset_index(drop=True)


def task_type(minors, cfg: KunConfig) -> dict:
    """COIG-CQIA's task_type of a record: its minors (a string from before minors were lists is
    one) and their majors (tags.task_types; dataset.task_major where tags are off)."""
    minors = [minors] if isinstance(minors, str) else list(minors)
    major = cfg.tags.majors(minors, cfg.dataset.task_major) if cfg.tags.enabled else list(cfg.dataset.task_major)
    return {"major": major, "minor": minors}


def cqia(recs: pd.DataFrame) -> list[dict]:
    """The released records (train.jsonl): CQIA's nine columns, the provenance and the rule that
    decided each tag in `metadata`, a JSON string (a NaN score as null)."""
    out = []
    for r in recs.to_dict(orient="records"):
        meta = {k: (None if isinstance(r[k], float) and r[k] != r[k] else r[k]) for k in PROVENANCE_COLUMNS}
        r["metadata"] = json.dumps(meta, ensure_ascii=False, default=storage.plain)
        out.append({k: r[k] for k in CQIA_COLUMNS})
    return out


def funnel(tallies: dict[str, list[storage.Tally]], threshold: float) -> dict:
    """Rows per stage and quarantine reasons of one source, from what its partitions of each stage
    hold (`tallies`: the release's declared inputs, by stage, a round's scored and polished pairs
    under their stage's name); kept by score and the scoring rules from the scored rows' columns."""
    rows, quarantined = {}, {}
    for stage in registry.CORPUS:
        rows[stage] = sum(t.rows for t in tallies.get(stage, []))
        reasons: Counter = Counter()
        for t in tallies.get(stage, []):
            reasons.update(t.quarantined)
        quarantined[stage] = dict(sorted(reasons.items()))
    kept, scored_by = 0, Counter()
    for t in tallies.get(registry.SCORED, []):
        if t.frame is not None and len(t.frame):
            kept += int(scoring.keep(t.frame["score"].to_numpy(dtype=float), threshold).sum())
            scored_by.update(t.frame["score_rule"])
    return {"rows": rows, "kept_by_score": kept, "scored_by": dict(sorted(scored_by.items())), "quarantined": quarantined}


def kept_pairs(scored: list[pd.DataFrame], threshold: float) -> pd.DataFrame:
    """Scored pairs that reach the threshold, (instruction, text): the curated set Humpback trains
    its next model on (round_data: segments)."""
    frames = [part[scoring.keep(part["score"].to_numpy(dtype=float), threshold)] for part in scored if len(part)]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"instruction": [], "text": []})
    return out[["instruction", "text"]].astype(object)


OVERLAP_NGRAM = 8  # characters of the normalised text: a clause, specific enough in Chinese


def mark_heldout(rows: pd.DataFrame, heldout: pd.DataFrame | None, bound: float | None, reason: pd.Series, detail: pd.Series) -> int:
    """Quarantine (heldout_overlap) the rows whose answer, or the document it was made from, holds
    at least `bound` of one held-out seed answer's character 8-grams: the web text the corpus came
    from may hold the very answers the seeds were taken from (Zhihu, encyclopedias), and a model
    trained on them would be measured on its own test items. Returns the held-out answers checked."""
    answers = [] if heldout is None or bound is None else heldout["output"].astype(str).tolist()
    for column, what in (("output", "answer"), ("text", "source document")):
        alive = rows.index[reason.isna()]
        if not answers or not len(alive) or column not in rows:
            break
        share, which = dedup.containment(rows.loc[alive, column].astype(str).tolist(), answers, OVERLAP_NGRAM)
        for i, s, w in zip(alive, share, which):
            if s >= bound:
                reason[i] = HELDOUT_OVERLAP
                detail[i] = f"its {what} holds {s:.0%} of the {OVERLAP_NGRAM}-grams of held-out seed answer {answers[w][:40]!r}"
    return len(answers)


def funnel_frame(fun: dict, n_records: int, dropped: dict | None = None) -> pd.DataFrame:
    """The funnel as rows: each stage (what it did), its rows, what it dropped; then kept and final."""
    rows = [
        (f"{v.name} ({v.what})", fun["rows"][v.name], ", ".join(f"{k}: {n}" for k, n in fun["quarantined"].get(v.name, {}).items()) or "-")
        for v in map(registry.get, registry.CORPUS)
    ]
    by = ", ".join(f"{rule}: {n}" for rule, n in fun.get("scored_by", {}).items())
    last = ", ".join(f"{k}: {n}" for k, n in (dropped or {}).items()) or "-"
    rows += [("kept by score", fun["kept_by_score"], f"scored by {by}" if by else ""), (registry.DATASET, n_records, last)]
    return pd.DataFrame(rows, columns=["stage", "rows", "dropped (reason: count)"])


def instruction_diversity(instructions: list[str], cfg: KunConfig) -> dict:
    d = cfg.dedup
    return dedup.diversity(instructions, INSTRUCTION_NGRAM, d.num_perm, d.threshold, d.seed)


def diversity_md(div: dict, threshold: float) -> list[str]:
    if not div["texts"]:
        return ["No instructions."]
    lines = [
        f"{div['distinct_ratio']:.1%} of the {div['texts']} instructions are distinct (up to whitespace); "
        f"{div['near_duplicate_clusters']} clusters of near-duplicates (Jaccard of character {INSTRUCTION_NGRAM}-grams "
        f">= {threshold}, MinHash estimate)" + (", the largest:" if div["largest"] else "."),
    ]
    if div["largest"]:
        lines += ["", pd.DataFrame(div["largest"]).to_markdown(index=False, colalign=("right", "left"))]
    return lines


def made_under(made: list[dict], current: dict[str, str]) -> tuple[list[str], list[str]]:
    """The card's "Versions" lines, and what is mixed. `made`: one row per partition the release was
    made from, {stage, partition, code_version, models: {model asset: data version}}; `current`:
    each stage's code version under the config now. Mixed: a stage whose partitions were made under
    more than one code version or model, or under a code version that is no longer current."""
    if not made:
        return ["No partitions recorded."], []
    frame = pd.DataFrame(made)
    lines = ["| stage | partitions | code version | models |", "|---|---:|---|---|"]
    mixed = []
    for stage, rows in frame.groupby("stage", sort=False):
        codes = sorted({c for c in rows["code_version"] if c})
        models: dict[str, set] = {}
        for m in rows["models"]:
            for name, version in m.items():
                models.setdefault(name, set()).add(version)
        old = [c for c in codes if c != current.get(stage)]
        code_text = ", ".join(f"`{c}`" + (" (not current)" if c in old else "") for c in codes) or "-"
        model_text = "; ".join(f"{name} " + ", ".join(f"`{v[:12]}`" for v in sorted(vs)) for name, vs in sorted(models.items())) or "-"
        lines.append(f"| {stage} | {len(rows)} | {code_text} | {model_text} |")
        if len(codes) > 1:
            by = rows.groupby("code_version")["partition"].apply(lambda p: ", ".join(sorted(p)))
            mixed.append(f"{stage}: {len(codes)} code versions (" + "; ".join(f"{c}: {p}" for c, p in by.items()) + ")")
        elif old:
            mixed.append(f"{stage}: made under code version {old[0]}, the config now gives {current.get(stage)}")
        mixed += [f"{stage}: {len(vs)} versions of {name}" for name, vs in sorted(models.items()) if len(vs) > 1]
    verdict = (
        ["", "**Mixed registry.** Re-materialize the stale partitions (the UI marks them) for a release made under one config:", ""]
        + [f"- {m}" for m in mixed]
        if mixed
        else ["", "Every stage's partitions were made under one code version (the current one) and one version of each model."]
    )
    return lines + verdict, mixed


def release(
    polished: pd.DataFrame,
    source: str,
    cfg: KunConfig,
    label_model: str,
    chat_model: str,
    fun: dict,
    made: list[dict] | None = None,
    current: dict[str, str] | None = None,
    heldout: pd.DataFrame | None = None,
) -> StageResult:
    """One source's release as a stage result: its records, as polishment made them (the threshold
    and the keyword lists were applied there), answers that repeat one of another shard quarantined
    as duplicate_output, the first by (file, row) kept, as Humpback dedups its outputs. A source with
    no rows left gets empty records: an empty result is a result. Its stats carry what the card says:
    `fun`, the funnel (funnel()); the instructions' diversity; `made` and `current`, the versions
    its partitions were made under (made_under); the models. `heldout`: the held-out seeds, whose
    answers no record may carry (mark_heldout)."""
    mine = polished[polished["source"] == source].sort_values(["file", "row"], kind="stable").reset_index(drop=True)
    reason, detail = no_reasons(mine)
    if cfg.polish.dedup_outputs:
        mark_duplicates(mine, "output", reason, detail, DUPLICATE_OUTPUT)
    checked = mark_heldout(mine, heldout, cfg.dataset.heldout_overlap, reason, detail)
    recs = records(mine[reason.isna()], cfg, label_model, chat_model)
    div = instruction_diversity(recs["instruction"].tolist(), cfg)
    docs = fun["rows"][registry.RAW]
    versions_md, mixed = made_under(made, current or {}) if made is not None else (None, [])
    stats = {
        "rows_in": docs,
        "rows_out": len(recs),
        "retention": round(len(recs) / docs, 4) if docs else None,
        "dropped": reason.dropna().value_counts().to_dict(),
        "distinct_instruction_ratio": div["distinct_ratio"],
        "instruction_clusters": div["near_duplicate_clusters"],
        "funnel": fun,
        "diversity": div,
        "versions": versions_md,
        "mixed_versions": mixed,
        "models": {"label": label_model, "chat": chat_model},
        "heldout_answers_checked": checked,
    }
    return StageResult(rows=recs, dropped=dropped_rows(mine, reason, detail, "output"), stats=stats)
