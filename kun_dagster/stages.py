"""The Kun stages as plain functions over DataFrames: rows in, (rows kept, rows dropped, stats) out.

No Dagster here: assets/ calls these once per partition. Every dropped row carries a reason code
(and its doc id), so nothing disappears without a count.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import progress, prompts, scoring
from .config import KunConfig
from .corpus import QUARANTINE_COLUMNS, iter_shard, quarantine_frame
from .llm.base import Engine, EngineError, SamplingParams, encode
from .names import FILTERED, LABELED, POLISHED, RAW, SCORED
from .storage import FrameSink, Rows, Sink, Store
from .text import clean_text, cut_at_whitespace_run, dedup_key, find_keyword, repair_repeated_lines, starts_with_repeated_phrase

# Drop reason codes after ingest.
EMPTY_AFTER_CLEAN = "empty_after_clean"
TOO_MANY_TOKENS = "too_many_tokens"
DUPLICATE_TEXT = "duplicate_text"
HIGH_PERPLEXITY = "high_perplexity"
PERPLEXITY_UNDEFINED = "perplexity_undefined"
EMPTY_GENERATION = "empty_generation"
BANNED_KEYWORD = "banned_keyword"
PROMPT_OVER_BUDGET = "prompt_over_budget"
TOO_SHORT = "too_short"
REPEATED_PHRASE = "repeated_phrase"
DUPLICATE_OUTPUT = "duplicate_output"
BROKEN_TEXT = "broken_text"  # U+FFFD: the model emitted bytes that are not UTF-8

REPLACEMENT_CHAR = "\ufffd"

TRACE_COLUMNS = ["doc_id", "source", "shard", "file", "row"]


@dataclass
class StageResult:
    rows: Rows  # a frame, or the file a streaming stage wrote into staging
    dropped: pd.DataFrame
    stats: dict = field(default_factory=dict)


def sampling_params(cfg: KunConfig) -> SamplingParams:
    s = cfg.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                          max_tokens=s.max_tokens, seed=s.seed)


def _dropped(df: pd.DataFrame, reasons: pd.Series, detail: pd.Series, sample_col: str) -> pd.DataFrame:
    """Quarantine rows (the ingest columns) for the rows of df whose reason is set."""
    mask = reasons.notna()
    out = df.loc[mask, [c for c in TRACE_COLUMNS if c in df]].copy()
    out["reason"] = reasons[mask]
    out["detail"] = detail[mask].fillna("")
    out["sample"] = df.loc[mask, sample_col].astype(str).str.slice(0, 200)
    return out.reindex(columns=QUARANTINE_COLUMNS)


def _no_reasons(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per-row (reason, detail), None = keep; a stage fills them in as its rules fire."""
    return (pd.Series([None] * len(df), index=df.index, dtype=object),
            pd.Series([None] * len(df), index=df.index, dtype=object))


def _mark_duplicates(df: pd.DataFrame, column: str, reason: pd.Series, detail: pd.Series, code: str,
                     first: dict[bytes, str] | None = None) -> None:
    """Drop every later row whose `column` equals (up to whitespace) an earlier kept row's; `first`
    (a 16-byte hash of each kept text -> its doc id) carries the kept texts across batches."""
    first = {} if first is None else first
    for i in df.index[reason.isna()]:
        key = hashlib.blake2b(dedup_key(df.at[i, column]).encode("utf-8"), digest_size=16).digest()
        if key in first:
            reason[i], detail[i] = code, f"same {column} as {first[key]}"
        else:
            first[key] = df.at[i, "doc_id"]


def _summary(values, digits: int = 2) -> dict:
    arr = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if arr.size == 0:
        return {}
    q = np.percentile(arr, [0, 50, 90, 100])
    return {"min": round(q[0], digits), "p50": round(q[1], digits), "p90": round(q[2], digits), "max": round(q[3], digits)}


def _stats(n_in: int, result_rows: int, reasons, **extra) -> dict:
    counts = Counter(r for r in reasons if isinstance(r, str))
    return {"rows_in": n_in, "rows_out": result_rows, "retention": round(result_rows / n_in, 4) if n_in else None,
            "dropped": dict(sorted(counts.items())), **extra}


def _require_text(gens, what: str, model: str) -> None:
    if gens and not any(g.text for g in gens):
        raise EngineError(f"{what}: model {model} returned empty text for all {len(gens)} prompts; nothing is published")


