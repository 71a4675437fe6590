"""Source-wide dedup (dedup.py, stages/deduped.py): planted near-duplicates at known Jaccard, exact
copies across shards, order independence, incremental shards, and the fast path against the rule."""

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kun_dagster import dedup, stages, storage
from kun_dagster.config import parse_config
from kun_dagster.registry import CLUSTERS, SIGNATURES
from kun_dagster.schemas import INDEXES
from kun_dagster.stages import StageContext, deduped
from kun_dagster.store import upath


def config(**dedup_cfg):
    sources = [{"name": n, "uri": "x", "format": "jsonl"} for n in ("web", "news")]
    return parse_config({"sources": sources, "seed": {"uri": "s"}, "dedup": dedup_cfg}, env={})


CFG = config()
RNG = np.random.default_rng(7)


def _random_text(n: int) -> str:
    return "".join(map(chr, RNG.integers(0x4E00, 0x9FA5, size=n)))


def shingles(text: str, n: int = 5) -> set[str]:
    t = dedup.normalise(text)
    return {t[i : i + n] for i in range(max(len(t) - n + 1, 1))} if t else set()


def true_jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def variant(text: str, target: float, n: int = 5) -> str:
    """A text whose 5-gram set has Jaccard `target` with `text`'s: the first k characters kept, the
    rest new (k from |A & B| = s, |A| = |B| = m: J = s / (2m - s))."""
    m = len(text) - n + 1
    s = round(2 * target * m / (1 + target))
    k = s + n - 1
    return text[:k] + _random_text(len(text) - k)


def frame(texts: list[str], source="web", shard=0, file="a.jsonl", start=0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "doc_id": [f"{source}-{file}-{start + i}" for i in range(len(texts))],
            "source": source,
            "shard": shard,
            "file": file,
            "row": range(start, start + len(texts)),
            "title": None,
            "text": texts,
        }
    )


def signed(df: pd.DataFrame, cfg=CFG) -> pa.Table:
    return pa.Table.from_pandas(stages.sign(df, StageContext(cfg)).rows, schema=INDEXES[SIGNATURES], preserve_index=False)


def members(partitions: list[pd.DataFrame], cfg=CFG) -> pd.DataFrame:
    return stages.cluster([signed(p, cfg) for p in partitions], StageContext(cfg)).rows


@pytest.fixture(scope="module")
def planted():
    """300 unrelated texts, then 200 pairs at each Jaccard (0.95, 0.85, 0.5), the copy in another
    shard and file than its original."""
    base = [_random_text(300) for _ in range(300)]
    pairs = {j: [(t := _random_text(300), variant(t, j)) for _ in range(200)] for j in (0.95, 0.85, 0.5)}
    for j, ps in pairs.items():
        got = [true_jaccard(a, b) for a, b in ps]
        assert abs(np.mean(got) - j) < 0.01  # the plant means what it says
    originals = base + [a for ps in pairs.values() for a, _ in ps]
    copies = [b for ps in pairs.values() for _, b in ps]
    parts = [frame(originals, shard=0, file="a.jsonl"), frame(copies, shard=1, file="b.jsonl")]
    return {"parts": parts, "pairs": pairs, "base": len(base)}


def _found(m: pd.DataFrame) -> dict[str, str]:
    """doc id -> the kept doc id, for the dropped members."""
    gone = m[m["role"] != "kept"]
    return dict(zip(gone["doc_id"], gone["kept_doc_id"], strict=True))


def test_planted_near_duplicates_are_found_above_the_threshold_and_not_below(planted):
    m = members(planted["parts"])
    found, n = _found(m), planted["base"]
    recall = {}
    for k, j in enumerate((0.95, 0.85, 0.5)):
        hits = sum(found.get(f"web-b.jsonl-{k * 200 + i}") == f"web-a.jsonl-{n + k * 200 + i}" for i in range(200))
        recall[j] = hits / 200
    assert (recall[0.95] + recall[0.85]) / 2 >= 0.95, recall  # every pair above dedup.threshold (0.8)
    assert recall[0.95] >= 0.99 and recall[0.85] >= 0.9, recall
    assert recall[0.5] <= 0.01, recall
    assert not any(d.startswith("web-a.jsonl-") for d in found)  # the original, at (file a, row), is always kept
    assert set(m.loc[m["role"] == "near_duplicate", "jaccard"].round(1)) <= {0.8, 0.9, 1.0}
    # the estimate is the rule's Jaccard within its error (sd sqrt(J(1-J)/128) ~ 0.03 at 0.85)
    est = m[m["role"] == "near_duplicate"]
    for doc, kept, j in zip(est["doc_id"], est["kept_doc_id"], est["jaccard"], strict=True):
        a = planted["parts"][0].set_index("doc_id").at[kept, "text"]
        b = planted["parts"][1].set_index("doc_id").at[doc, "text"]
        assert abs(j - true_jaccard(a, b)) < 0.15


