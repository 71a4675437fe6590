"""Source corpora: list a source's files, assign each to a shard, read its records.

Readers take jsonl / json / parquet / txt on any fsspec URI, gzip- or zstd-compressed (by
suffix). Every record comes out either as a document or as a quarantine row that names the file,
the row and a reason code; one bad record never costs the rest of its file.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pandas as pd
import pyarrow.parquet as pq

from .config import SourceConfig
from .text import clean_text

DOC_COLUMNS = ["doc_id", "source", "shard", "file", "row", "title", "text"]
QUARANTINE_COLUMNS = ["source", "shard", "file", "row", "doc_id", "reason", "detail", "sample"]

# Quarantine reason codes of ingest.
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"
EMPTY_TEXT = "empty_text"
MISSING_ID = "missing_id"
DUPLICATE_ID = "duplicate_id"
UNREADABLE_FILE = "unreadable_file"


class CorpusError(RuntimeError):
    """A source that cannot be read at all (no files, unreachable store)."""


@dataclass
class Ingested:
    docs: pd.DataFrame
    quarantine: pd.DataFrame
    files: list[str] = field(default_factory=list)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: file paths relative to it are the
    shard keys, so the same corpus on another disk or bucket keeps its shards."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if globlib.has_magic(part):
            return "/".join(parts[:i])
    return "/".join(parts[:-1])


def list_files(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[tuple[str, str]]]:
    """(filesystem, [(path, path relative to the glob root)]) for a source's URI glob, sorted."""
    fs, pattern = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = _glob_root(pattern)
    paths = sorted(p for p in fs.glob(pattern) if not fs.isdir(p))
    return fs, [(p, p[len(root):].lstrip("/") if root and p.startswith(root) else p) for p in paths]


def shard_of(relpath: str, shards: int) -> int:
    """A file's shard: a stable hash of its relative path, so adding files never moves old ones."""
    return int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big") % shards


def _compression(path: str, source: SourceConfig) -> str | None:
    if source.compression == "none":
        return None
    if source.compression == "infer":
        return fsspec.utils.infer_compression(path)
    return source.compression


def _sample(raw: bytes | str | object, limit: int = 200) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return text[:limit]


# A reader yields (row, record-or-None, reason, detail, raw) per record.
Record = tuple[int, dict | None, str | None, str, object]


