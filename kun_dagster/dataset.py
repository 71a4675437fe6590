"""The final dataset: COIG-CQIA records with provenance, the stage funnel, the dataset card."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pandas as pd
import yaml
from upath import UPath

from . import dedup, registry, scoring, storage, tagging
from .code_versions import published_config
from .config import KunConfig
from .registry import BANNED_KEYWORD, BELOW_THRESHOLD, CHAT_MODEL, EVALUATION, ROUND_STAGES, in_round
from .stages import DUPLICATE_OUTPUT, StageResult
from .stages.common import dropped_rows, mark_duplicates, no_reasons
from .text import find_keyword

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
        r["metadata"] = json.dumps(meta, ensure_ascii=False)
        out.append({k: r[k] for k in CQIA_COLUMNS})
    return out


def funnel(base: UPath, source: str, shards: list[str], threshold: float, round_: int = 1) -> dict:
    """Rows per stage and quarantine reasons for one source, read from what is published; scoring
    and polishment as round `round_` made them (the stages before are every round's)."""
    rows, quarantined = {}, {}
    for stage in registry.CORPUS:
        rows[stage] = 0
        reasons: Counter = Counter()
        asset = in_round(stage, round_) if stage in ROUND_STAGES else stage
        for shard in shards:
            part = {"source": source, "shard": shard}
            rows[stage] += storage.partition_rows(storage.partition_dir(base, asset, part))
            qdir = storage.quarantine_dir(base, asset, part)
            if storage.partition_rows(qdir):
                reasons.update(storage.read_partition(qdir, ["reason"])["reason"])
        quarantined[stage] = dict(sorted(reasons.items()))
    _, kept, scored_by = scored(base, source, shards, threshold, round_)
    return {"rows": rows, "kept_by_score": kept, "scored_by": dict(sorted(scored_by.items())), "quarantined": quarantined}


def _scored_parts(base: UPath, source: str, shards: list[str], round_: int, columns: list[str]):
    """Round `round_`'s published scored_pairs partitions of a source, each read with `columns`."""
    for shard in shards:
        d = storage.partition_dir(base, in_round(registry.SCORED, round_), {"source": source, "shard": shard})
        if storage.partition_rows(d):
            yield storage.read_partition(d, columns)


def scored(base: UPath, source: str, shards: list[str], threshold: float, round_: int = 1) -> tuple[int, int, Counter]:
    """Round `round_`'s scored rows of a source: how many, how many reach the threshold, and by which rule."""
    n, kept, scored_by = 0, 0, Counter()
    for part in _scored_parts(base, source, shards, round_, ["score", "score_rule"]):
        n += len(part)
        kept += int(scoring.keep(part["score"].to_numpy(dtype=float), threshold).sum())
        scored_by.update(part["score_rule"])
    return n, kept, scored_by


def kept_pairs(base: UPath, source: str, shards: list[str], threshold: float, round_: int) -> pd.DataFrame:
    """Round `round_`'s scored pairs of a source that reach the threshold, (instruction, text): the
    curated set Humpback trains its next model on (round_data: segments)."""
    frames = [
        part[scoring.keep(part["score"].to_numpy(dtype=float), threshold)]
        for part in _scored_parts(base, source, shards, round_, ["instruction", "text", "score"])
    ]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"instruction": [], "text": [], "score": []})
    return out[["instruction", "text"]].astype(object)


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


def _diversity_md(div: dict, threshold: float) -> list[str]:
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