# -- raw_corpus --------------------------------------------------------------------------------------
def ingest(cfg: KunConfig, source_name: str, shard: int, store: Store | None = None, sink: Sink | None = None,
           label: str = RAW) -> StageResult:
    """Every document of the source's files that fall in `shard`, read and written `batch_rows` at a
    time into `sink` (default: one in-memory frame); unreadable rows quarantined."""
    source = cfg.source(source_name)
    uri = cfg.resolve(source.uri)
    sink = sink or FrameSink()
    n_docs, bad, files = 0, [], []
    with progress.task(f"{label} {source_name}/{shard}", unit="docs") as bar:
        for got in iter_shard(source, uri, shard, cfg.shards, (store or Store(cfg.storage)).options(uri), cfg.storage.batch_rows):
            sink.write(got.docs)
            n_docs, files = n_docs + len(got.docs), got.files
            bad.append(got.quarantine)
            bar.update(len(got.docs) + len(got.quarantine))
    quarantine = pd.concat(bad, ignore_index=True)
    return StageResult(rows=sink.close(), dropped=quarantine,
                       stats=_stats(n_docs + len(quarantine), n_docs, quarantine["reason"], files=len(files)))


def corpus_texts(cfg: KunConfig, limit: int, store: Store | None = None) -> list[str]:
    """Up to `limit` documents across every source and shard (the tiny base's pre-training text)."""
    texts: list[str] = []
    for source in cfg.sources:
        for shard in range(cfg.shards):
            texts += ingest(cfg, source.name, shard, store, label="base_model texts").rows["text"].tolist()
            if len(texts) >= limit:
                return texts[:limit]
    return texts


# -- filtered_corpus -------------------------------------------------------------------------------
def filter_corpus(docs: pd.DataFrame | Iterable[pd.DataFrame], tokenizer, ppl_engine: Engine | None, cfg: KunConfig, sink: Sink | None = None,
                  label: str = FILTERED) -> StageResult:
    """Clean, then drop: empty, over the token limit (label model's tokenizer), exact duplicates,
    perplexity above the threshold (reference model). Dedup runs before perplexity to save work.
    `docs` may be batches (a partition streamed from storage): each is filtered and written to
    `sink` in turn, duplicates found across batches; memory holds one batch and a hash per text."""
    sink = sink or FrameSink()
    seen: dict[bytes, str] = {}
    n_in, counts, tokens, ppls, dropped = 0, Counter(), [], [], []
    total = len(docs) if isinstance(docs, pd.DataFrame) else getattr(docs, "total", None)
    with progress.task(label, total=total, unit="docs") as bar:
        for batch in [docs] if isinstance(docs, pd.DataFrame) else docs:
            kept, reason, out = _filter_batch(batch, tokenizer, ppl_engine, cfg, seen)
            sink.write(kept)
            n_in += len(batch)
            counts.update(r for r in reason if isinstance(r, str))
            tokens.append(kept["n_tokens"].to_numpy())
            ppls.append(kept["perplexity"].to_numpy())
            dropped.append(out)
            bar.update(len(batch))
    return StageResult(
        rows=sink.close(),
        dropped=pd.concat(dropped, ignore_index=True) if dropped else quarantine_frame([]),
        stats=_stats(n_in, n_in - sum(counts.values()), counts.elements(), tokens=_summary(np.concatenate(tokens) if tokens else [], 0),
                     perplexity=_summary(np.concatenate(ppls) if ppls else [])),
    )


def _token_counts(tokenizer, texts: list[str], chunk: int = 1000) -> list[int]:
    """Token counts of many texts; a fast tokenizer's encodings (offsets, strings) are large, so
    they are made `chunk` texts at a time and only their lengths kept."""
    return [len(ids) for i in range(0, len(texts), chunk) for ids in encode(tokenizer, texts[i : i + chunk], special=False)]


def _filter_batch(docs: pd.DataFrame, tokenizer, ppl_engine: Engine | None, cfg: KunConfig, seen: dict) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
    df = docs.copy()
    df["text"] = df["text"].map(clean_text).astype(object)  # object even when empty, for .str
    reason, detail = _no_reasons(df)
    reason[df["text"].str.len() == 0] = EMPTY_AFTER_CLEAN

    df["n_tokens"] = pd.Series(_token_counts(tokenizer, df["text"].tolist()), index=df.index, dtype="int64")
    over = reason.isna() & (df["n_tokens"] > cfg.filter.max_tokens)
    reason[over] = TOO_MANY_TOKENS
    detail[over] = df.loc[over, "n_tokens"].map(lambda n: f"{n} tokens > {cfg.filter.max_tokens}")

    if cfg.filter.dedup:
        _mark_duplicates(df, "text", reason, detail, DUPLICATE_TEXT, seen)

    df["perplexity"] = np.nan
    if cfg.filter.perplexity_max is not None and ppl_engine is not None:
        alive = df.index[reason.isna()]
        if len(alive):
            df.loc[alive, "perplexity"] = ppl_engine.perplexity(df.loc[alive, "text"].tolist())
        ppl = df.loc[alive, "perplexity"]
        undefined = alive[ppl.isna().to_numpy()]
        high = alive[(ppl > cfg.filter.perplexity_max).to_numpy()]
        reason[undefined] = PERPLEXITY_UNDEFINED
        reason[high] = HIGH_PERPLEXITY
        detail[high] = df.loc[high, "perplexity"].map(lambda p: f"perplexity {p:.1f} > {cfg.filter.perplexity_max}")
    return df[reason.isna()].reset_index(drop=True), reason, _dropped(df, reason, detail, "text")


