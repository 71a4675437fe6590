"""Pandera schemas, one DataFrameModel per dataset version: the shape every published partition has.

Static constraints live on the models; those that come from kun.yaml (the token limit, the score's
scale, the banned keywords, the minimum output length) are added by `schema(asset, cfg)`.
`validate` checks a partition (whole, or batch by batch for a streamed one) and returns what
failed, with counts and sample rows, instead of raising.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import get_args

import pandas as pd
import pandera.pandas as pa
import pyarrow
from pandera.typing import Series

from . import registry
from .config import KunConfig, ScoreConfig
from .corpus import QUARANTINE_COLUMNS
from .registry import CLUSTERS, DATASET, SIGNATURES, stage_of
from .scoring import SCORE_RULES
from .tagging import DEFAULT_DOMAIN, TAG_RULES
from .text import NON_SPACE, keyword_form

# Holds a non-space character anywhere: str_contains searches (str_matches would anchor at the start
# and fail a valid text that opens with a space, a newline or U+3000). Same rule as text.has_text.
NON_EMPTY = {"str_contains": NON_SPACE.pattern}


class RawCorpus(pa.DataFrameModel):
    doc_id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    source: Series[str] = pa.Field(str_length={"min_value": 1})
    shard: Series[int] = pa.Field(ge=0)
    file: Series[str]
    row: Series[int] = pa.Field(ge=0)
    title: Series[str] = pa.Field(nullable=True)
    text: Series[str] = pa.Field(**NON_EMPTY)

    class Config:
        coerce = True  # an empty partition's columns read back as object


class FilteredCorpus(RawCorpus):
    n_tokens: Series[int] = pa.Field(ge=1)
    perplexity: Series[float] = pa.Field(gt=0, nullable=True)  # NaN where the filter is off


class DedupedCorpus(FilteredCorpus):
    """filtered_corpus less the duplicates of documents in other shards (and sources, scope: all)."""


class LabeledPairs(DedupedCorpus):
    instruction: Series[str] = pa.Field(**NON_EMPTY)
    label_tokens: Series[int] = pa.Field(ge=0)
    label_finish: Series[str] = pa.Field(isin=["stop", "length"])


SCORE_METHODS = list(get_args(ScoreConfig.model_fields["method"].annotation))  # the methods kun.yaml accepts


PROBABILITY = {"ge": 0, "le": 1 + 1e-6, "nullable": True}  # NaN where the method reads none (free text)


class ScoredPairs(LabeledPairs):
    p_good: Series[float] = pa.Field(**PROBABILITY)  # P(reply opens with 【好】); empty for Humpback
    p_bad: Series[float] = pa.Field(**PROBABILITY)
    answer_mass: Series[float] = pa.Field(**PROBABILITY)  # P(reply opens with any answer)
    score: Series[float] = pa.Field(nullable=True)  # NaN: a free-text reply that did not parse
    score_rule: Series[str] = pa.Field(isin=SCORE_RULES)  # probability, or freetext (generated and parsed)
    score_reply: Series[str] = pa.Field(nullable=True)  # the free-text reply; null where probability scored
    score_method: Series[str] = pa.Field(isin=SCORE_METHODS)


class PolishedPairs(LabeledPairs):
    score: Series[float] = pa.Field(nullable=True)
    score_rule: Series[str] = pa.Field(isin=SCORE_RULES)
    score_method: Series[str] = pa.Field(isin=SCORE_METHODS)
    output: Series[str] = pa.Field(**NON_EMPTY)
    instruction_truncated: Series[bool]
    polish_tokens: Series[int] = pa.Field(ge=1)
    polish_finish: Series[str] = pa.Field(isin=["stop", "length"])
    task_minor: Series[object]  # 1 to tags.max_minors of tags.task_types (or [kun:<source>], tags off)
    domain: Series[str] = pa.Field(str_length={"min_value": 1})  # in tags.domains (or 通用, tags off)
    task_minor_rule: Series[str] = pa.Field(isin=TAG_RULES)
    domain_rule: Series[str] = pa.Field(isin=TAG_RULES)


class InstructionDataset(pa.DataFrameModel):
    """COIG-CQIA's record schema, then the provenance columns; nothing else."""

    instruction: Series[str] = pa.Field(**NON_EMPTY)
    input: Series[str]
    output: Series[str] = pa.Field(**NON_EMPTY)
    task_type: Series[object]
    domain: Series[object]
    answer_from: Series[str]
    human_verified: Series[bool]
    copyright: Series[str]
    source: Series[str]
    doc_id: Series[str] = pa.Field(unique=True)
    file: Series[str]
    row: Series[int] = pa.Field(ge=0)
    score: Series[float] = pa.Field(nullable=True)
    score_method: Series[str] = pa.Field(isin=SCORE_METHODS)
    score_rule: Series[str] = pa.Field(isin=SCORE_RULES)
    label_model: Series[str]
    chat_model: Series[str]
    task_minor_rule: Series[str] = pa.Field(isin=TAG_RULES)
    domain_rule: Series[str] = pa.Field(isin=TAG_RULES)

    class Config:
        strict = True
        ordered = True

    @pa.check("task_type", element_wise=True)
    def coig_task_type(cls, v) -> bool:
        return isinstance(v, dict) and set(v) == {"major", "minor"} and all(len(v[k]) and all(isinstance(x, str) for x in v[k]) for k in v)

    @pa.check("domain", element_wise=True)
    def coig_domain(cls, v) -> bool:
        return len(v) > 0 and all(isinstance(x, str) for x in v)


