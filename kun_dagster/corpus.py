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
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.utils import glob_translate

from . import manifest as manifests
from .config import IngestConfig, SourceConfig
from .registry import (  # noqa: F401 (ingest's reason codes, named here for its callers)
    DUPLICATE_ID,
    EMPTY_FILE,
    EMPTY_TEXT,
    FILE_TOO_LARGE,
    INVALID_ENCODING,
    INVALID_JSON,
    INVALID_UNICODE,
    MISSING_ID,
    MISSING_TEXT,
    NOT_AN_OBJECT,
    RECORD_ERROR,
    RECORD_TOO_LARGE,
    ROW_GROUP_TOO_LARGE,
    TEXT_NOT_STRING,
    UNREADABLE_FILE,
)
from .text import has_content

DOC_COLUMNS = ["doc_id", "source", "shard", "file", "row", "title", "text"]
QUARANTINE_COLUMNS = ["source", "shard", "file", "row", "doc_id", "reason", "detail", "sample"]


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


def _fs(uri: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a URI, its listings cache emptied: fsspec shares one instance per
    set of options in a process, and s3fs keeps each folder's listing with no expiry, so the
    sensor's process would never see a file added under a folder it had walked (nor a new size of
    a manifest it had read)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache()
    return fs, path


def _glob(uri: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str, dict[str, dict]]:
    fs, pattern = _fs(uri, storage_options)
    found = fs.glob(pattern, detail=True)
    return fs, _glob_root(pattern), {p: info for p, info in sorted(found.items()) if info.get("type") != "directory"}


def _list(uri: str, storage_options: dict | None, manifest: str | None = None) -> tuple[fsspec.AbstractFileSystem, str, dict[str, dict]]:
    """The source's files: globbed from the store, or the entries of its manifest that the glob matches."""
    if manifest is None:
        return _glob(uri, storage_options)
    fs, pattern = _fs(uri, storage_options)
    root, matches = _glob_root(pattern), re.compile(glob_translate(pattern)).match
    found = {p: {**info, "type": "file"} for p, info in manifests.entries(manifest, storage_options, fs, root) if matches(p)}
    return fs, root, dict(sorted(found.items()))


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") if root and path.startswith(root) else path


def list_files(
    uri: str, storage_options: dict | None = None, manifest: str | None = None
) -> tuple[fsspec.AbstractFileSystem, list[tuple[str, str]]]:
    """(filesystem, [(path, path relative to the glob root)]) for a source's URI glob, sorted."""
    fs, root, found = _list(uri, storage_options, manifest)
    return fs, [(p, _relative(p, root)) for p in found]


def _stamp(info: dict) -> str:
    """What says a file's bytes changed without reading them: its ETag on object stores, else its
    modification time."""
    return str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created") or "")


def shard_versions(
    source: SourceConfig,
    uri: str,
    shards: int,
    storage_options: dict | None = None,
    limits: IngestConfig | None = None,
    manifest: str | None = None,
    until: float | None = None,
) -> dict[int, str]:
    """Each shard's data version: a hash of (relative path, size, ETag or mtime) over its files, from
    one listing. A new, changed or removed file changes only its own shard's version; a shard with
    no files has the version of the empty list. A source with ids adds, per shard, where each id
    its files repeat is kept: a new file that now keeps an id (it sorts first) also changes the
    version of the shard that kept it before, which is ingested again and drops its copy, so ids
    stay unique per source under incremental adds (this reads the files new since the last
    listing; `until`: a time.monotonic() by which to stop reading, else IndexIncomplete)."""
    try:
        fs, root, found = _list(uri, storage_options, manifest)
        index = id_index(source, fs, root, found, limits, until)
    except IndexIncomplete:
        raise
    except Exception as e:  # noqa: BLE001 - an unreachable store is a source error, said plainly
        raise CorpusError(f"source {source.name}: cannot list {uri}: {type(e).__name__}: {e}") from e
    files: dict[int, list] = {shard: [] for shard in range(shards)}
    for path, info in found.items():
        rel = _relative(path, root)
        files[shard_of(rel, shards)].append((rel, info.get("size"), _stamp(info)))
    kept: dict[int, list] = {shard: [] for shard in range(shards)}
    for h, where in index.files.items():
        for shard in {shard_of(rel, shards) for rel in where}:
            kept[shard].append((h.hex(), *index.kept_at[h]))
    return {
        shard: hashlib.sha256(
            json.dumps([sorted(fs), sorted(kept[shard])] if kept[shard] else sorted(fs), default=str).encode()
        ).hexdigest()[:16]
        for shard, fs in files.items()
    }


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
    try:
        text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):  # nested too deep, a circular structure
        text = repr(raw)[:limit]
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


