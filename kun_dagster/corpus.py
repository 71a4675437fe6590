"""Source corpora: list a source's files, assign each to a shard, read its records.

Readers take jsonl / json / parquet / txt on any fsspec URI, gzip- or zstd-compressed (by
suffix). Every record comes out either as a document or as a quarantine row that names the file,
the row and a reason code; one bad record never costs the rest of its file.
"""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pandas as pd
import pyarrow.parquet as pq

from .config import SourceConfig
from .text import has_content

DOC_COLUMNS = ["doc_id", "source", "shard", "file", "row", "title", "text"]
QUARANTINE_COLUMNS = ["source", "shard", "file", "row", "doc_id", "reason", "detail", "sample"]

# Quarantine reason codes of ingest.
INVALID_ENCODING = "invalid_encoding"  # bytes that are not valid in the source's encoding
INVALID_UNICODE = "invalid_unicode"  # a lone surrogate (a JSON \\ud83d escape): no UTF-8 can hold it
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"  # the text field is absent or null
TEXT_NOT_STRING = "text_not_string"  # a number, a list, an object
EMPTY_TEXT = "empty_text"  # nothing but spaces, control characters, escapes
MISSING_ID = "missing_id"  # absent, null, empty, or not a string or number
DUPLICATE_ID = "duplicate_id"  # an earlier document of the source has this id (the detail names where)
EMPTY_FILE = "empty_file"  # zero bytes: no records (one row, so the file is seen)
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


def _glob(uri: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str, dict[str, dict]]:
    fs, pattern = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    found = fs.glob(pattern, detail=True)
    return fs, _glob_root(pattern), {p: info for p, info in sorted(found.items()) if info.get("type") != "directory"}


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") if root and path.startswith(root) else path


def list_files(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[tuple[str, str]]]:
    """(filesystem, [(path, path relative to the glob root)]) for a source's URI glob, sorted."""
    fs, root, found = _glob(uri, storage_options)
    return fs, [(p, _relative(p, root)) for p in found]


def _stamp(info: dict) -> str:
    """What says a file's bytes changed without reading them: its ETag on object stores, else its
    modification time."""
    return str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created") or "")


def shard_versions(source: SourceConfig, uri: str, shards: int, storage_options: dict | None = None) -> dict[int, str]:
    """Each shard's data version: a hash of (relative path, size, ETag or mtime) over its files, from
    one listing and no reads. A new, changed or removed file changes only its own shard's version;
    a shard with no files has the version of the empty list."""
    try:
        _, root, found = _glob(uri, storage_options)
    except Exception as e:  # noqa: BLE001 - an unreachable store is a source error, said plainly
        raise CorpusError(f"source {source.name}: cannot list {uri}: {type(e).__name__}: {e}") from e
    files: dict[int, list] = {shard: [] for shard in range(shards)}
    for path, info in found.items():
        rel = _relative(path, root)
        files[shard_of(rel, shards)].append((rel, info.get("size"), _stamp(info)))
    return {shard: hashlib.sha256(json.dumps(sorted(fs), default=str).encode()).hexdigest()[:16] for shard, fs in files.items()}


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
    return _SURROGATE.sub("\ufffd", text[:limit])  # the quarantine itself must be writable as UTF-8


