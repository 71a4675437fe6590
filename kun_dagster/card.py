"""The release folder of a source: train.jsonl (COIG-CQIA records), README.md (the dataset card) and
manifest.json, written together by one writer (the dataset_card asset) from what the release and
the evaluations recorded."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import yaml
from upath import UPath

from . import scoring, storage
from .code_versions import published_config
from .config import KunConfig
from .dataset import cqia, diversity_md, funnel_frame, instruction_diversity
from .registry import CHAT_MODEL, SCORED, in_round

MANIFEST = "manifest.json"  # written last in a release folder: its files' rows, bytes and sha256


def release_dir(base: UPath, source: str, round_: int = 1, rounds: int = 1) -> UPath:
    """release/{source}: the last round's release; an earlier round's is kept beside it, under
    release/round{k}/{source}."""
    return base / "release" / source if round_ == rounds else base / "release" / f"round{round_}" / source


def evaluated(report: dict | None, source: str) -> dict | None:
    """The evaluation's row for a source's release: its own model; with evaluation.per_source off
    (no per-source models), the one on every source's. None where the source had no records."""
    if not report:
        return None
    rows = {r["model"]: r for r in report.get("models", [])}
    per_source = any(m.startswith("seeds+") and m != "seeds+all" for m in rows)
    return rows.get(f"seeds+{source}") if per_source else rows.get("seeds+all")


def round_row(k: int, stats: dict | None, report: dict | None, source: str) -> dict:
    """Round k's row of the card: its chat model, keep rate, records (from what round k's release
    recorded) and, where the evaluation ran, its figures."""
    fun = (stats or {}).get("funnel") or {}
    n_scored, kept = fun.get("rows", {}).get(SCORED, 0), fun.get("kept_by_score", 0)
    ev, report = evaluated(report, source), report or {}
    base_row = next((r for r in report.get("models", []) if r["model"] == "seeds"), None)
    return {
        "round": k,
        "chat model": f"{in_round(CHAT_MODEL, k)} (M{k - 1})",  # Humpback's names: M0 is the seeds-only model
        "keep rate": f"{kept / n_scored:.1%}" if n_scored else "-",
        "kept by score": kept,
        "records": (stats or {}).get("rows_out", "-"),
        "held-out loss (seeds only -> + release)": f"{base_row['heldout_loss']:.3f} -> {ev['heldout_loss']:.3f}" + _spread(base_row, ev)
        if ev and base_row
        else "-",
        "win rate vs seeds only [95% CI]": _win(ev, report),
        **({"benchmarks (seeds only -> + release)": _benchmarks(base_row, ev)} if ev and ev.get("benchmarks") else {}),
    }


def _benchmarks(base_row: dict | None, ev: dict) -> str:
    """Each task's accuracy (lm-evaluation-harness), the seeds-only model's then the release's, with its stderr."""
    out = []
    for task, got in sorted(ev["benchmarks"].items()):
        before = ((base_row or {}).get("benchmarks") or {}).get(task, {})
        metric = "acc" if "acc" in got else next((m for m in got if m != "n" and not m.endswith("_stderr")), None)
        if metric is None:
            continue
        was = f"{before[metric]:.3f} -> " if metric in before else ""
        err = f" ± {got[metric + '_stderr']:.3f}" if metric + "_stderr" in got else ""
        out.append(f"{task} {metric} {was}{got[metric]:.3f}{err} (n={got.get('n')})")
    return "; ".join(out) or "-"


def _spread(base_row: dict, ev: dict) -> str:
    """How far the loss moved over evaluation.repeats training seeds (the larger of the two models')."""
    spreads = [r["heldout_loss_spread"] for r in (base_row, ev) if "heldout_loss_spread" in r]
    return f" (seed spread {max(spreads):.3f} over {len(ev['heldout_loss_runs'])} seeds)" if spreads and "heldout_loss_runs" in ev else ""