# A reader yields (row, record-or-None, reason, detail, raw) per record. It holds one record at a
# time, at most `limits.max_record_bytes` of it, and never raises for a record: only the file
# itself (a corrupt archive, a lost connection) can end it early.
Record = tuple[int, dict | None, str | None, str, object]
_PIECE = 2**20  # characters read at a time past a record over the limit


def _lines(f, source: SourceConfig, limit: int) -> Iterator[tuple[int, str | None, str]]:
    """(row, line without its ending or None when over `limit` bytes, first characters) per line.
    Lines end at LF, CR LF or a lone CR (old Mac files). A line over the limit is read past in
    pieces, never held whole."""
    text = io.TextIOWrapper(f, encoding=_codec(source), errors=_MARK, newline=None)
    row = 0
    while line := text.readline(limit + 1):
        row += 1
        if line.endswith("\n"):
            line = line[:-1]
        elif len(line) > limit:  # more characters than the limit allows bytes: no need to see its end
            while (piece := text.readline(_PIECE)) and not piece.endswith("\n"):
                pass
            yield row, None, line[:200]
            continue
        yield (row, None, line[:200]) if _over(line, limit) else (row, line, line)


def _over(text: str, limit: int) -> bool:
    """More than `limit` bytes in UTF-8 (a character is at most 4 of them)."""
    return len(text) > limit or (len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit)


def _too_large(limit: int) -> str:
    return f"longer than ingest.max_record_bytes ({limit:,} bytes); the rest of the file is read"


def _big_int(digits: str) -> int | str:
    """A JSON integer over Python's 4,300-digit limit stays its digits (a string), so a record with
    one in a field nobody reads is still a document."""
    return int(digits) if len(digits) <= 4000 else digits


def _parse(text: str) -> tuple[object, str | None, str]:
    """(value, None, "") or (None, invalid_json, why)."""
    try:
        return json.loads(text, parse_int=_big_int), None, ""
    except RecursionError:
        return None, INVALID_JSON, "nested too deeply to parse"
    except ValueError as e:  # JSONDecodeError among them
        return None, INVALID_JSON, str(e)[:300]


def _read_jsonl(f, source: SourceConfig, limits: IngestConfig) -> Iterator[Record]:
    for row, line, head in _lines(f, source, limits.max_record_bytes):
        if line is None:
            yield row, None, RECORD_TOO_LARGE, _too_large(limits.max_record_bytes), head
        elif not line.strip():
            continue
        elif bad := _undecodable(line, source):
            yield row, None, INVALID_ENCODING, bad, line
        else:
            yield row, *_parse(line), line


def _read_json(f, source: SourceConfig, limits: IngestConfig) -> Iterator[Record]:
    raw = f.read(limits.max_file_bytes + 1)  # decompressed bytes: a small gzip can expand to any size
    if len(raw) > limits.max_file_bytes:
        yield (
            0,
            None,
            FILE_TOO_LARGE,
            f"whole file: over ingest.max_file_bytes ({limits.max_file_bytes:,} bytes); write it as jsonl",
            raw[:200],
        )
        return
    text = raw.decode(_codec(source), errors=_MARK)
    del raw
    data, reason, why = _parse(text)
    if reason:
        bad = _undecodable(text, source)
        yield 0, None, INVALID_ENCODING if bad else reason, f"whole file: {bad or why}", text[:200]
        return
    if isinstance(data, dict):  # {"data": [...]} and similar wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        yield 0, None, NOT_AN_OBJECT, f"whole file: expected a list of objects, got {type(data).__name__}", text[:200]
        return
    del text
    for row, rec in enumerate(data, start=1):
        yield row, rec, None, "", rec


