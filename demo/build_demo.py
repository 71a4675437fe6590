"""Writes the demo corpora and seed set from the paragraphs in this folder (run from the repo root:
`python demo/build_demo.py`). The output is committed; rerun only after editing the paragraphs.

Planted bad rows, one per kind, are listed in demo/planted.json; tests hold the pipeline to them.
"""

import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from paragraphs_a import WUDAO  # noqa: E402
from paragraphs_b import WANJUAN  # noqa: E402
from paragraphs_c import SKYPILE  # noqa: E402
from seeds_src import JUDGEMENTS, SEEDS  # noqa: E402

OUT = HERE / "corpora"
planted = []


def halves(items):
    mid = (len(items) + 1) // 2
    return items[:mid], items[mid:]


def plant(source: str, file: str, row: int, doc_id: str, reason: str, stage: str) -> None:
    planted.append({"source": source, "file": file, "row": row, "doc_id": doc_id, "reason": reason, "stage": stage})


def jline(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


# Wudao-like: JSON arrays of {id, uniqueKey, title, content, dataType}.
(OUT / "wudao").mkdir(parents=True, exist_ok=True)
for n, part in enumerate(halves(WUDAO)):
    recs = [
        {"id": f"wd-{n}-{i:03d}", "uniqueKey": f"u{n}{i:03d}", "title": t, "content": c, "dataType": "百科"}
        for i, (t, c) in enumerate(part)
    ]
    name = f"wudao_{n:02d}.json"
    if n == 0:  # an oversized document: far over the 512-token limit
        long = "".join(c for _, c in WUDAO[:30])
        recs.append({"id": "wd-0-big", "uniqueKey": "ubig", "title": "合集", "content": long, "dataType": "百科"})
        plant("wudao", name, len(recs), "wd-0-big", "too_many_tokens", "filtered_corpus")
    else:  # an empty text; a repost of a document of the other file (shard): a near-duplicate
        recs.append({"id": "wd-1-empty", "uniqueKey": "uempty", "title": "空白", "content": "   ", "dataType": "百科"})
        plant("wudao", name, len(recs), "wd-1-empty", "empty_text", "raw_corpus")
        title, content = WUDAO[3]
        recs.append({"id": "wd-1-repost", "uniqueKey": "urepost", "title": title, "content": f"转载：{content}（完）", "dataType": "百科"})
        plant("wudao", name, len(recs), "wd-1-repost", "near_duplicate", "deduped_corpus")
    (OUT / "wudao" / name).write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")

# WanJuan-like: gzipped JSONL of {id, content}.
(OUT / "wanjuan").mkdir(parents=True, exist_ok=True)
for n, part in enumerate(halves(WANJUAN)):
    lines = [jline({"id": f"wj-{n}-{i:03d}", "content": c}) for i, c in enumerate(part)]
    name = f"wanjuan-2023-{n + 1:02d}.jsonl.gz"  # names chosen to fall in both demo shards
    if n == 0:  # a broken JSON line (truncated mid-object)
        lines.insert(5, b'{"id": "wj-0-broken", "content": "\xe8\xbf\x99\xe4\xb8\x80\xe8\xa1\x8c\n')
        plant("wanjuan", name, 6, "", "invalid_json", "raw_corpus")
    else:  # a line with bytes that are not UTF-8 (a GBK fragment)
        lines.insert(3, b'{"id": "wj-1-gbk", "content": "' + "中文编码错误".encode("gbk") + b'"}\n')
        plant("wanjuan", name, 4, "", "invalid_encoding", "raw_corpus")
    with gzip.GzipFile(OUT / "wanjuan" / name, "wb", mtime=0) as f:
        f.write(b"".join(lines))

# SkyPile-like: JSONL of {text}, no ids (doc ids are file:row).
(OUT / "skypile").mkdir(parents=True, exist_ok=True)
for n, part in enumerate(halves(SKYPILE)):
    lines = [jline({"text": t}) for t in part]
    name = f"skypile_{n:02d}.jsonl"
    if n == 0:  # an exact duplicate of the file's second document
        lines.append(jline({"text": part[1]}))
        plant("skypile", name, len(lines), f"{name}:{len(lines)}", "duplicate_text", "filtered_corpus")
    else:  # an exact copy (up to spacing) of a document of the other file (shard)
        lines.append(jline({"text": "  " + SKYPILE[3].replace("，", " ，") + "\n"}))
        plant("skypile", name, len(lines), f"{name}:{len(lines)}", "duplicate_text", "deduped_corpus")
    (OUT / "skypile" / name).write_bytes(b"".join(lines))

# COIG-CQIA-shaped seed records.
seed_dir = HERE / "seed"
seed_dir.mkdir(exist_ok=True)
with open(seed_dir / "coig_cqia_seed.jsonl", "w", encoding="utf-8") as f:
    for i, (ins, inp, out) in enumerate(SEEDS):
        rec = {
            "instruction": ins,
            "input": inp,
            "output": out,
            "task_type": {"major": ["问答"], "minor": ["百科问答" if not inp else "翻译" if "翻译" in ins else "选择题"]},
            "domain": ["通用"],
            "answer_from": "human",
            "human_verified": True,
            "copyright": "Written for kun-dagster; Apache-2.0",
            "id": f"seed-{i:03d}",
        }
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    # judgements in the point prompt: instruction + "\n" + input is exactly Kun's point user turn
    point = json.loads((HERE.parent / "kun_dagster" / "data" / "kun_prompts.json").read_text("utf-8"))["pointPrompt"]
    for j, (candidate, verdict) in enumerate(JUDGEMENTS):
        rec = {
            "instruction": point,
            "input": f"指令: 【{candidate}】 回复：",
            "output": f"【{verdict}】",
            "task_type": {"major": ["分类"], "minor": ["指令评价"]},
            "domain": ["通用"],
            "answer_from": "human",
            "human_verified": True,
            "copyright": "Written for kun-dagster; Apache-2.0",
            "id": f"seed-judge-{j:03d}",
        }
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")

(HERE / "planted.json").write_text(json.dumps(planted, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
print(f"wrote {OUT} and {seed_dir}; planted {len(planted)} bad rows")