def _win(ev: dict | None, report: dict) -> str:
    """The win rate with its interval, "undetermined" where most verdicts were ties, '-' where not judged."""
    if not ev:
        return "-"
    if ev.get("win_rate") is not None:
        return (
            f"{ev['win_rate']:.1%} [{ev['win_ci_low']:.1%}, {ev['win_ci_high']:.1%}] on {report['heldout']} ({ev.get('judged_by') or '-'})"
        )
    return ev.get("verdict") or "-"  # undetermined: how many ties, never a zero-width interval


def rounds_md(rows: list[dict]) -> list[str]:
    """The card's "Rounds" lines: per round, its chat model, keep rate, records and, where the
    evaluation ran, the held-out loss and win rate against the seeds-only model."""
    if not rows:
        return []
    return [
        "## Rounds",
        "",
        "Round 1 is Kun's single pass; each later round fine-tunes the base on the seeds + the previous round's "
        "release and re-scores the same labeled pairs (Humpback's self-curation). Evaluation: the base fine-tuned on "
        "the training seeds alone and on the seeds + this source's release (evaluation.per_source off: every source's), "
        "compared on the held-out seeds "
        "(seed.eval_fraction: answers only, near-duplicates of them in no training set, and no record of this release "
        "carrying one): the loss of the held-out answers (how well a model fits the seeds; it favours the seeds-only model "
        "by construction), and an independent judge's pairwise judgement (evaluation.judge, none of the compared "
        "models; both orders; win rate against the seeds-only model with a bootstrap 95% interval; in brackets how the "
        "verdicts were read: by probability, from a free-text reply, or a tie when the judge named neither answer; "
        "undetermined where ties are most of them). '-': not evaluated or not judged.",
        "",
        pd.DataFrame(rows).to_markdown(index=False),
        "",
    ]


def _head(source: str, n_records: int, cfg: KunConfig, models: dict) -> list[str]:
    """The front matter (YAML, as HF datasets expect) and what the records are."""
    method = f"- score: `{cfg.score.method}`, threshold {cfg.score.threshold}"
    if scoring.uses_probability(cfg.score.method):
        method += f", rows under answer mass {cfg.score.min_answer_mass} scored by free text"
    return [
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
        f"- label model: `{models.get('label', '-')}`",
        f"- chat model: `{models.get('chat', '-')}`",
        f"- copyright: `{cfg.dataset.copyright}` in every record (dataset.copyright); the texts come from `{source}`: "
        "check its licence before redistribution",
        method,
        "",
    ]


def card(source: str, stats: dict, cfg: KunConfig, rounds: list[dict] | None = None) -> str:
    """A source's dataset card (Markdown with YAML front matter) from what its release recorded
    (dataset.release's stats: funnel, diversity, versions, models) and the rounds' rows."""
    n = stats["rows_out"]
    lines = [
        *_head(source, n, cfg, stats.get("models") or {}),
        "## Funnel",
        "",
        funnel_frame(stats["funnel"], n, stats.get("dropped")).to_markdown(index=False, colalign=("left", "right", "left")),
        "",
        "## Instruction diversity",
        "",
        *diversity_md(stats.get("diversity") or instruction_diversity([], cfg), cfg.dedup.threshold),
        "",
        *rounds_md(rounds or []),
        "## Versions",
        "",
        "The code version (a hash of the kun.yaml keys and prompts that shape the stage) and the model versions "
        "(content fingerprints) each stage's partitions of this source were made under.",
        "",
        *(stats.get("versions") or ["Not recorded."]),
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


def _entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def publish_releases(releases: dict[UPath, tuple[pd.DataFrame, str]], run_id: str) -> None:
    """Each release folder's train.jsonl and README.md (release_dir; the Parquet copy is the
    instruction_dataset partition), all or none: every file is first written under a temporary
    name and flushed, and only when all of them are written are they renamed into place; each
    folder's manifest.json goes last. A folder without a manifest is being written (or was cut
    short: the asset was then not recorded, and the next run writes it again)."""
    staged, manifests = [], {}
    try:
        for out, (recs, card_md) in releases.items():
            jsonl = "".join(json.dumps(r, ensure_ascii=False, default=storage.plain) + "\n" for r in cqia(recs)).encode("utf-8")
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
        storage.write_atomic(out / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))


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