def _columns(names: list[str], source: SourceConfig) -> list[str]:
    """The top-level columns a source's fields live in (a dotted field in its first part's column,
    unless a column holds the dotted name): the only ones read."""
    wanted = [f for f in (source.text_field, source.id_field, source.title_field) if f]
    return list(dict.fromkeys(f if f in names else f.split(".")[0] for f in wanted if f in names or f.split(".")[0] in names))


def _text_bytes(batch, source: SourceConfig) -> list[int] | None:
    """Each row's text size in bytes, read from Arrow without making the strings (a top-level string
    column, dictionary-encoded or not); None where the text is nested in another column."""
    if source.text_field not in batch.schema.names:
        return None
    col = batch.column(source.text_field)
    if pa.types.is_dictionary(col.type) and pa.types.is_string(col.type.value_type):
        return pc.binary_length(col.dictionary).take(col.indices).fill_null(0).to_pylist()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.binary_length(col).fill_null(0).to_pylist()
    return None


def _read_parquet(f, source: SourceConfig, limits: IngestConfig) -> Iterator[Record]:
    """Only the columns the source's fields live in; a row group whose columns are over
    max_file_bytes is not read; within one, rows are made into records at most max_file_bytes of text
    at a time (a dictionary page can repeat one large text on every row) and a text over
    max_record_bytes is quarantined without being made."""
    pf = pq.ParquetFile(f, read_dictionary=[source.text_field])
    cols = _columns(pf.schema_arrow.names, source)
    meta, row = pf.metadata, 0
    for g in range(pf.num_row_groups):
        group = meta.row_group(g)
        leaves = [group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema.split(".")[0] in cols]
        size = sum(c.total_uncompressed_size for c in leaves)
        if size > limits.max_file_bytes or not cols:  # each of its rows counted, none read
            why = (
                f"row group {g} (rows {row + 1}-{row + group.num_rows}): {size:,} bytes in {', '.join(cols)} > "
                f"ingest.max_file_bytes ({limits.max_file_bytes:,}); rewrite the file with smaller row groups"
            )
            for _ in range(group.num_rows):
                row += 1  # no column holds a field the source reads: every row lacks its text
                yield (row, {}, None, "", {}) if not cols else (row, None, ROW_GROUP_TOO_LARGE, why, "")
            continue
        for batch in pf.iter_batches(batch_size=1024, row_groups=[g], columns=cols):
            sizes = _text_bytes(batch, source) or [0] * batch.num_rows
            start = 0
            while start < batch.num_rows:
                end, held = start, 0
                while end < batch.num_rows and (end == start or held + sizes[end] <= limits.max_file_bytes):
                    held += sizes[end] if sizes[end] <= limits.max_record_bytes else 0
                    end += 1
                part = batch.slice(start, end - start)
                fits = [sizes[i] <= limits.max_record_bytes for i in range(start, end)]
                recs = iter(part.to_pylist() if all(fits) else part.filter(pa.array(fits)).to_pylist())  # an oversized text never made
                for i in range(start, end):
                    row += 1
                    rec = next(recs) if sizes[i] <= limits.max_record_bytes else None
                    text = field_value(rec, source.text_field) if rec is not None else None
                    if rec is None or (isinstance(text, str) and _over(text, limits.max_record_bytes)):
                        sample = text[:200] if isinstance(text, str) else f"{sizes[i]:,} bytes of text"
                        yield row, None, RECORD_TOO_LARGE, _too_large(limits.max_record_bytes), sample
                    else:
                        yield row, rec, None, "", rec
                start = end