# -- labeled_pairs -----------------------------------------------------------------------------------
def clean_instruction(text: str, whitespace_run: int) -> str:
    """Kun's cut at a whitespace run and repeated-line repair, on the stripped instruction: a model
    that opens with newlines has still written its instruction. Kun cleans after scoring (polish
    does it here), so the scorer sees what the point prompt's 【差】 examples teach it to reject."""
    return repair_repeated_lines(cut_at_whitespace_run(text.strip(), whitespace_run)).rstrip()


def label(docs: pd.DataFrame, engine: Engine, cfg: KunConfig) -> StageResult:
    """The label model writes the instruction each text answers; instructions that point at
    context the reader will not have (banned keywords) are dropped. The instruction is kept as the
    model wrote it, less trailing whitespace (Kun's instruction filter): scoring reads it raw."""
    df = docs.copy()
    keep_system = cfg.models.keep_default_system
    gens = engine.generate([prompts.render(engine.tokenizer, prompts.label_user(t), keep_system=keep_system) for t in df["text"]],
                           sampling_params(cfg))
    _require_text(gens, LABELED, engine.model_name)
    df["instruction"] = pd.Series([g.text.rstrip() for g in gens], index=df.index, dtype=object)
    df["label_tokens"] = [g.num_tokens for g in gens]
    df["label_finish"] = [g.finish_reason for g in gens]
    reason, detail = _no_reasons(df)
    reason[df["instruction"].str.len() == 0] = EMPTY_GENERATION
    broken = reason.isna() & df["instruction"].str.contains(REPLACEMENT_CHAR, regex=False)
    reason[broken], detail[broken] = BROKEN_TEXT, "instruction holds U+FFFD (bytes that are not UTF-8)"
    for i in df.index[reason.isna()]:
        kw = find_keyword(df.at[i, "instruction"], cfg.label.banned_keywords)
        if kw:
            reason[i], detail[i] = BANNED_KEYWORD, f"instruction contains {kw!r}"
    kept = df[reason.isna()].reset_index(drop=True)
    return StageResult(
        rows=kept,
        dropped=_dropped(df, reason, detail, "instruction"),
        stats=_stats(len(df), len(kept), reason, instruction_tokens=_summary(kept["label_tokens"], 0),
                     truncated_at_max_tokens=int((df["label_finish"] == "length").sum())),
    )


# -- scored_pairs ------------------------------------------------------------------------------------
def score(pairs: pd.DataFrame, engine: Engine, cfg: KunConfig) -> StageResult:
    """Every row comes out with its score and the rule that scored it (scoring.py); no keep flag:
    polish applies score.threshold, so a new threshold needs no re-scoring.

    *_choice: one probability read per row (the answers' shared opening, then the token where
    they differ); rows where the model puts less than min_answer_mass on the answers are scored by
    the method's own free-text rule, generated in the same step. *_freetext: every row generated
    and parsed."""
    sc, tok, keep_system = cfg.score, engine.tokenizer, cfg.models.keep_default_system
    rule = scoring.rule(sc.method)
    df = pairs.copy().reset_index(drop=True)
    users = [rule.user(s, t) for s, t in zip(df["instruction"], df["text"])]
    for col in ("p_good", "p_bad", "answer_mass"):
        df[col] = np.nan
    df["score"] = np.nan
    df["score_rule"] = scoring.FREETEXT
    df["score_reply"] = None
    if scoring.uses_probability(sc.method) and len(df):
        lp = engine.choice_logprobs([prompts.render(tok, u, rule.prefix, keep_system) for u in users], list(rule.choices), exact=sc.exact)
        for col, values in scoring.from_logprobs(lp, rule).items():
            df[col] = values
        df.loc[df["answer_mass"] >= sc.min_answer_mass, "score_rule"] = scoring.PROBABILITY
    free = df.index[df["score_rule"] == scoring.FREETEXT]
    if len(free):
        gens = engine.generate([prompts.render(tok, users[i], keep_system=keep_system) for i in free], sampling_params(cfg))
        _require_text(gens, SCORED, engine.model_name)
        df.loc[free, "score_reply"] = pd.Series([g.text for g in gens], index=free, dtype=object)
        df.loc[free, "score"] = [rule.parse(g.text) for g in gens]
    df["score"] = df["score"].astype(float)
    df["score_method"] = sc.method
    hist, edges = np.histogram(df["score"].dropna(), bins=10, range=sc.scale)
    by_rule = df["score_rule"].value_counts()
    stats = {"rows_in": len(df), "rows_out": len(df),
             "scored_by": {r: int(by_rule.get(r, 0)) for r in scoring.SCORE_RULES},
             "fallback_rate": round(len(free) / len(df), 4) if len(df) and scoring.uses_probability(sc.method) else None,
             "answer_mass": _summary(df["answer_mass"], 4),
             "parse_failures": int(df.loc[free, "score"].isna().sum()),
             "histogram": {f"{edges[i]:.1f}-{edges[i + 1]:.1f}": int(h) for i, h in enumerate(hist)}}
    return StageResult(rows=df, dropped=quarantine_frame([]), stats=stats)