def model(asset: str) -> type[pa.DataFrameModel]:
    """An asset's DataFrameModel, as its spec (registry.py) names it."""
    return globals()[registry.get(asset).schema]


# Arrow types of the columns (pandera dtype names; object columns by name): every partition of a
# dataset version is written with these, the empty ones included, so readers see one schema.
_ARROW = {"str": pyarrow.string(), "int64": pyarrow.int64(), "float64": pyarrow.float64(), "bool": pyarrow.bool_()}
_NESTED = {
    "task_minor": pyarrow.list_(pyarrow.string()),
    "task_type": pyarrow.struct([("major", pyarrow.list_(pyarrow.string())), ("minor", pyarrow.list_(pyarrow.string()))]),
    "domain": pyarrow.list_(pyarrow.string()),
}
QUARANTINE = pyarrow.schema([(c, pyarrow.int64() if c in ("shard", "row") else pyarrow.string()) for c in QUARANTINE_COLUMNS])


# Where a document is: what the dedup indices hold of each, and of each cluster's kept document.
LOCATION = pyarrow.schema(
    [
        ("source", pyarrow.string()),
        ("shard", pyarrow.int64()),
        ("doc_id", pyarrow.string()),
        ("file", pyarrow.string()),
        ("row", pyarrow.int64()),
    ]
)
# The dedup indices (dedup.py) are typed Arrow, not checked frames: they are derived, never edited.
INDEXES = {
    SIGNATURES: pyarrow.schema(
        list(LOCATION)
        + [
            ("shingles", pyarrow.int64()),
            ("params", pyarrow.string()),  # what made the signature: algorithm, ngram, num_perm, seed
            ("text_key", pyarrow.binary()),  # text.text_key: 16 bytes
            ("signature", pyarrow.binary()),  # num_perm little-endian uint32
        ]
    ),
    CLUSTERS: pyarrow.schema(
        [("cluster", pyarrow.int64()), ("role", pyarrow.string())]
        + list(LOCATION)
        + [("jaccard", pyarrow.float64())]
        + [pyarrow.field(f"kept_{f.name}", f.type) for f in LOCATION]
    ),
}


def known(asset: str) -> bool:
    return registry.find(asset) is not None or asset in INDEXES or asset.startswith("quarantine/")


def arrow_schema(asset: str) -> pyarrow.Schema:
    """The Arrow schema of an asset's partitions (and `quarantine/<asset>`'s)."""
    if asset.startswith("quarantine/"):
        return QUARANTINE
    if asset in INDEXES:
        return INDEXES[asset]
    columns = model(asset).to_schema().columns
    return pyarrow.schema([(name, _ARROW[str(col.dtype)] if str(col.dtype) in _ARROW else _NESTED[name]) for name, col in columns.items()])


def empty_frame(asset: str) -> pd.DataFrame:
    """A partition with no rows and every column, typed: what an empty shard publishes."""
    return arrow_schema(asset).empty_table().to_pandas()


def _no_keyword(keywords: list[str], name: str) -> list[pa.Check]:
    """No text holds a keyword, matched as the stages match it (text.keyword_form); none: no check."""
    forms = [keyword_form(k) for k in keywords if k]
    if not forms:
        return []
    pattern = "|".join(re.escape(k) for k in forms)
    return [
        pa.Check(
            lambda s: ~s.map(lambda v: keyword_form(v) if isinstance(v, str) else "").str.contains(pattern, regex=True),
            name=name,
            error=f"no banned keyword ({'、'.join(keywords)})",
        )
    ]


def _add(schema: pa.DataFrameSchema, column: str, *checks: pa.Check) -> pa.DataFrameSchema:
    if column not in schema.columns:
        return schema
    return schema.update_column(column, checks=[*schema.columns[column].checks, *checks])


_built: dict[tuple[str, str], pa.DataFrameSchema] = {}


def schema(asset: str, cfg: KunConfig) -> pa.DataFrameSchema:
    """The asset's DataFrameModel with the constraints kun.yaml sets; built once per asset and
    config (a step validates each of its partitions with it)."""
    key = (asset, cfg.model_dump_json())
    if key not in _built:
        _built[key] = _build(asset, cfg)
    return _built[key]