def _read_txt(f, source: SourceConfig, limits: IngestConfig) -> Iterator[Record]:
    """One document per paragraph (lines between blank lines), read line by line: a paragraph over
    the limit is quarantined and read past."""
    row, para, size, over = 0, [], 0, False

    def flush():
        text = "\n".join(para)
        if over:
            return row, None, RECORD_TOO_LARGE, _too_large(limits.max_record_bytes), text[:200]
        if bad := _undecodable(text, source):
            return row, None, INVALID_ENCODING, bad, text
        return row, {"text": text}, None, "", text

    for _, line, head in _lines(f, source, limits.max_record_bytes):
        if line is not None and not line.strip(" \t"):
            if para or over:
                yield flush()
            para, size, over = [], 0, False
            continue
        if not para and not over:
            row += 1
        size += limits.max_record_bytes + 1 if line is None else len(line.encode("utf-8", "surrogatepass")) + 1  # + its \\n
        if size > limits.max_record_bytes:
            over, para = True, para[:1] or [head]
        else:
            para.append(line)
    if para or over:
        yield flush()


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "txt": _read_txt}


def read_records(fs, path: str, source: SourceConfig, limits: IngestConfig | None = None) -> Iterator[Record]:
    with fs.open(path, "rb", compression=_compression(path, source)) as f:
        yield from _READERS[source.format](f, source, limits or IngestConfig())


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


def _record_id(rec: dict, rel: str, row: int, source: SourceConfig) -> tuple[str | None, str, str]:
    """(the record's doc id, "", "") or (None, reason, detail): its id field's value as a string,
    or file:row for a source without ids."""
    if not source.id_field:
        return f"{rel}:{row}", "", ""
    raw_id = field_value(rec, source.id_field)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, float)) or raw_id == "":
        return None, MISSING_ID, f"field {source.id_field!r} is {'empty' if raw_id == '' else _kind(raw_id)}"
    if isinstance(raw_id, str) and _SURROGATE.search(raw_id):
        return None, INVALID_UNICODE, f"field {source.id_field!r} holds a lone surrogate: not Unicode text"
    return str(raw_id), "", ""


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
    doc_id, reason, detail = _record_id(rec, rel, row, source)
    if doc_id is None:
        return None, reason, detail
    if not has_content(text):
        return None, EMPTY_TEXT, f"field {source.text_field!r} holds no text (only spaces, control characters or escapes)"
    title = field_value(rec, source.title_field) if source.title_field else None
    return doc_id, title if isinstance(title, str) and not _SURROGATE.search(title) else None, text


def documents(fs, path: str, rel: str, source: SourceConfig, limits: IngestConfig | None = None) -> Iterator[tuple]:
    """("doc", row, doc_id, title, text) or ("bad", row, reason, detail, raw, doc_id) for each record of one
    file. Only the file itself breaking (a truncated archive) ends it early: the rows read before
    the break are kept and one unreadable_file row says where it broke."""
    records, row = read_records(fs, path, source, limits), 0
    while True:
        try:
            item = next(records, None)
        except Exception as e:  # noqa: BLE001 - a corrupt archive or unreadable object
            yield (
                "bad",
                row,
                UNREADABLE_FILE,
                f"{type(e).__name__}: {e}" + (f" (after row {row}; rows before it kept)" if row else ""),
                b"",
                "",
            )
            return
        if item is None:
            return
        row, rec, reason, detail, raw = item
        if reason:
            yield "bad", row, reason, detail, raw, ""
        elif not isinstance(rec, dict):
            yield "bad", row, NOT_AN_OBJECT, f"expected an object, got {type(rec).__name__}", raw, ""
        else:
            try:
                doc_id, *rest = _document(rec, rel, row, source)
                if doc_id is None:
                    rest = [*rest, raw, _record_id(rec, rel, row, source)[0] or ""]  # kept beside file and row where known
            except Exception as e:  # noqa: BLE001 - one record no rule expected costs itself only
                doc_id, rest = None, [RECORD_ERROR, f"{type(e).__name__}: {str(e)[:300]}", raw, ""]
            yield ("doc", row, doc_id, *rest) if doc_id is not None else ("bad", row, *rest)