def test_the_result_does_not_depend_on_the_order_of_shards_files_or_rows(planted):
    want = members(planted["parts"])
    a, b = planted["parts"]
    shuffled = [b.sample(frac=1, random_state=1), a.iloc[::-1]]
    split = [pd.concat([a.iloc[400:], b.iloc[:300]]), b.iloc[300:], a.iloc[:400]]  # rows of a file in other batches
    for parts in (shuffled, split):
        got = members(parts)
        pd.testing.assert_frame_equal(
            got.sort_values(["cluster", "doc_id"]).reset_index(drop=True), want.sort_values(["cluster", "doc_id"]).reset_index(drop=True)
        )


def test_a_new_shard_changes_only_the_clusters_it_touches(planted):
    a, b = planted["parts"]
    before = members([a, b])
    # a new shard: copies of 20 originals that had no duplicate, and 50 unrelated texts
    lone = a.iloc[:20]
    new = frame([variant(t, 0.95) for t in lone["text"]] + [_random_text(300) for _ in range(50)], shard=2, file="c.jsonl")
    after = members([a, b, new])
    touched = set(lone["doc_id"]) | set(new["doc_id"])
    key = ["doc_id", "role", "kept_doc_id"]
    unchanged = lambda m: m[~m["doc_id"].isin(touched) & ~m["kept_doc_id"].isin(touched)][key].sort_values("doc_id")  # noqa: E731
    pd.testing.assert_frame_equal(unchanged(before).reset_index(drop=True), unchanged(after).reset_index(drop=True))
    assert _found(after).keys() - _found(before).keys() <= set(new["doc_id"])


def test_exact_copies_across_shards_keep_the_first_location_and_name_it():
    text = "复利是指在计算利息时，把上一期的利息加入本金，再计算下一期的利息。" * 3
    parts = [
        frame(["独立的一段文字，讲的是蜜蜂的分工。" * 4, text], shard=1, file="b.jsonl"),
        frame([" " + text.replace("，", " ，") + "\n"], shard=0, file="z.jsonl"),  # same text up to whitespace
        frame([text], shard=3, file="a.jsonl", start=5),
    ]
    m = members(parts)
    assert list(m["role"]) == ["kept", "duplicate_text", "duplicate_text"]
    assert m.iloc[0]["doc_id"] == "web-a.jsonl-5" and (m["kept_file"] == "a.jsonl").all() and (m["kept_row"] == 5).all()
    res = stages.dedupe(parts[0], StageContext(CFG, inputs={CLUSTERS: m[m["shard"] == 1]}))
    assert res.rows["doc_id"].tolist() == ["web-b.jsonl-0"]
    q = res.dropped.iloc[0]
    assert q["reason"] == "duplicate_text" and "same text as web-a.jsonl-5 (web shard 3, a.jsonl row 5)" in q["detail"]
    assert res.stats["dropped"] == {"duplicate_text": 1}


def test_near_duplicates_go_to_the_quarantine_with_location_and_jaccard():
    t = _random_text(400)
    parts = [frame([t], shard=0, file="a.jsonl"), frame([variant(t, 0.9), _random_text(400)], shard=1, file="b.jsonl")]
    m = members(parts)
    res = stages.dedupe(parts[1], StageContext(CFG, inputs={CLUSTERS: m[m["shard"] == 1]}))
    assert res.rows["doc_id"].tolist() == ["web-b.jsonl-1"]
    q = res.dropped.iloc[0]
    assert q["reason"] == "near_duplicate" and q["file"] == "b.jsonl" and q["row"] == 0
    assert q["detail"].startswith("near-duplicate of web-a.jsonl-0 (web shard 0, a.jsonl row 0), estimated Jaccard 0.")
    assert abs(float(q["detail"].rsplit(" ", 1)[1]) - 0.9) < 0.12  # the estimate's sd at 0.9 is 0.027