def _build(asset: str, cfg: KunConfig) -> pa.DataFrameSchema:
    s = model(asset).to_schema()
    s = _add(s, "n_tokens", pa.Check.le(cfg.filter.max_tokens, name="within_token_limit"))
    s = _add(s, "instruction", *_no_keyword(cfg.label.banned_keywords, "no_banned_keyword"))
    s = _add(s, "score", pa.Check.in_range(*cfg.score.scale, name="within_score_scale"))
    if stage_of(asset) == DATASET:  # polish applied the threshold; the release verifies the one now in force (older inputs fail)
        s = _add(s, "score", pa.Check.ge(cfg.score.threshold, name="at_least_threshold"))
    s = _taxonomy(s, cfg)
    s = _add(
        s,
        "output",
        pa.Check.str_length(min_value=max(cfg.polish.min_output_chars, 1), name="min_output_chars"),
        *_no_keyword(cfg.polish.banned_keywords, "no_banned_output_keyword"),
    )
    return s


def _taxonomy(s: pa.DataFrameSchema, cfg: KunConfig) -> pa.DataFrameSchema:
    """Every tag is one of the taxonomy's (tags on), or the constants (tags off): polished_pairs
    holds the minors as a list and the domain as a string, the COIG-CQIA records both as lists,
    with each minor's major (tags.task_types) in task_type.major."""
    t, default_major = cfg.tags, cfg.dataset.task_major
    minors = set(t.minors) if t.enabled else None
    domains = set(t.domains) if t.enabled else {DEFAULT_DOMAIN}
    where = "in the taxonomy (" + ("tags.task_types / tags.domains)" if t.enabled else "tags off: kun:<source> / 通用)")

    def minor_ok(v) -> bool:
        return v in minors if minors is not None else isinstance(v, str) and v.startswith("kun:")

    def minors_ok(v) -> bool:
        v = list(v) if v is not None and not isinstance(v, (str, dict)) else None
        return bool(v) and len(v) <= t.max_minors and len(set(v)) == len(v) and all(map(minor_ok, v))

    if "task_type" in s.columns:  # the records (their shape is coig_task_type's and coig_domain's to check)
        minor = pa.Check(
            lambda v: (
                isinstance(v, dict)
                and minors_ok(v.get("minor"))
                and list(v.get("major") or []) == (t.majors(list(v["minor"]), default_major) if t.enabled else default_major)
            ),
            element_wise=True,
            name="minor_in_taxonomy",
            error=where + ", task_type.major each minor's major",
        )
        domain = pa.Check(
            lambda v: not isinstance(v, str) and all(d in domains for d in v), element_wise=True, name="domain_in_taxonomy", error=where
        )
        return _add(_add(s, "task_type", minor), "domain", domain)
    s = _add(s, "task_minor", pa.Check(minors_ok, element_wise=True, name="in_taxonomy", error=where + f", 1 to {t.max_minors}"))
    return _add(s, "domain", pa.Check.isin(sorted(domains), name="in_taxonomy", error=where))


@dataclass
class Violations:
    """What failed in a partition: failure cases by column and check, and a few failing rows."""

    rows: int = 0
    failures: int = 0
    by_check: dict[str, int] = field(default_factory=dict)
    sample: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def passed(self) -> bool:
        return self.failures == 0


# Failure cases of a frame with no rows, by schema and shape: its row checks hold vacuously, so
# only its columns and types decide, the same for every empty partition (most of them, at scale:
# pandera takes ~20 ms even on no rows, and a run over 3,000 shards validates each).
_empty: dict[tuple, pd.DataFrame] = {}


def _failures(s: pa.DataFrameSchema, df: pd.DataFrame) -> pd.DataFrame:
    shape = (id(s), str(df.index.dtype), tuple((str(c), str(t)) for c, t in df.dtypes.items())) if df.empty else None
    if shape in _empty:
        return _empty[shape]
    try:
        s.validate(df, lazy=True)
        found = pd.DataFrame(columns=["column", "check", "index"])
    except pa.errors.SchemaErrors as e:
        found = e.failure_cases[["column", "check", "index"]]
    if shape is not None:
        _empty[shape] = found
    return found


def validate(asset: str, frames: pd.DataFrame | Iterable[pd.DataFrame], cfg: KunConfig, sample_rows: int = 5) -> Violations:
    """Validate a partition, whole or in batches (doc ids are also checked across batches)."""
    s = schema(asset, cfg)
    out, samples, seen = Violations(), [], set()
    for df in [frames] if isinstance(frames, pd.DataFrame) else frames:
        out.rows += len(df)
        cases = [_failures(s, df)]
        if "doc_id" in df and stage_of(asset) != DATASET:
            again = df.index[df["doc_id"].isin(seen).to_numpy()]
            cases.append(pd.DataFrame({"column": "doc_id", "check": "unique across batches", "index": again}))
            seen.update(df["doc_id"])
        for fc in cases:
            for (column, check), n in fc.groupby(["column", "check"], dropna=False).size().items():
                key = f"{column}: {check}"
                out.by_check[key] = out.by_check.get(key, 0) + int(n)
                out.failures += int(n)
            rows = [i for i in fc["index"].dropna().unique() if i in df.index][:sample_rows]
            if rows:
                samples.append(df.loc[rows])
    out.sample = pd.concat(samples).head(sample_rows) if samples else pd.DataFrame()
    return out