# -- ids unique per source ------------------------------------------------------------------------------
@dataclass
class IdIndex:
    """The ids more than one document of a source carries, by id_hash: where each is kept (the
    first valid document in (file, row) order) and every file it occurs in."""

    kept_at: dict[bytes, tuple[str, int]] = field(default_factory=dict)
    files: dict[bytes, set[str]] = field(default_factory=dict)

    def kept(self, doc_id: str) -> tuple[str, int] | None:
        """Where a repeated id is kept; None for an id no other document carries."""
        return self.kept_at.get(id_hash(doc_id)) if self.kept_at else None


def id_hash(doc_id: str) -> bytes:
    """16 bytes standing for an id (a collision is as unlikely as text_key's, ~1e-21 at 1e9 ids)."""
    return hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


# per process, each source's index of its last listing: the sensor, which observes every source in
# one long-lived process, re-reads a source only when its files change
_ID_INDEX: dict[str, tuple[tuple, IdIndex]] = {}
_ID_RECORD = np.dtype([("h", "V16"), ("file", "<i4"), ("row", "<i8")])
_FILE_IDS = np.dtype([("h", "V16"), ("row", "<i8")])
ID_BUCKETS, ID_BUFFER = 256, 1 << 16  # spill files (a bucket read back holds 1/256 of the records), records held between spills
ID_READERS = 16  # files read at once


class _IdCache:
    """Each file's (id hash, row) records, kept on local disk by what the file is (its path, size
    and ETag or mtime, and the source's reading settings): when a file is added, the next index
    reads that file alone, not the source again. 24 bytes a document, under $TMPDIR/kun-ids/<source>-<settings>;
    the entries of files gone from the listing are removed after each index."""

    def __init__(self, folder: Path, settings: str):
        self.folder, self.settings = folder, settings

    def _name(self, path: str, info: dict) -> str:
        what = json.dumps([path, info.get("size"), _stamp(info), self.settings], default=str)
        return hashlib.blake2b(what.encode(), digest_size=16).hexdigest() + ".npy"

    def ids(
        self, fs, path: str, rel: str, found: dict[str, dict], source: SourceConfig, limits: IngestConfig | None, until: float | None = None
    ) -> np.ndarray:
        """The file's records, read (and kept) unless kept already; past `until` only kept ones are given."""
        kept = self.folder / self._name(path, found[path])
        try:
            return np.load(kept)
        except (OSError, ValueError):
            pass
        if until is not None and time.monotonic() > until:
            raise _OutOfTime
        got = [(id_hash(doc_id), row) for kind, row, doc_id, *_ in documents(fs, path, rel, source, limits) if kind == "doc"]
        ids = np.array(got, dtype=_FILE_IDS)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = kept.with_name(f"{kept.stem}.{threading.get_ident()}.tmp.npy")
            np.save(tmp, ids)
            tmp.replace(kept)  # whole or not at all
        except OSError:
            pass  # a full or read-only disk costs a re-read next time, nothing else
        return ids

    def keep_only(self, found: dict[str, dict]) -> None:
        wanted = {self._name(p, info) for p, info in found.items()}
        for f in self.folder.glob("*.npy") if self.folder.exists() else ():
            if f.name not in wanted:
                f.unlink(missing_ok=True)


def _id_cache(source: SourceConfig, limits: IngestConfig | None) -> _IdCache:
    settings = source.model_dump_json() + (limits or IngestConfig()).model_dump_json()
    folder = f"{source.name}-{hashlib.blake2b(settings.encode(), digest_size=4).hexdigest()}"  # two configs' sources of one name apart
    return _IdCache(Path(tempfile.gettempdir()) / "kun-ids" / folder, settings)


class _OutOfTime(Exception):
    pass