def _lines(f, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream read in chunks (some decompressors have no readline)."""
    buf = b""
    while data := f.read(chunk):
        buf += data
        *lines, buf = buf.split(b"\n")
        yield from lines
    if buf:
        yield buf


def _read_jsonl(f) -> Iterator[Record]:
    for row, line in enumerate(_lines(f), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield row, None, INVALID_UTF8, str(e), line
            continue
        try:
            yield row, json.loads(text), None, "", text
        except json.JSONDecodeError as e:
            yield row, None, INVALID_JSON, str(e), text


def _read_json(f) -> Iterator[Record]:
    raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield 0, None, INVALID_UTF8, f"whole file: {e}", raw
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        yield 0, None, INVALID_JSON, f"whole file: {e}", text
        return
    if isinstance(data, dict):  # {"data": [...]} and similar wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        yield 0, None, NOT_AN_OBJECT, f"whole file: expected a list of objects, got {type(data).__name__}", text
        return
    for row, rec in enumerate(data, start=1):
        yield row, rec, None, "", rec


def _read_parquet(f) -> Iterator[Record]:
    pf = pq.ParquetFile(f)
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec, None, "", rec


_PARAGRAPH_BREAK = re.compile(rb"\r?\n[ \t]*\r?\n")


def _read_txt(f) -> Iterator[Record]:
    """One document per blank-line-separated paragraph."""
    for row, para in enumerate(_PARAGRAPH_BREAK.split(f.read()), start=1):
        if not para.strip():
            continue
        try:
            yield row, {"text": para.decode("utf-8")}, None, "", para
        except UnicodeDecodeError as e:
            yield row, None, INVALID_UTF8, str(e), para


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "txt": _read_txt}


def read_records(fs, path: str, source: SourceConfig) -> Iterator[Record]:
    with fs.open(path, "rb", compression=_compression(path, source)) as f:
        yield from _READERS[source.format](f)


def iter_shard(source: SourceConfig, uri: str, shard: int, shards: int, storage_options: dict | None = None,
               batch_rows: int = 20000) -> Iterator[Ingested]:
    """Read every file of `source` that falls in `shard`, as batches of at most `batch_rows`
    documents (each with the quarantined rows met since the last): memory holds one batch, not
    the shard. Always yields at least one batch. A file that breaks mid-way (a truncated archive)
    keeps the rows read before the break and quarantines the rest as unreadable_file."""
    try:
        fs, files = list_files(uri, storage_options)
    except Exception as e:  # noqa: BLE001 - an unreachable store is a source error, said plainly
        raise CorpusError(f"source {source.name}: cannot list {uri}: {type(e).__name__}: {e}") from e
    if not files:
        raise CorpusError(f"source {source.name}: no file matches {uri}")
    mine = [(p, rel) for p, rel in files if shard_of(rel, shards) == shard]
    names = [rel for _, rel in mine]
    docs: list[dict] = []
    bad: list[dict] = []
    seen_ids: set[str] = set()
    fields = (source.text_field, source.id_field or "", source.title_field or "")

    def reject(rel: str, row: int, reason: str, detail: str, raw: object, doc_id: str = "") -> None:
        bad.append({"source": source.name, "shard": shard, "file": rel, "row": row, "doc_id": doc_id,
                    "reason": reason, "detail": detail[:500], "sample": _sample(raw)})

    def batch() -> Ingested:
        out = Ingested(docs=pd.DataFrame(docs, columns=DOC_COLUMNS), quarantine=pd.DataFrame(bad, columns=QUARANTINE_COLUMNS), files=names)
        docs.clear()
        bad.clear()
        return out

    for path, rel in mine:
        records, row = read_records(fs, path, source), 0
        while True:
            try:
                item = next(records, None)
            except Exception as e:  # noqa: BLE001 - a corrupt archive or unreadable object
                reject(rel, row, UNREADABLE_FILE, f"{type(e).__name__}: {e}" + (f" (after row {row}; rows before it kept)" if row else ""), b"")
                break
            if item is None:
                break
            row, rec, reason, detail, raw = item
            if reason:
                reject(rel, row, reason, detail, raw)
                continue
            if not isinstance(rec, dict):
                reject(rel, row, NOT_AN_OBJECT, f"expected an object, got {type(rec).__name__}", raw)
                continue
            text = rec.get(fields[0])
            if not isinstance(text, str):
                reject(rel, row, MISSING_TEXT, f"field {fields[0]!r} is missing or not a string", raw)
                continue
            if fields[1]:
                if rec.get(fields[1]) in (None, ""):
                    reject(rel, row, MISSING_ID, f"field {fields[1]!r} is missing", raw)
                    continue
                doc_id = str(rec[fields[1]])
            else:
                doc_id = f"{rel}:{row}"
            if doc_id in seen_ids:
                reject(rel, row, DUPLICATE_ID, f"doc id {doc_id!r} seen earlier in this partition", raw, doc_id)
                continue
            if not clean_text(text):
                reject(rel, row, EMPTY_TEXT, f"field {fields[0]!r} is empty", raw, doc_id)
                continue
            seen_ids.add(doc_id)
            title = rec.get(fields[2]) if fields[2] else None
            docs.append({"doc_id": doc_id, "source": source.name, "shard": shard, "file": rel, "row": row,
                         "title": title if isinstance(title, str) else None, "text": text})
            if len(docs) >= batch_rows:
                yield batch()
    yield batch()


def ingest_shard(source: SourceConfig, uri: str, shard: int, shards: int, storage_options: dict | None = None) -> Ingested:
    """A whole shard at once: every document and every quarantined row."""
    batches = list(iter_shard(source, uri, shard, shards, storage_options))
    return Ingested(docs=pd.concat([b.docs for b in batches], ignore_index=True),
                    quarantine=pd.concat([b.quarantine for b in batches], ignore_index=True), files=batches[0].files)