def test_scope_all_finds_duplicates_across_sources_and_the_first_source_listed_keeps():
    t = _random_text(300)
    web, news = frame([t], source="web", file="z.jsonl"), frame([t, variant(t, 0.95)], source="news", file="a.jsonl")
    assert len(members([web, news], config(scope="all"))) == 3
    m = members([news, web], config(scope="all"))
    assert m.loc[m["role"] == "kept", "source"].tolist() == ["web"]  # listed first in kun.yaml, though its file sorts later
    assert sorted(m.loc[m["role"] != "kept", "role"]) == ["duplicate_text", "near_duplicate"]


def test_switches_empty_partitions_and_texts_without_shingles():
    t = _random_text(300)
    parts = [frame([t, "。。。！！", "……"], shard=0), frame([t, variant(t, 0.95)], shard=1, file="b.jsonl"), frame([], shard=2)]
    assert sorted(members(parts)["role"]) == ["duplicate_text", "kept", "near_duplicate"]  # punctuation alone is no text
    assert sorted(members(parts, config(near=False))["role"]) == ["duplicate_text", "kept"]
    assert sorted(members(parts, config(exact=False, near=False))["role"]) == []
    copies = [frame([t], shard=0), frame([" " + t], shard=1, file="b.jsonl")]  # one text, twice: nothing else to compare
    assert sorted(members(copies, config(exact=False))["role"]) == ["duplicate_text", "kept"]  # Jaccard 1 is near too
    assert members([frame([], shard=0)]).empty and stages.cluster([], StageContext(CFG)).rows.empty
    res = stages.dedupe(frame([]), StageContext(CFG, inputs={CLUSTERS: members([frame([])])}))
    assert res.rows.empty and res.stats["rows_in"] == 0


def test_signatures_of_another_configuration_are_refused():
    parts = [signed(frame(["一段文字，足够长了吧，真的。"])), signed(frame(["另一段文字，也够长。"], shard=1), config(ngram=3))]
    with pytest.raises(stages.DedupError, match="re-materialize minhash_signatures"):
        stages.cluster(parts, StageContext(CFG))
    with pytest.raises(stages.DedupError, match="re-materialize minhash_signatures"):
        deduped.band(parts, 0, StageContext(CFG))  # the banded path's steps, alike
    with pytest.raises(stages.DedupError, match="re-materialize minhash_signatures"):
        deduped.merge(parts, [], StageContext(CFG))


