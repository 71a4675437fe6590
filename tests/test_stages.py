import math

import pandas as pd
import pytest

from kun_dagster import prompts, stages
from kun_dagster.config import parse_config
from kun_dagster.llm import EngineError

from .fakes import ScriptedEngine

CFG = parse_config({"sources": [{"name": "web", "uri": "x", "format": "jsonl"}], "seed": {"uri": "s"},
                    "filter": {"max_tokens": 40, "perplexity_max": 50}}, env={})


def docs(texts):
    return pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(texts))], "source": "web", "shard": 0, "file": "f.jsonl",
                         "row": range(1, len(texts) + 1), "title": None, "text": texts})


def test_filter_corpus_drops_with_reasons_and_keeps_order():
    eng = ScriptedEngine(ppl=[5.0, 80.0, math.nan])
    df = docs(["复利是指利息计入本金。", "\x00  \n", "复利是指利息计入本金。 ", "长" * 300, "蜜蜂的分工很细。", "乱码乱码。"])
    res = stages.filter_corpus(df, eng.tokenizer, eng, CFG)
    assert res.rows["doc_id"].tolist() == ["d0"]
    assert dict(zip(res.dropped["doc_id"], res.dropped["reason"])) == {
        "d1": "empty_after_clean", "d2": "duplicate_text", "d3": "too_many_tokens", "d4": "high_perplexity", "d5": "perplexity_undefined"}
    assert res.dropped.set_index("doc_id").loc["d2", "detail"] == "same text as d0"
    assert res.stats["rows_in"] == 6 and res.stats["rows_out"] == 1 and res.stats["dropped"]["duplicate_text"] == 1
    assert res.rows.loc[0, "perplexity"] == 5.0 and res.rows.loc[0, "n_tokens"] <= 40


def test_label_uses_kun_prompt_cleans_and_filters_keywords():
    eng = ScriptedEngine(replies=["什么是复利？  ", "请总结这篇文章的摘要。", "", "什么是蜜蜂？     \n -> 什么是", "坏\ufffd字"])
    res = stages.label(docs(["甲", "乙", "丙", "丁", "戊"]), eng, CFG)
    assert res.rows["instruction"].tolist() == ["什么是复利？", "什么是蜜蜂？"]
    assert dict(zip(res.dropped["doc_id"], res.dropped["reason"])) == {"d1": "banned_keyword", "d2": "empty_generation", "d4": "broken_text"}
    assert res.dropped.set_index("doc_id").loc["d4", "detail"].startswith("instruction holds U+FFFD")
    assert eng.prompts[0] == prompts.render(eng.tokenizer, "请直接告诉我，以下回复最有可能对应的指令是什么：\n甲")


def test_stage_fails_loudly_when_the_model_returns_nothing():
    with pytest.raises(EngineError, match="empty text for all 2 prompts"):
        stages.label(docs(["甲", "乙"]), ScriptedEngine(replies=["", ""]), CFG)


def test_score_keeps_every_row_with_its_score():
    pairs = docs(["甲", "乙", "丙"]).assign(instruction=["好指令", "坏指令", "中指令"])
    eng = ScriptedEngine(probs=[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    res = stages.score(pairs, eng, CFG)
    assert res.rows["score"].tolist() == [0.9, 0.2, 0.5] and res.rows["keep"].tolist() == [True, False, True]
    assert res.stats["kept"] == 2 and sum(res.stats["histogram"].values()) == 3 and res.dropped.empty
    assert eng.prompts[0].count("指令: 【好指令】 回复：") == 1  # the instruction alone, not the text


def test_free_text_scoring_counts_parse_failures():
    pairs = docs(["甲", "乙", "丙"]).assign(instruction=["a", "b", "c"])
    cfg = parse_config({**CFG.model_dump(), "score": {"method": "kun_freetext"}}, env={})
    res = stages.score(pairs, ScriptedEngine(replies=["【好】", "【差】", "我不知道"]), cfg)
    assert res.rows["keep"].tolist() == [True, False, False] and res.stats["parse_failures"] == 1


def test_polish_applies_output_filters_and_dedup():
    scored = docs(["甲文", "乙文", "丙文", "丁文", "戊文", "己文"]).assign(
        instruction="问题", score=[0.9] * 5 + [0.1], keep=[True] * 5 + [False], score_method="kun_choice")
    good = "复利是把每一期的利息计入本金，下一期一起计息。"
    eng = ScriptedEngine(replies=[good, "太短了", "作为一个AI，" + good, good, "好的" * 8 + good])
    res = stages.polish(scored, eng, CFG)
    assert res.rows[["doc_id", "output"]].values.tolist() == [["d0", good]]
    assert dict(zip(res.dropped["doc_id"], res.dropped["reason"])) == {
        "d1": "too_short", "d2": "banned_keyword", "d3": "duplicate_output", "d4": "repeated_phrase"}
    assert res.stats["not_kept_by_score"] == 1
    assert eng.prompts[0] == prompts.render(eng.tokenizer, " 已知：\n甲文,请回答:问题")


def test_an_empty_partition_flows_through_every_stage():
    eng = ScriptedEngine()
    empty = docs([])
    filtered = stages.filter_corpus(empty, eng.tokenizer, eng, CFG)
    labeled = stages.label(filtered.rows, eng, CFG)
    scored = stages.score(labeled.rows, eng, CFG)
    polished = stages.polish(scored.rows, eng, CFG)
    for res in (filtered, labeled, scored, polished):
        assert res.rows.empty and res.dropped.empty
    assert {"instruction", "score", "keep"} <= set(scored.rows.columns)
    assert {"instruction", "output", "score"} <= set(polished.rows.columns)