# -- decoding -----------------------------------------------------------------------------------------
# Undecodable bytes become U+DC00 + byte (like surrogateescape, for every byte and every codec), so a
# reader can decode a whole stream, find the bad rows, and quarantine just those. A valid decoding
# never yields a lone surrogate, so a marker is unambiguous before any JSON unescaping.
_MARK = "kun-mark-undecodable"
codecs.register_error(_MARK, lambda e: ("".join(chr(0xDC00 + b) for b in e.object[e.start : e.end]), e.end))
_MARKER = re.compile("[\udc00-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _codec(source: SourceConfig) -> str:
    return "utf-8-sig" if source.encoding == "utf-8" else source.encoding  # a UTF-8 BOM is not text


def _undecodable(text: str, source: SourceConfig) -> str | None:
    """Detail for a decoded text that holds undecodable bytes, else None."""
    m = _MARKER.search(text)
    if m is None:
        return None
    bad = [f"0x{ord(c) - 0xDC00:02x}" for c in _MARKER.findall(text)[:4]]
    return f"bytes {' '.join(bad)} at character {m.start()} are not valid {source.encoding}"


# A reader yields (row, record-or-None, reason, detail, raw) per record.
Record = tuple[int, dict | None, str | None, str, object]


def _read_jsonl(f, source: SourceConfig) -> Iterator[Record]:
    lines = io.TextIOWrapper(f, encoding=_codec(source), errors=_MARK, newline="\n")
    for row, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        bad = _undecodable(line, source)
        if bad:
            yield row, None, INVALID_ENCODING, bad, line
            continue
        try:
            yield row, json.loads(line), None, "", line
        except json.JSONDecodeError as e:
            yield row, None, INVALID_JSON, str(e), line


def _read_json(f, source: SourceConfig) -> Iterator[Record]:
    text = f.read().decode(_codec(source), errors=_MARK)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        bad = _undecodable(text, source)
        yield 0, None, INVALID_ENCODING if bad else INVALID_JSON, f"whole file: {bad or e}", text
        return
    if isinstance(data, dict):  # {"data": [...]} and similar wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        yield 0, None, NOT_AN_OBJECT, f"whole file: expected a list of objects, got {type(data).__name__}", text
        return
    for row, rec in enumerate(data, start=1):
        yield row, rec, None, "", rec


def _read_parquet(f, source: SourceConfig) -> Iterator[Record]:
    pf = pq.ParquetFile(f)
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec, None, "", rec


_PARAGRAPH_BREAK = re.compile(r"\r?\n[ \t]*\r?\n")


def _read_txt(f, source: SourceConfig) -> Iterator[Record]:
    """One document per blank-line-separated paragraph."""
    text = f.read().decode(_codec(source), errors=_MARK)
    for row, para in enumerate(_PARAGRAPH_BREAK.split(text), start=1):
        if not para.strip():
            continue
        bad = _undecodable(para, source)
        if bad:
            yield row, None, INVALID_ENCODING, bad, para
        else:
            yield row, {"text": para}, None, "", para


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "txt": _read_txt}


def read_records(fs, path: str, source: SourceConfig) -> Iterator[Record]:
    with fs.open(path, "rb", compression=_compression(path, source)) as f:
        yield from _READERS[source.format](f, source)


# -- records to documents ---------------------------------------------------------------------------------
_ABSENT = object()


def field_value(rec: dict, path: str) -> object:
    """A record's field by name or dotted path (meta.content); a key holding the dot wins."""
    if path in rec:
        return rec[path]
    node: object = rec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _kind(value: object) -> str:
    return "null" if value is None else "missing" if value is _ABSENT else f"a {type(value).__name__}, not a string"


def _document(rec: dict, rel: str, row: int, source: SourceConfig) -> tuple[str, str | None, str] | tuple[None, str, str]:
    """(doc_id, title, text) of a record, or (None, reason, detail)."""
    text = field_value(rec, source.text_field)
    if text is None or text is _ABSENT:
        return None, MISSING_TEXT, f"field {source.text_field!r} is {_kind(text)}"
    if not isinstance(text, str):
        return None, TEXT_NOT_STRING, f"field {source.text_field!r} is {_kind(text)}"
    if source.format == "json" and _MARKER.search(text):  # jsonl and txt rows with such bytes never get here
        return None, INVALID_ENCODING, f"field {source.text_field!r}: {_undecodable(text, source)}"
    if lone := _SURROGATE.search(text):
        return None, INVALID_UNICODE, f"field {source.text_field!r} holds a lone surrogate (U+{ord(lone[0]):04X}): not Unicode text"
    if source.id_field:
        raw_id = field_value(rec, source.id_field)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, float)) or raw_id == "":
            return None, MISSING_ID, f"field {source.id_field!r} is {'empty' if raw_id == '' else _kind(raw_id)}"
        if isinstance(raw_id, str) and _SURROGATE.search(raw_id):
            return None, INVALID_UNICODE, f"field {source.id_field!r} holds a lone surrogate: not Unicode text"
        doc_id = str(raw_id)
    else:
        doc_id = f"{rel}:{row}"
    if not has_content(text):
        return None, EMPTY_TEXT, f"field {source.text_field!r} holds no text (only spaces, control characters or escapes)"
    title = field_value(rec, source.title_field) if source.title_field else None
    return doc_id, title if isinstance(title, str) and not _SURROGATE.search(title) else None, text


def documents(fs, path: str, rel: str, source: SourceConfig) -> Iterator[tuple]:
    """("doc", row, doc_id, title, text) or ("bad", row, reason, detail, raw) for each record of one
    file. A file that breaks mid-way (a truncated archive) keeps the rows read before the break."""
    records, row = read_records(fs, path, source), 0
    while True:
        try:
            item = next(records, None)
        except Exception as e:  # noqa: BLE001 - a corrupt archive or unreadable object
            yield "bad", row, UNREADABLE_FILE, f"{type(e).__name__}: {e}" + (f" (after row {row}; rows before it kept)" if row else ""), b""
            return
        if item is None:
            return
        row, rec, reason, detail, raw = item
        if reason:
            yield "bad", row, reason, detail, raw
        elif not isinstance(rec, dict):
            yield "bad", row, NOT_AN_OBJECT, f"expected an object, got {type(rec).__name__}", raw
        else:
            doc_id, *rest = _document(rec, rel, row, source)
            yield ("doc", row, doc_id, *rest) if doc_id is not None else ("bad", row, *rest, raw)