# -- polished_pairs ----------------------------------------------------------------------------------
def output_reason(output: str, cfg: KunConfig) -> tuple[str, str] | None:
    """Kun's output filter: (reason, detail) to drop, or None to keep."""
    p = cfg.polish
    if not output:
        return EMPTY_GENERATION, ""
    if REPLACEMENT_CHAR in output:
        return BROKEN_TEXT, "output holds U+FFFD (bytes that are not UTF-8)"
    kw = find_keyword(output, p.banned_keywords)
    if kw:
        return BANNED_KEYWORD, f"output contains {kw!r}"
    if len(output) < p.min_output_chars:
        return TOO_SHORT, f"{len(output)} characters < {p.min_output_chars}"
    if starts_with_repeated_phrase(output, p.max_phrase_repeats, p.min_phrase_chars):
        return REPEATED_PHRASE, f"opens with a phrase repeated {p.max_phrase_repeats}+ times"
    return None


def polish(scored: pd.DataFrame, engine: Engine, cfg: KunConfig) -> StageResult:
    """Rows whose score reaches score.threshold (applied here, so a new threshold re-runs only this
    stage, not the scorer); the chat model rewrites each kept text into an answer to its
    instruction (answer polishment)."""
    keep = scoring.keep(scored["score"].to_numpy(dtype=float), cfg.score.threshold)
    df = scored[keep].drop(columns=["score_reply"], errors="ignore").reset_index(drop=True)
    df["instruction"] = df["instruction"].map(lambda s: clean_instruction(s, cfg.label.whitespace_run)).astype(object)
    reason, detail = _no_reasons(df)
    reason[df["instruction"].str.len() == 0] = EMPTY_AFTER_CLEAN
    built = [None if reason[i] is not None else
             prompts.answer_prompt(engine.tokenizer, t, s, cfg.polish.prompt_token_budget, cfg.models.keep_default_system)
             for i, t, s in zip(df.index, df["text"], df["instruction"])]
    for i, b in enumerate(built):
        if b is None and reason[i] is None:
            reason[i], detail[i] = PROMPT_OVER_BUDGET, f"the text alone fills the {cfg.polish.prompt_token_budget}-token budget"
    todo = [i for i in df.index if reason[i] is None]
    gens = engine.generate([built[i][0] for i in todo], sampling_params(cfg))
    _require_text(gens, POLISHED, engine.model_name)
    df["output"] = pd.Series("", index=df.index, dtype=object)
    df["instruction_truncated"], df["polish_tokens"], df["polish_finish"] = False, 0, ""
    for i, g in zip(todo, gens):
        df.at[i, "output"] = repair_repeated_lines(g.text)
        df.at[i, "instruction_truncated"] = built[i][1]
        df.at[i, "polish_tokens"] = g.num_tokens
        df.at[i, "polish_finish"] = g.finish_reason
        why = output_reason(df.at[i, "output"], cfg)
        if why:
            reason[i], detail[i] = why
    if cfg.polish.dedup_outputs:
        _mark_duplicates(df, "output", reason, detail, DUPLICATE_OUTPUT)
    kept = df[reason.isna()].reset_index(drop=True)
    return StageResult(
        rows=kept,
        dropped=_dropped(df, reason, detail, "output"),
        stats=_stats(len(df), len(kept), reason, not_kept_by_score=int(len(scored) - len(df)),
                     keep_rate=round(len(df) / len(scored), 4) if len(scored) else None, threshold=cfg.score.threshold,
                     output_chars=_summary(kept["output"].astype(str).str.len(), 0),
                     truncated_at_max_tokens=int((df["polish_finish"] == "length").sum())),
    )
