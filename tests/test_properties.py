"""Property-based tests (hypothesis): arbitrary Unicode and arbitrary bytes go in; what comes out of
ingest is a document or a quarantine reason for every line, never an exception; the text rules hold
their invariants; every Pandera schema answers (never raises) and means "holds a non-space
character" exactly where the text rule does."""

import json
import re
import tempfile
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kun_dagster import corpus, registry, schemas, stages, storage
from kun_dagster.config import SourceConfig
from kun_dagster.text import clean_text, has_content, has_text, repair_instruction, starts_with_repeated_phrase

from .test_schemas import GOOD
from .test_stages import CFG
from .wild import ingest_shard

# Every code point, lone surrogates included (hypothesis leaves them out by default), weighted
# towards what real dumps hold: spaces of every kind, control characters, CJK.
ANY_CHAR = st.one_of(
    st.characters(exclude_categories=()),
    st.sampled_from(" \t\r\n\u3000\u00a0\ufeff\u200b\x00\x1b\x7f"),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
)
TEXT = st.text(ANY_CHAR, max_size=40)
VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
RECORD = st.fixed_dictionaries(
    {}, optional={"id": VALUE, "text": VALUE, "meta": st.fixed_dictionaries({}, optional={"content": VALUE, "id": VALUE})}
)


def _line(rec_or_bytes, ascii_only: bool) -> bytes:
    if isinstance(rec_or_bytes, bytes):
        return rec_or_bytes.replace(b"\n", b" ")
    return json.dumps(rec_or_bytes, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")  # raw surrogates: not UTF-8


LINES = st.lists(st.tuples(st.one_of(RECORD, st.binary(max_size=30)), st.booleans()), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=LINES, nested=st.booleans(), encoding=st.sampled_from(["utf-8", "gb18030"]))
def test_every_line_is_a_document_or_a_quarantine_reason(lines, nested, encoding):
    data = b"\n".join(_line(x, a) for x, a in lines) + b"\n"
    assume(not data.startswith(b"\xef\xbb\xbf"))  # a BOM is not a line's text
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "x.jsonl").write_bytes(data)
        src = SourceConfig(
            name="t",
            uri="unused",
            format="jsonl",
            encoding=encoding,
            id_field="meta.id" if nested else "id",
            text_field="meta.content" if nested else "text",
        )
        got = ingest_shard(src, str(Path(d) / "*.jsonl"), 0, 1)
    decoded = [raw.decode(encoding, "replace") for raw in re.split(rb"\r\n|\r|\n", data)]  # a lone CR ends a line too
    expected = {i for i, text in enumerate(decoded, start=1) if text.strip()}
    rows = list(got.docs["row"]) + list(got.quarantine["row"])
    assert sorted(rows) == sorted(expected)  # each line once: a document or a reason
    assert set(got.quarantine["reason"]) <= REASONS - {corpus.EMPTY_FILE, corpus.UNREADABLE_FILE}
    assert got.docs["doc_id"].is_unique
    assert schemas.validate("raw_corpus", got.docs, CFG).passed  # what ingest keeps, the schema accepts
    storage.parquet_bytes(got.docs, schemas.arrow_schema("raw_corpus"))  # and Parquet can hold it
    storage.parquet_bytes(got.quarantine, schemas.QUARANTINE)


REASONS = set(registry.get(registry.RAW).reasons)  # ingest's reason codes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(["json", "txt"]),
    encoding=st.sampled_from(["utf-8", "gb18030", "utf-16"]),
    payload=st.one_of(st.lists(RECORD, max_size=6), st.text(ANY_CHAR, max_size=80), st.binary(max_size=80)),
)
def test_json_and_txt_files_in_any_encoding_give_documents_or_reasons(fmt, encoding, payload):
    try:
        if isinstance(payload, list):
            data = json.dumps(payload, ensure_ascii=False).encode(encoding, "surrogatepass")
        elif isinstance(payload, str):
            data = payload.encode(encoding, "surrogatepass")
        else:
            data = payload
    except UnicodeEncodeError:  # a lone surrogate has no GB18030 bytes (surrogatepass is UTF-only): no such file exists
        assume(False)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / f"x.{fmt}").write_bytes(data)
        src = SourceConfig(name="t", uri="unused", format=fmt, encoding=encoding, id_field="id" if fmt == "json" else None)
        got = ingest_shard(src, str(Path(d) / f"*.{fmt}"), 0, 1)
    assert set(got.quarantine["reason"]) <= REASONS
    assert got.docs["doc_id"].is_unique and schemas.validate("raw_corpus", got.docs, CFG).passed
    storage.parquet_bytes(got.docs, schemas.arrow_schema("raw_corpus"))
    storage.parquet_bytes(got.quarantine, schemas.QUARANTINE)
    if fmt == "json" and isinstance(payload, list) and data:
        assert len(got.docs) + len(got.quarantine) == len(payload)  # one outcome per record


@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_text_rules_hold_their_invariants(text):
    text = text.encode("utf-8", "replace").decode("utf-8")  # the rules see texts ingest has kept
    cleaned = clean_text(text)
    assert clean_text(cleaned) == cleaned  # idempotent
    assert has_content(text) == bool(cleaned)  # ingest's fast test means exactly "something is left after cleaning"
    assert bool(cleaned) == has_text(cleaned)  # a cleaned text is empty or holds a non-space character
    assert not any(c in cleaned for c in "\x00\x1b\r\ufeff\u200b")
    instruction = repair_instruction(text, 5)  # Kun's repair: a prefix of the text, its own line, or dropped
    if instruction is not None:
        assert instruction == instruction.strip() and text.strip().startswith(instruction)
        assert re.search(r"\s{5,}", instruction) is None
    starts_with_repeated_phrase(text)
    reason = stages.output_reason(cleaned, CFG)
    assert reason is None or reason[0] in {
        stages.EMPTY_GENERATION,
        stages.BROKEN_TEXT,
        stages.BANNED_KEYWORD,
        stages.TOO_SHORT,
        stages.REPEATED_PHRASE,
    }


TEXT_COLUMNS = {
    "raw_corpus": ["text"],
    "filtered_corpus": ["text"],
    "labeled_pairs": ["text", "instruction"],
    "scored_pairs": ["text", "instruction"],
    "polished_pairs": ["text", "instruction", "output"],
    "instruction_dataset": ["instruction", "output"],
}


@settings(max_examples=60, deadline=None)
@given(asset=st.sampled_from(sorted(TEXT_COLUMNS)), values=st.lists(TEXT, min_size=1, max_size=4))
def test_every_schema_answers_and_means_holds_a_non_space_character(asset, values):
    values = [v.encode("utf-8", "replace").decode("utf-8") for v in values]
    frame = GOOD[asset](len(values))
    for column in TEXT_COLUMNS[asset]:
        bad = frame.copy()
        bad[column] = pd.Series(values, index=bad.index, dtype=object)
        v = schemas.validate(asset, bad, CFG)  # never raises
        failed = {k for k in v.by_check if k.startswith(f"{column}: str_contains")}
        assert bool(failed) == (not all(has_text(x) for x in values)), (column, values, v.by_check)