def test_bands_catch_a_pair_at_the_threshold_with_probability_099():
    for t, perm in ((0.8, 128), (0.7, 128), (0.9, 256), (0.5, 64)):
        b, r = dedup.bands(t, perm)
        assert b * r <= perm and 1 - (1 - t**r) ** b >= 0.99
        assert b == 1 or 1 - (1 - t ** (perm // (b - 1))) ** (b - 1) < 0.99  # the fewest bands that do


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60)


@settings(max_examples=150, deadline=None)
@given(st.lists(_TEXT, min_size=1, max_size=12), st.integers(1, 7))
def test_shingle_hashes_are_the_n_grams_of_the_normalised_text_whatever_the_batch(texts, n):
    """The vectorised hashing against the rule it stands for: each text's hashes are those of its
    own n-grams (one for a text shorter than n, none for an empty one), wherever it sits in a batch."""
    flat, offsets = dedup.shingle_hashes(texts, n)
    for i, t in enumerate(texts):
        mine = flat[offsets[i] : offsets[i + 1]]
        alone, _ = dedup.shingle_hashes([t], n)
        assert np.array_equal(mine, alone)
        norm = dedup.normalise(t)
        want = {norm[j : j + n] for j in range(max(len(norm) - n + 1, 1))} if norm else set()
        assert len(mine) == max(len(norm) - n + 1, 1 if norm else 0)
        grams = [norm[j : j + n] for j in range(len(mine))]
        assert len(set(mine.tolist())) == len(set(grams)) == len(want)  # equal n-grams hash equal, others not


@settings(max_examples=60, deadline=None)
@given(_TEXT.filter(lambda t: len(dedup.normalise(t)) >= 1))
def test_spacing_case_width_and_punctuation_do_not_change_a_signature(text):
    other = "　" + text.upper().replace("，", ",") + " !\n"  # U+3000, upper case, ASCII comma, more punctuation
    a, b = dedup.signatures([text, other], 5, 64, 1)[0]
    assert np.array_equal(a, b) == (dedup.normalise(text) == dedup.normalise(other))


@settings(max_examples=150, deadline=None)
@given(st.lists(_TEXT, max_size=12))
def test_the_batch_normalisation_is_normalise_text_by_text(texts):
    codes, lens = dedup._normalised_codes(texts)
    got = codes.tobytes().decode("utf-32-le")
    assert got == "".join(map(dedup.normalise, texts)) and lens.tolist() == [len(dedup.normalise(t)) for t in texts]


def test_the_release_drops_answers_repeated_across_shards_and_its_card_reports_instruction_diversity():
    from kun_dagster import card as kun_card
    from kun_dagster import dataset, schemas
    from kun_dagster.registry import POLISHED

    answer = "复利是指在计算利息时，把上一期的利息加入本金，再计算下一期的利息。"
    rows = [  # (shard, file, row, instruction, output)
        (1, "b.jsonl", 0, "什么是复利？", answer),
        (0, "a.jsonl", 3, "什么是复利？请详细解释一下", answer + " "),  # the same answer up to whitespace, first by (file, row)
        (0, "a.jsonl", 4, "什么是复利?请详细解释一下吧", "蜜蜂的分工很细：工蜂采蜜，蜂王产卵，雄蜂交配。" * 2),
        (1, "b.jsonl", 1, "蜜蜂如何分工？", "长江是中国最长的河流，流经十一个省级行政区。" * 2),
    ]
    polished = schemas.empty_frame(POLISHED).reindex(range(len(rows)))
    for i, (shard, file, row, ins, out) in enumerate(rows):
        polished.loc[i, ["source", "shard", "file", "row", "doc_id", "instruction", "output"]] = [
            "web",
            shard,
            file,
            row,
            f"d{i}",
            ins,
            out,
        ]
    polished[["score", "score_rule", "score_method"]] = [0.9, "probability", "kun_choice"]
    polished["task_minor"] = [["kun:web"]] * len(rows)  # tags off: the constants polish writes
    polished[["domain", "task_minor_rule", "domain_rule"]] = ["通用", "off", "off"]
    fun = dataset.funnel({}, CFG.score.threshold)
    result = dataset.release(polished, "web", CFG, "kun-label", "kun-chat", fun)
    card = kun_card.card("web", result.stats, CFG)
    assert result.rows["doc_id"].tolist() == ["d1", "d2", "d3"]  # d0 repeats d1's answer; a.jsonl row 3 comes first
    q = result.dropped.iloc[0]
    assert q["reason"] == "duplicate_output" and q["doc_id"] == "d0" and "same output as d1" in q["detail"]
    assert result.stats["dropped"] == {"duplicate_output": 1}
    div = result.stats["diversity"]
    assert div["texts"] == 3 and div["distinct_ratio"] == 1.0
    # 3-grams of the normalised instructions: 10 of 11 shared, Jaccard 0.91
    assert div["largest"] == [{"size": 2, "example": "什么是复利？请详细解释一下"}] and div["near_duplicate_clusters"] == 1
    assert "## Instruction diversity" in card and "100.0% of the 3 instructions are distinct" in card
    assert re.search(r"^\| instruction_dataset .*\| duplicate_output: 1 *\|$", card, re.M)


def _reference_components(n: int, edges: list[tuple[int, int]]) -> list[int]:
    """Each node's smallest component member, by a breadth-first search from each node in order."""
    adjacent: dict[int, set[int]] = {}
    for a, b in edges:
        adjacent.setdefault(a, set()).add(b)
        adjacent.setdefault(b, set()).add(a)
    label = [-1] * n
    for start in range(n):
        if label[start] < 0:
            label[start], todo = start, [start]
            while todo:
                for m in adjacent.get(todo.pop(), ()):
                    if label[m] < 0:
                        label[m] = start
                        todo.append(m)
    return label


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 60).flatmap(
        lambda n: st.tuples(st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=120))
    )
)
def test_connected_components_equal_a_breadth_first_search(graph):
    n, edges = graph
    src, dst = np.array([a for a, _ in edges], dtype=np.int64), np.array([b for _, b in edges], dtype=np.int64)
    assert dedup.components(n, src, dst).tolist() == _reference_components(n, edges)


