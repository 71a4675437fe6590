"""A "wild" corpus as real dumps come: texts that open with spaces or U+3000, CRLF, a BOM, NUL and
other control characters, ANSI colour escapes; a zero-byte file, a truncated .gz, a GB18030 file,
a UTF-16 file, Parquet with a nested struct and nulls, zstd-compressed JSONL; ids that collide
across files; text fields that are null, numbers or lists; nested fields; one file for every
shard, with CR line ends and hostile lines (nested 100k deep, 5,000 digits, over the record
limit); a gzip of one 100 MB line; and a source whose rows are all filtered out.

`build(root)` writes it and returns the config's sources with what must happen to every row: the
planted bad rows (stage, source, file, row, reason) and the valid rows, which must all reach
filtered_corpus. The texts are random Chinese sentences from a seeded generator, not prose written
for the project.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

# Common characters and punctuation; sentences of random length, so no two texts are alike.
_CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"
_PUNCT = "，，，。；、"


def sentence(rng: random.Random, lo: int = 30, hi: int = 90) -> str:
    n = rng.randint(lo, hi)
    out = [rng.choice(_CHARS) if rng.random() > 0.08 else rng.choice(_PUNCT) for _ in range(n)]
    return "".join(out).strip("，。；、") + "。"


@dataclass
class Wild:
    sources: list[dict]
    planted: list[tuple[str, str, str, int, str]] = field(default_factory=list)  # (stage, source, file, row, reason)
    valid: list[tuple[str, str]] = field(default_factory=list)  # (source, doc_id) that must reach filtered_corpus
    all_filtered: list[str] = field(default_factory=list)  # sources with no valid row left after filtered_corpus


def _jsonl(path: Path, rows: list, newline: str = "\n", bom: bool = False) -> None:
    lines = [r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() for r in rows]
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.encode().join(lines) + newline.encode())


def build(root: Path, seed: int = 7) -> Wild:
    rng = random.Random(seed)
    w = Wild(sources=[])

    # -- nested: JSONL with meta.content / meta.id / meta.title, every text shape a dump has ----------
    d = root / "nested"
    (d / "part").mkdir(parents=True)
    s = "nested"

    def rec(i, text, **meta):
        return {"meta": {"id": i, "content": text, "title": f"标题{i}", **meta}, "lang": "zh"}

    good = {
        "n-lead": "   " + sentence(rng),
        "n-ideo": "\u3000\u3000" + sentence(rng),
        "n-trail": sentence(rng) + "  \t\n",
        "n-crlf": sentence(rng) + "\r\n" + sentence(rng),
        "n-bom": "\ufeff" + sentence(rng),
        "n-nul": sentence(rng)[:20] + "\x00\x07\x1f" + sentence(rng),
        "n-ansi": "\x1b[31m" + sentence(rng) + "\x1b[0m",
        "n-newlines": "\n\n" + sentence(rng) + "\n\n\n\n" + sentence(rng),
        "dup-1": sentence(rng),  # kept here: a-file sorts first
        "dup-2": sentence(rng),
        7: sentence(rng),  # a numeric id becomes "7"
    }
    a_rows: list = [rec(i, t) for i, t in good.items()]
    bad_a = [
        (rec("n-null", None), "missing_text"),
        (rec("n-num", 12345), "text_not_string"),
        (rec("n-list", ["第一段", "第二段"]), "text_not_string"),
        ({"meta": {"id": "n-absent"}}, "missing_text"),
        (rec("n-blank", " \u3000\t\r\n "), "empty_text"),
        (rec("n-escapes", "\x1b[1;32m\x1b[0m\x00"), "empty_text"),
        (rec(None, sentence(rng)), "missing_id"),
        (rec(["x"], sentence(rng)), "missing_id"),
        (b'{"meta": {"id": "n-broken", "content": "\xe6\x96\x87\xff\xfe"}}', "invalid_encoding"),
        (b'{"meta": {"id": "n-surrogate", "content": "\\ud83d lone"}}', "invalid_unicode"),
        (b'{"meta": {"id": "n-cut", "content": "unterminated', "invalid_json"),
        (b'["not", "an", "object"]', "not_an_object"),
        (rec("dup-2", sentence(rng)), "duplicate_id"),  # same file, later row
    ]
    for r, reason in bad_a:
        a_rows.append(r)
        w.planted.append(("raw_corpus", s, "a.jsonl", len(a_rows), reason))
    _jsonl(d / "part" / "a.jsonl", a_rows)
    w.valid += [(s, str(i)) for i in good]

    b_good = {f"b-{k}": sentence(rng) for k in range(6)}
    b_rows = [rec(i, t) for i, t in b_good.items()] + [rec("dup-1", sentence(rng))]  # id of a.jsonl: another file, maybe another shard
    w.planted.append(("raw_corpus", s, "b.jsonl", len(b_rows), "duplicate_id"))
    _jsonl(d / "part" / "b.jsonl", b_rows, newline="\r\n", bom=True)  # CRLF and a BOM, as Windows tools write
    w.valid += [(s, i) for i in b_good]

    (d / "part" / "c-empty.jsonl").write_bytes(b"")  # a zero-byte file
    w.planted.append(("raw_corpus", s, "c-empty.jsonl", 0, "empty_file"))

    c_good = {f"c-{k}": sentence(rng, 20, 30) for k in range(3)}
    body = b"".join(json.dumps(rec(i, t), ensure_ascii=False).encode() + b"\n" for i, t in c_good.items())
    tail = json.dumps(rec("c-lost", "".join(sentence(rng) for _ in range(60))), ensure_ascii=False).encode() + b"\n"
    packed = gzip.compress(body + tail)
    (d / "part" / "d-truncated.jsonl.gz").write_bytes(packed[: len(packed) - 400])  # cut inside the long last row
    w.planted.append(("raw_corpus", s, "d-truncated.jsonl.gz", len(c_good), "unreadable_file"))
    w.valid += [(s, i) for i in c_good]
    w.sources.append(
        {
            "name": s,
            "uri": str(d / "part" / "*"),
            "format": "jsonl",
            "compression": "infer",
            "text_field": "meta.content",
            "id_field": "meta.id",
            "title_field": "meta.title",
        }
    )

    # -- gb: GB18030 text files, one paragraph with bytes GB18030 cannot decode -----------------------
    d = root / "gb"
    d.mkdir()
    paras = [sentence(rng) for _ in range(5)]
    raw = (
        b"\r\n\r\n".join(p.encode("gb18030") for p in paras[:3])
        + b"\r\n\r\n"
        + "坏字节".encode("gb18030")
        + b"\x81\x20\xff"
        + b"\r\n\r\n"
        + b"\r\n\r\n".join(p.encode("gb18030") for p in paras[3:])
    )
    (d / "gb-0001.txt").write_bytes(raw)
    w.planted.append(("raw_corpus", "gb", "gb-0001.txt", 4, "invalid_encoding"))
    w.valid += [("gb", f"gb-0001.txt:{i}") for i in (1, 2, 3, 5, 6)]
    w.sources.append({"name": "gb", "uri": str(d / "*.txt"), "format": "txt", "encoding": "gb18030"})

    # -- utf16: a UTF-16 JSON array (with its BOM), ids as numbers ------------------------------------
    d = root / "utf16"
    d.mkdir()
    recs = [{"id": 100 + k, "text": sentence(rng)} for k in range(5)] + [{"id": 200, "text": None}]
    (d / "dump.json").write_bytes(json.dumps(recs, ensure_ascii=False).encode("utf-16"))
    w.planted.append(("raw_corpus", "utf16", "dump.json", 6, "missing_text"))
    w.valid += [("utf16", str(100 + k)) for k in range(5)]
    w.sources.append({"name": "utf16", "uri": str(d / "*.json"), "format": "json", "encoding": "utf-16", "id_field": "id"})

    # -- pq: Parquet with a nested struct column and nulls; pqzst: zstd-compressed JSONL ---------------
    d = root / "pq"
    d.mkdir()
    rows = [{"uid": 300 + k, "meta": {"content": sentence(rng), "lang": "zh"}} for k in range(4)]
    rows += [
        {"uid": 310, "meta": {"content": None, "lang": "zh"}},
        {"uid": 311, "meta": None},
        {"uid": None, "meta": {"content": sentence(rng), "lang": "zh"}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), d / "part-000.parquet")
    w.planted += [
        ("raw_corpus", "pq", "part-000.parquet", 5, "missing_text"),
        ("raw_corpus", "pq", "part-000.parquet", 6, "missing_text"),
        ("raw_corpus", "pq", "part-000.parquet", 7, "missing_id"),
    ]
    w.valid += [("pq", str(300 + k)) for k in range(4)]
    zst = [{"uid": 400 + k, "meta": {"content": sentence(rng)}} for k in range(3)] + [{"uid": 400, "meta": {"content": sentence(rng)}}]
    (d / "part-001.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in zst).encode())
    )
    w.planted.append(("raw_corpus", "pqzst", "part-001.jsonl.zst", 4, "duplicate_id"))  # uid 400 is kept at row 1
    w.valid += [("pqzst", str(400 + k)) for k in range(3)]
    w.sources.append(
        {"name": "pq", "uri": str(d / "part-000.parquet"), "format": "parquet", "text_field": "meta.content", "id_field": "uid"}
    )
    w.sources.append({"name": "pqzst", "uri": str(d / "*.jsonl.zst"), "format": "jsonl", "text_field": "meta.content", "id_field": "uid"})

    # -- onefile: one file for every shard (the others are empty partitions), with old Mac line ends
    # (a lone CR) and hostile lines among its texts: one nested 100k deep, one over
    # ingest.max_record_bytes (the tests' 256 KiB), and a record with a 5,000-digit number (a document)
    d = root / "onefile"
    d.mkdir()
    texts = [sentence(rng) for _ in range(12)]
    rows: list = [{"text": t} for t in texts]
    rows.insert(6, b'{"text": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    rows.insert(10, json.dumps({"text": sentence(rng)}, ensure_ascii=False).encode()[:-1] + b', "n": ' + b"9" * 5000 + b"}")
    rows.append({"text": "长" * 100_000})  # 300 KB
    _jsonl(d / "all.jsonl", rows, newline="\r")
    w.planted += [("raw_corpus", "onefile", "all.jsonl", 7, "invalid_json"), ("raw_corpus", "onefile", "all.jsonl", 15, "record_too_large")]
    w.valid += [("onefile", f"all.jsonl:{i}") for i in range(1, 15) if i != 7]
    w.sources.append({"name": "onefile", "uri": str(d / "*.jsonl"), "format": "jsonl"})

    # -- toolong: every row is valid at ingest and too long for the 512-token filter, or for the
    # tests' filter.max_doc_chars (5,000: never tokenized); and a 100 KB gzip of one 100 MB line
    d = root / "toolong"
    d.mkdir()
    _jsonl(d / "long.jsonl", [{"text": "".join(sentence(rng, 80, 90) for _ in range(30))} for _ in range(3)] + [{"text": "长句。" * 2000}])
    w.planted += [("filtered_corpus", "toolong", "long.jsonl", i, "too_many_tokens") for i in (1, 2, 3)]
    w.planted.append(("filtered_corpus", "toolong", "long.jsonl", 4, "text_too_long"))
    with gzip.open(d / "bomb.jsonl.gz", "wb") as f:
        f.write(b'{"text": "')
        for _ in range(100):
            f.write(b"a" * 2**20)
        f.write(b'"}\n')
    w.planted.append(("raw_corpus", "toolong", "bomb.jsonl.gz", 1, "record_too_large"))
    w.sources.append({"name": "toolong", "uri": str(d / "*.jsonl*"), "format": "jsonl"})
    w.all_filtered.append("toolong")
    return w


def ingest_shard(source, uri: str, shard: int, shards: int, storage_options: dict | None = None, limits=None, batch_rows: int = 20000):
    """A whole shard at once (the stages stream it in batches): every document, every quarantined row."""
    import pandas as pd

    from kun_dagster.corpus import Ingested, iter_shard

    batches = list(iter_shard(source, uri, shard, shards, storage_options, batch_rows, limits))
    return Ingested(
        docs=pd.concat([b.docs for b in batches], ignore_index=True),
        quarantine=pd.concat([b.quarantine for b in batches], ignore_index=True),
        files=batches[0].files,
    )