# -- ids unique per source ------------------------------------------------------------------------------
_FIRST_IDS: dict[tuple, dict[str, tuple[str, int]]] = {}  # per process: one index per source listing


def first_locations(source: SourceConfig, fs, root: str, found: dict[str, dict]) -> dict[str, tuple[str, int]]:
    """For every id that more than one document of the source carries, where it is kept: the first
    valid document in (file, row) order over all the source's files. Ingest of any shard then
    quarantines the others as duplicate_id, naming that place, so ids are unique per source (what
    the release requires) whatever the shard count. Empty when ids are file:row (unique by
    construction). Computed once per process for a given listing (`_glob`'s: paths, sizes,
    modification), which the caller has already made."""
    if not source.id_field:
        return {}
    key = (
        source.model_dump_json(),
        tuple((p, info.get("size"), _stamp(info)) for p, info in found.items()),
    )
    if key not in _FIRST_IDS:
        first: dict[str, tuple[str, int]] = {}
        repeated: set[str] = set()
        for path in found:
            rel = _relative(path, root)
            for kind, row, doc_id, *_ in documents(fs, path, rel, source):
                if kind == "doc":
                    if doc_id in first:
                        repeated.add(doc_id)
                    else:
                        first[doc_id] = (rel, row)
        _FIRST_IDS.clear()  # one source's index at a time: it can be large
        _FIRST_IDS[key] = {i: first[i] for i in repeated}
    return _FIRST_IDS[key]


def iter_shard(
    source: SourceConfig, uri: str, shard: int, shards: int, storage_options: dict | None = None, batch_rows: int = 20000
) -> Iterator[Ingested]:
    """Read every file of `source` that falls in `shard`, as batches of at most `batch_rows`
    documents (each with the quarantined rows met since the last): memory holds one batch, not
    the shard. Always yields at least one batch."""
    try:
        fs, root, found = _glob(uri, storage_options)
        kept_at = first_locations(source, fs, root, found)
    except Exception as e:  # noqa: BLE001 - an unreachable store is a source error, said plainly
        raise CorpusError(f"source {source.name}: cannot list {uri}: {type(e).__name__}: {e}") from e
    if not found:
        raise CorpusError(f"source {source.name}: no file matches {uri}")
    mine = [(p, rel) for p in found if shard_of(rel := _relative(p, root), shards) == shard]
    names = [rel for _, rel in mine]
    docs: list[dict] = []
    bad: list[dict] = []

    def reject(rel: str, row: int, reason: str, detail: str, raw: object, doc_id: str = "") -> None:
        bad.append(
            {
                "source": source.name,
                "shard": shard,
                "file": rel,
                "row": row,
                "doc_id": doc_id,
                "reason": reason,
                "detail": _sample(detail, 500),
                "sample": _sample(raw),
            }
        )

    def batch() -> Ingested:
        out = Ingested(
            docs=pd.DataFrame(docs, columns=DOC_COLUMNS).astype({"shard": "int64", "row": "int64"}),
            quarantine=quarantine_frame(bad),
            files=names,
        )
        docs.clear()
        bad.clear()
        return out

    for path, rel in mine:
        if found[path].get("size") == 0:
            reject(rel, 0, EMPTY_FILE, "the file has zero bytes", b"")
            continue
        for kind, row, *item in documents(fs, path, rel, source):
            if kind == "bad":
                reject(rel, row, *item)
                continue
            doc_id, title, text = item
            if kept_at.get(doc_id, (rel, row)) != (rel, row):
                kf, kr = kept_at[doc_id]
                reject(rel, row, DUPLICATE_ID, f"doc id {doc_id!r} is kept at {kf}:{kr} (first in the source)", text, doc_id)
                continue
            docs.append({"doc_id": doc_id, "source": source.name, "shard": shard, "file": rel, "row": row, "title": title, "text": text})
            if len(docs) >= batch_rows:
                yield batch()
    yield batch()


def quarantine_frame(rows: list[dict]) -> pd.DataFrame:
    """Quarantine rows as a frame with its columns and types, also when there are none."""
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS).astype({"shard": "int64", "row": "int64"})