class IndexIncomplete(CorpusError):
    """The id index's reading ran out of its time; what was read is kept and the next call goes on."""

    def __init__(self, source: str, read: int, files: int):
        super().__init__(f"source {source}: reading its ids, {read:,} of {files:,} files so far")
        self.read, self.files = read, files


def id_index(
    source: SourceConfig, fs, root: str, found: dict[str, dict], limits: IngestConfig | None = None, until: float | None = None
) -> IdIndex:
    """The source's repeated ids. Ingest of any shard quarantines every copy but the kept one as
    duplicate_id, naming that place, so ids are unique per source (what the release requires)
    whatever the shard count. Empty when ids are file:row (unique by construction). Computed
    once per process for a given listing of the source (paths, sizes, modification).

    Memory holds the repeated ids only: every document's (id_hash, file, row) is spilled to one of
    ID_BUCKETS temporary files by its hash, and the buckets are read back one at a time; an id's
    copies all land in one bucket (28 bytes a document on disk, under $TMPDIR). Files are read
    ID_READERS at a time, and each file's records are kept (_IdCache): a new listing reads only
    the files that are new or changed. With `until` (the sensor's tick's end, a time.monotonic()),
    files are read until then at most and IndexIncomplete is raised if some are left: the next call
    goes on from there."""
    if not source.id_field:
        return IdIndex()
    key = (
        source.model_dump_json(),
        (limits or IngestConfig()).model_dump_json(),
        tuple((p, info.get("size"), _stamp(info)) for p, info in found.items()),
    )
    if _ID_INDEX.get(source.name, ((),))[0] != key:
        rels = [_relative(path, root) for path in found]
        index = IdIndex()
        with tempfile.TemporaryDirectory(prefix="kun-ids-") as tmp:
            spills = [Path(tmp) / f"{b}.bin" for b in range(ID_BUCKETS)]
            held: list[np.ndarray] = []

            def spill() -> None:  # the held records, each to its bucket's file
                if not held:
                    return
                records = np.concatenate(held)
                held.clear()
                bucket = np.frombuffer(records["h"].tobytes(), dtype=np.uint8)[::16].astype(np.intp) % ID_BUCKETS
                for b in np.unique(bucket):
                    with spills[b].open("ab") as f:
                        records[bucket == b].tofile(f)

            cache, paths, count = _id_cache(source, limits), list(found), 0

            def file_ids(i: int) -> np.ndarray | None:
                try:
                    return cache.ids(fs, paths[i], rels[i], found, source, limits, until)
                except _OutOfTime:
                    return None

            with ThreadPoolExecutor(ID_READERS) as pool:  # an object store's GETs overlap; each file's ids are cached
                if until is not None:  # first every file read and kept (or the time out), holding none
                    read = sum(pool.map(lambda i: file_ids(i) is not None, range(len(paths))))
                    if read < len(paths):
                        raise IndexIncomplete(source.name, read, len(paths))
                for i, ids in enumerate(pool.map(file_ids, range(len(paths)))):
                    records = np.empty(len(ids), dtype=_ID_RECORD)
                    records["h"], records["file"], records["row"] = ids["h"], i, ids["row"]
                    held.append(records)
                    count += len(records)
                    if count >= ID_BUFFER:
                        spill()
                        count = 0
            cache.keep_only(found)
            spill()
            for b in range(ID_BUCKETS):
                if not spills[b].exists():
                    continue
                records = np.fromfile(spills[b], dtype=_ID_RECORD)
                hashes, counts = np.unique(records["h"], return_counts=True)
                if not (counts > 1).any():
                    continue
                repeated = records[np.isin(records["h"], hashes[counts > 1])]
                repeated.sort(order=["h", "file", "row"])  # each id's copies together, the kept (first) one first
                for r in repeated:
                    h = r["h"].tobytes()
                    if h not in index.kept_at:
                        index.kept_at[h] = (rels[r["file"]], int(r["row"]))
                    index.files.setdefault(h, set()).add(rels[r["file"]])
        _ID_INDEX[source.name] = (key, index)
    return _ID_INDEX[source.name][1]