def test_connected_components_of_long_chains_in_any_order():
    n = 20_000
    order = RNG.permutation(n - 1)
    src, dst = order, order + 1  # one path through every node, its edges shuffled, and a second copy reversed
    assert (dedup.components(n, np.r_[src, dst[::-1]], np.r_[dst, src[::-1]]) == 0).all()
    src = RNG.permutation(n - 2)  # i - i+2: the even nodes and the odd ones, two chains
    assert dedup.components(n, src, src + 2).tolist() == (np.arange(n) % 2).tolist()


def _banded(sig, keys, shingles, rank, threshold, asked=None):
    """dedup.cluster's result rebuilt as the banded path makes it: one band_step per band (given
    only that band's bucket of each document, and the signatures it asks for), then merge."""
    b, r = dedup.bands(threshold, sig.shape[1])

    def signatures_of(docs):
        if asked is not None:
            asked.append(len(docs))
        return sig[docs]

    got = [dedup.band_step(dedup.band_key(sig, k, r), keys, shingles, rank, signatures_of, threshold) for k in range(b)]
    a, c, ok = (np.concatenate(x) for x in zip(*got, strict=True))
    exact = dedup.exact_edges(keys, rank)
    return dedup.merge(len(rank), keys, rank, exact, (a, c, ok), (b, r), lambda i, j: dedup.rows_jaccard(signatures_of, i, j))


def _same(one: dedup.Clusters, banded: dedup.Clusters) -> None:
    assert one.keeper.tolist() == banded.keeper.tolist()
    assert one.reason.tolist() == banded.reason.tolist()
    assert np.allclose(one.jaccard, banded.jaccard) and one.candidates == banded.candidates and one.bands == banded.bands


def test_the_banded_path_makes_the_clusters_of_one_step_on_planted_text(planted):
    texts = pd.concat(planted["parts"])["text"].tolist()
    texts += texts[:40] + ["", "。。。"]  # exact copies, and two texts without a shingle
    sig, count = dedup.signatures(texts, 5, 128, 1)
    keys, rank = dedup.text_keys(texts), RNG.permutation(len(texts))
    one = dedup.cluster(sig, keys, count, rank, exact=True, near=True, threshold=0.8)
    asked = []
    banded = _banded(sig, keys, count, rank, 0.8, asked)
    _same(one, banded)
    assert (one.reason == "near_duplicate").sum() >= 390 and (one.reason == "duplicate_text").sum() == 40
    # a band's step reads the signatures of its candidates, not of every document (the 300
    # unrelated texts are nobody's candidate)
    assert asked and max(asked) <= len(texts) - planted["base"]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 120), st.sampled_from([0.5, 0.7, 0.9]))