def card(
    source: str,
    n_records: int,
    fun: dict,
    cfg: KunConfig,
    label_model: str,
    chat_model: str,
    div: dict | None = None,
    dropped=None,
    versions_md: list[str] | None = None,
    rounds: list[dict] | None = None,
) -> str:
    """A dataset card (Markdown with YAML front matter, as HF datasets expect)."""
    lines = [
        "---",
        f"pretty_name: kun-{source}",
        "language: [zh]",
        "task_categories: [text-generation]",
        "size_categories: [n<1K]" if n_records < 1000 else "size_categories: [1K<n<1M]",
        "---",
        "",
        f"# Kun instruction data from `{source}`",
        "",
        f"{n_records} instruction/answer records in COIG-CQIA's schema, made from unlabeled `{source}` text by the "
        "Kun method: a label model writes the instruction each text answers, the chat model scores the instruction "
        "alone and rewrites the text into an answer (answer polishment). Every record names its source document "
        "(`source`, `doc_id`, `file`, `row`), its score and the models that made it.",
        "",
        f"- label model: `{label_model}`",
        f"- chat model: `{chat_model}`",
        f"- copyright: `{cfg.dataset.copyright}` in every record (dataset.copyright); the texts come from `{source}`: "
        "check its licence before redistribution",
        f"- score: `{cfg.score.method}`, threshold {cfg.score.threshold}"
        + (
            f", rows under answer mass {cfg.score.min_answer_mass} scored by free text"
            if scoring.uses_probability(cfg.score.method)
            else ""
        ),
        "",
        "## Funnel",
        "",
        funnel_frame(fun, n_records, dropped).to_markdown(index=False, colalign=("left", "right", "left")),
        "",
        "## Instruction diversity",
        "",
        *_diversity_md(div or instruction_diversity([], cfg), cfg.dedup.threshold),
        "",
        *rounds_md(rounds or []),
        "## Versions",
        "",
        "The code version (a hash of the kun.yaml keys and prompts that shape the stage) and the model versions "
        "(content fingerprints) each stage's partitions of this source were made under.",
        "",
        *(versions_md or ["Not recorded."]),
        "",
        "## Config used",
        "",
        "The kun.yaml keys that shape the data (storage, credentials, engine and deploy settings are left out).",
        "",
        "```yaml",
        yaml.safe_dump(published_config(cfg), allow_unicode=True, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def release(
    polished: pd.DataFrame,
    source: str,
    cfg: KunConfig,
    base: UPath,
    label_model: str,
    chat_model: str,
    made: list[dict] | None = None,
    current: dict[str, str] | None = None,
    round_: int = 1,
    reports: dict[int, dict] | None = None,
) -> tuple[StageResult, str]:
    """One source's release as a stage result (its records; answers that repeat one of another
    shard quarantined as duplicate_output, the first by (file, row) kept, as Humpback dedups its
    outputs; the funnel read from what is published in stats, for the retention check) and its
    dataset card. A source with no rows left gets empty records and its card: an empty result is a result.
    `made` and `current`: the versions its partitions were made under (made_under); `round_`:
    whose scores and polishment these are; `reports`: the evaluations of the rounds so far."""
    mine = polished[polished["source"] == source].sort_values(["file", "row"], kind="stable").reset_index(drop=True)
    reason, detail = no_reasons(mine)
    gate(mine, cfg, reason, detail)
    if cfg.polish.dedup_outputs:
        mark_duplicates(mine, "output", reason, detail, DUPLICATE_OUTPUT)
    recs = records(mine[reason.isna()], cfg, label_model, chat_model)
    dropped = reason.dropna().value_counts().to_dict()
    fun = funnel(base, source, cfg.shard_keys(), cfg.score.threshold, round_)
    div = instruction_diversity(recs["instruction"].tolist(), cfg)
    docs = fun["rows"][registry.RAW]
    stats = {
        "rows_in": docs,
        "rows_out": len(recs),
        "retention": round(len(recs) / docs, 4) if docs else None,
        "dropped": dropped,
        "distinct_instruction_ratio": div["distinct_ratio"],
        "instruction_clusters": div["near_duplicate_clusters"],
        "funnel": fun,
        "diversity": div,
    }
    versions_md, mixed = made_under(made, current or {}) if made is not None else (None, [])
    stats["mixed_versions"] = mixed
    result = StageResult(rows=recs, dropped=dropped_rows(mine, reason, detail, "output"), stats=stats)
    rounds = round_rows(base, source, cfg, round_, len(recs), reports or {}) if cfg.iterations > 1 or reports else None
    stats["rounds"] = rounds or []
    return result, card(source, len(recs), fun, cfg, label_model, chat_model, div, dropped, versions_md, rounds)


def gate(rows: pd.DataFrame, cfg: KunConfig, reason: pd.Series, detail: pd.Series) -> None:
    """The release's own rules, whatever config its inputs were made under (a single-asset
    materialization after a change): the score threshold now in force and both keyword lists."""
    low = reason.isna() & (rows["score"] < cfg.score.threshold)
    reason[low], detail[low] = (
        BELOW_THRESHOLD,
        rows.loc[low, "score"].map(lambda x: f"score {x:.3f} < score.threshold {cfg.score.threshold}"),
    )
    for column, keywords, key in (("instruction", cfg.label.banned_keywords, "label"), ("output", cfg.polish.banned_keywords, "polish")):
        for i in rows.index[reason.isna()]:
            if kw := find_keyword(rows.at[i, column], keywords):
                reason[i], detail[i] = BANNED_KEYWORD, f"{column} holds {kw!r} ({key}.banned_keywords)"


def evaluated(report: dict | None, source: str) -> dict | None:
    """The evaluation's row for a source's release: its own model; with evaluation.per_source off
    (no per-source models), the one on every source's. None where the source had no records."""
    if not report:
        return None
    rows = {r["model"]: r for r in report.get("models", [])}
    per_source = any(m.startswith("seeds+") and m != "seeds+all" for m in rows)
    return rows.get(f"seeds+{source}") if per_source else rows.get("seeds+all")


def round_rows(base: UPath, source: str, cfg: KunConfig, upto: int, records_now: int, reports: dict[int, dict]) -> list[dict]:
    """One row per round 1..upto for the card: keep rate, records, and the evaluation where it ran."""
    out = []
    for k in range(1, upto + 1):
        n_scored, kept, _ = scored(base, source, cfg.shard_keys(), cfg.score.threshold, k)
        n = (
            records_now
            if k == upto
            else storage.partition_rows(storage.partition_dir(base, in_round(registry.DATASET, k), {"source": source}))
        )
        ev, report = evaluated(reports.get(k), source), reports.get(k) or {}
        base_row = next((r for r in report.get("models", []) if r["model"] == "seeds"), None)
        out.append(
            {
                "round": k,
                "chat model": f"{in_round(CHAT_MODEL, k)} (M{k - 1})",  # Humpback's names: M0 is the seeds-only model
                "keep rate": f"{kept / n_scored:.1%}" if n_scored else "-",
                "kept by score": kept,
                "records": n,
                "held-out loss (seeds only -> + release)": f"{base_row['heldout_loss']:.3f} -> {ev['heldout_loss']:.3f}"
                if ev and base_row
                else "-",
                "win rate vs seeds only [95% CI]": f"{ev['win_rate']:.1%} [{ev['win_ci_low']:.1%}, {ev['win_ci_high']:.1%}] "
                f"on {report['heldout']} ({ev.get('judged_by') or '-'})"
                if ev and ev.get("win_rate") is not None
                else "-",
            }
        )
    return out


REPORTS = "reports"  # {base}/reports/{asset}.json: the evaluation's figures (resources/io.py writes them)


def read_reports(base: UPath, upto: int) -> dict[int, dict]:
    """The evaluation reports of rounds 1..upto that have run."""
    out = {}
    for k in range(1, upto + 1):
        path = base / REPORTS / f"{in_round(EVALUATION, k)}.json"
        if path.exists():
            out[k] = json.loads(path.read_text(encoding="utf-8"))
    return out


def add_evaluation(base: UPath, cfg: KunConfig, k: int, reports: dict[int, dict], releases: dict[str, pd.DataFrame]) -> None:
    """Round k's cards get its evaluation's figures (the release was written before them)."""
    for source in [s.name for s in cfg.sources]:
        path = release_dir(base, source, k, cfg.iterations) / "README.md"
        if path.exists():
            rows = round_rows(base, source, cfg, k, len(releases.get(source, [])), reports)
            card_md = amend_card(path.read_text(encoding="utf-8"), rows).encode("utf-8")
            storage.write_atomic(path, card_md)
            if (path.parent / MANIFEST).exists():  # the manifest names the card as it now is
                manifest = json.loads((path.parent / MANIFEST).read_text(encoding="utf-8"))
                manifest["files"]["README.md"] = _entry(card_md)
                _write_manifest(path.parent, manifest)


def amend_card(card_md: str, rounds: list[dict]) -> str:
    """The card with its Rounds section replaced (the evaluation adds its figures after the release)."""
    new = "\n".join(rounds_md(rounds)) + "\n"
    head, sep, rest = card_md.partition("## Rounds\n")
    if not sep:
        head, sep, rest = card_md.partition("## Versions\n")
        return head + new + sep + rest
    _, nxt, tail = rest.partition("\n## ")
    return head + new + nxt.lstrip("\n") + tail if nxt else head + new


def release_dir(base: UPath, source: str, round_: int = 1, rounds: int = 1) -> UPath:
    """release/{source}: the last round's release; an earlier round's is kept beside it, under
    release/round{k}/{source}."""
    return base / "release" / source if round_ == rounds else base / "release" / f"round{round_}" / source


def read_records(base: UPath, asset: str, sources: list[str]) -> dict[str, pd.DataFrame]:
    """The published records of each source that has them (a round's release, for the next
    round's chat model and the evaluation)."""
    out = {}
    for source in sources:
        d = storage.partition_dir(base, asset, {"source": source})
        if storage.partition_rows(d):
            out[source] = storage.read_partition(d, ["instruction", "input", "output"])
    return out


def rounds_md(rows: list[dict]) -> list[str]:
    """The card's "Rounds" lines: per round, its chat model, keep rate, records and, where the
    evaluation ran, the held-out loss and win rate against the seeds-only model."""
    if not rows:
        return []
    frame = pd.DataFrame(rows)
    lines = [
        "## Rounds",
        "",
        "Round 1 is Kun's single pass; each later round fine-tunes the base on the seeds + the previous round's "
        "release and re-scores the same labeled pairs (Humpback's self-curation). Evaluation: the base fine-tuned on "
        "the training seeds alone and on the seeds + this source's release (evaluation.per_source off: every source's), "
        "compared on the held-out seeds "
        "(seed.eval_fraction): loss of the held-out answers, and the chat model's pairwise judgement (both orders; "
        "win rate against the seeds-only model with a bootstrap 95% interval; in brackets how the verdicts were read: "
        "by probability, from a free-text reply, or a tie when the judge named neither answer). '-': not evaluated.",
        "",
        frame.to_markdown(index=False),
        "",
    ]
    return lines


MANIFEST = "manifest.json"  # written last in a release folder: its files' rows, bytes and sha256


def _entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_manifest(out: UPath, manifest: dict) -> None:
    storage.write_atomic(out / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))


def publish_releases(releases: dict[UPath, tuple[pd.DataFrame, str]], run_id: str) -> None:
    """Each release folder's train.jsonl and README.md (release_dir; the Parquet copy is the asset's
    partition), all or none: every file is first written under a temporary name and flushed, and
    only when all of them are written are they renamed into place; each folder's manifest.json
    goes last. A folder without a manifest is being written (or was cut short: the asset was then
    not recorded, and the next run writes it again)."""
    staged, manifests = [], {}
    try:
        for out, (recs, card_md) in releases.items():
            jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cqia(recs)).encode("utf-8")
            files = {"train.jsonl": jsonl, "README.md": card_md.encode("utf-8")}
            for name, data in files.items():
                staged.append((storage.write_staged(out / name, data), out / name))
            manifests[out] = {"rows": len(recs), "run_id": run_id, "files": {name: _entry(data) for name, data in files.items()}}
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for out in releases:
        (out / MANIFEST).unlink(missing_ok=True)
    for tmp, final in staged:
        tmp.rename(final)
    for out, manifest in manifests.items():
        _write_manifest(out, manifest)


def verify_release(out: UPath) -> list[str]:
    """What in a release folder disagrees with its manifest (empty: whole and as published)."""
    if not (out / MANIFEST).exists():
        return [f"{out}: no {MANIFEST} (being written, or cut short)"]
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    problems = []
    for name, want in manifest["files"].items():
        got = _entry((out / name).read_bytes()) if (out / name).exists() else None
        if got != want:
            problems.append(f"{out / name}: {'missing' if got is None else 'not the bytes the manifest names'}")
    return problems