@dataclass
class _Batch:
    """The documents and quarantine rows met since the last batch was yielded."""

    source: str
    shard: int
    files: list[str]
    docs: list[dict] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)

    def __len__(self) -> int:  # quarantine rows count too: a file of bad lines is bounded alike
        return len(self.docs) + len(self.bad)

    def keep(self, rel: str, row: int, doc_id: str, title: str, text: str) -> None:
        self.docs.append(
            {"doc_id": doc_id, "source": self.source, "shard": self.shard, "file": rel, "row": row, "title": title, "text": text}
        )

    def reject(self, rel: str, row: int, reason: str, detail: str, raw: object, doc_id: str = "") -> None:
        self.bad.append(
            {
                "source": self.source,
                "shard": self.shard,
                "file": rel,
                "row": row,
                "doc_id": doc_id,
                "reason": reason,
                "detail": _sample(detail, 500),
                "sample": _sample(raw),
            }
        )

    def take(self) -> Ingested:
        out = Ingested(
            docs=pd.DataFrame(self.docs, columns=DOC_COLUMNS).astype({"shard": "int64", "row": "int64"}),
            quarantine=quarantine_frame(self.bad),
            files=self.files,
        )
        self.docs, self.bad = [], []
        return out


@dataclass(frozen=True)
class Listing:
    """A source's files from one listing: a step over many shards of the source lists it once."""

    fs: fsspec.AbstractFileSystem
    root: str
    found: dict[str, dict]


def listing(source: SourceConfig, uri: str, storage_options: dict | None = None, manifest: str | None = None) -> Listing:
    try:
        return Listing(*_list(uri, storage_options, manifest))
    except Exception as e:  # noqa: BLE001 - an unreachable store is a source error, said plainly
        raise CorpusError(f"source {source.name}: cannot list {uri}: {type(e).__name__}: {e}") from e


def iter_shard(
    source: SourceConfig,
    uri: str,
    shard: int,
    shards: int,
    storage_options: dict | None = None,
    batch_rows: int = 20000,
    limits: IngestConfig | None = None,
    listed: Listing | None = None,
) -> Iterator[Ingested]:
    """Read every file of `source` that falls in `shard`, as batches of at most `batch_rows`
    documents (each with the quarantined rows met since the last): memory holds one batch, not
    the shard. Always yields at least one batch. `listed`: the source's listing, made once for
    every shard of a step (else listed here)."""
    lst = listed or listing(source, uri, storage_options)
    fs, root, found = lst.fs, lst.root, lst.found
    try:
        index = id_index(source, fs, root, found, limits)
    except Exception as e:  # noqa: BLE001 - an unreachable store is a source error, said plainly
        raise CorpusError(f"source {source.name}: cannot list {uri}: {type(e).__name__}: {e}") from e
    if not found:
        raise CorpusError(f"source {source.name}: no file matches {uri}")
    mine = [(p, rel) for p in found if shard_of(rel := _relative(p, root), shards) == shard]
    batch = _Batch(source.name, shard, [rel for _, rel in mine])
    for path, rel in mine:
        if found[path].get("size") == 0:
            batch.reject(rel, 0, EMPTY_FILE, "the file has zero bytes", b"")
            continue
        for kind, row, *item in documents(fs, path, rel, source, limits):
            if len(batch) >= batch_rows:
                yield batch.take()
            if kind == "bad":
                batch.reject(rel, row, *item)
                continue
            doc_id, title, text = item
            if (kept := index.kept(doc_id)) is not None and kept != (rel, row):
                kf, kr = kept
                batch.reject(rel, row, DUPLICATE_ID, f"doc id {doc_id!r} is kept at {kf}:{kr} (first in the source)", text, doc_id)
                continue
            batch.keep(rel, row, doc_id, title, text)
    yield batch.take()


def quarantine_frame(rows: list[dict]) -> pd.DataFrame:
    """Quarantine rows as a frame with its columns and types, also when there are none."""
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS).astype({"shard": "int64", "row": "int64"})