def test_the_banded_path_makes_the_clusters_of_one_step(seed, n, threshold):
    """Random signatures with planted copies (whole, or with some values changed), exact texts
    repeated, texts without shingles, and ranks in any order."""
    rng = np.random.default_rng(seed)
    text = rng.integers(0, max(n // 2, 1), size=n)  # repeated texts: exact duplicates, equal signatures
    sig = rng.integers(0, 2**32, size=(n, 64), dtype=np.uint64).astype(np.uint32)[text]
    for i in rng.integers(0, n, size=n // 3):  # near copies: another text, some values changed
        j = rng.integers(0, n)
        text[j] = n + j
        changed = rng.random(64) < rng.choice([0.05, 0.2, 0.4])
        sig[j] = np.where(changed, rng.integers(0, 2**32, size=64, dtype=np.uint64).astype(np.uint32), sig[i])
    keys = np.stack([text.astype(np.uint64), np.zeros(n, dtype=np.uint64)], axis=1)
    shingles = np.where(rng.random(n) < 0.1, 0, 50)
    rank = rng.permutation(n)
    one = dedup.cluster(sig, keys, shingles, rank, exact=True, near=True, threshold=threshold)
    _same(one, _banded(sig, keys, shingles, rank, threshold))


def _band_steps(tables: list, cfg=CFG) -> dict:
    """Every band as lsh_band_pairs makes it (its own step, each ranking the group), as {band: (pairs, stats)}."""
    n_bands, _ = dedup.bands(cfg.dedup.threshold, cfg.dedup.num_perm)
    made = {k: deduped.band_pairs(tables[::-1], k, StageContext(cfg)) for k in range(n_bands)}  # any partition order
    return {k: (r.rows, r.stats) for k, r in made.items()}


def _banded_stage(tables: list, cfg=CFG):
    result = deduped.merge_bands(tables, _band_steps(tables, cfg), StageContext(cfg))
    assert result.stats.pop("mode") == "band_steps"
    return result


def test_bands_made_from_other_documents_or_missing_are_refused_by_the_merge(planted):
    tables = [signed(p) for p in planted["parts"]]
    bands = _band_steps(tables)
    assert len({stats["documents_fingerprint"] for _, stats in bands.values()}) == 1
    assert sum(stats["near_pairs"] for _, stats in bands.values()) > 0
    with pytest.raises(stages.DedupError, match=r"lsh_band_pairs bands \[3\] of \d+ not given"):
        deduped.merge_bands(tables, {k: v for k, v in bands.items() if k != 3}, StageContext(CFG))
    # a shard re-signed since the bands were made: one more document (ranks shift), or one text
    # changed (the same ranks, other content); a change of whitespace alone keeps the bands valid
    more = [signed(pd.concat([planted["parts"][0], frame(["另一篇文章" * 20], start=1000)])), *tables[1:]]
    edited = planted["parts"][1].copy()
    edited.loc[0, "text"] = edited.loc[0, "text"] + "。补充一句。"
    for other in (more, [tables[0], signed(edited), *tables[2:]]):
        with pytest.raises(stages.DedupError, match=r"bands \[0, 1, .*\] were made from other signatures .* re-materialize lsh_band_pairs"):
            deduped.merge_bands(other, bands, StageContext(CFG))
    # bands found under another threshold: their `ok` means another rule (the same bands and rows)
    higher = config(threshold=0.805)
    assert dedup.bands(0.805, 128) == dedup.bands(0.8, 128)
    with pytest.raises(stages.DedupError, match=r"were made under another rule than kun.yaml's \(near=True threshold=0.805 "):
        deduped.merge_bands(tables, bands, StageContext(higher))
    spaced = planted["parts"][1].copy()
    spaced["text"] = " " + spaced["text"] + "\n"  # whitespace: the same keys, the same signatures
    assert deduped.merge_bands([tables[0], signed(spaced), *tables[2:]], bands, StageContext(CFG)).stats["documents"] == sum(
        len(p) for p in planted["parts"]
    )


def test_banded_steps_over_partitions_give_the_one_step_clusters_and_stats(planted, tmp_path):
    parts = planted["parts"] + [frame(pd.concat(planted["parts"])["text"].tolist()[:30], shard=2, file="c.jsonl")]  # exact copies
    parts += [frame([], shard=3, file="d.jsonl"), frame(["", "   "], source="news", shard=0, file="e.jsonl")]
    tables = [signed(p) for p in parts]  # the switches below leave the signatures as they are
    one = stages.cluster(tables, StageContext(CFG))
    banded = _banded_stage(tables)
    pd.testing.assert_frame_equal(one.rows, banded.rows)
    assert {k: v for k, v in one.stats.items() if k != "seconds"} == {k: v for k, v in banded.stats.items() if k != "seconds"}
    assert one.stats["duplicates"]["near_duplicate"] >= 390 and one.stats["duplicates"]["duplicate_text"] >= 30
    published = []  # as the assets get them: published partitions, source and shard in their path only
    for (source, shard), table in zip([("web", 0), ("web", 1), ("web", 2), ("web", 3), ("news", 0)], tables, strict=True):
        where = storage.partition_dir(upath(str(tmp_path)), SIGNATURES, {"source": source, "shard": str(shard)})
        storage.write_partition(where, table.to_pandas(), INDEXES[SIGNATURES])
        published.append(storage.PartitionTable(where))
    pd.testing.assert_frame_equal(one.rows, _banded_stage(published).rows)
    for cfg in (config(near=False), config(exact=False), config(scope="all")):
        pd.testing.assert_frame_equal(stages.cluster(tables, StageContext(cfg)).rows, _banded_stage(tables, cfg).rows)
