import math

import numpy as np
import pandas as pd
import pytest

from kun_dagster import prompts, scoring, stages
from kun_dagster.config import parse_config
from kun_dagster.llm import EngineError
from kun_dagster.stages import StageContext

from .fakes import ScriptedEngine

CFG = parse_config(
    {
        "sources": [{"name": "web", "uri": "x", "format": "jsonl"}],
        "seed": {"uri": "s"},
        "filter": {"max_tokens": 40, "perplexity_max": 50},
        "tags": "off",  # the scripted engine answers the stages' own prompts; tags: tests/test_rounds.py
    },
    env={},
)


def kept(rows, cfg=CFG) -> list[bool]:
    """What polish keeps of scored rows: score.threshold is applied there, not by the scorer."""
    return scoring.keep(rows["score"].to_numpy(dtype=float), cfg.score.threshold).tolist()


def docs(texts):
    return pd.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(len(texts))],
            "source": "web",
            "shard": 0,
            "file": "f.jsonl",
            "row": range(1, len(texts) + 1),
            "title": None,
            "text": texts,
        }
    )


def test_filter_corpus_drops_with_reasons_and_keeps_order():
    eng = ScriptedEngine(ppl=[5.0, 80.0, math.nan])
    df = docs(["复利是指利息计入本金。", "\x00  \n", "复利是指利息计入本金。 ", "长" * 300, "蜜蜂的分工很细。", "乱码乱码。"])
    res = stages.filter_corpus(df, StageContext(CFG, engine=eng, tokenizer=eng.tokenizer))
    assert res.rows["doc_id"].tolist() == ["d0"]
    assert dict(zip(res.dropped["doc_id"], res.dropped["reason"])) == {
        "d1": "empty_after_clean",
        "d2": "duplicate_text",
        "d3": "too_many_tokens",
        "d4": "high_perplexity",
        "d5": "perplexity_undefined",
    }
    assert res.dropped.set_index("doc_id").loc["d2", "detail"] == "same text as d0"
    assert res.stats["rows_in"] == 6 and res.stats["rows_out"] == 1 and res.stats["dropped"]["duplicate_text"] == 1
    assert res.rows.loc[0, "perplexity"] == 5.0 and res.rows.loc[0, "n_tokens"] <= 40


def test_label_uses_kun_prompt_keeps_the_raw_instruction_and_filters_keywords():
    eng = ScriptedEngine(replies=["什么是复利？  ", "请总结这篇文章的摘要。", "", "什么是蜜蜂？     \n -> 什么是", "坏\ufffd字"])
    res = stages.label(docs(["甲", "乙", "丙", "丁", "戊"]), StageContext(CFG, engine=eng))
    # as written, less trailing whitespace: Kun scores before it cuts whitespace runs and repeated lines
    assert res.rows["instruction"].tolist() == ["什么是复利？", "什么是蜜蜂？     \n -> 什么是"]
    assert dict(zip(res.dropped["doc_id"], res.dropped["reason"])) == {
        "d1": "banned_keyword",
        "d2": "empty_generation",
        "d4": "broken_text",
    }
    assert res.dropped.set_index("doc_id").loc["d4", "detail"].startswith("instruction holds U+FFFD")
    assert eng.prompts[0] == prompts.render(eng.tokenizer, "请直接告诉我，以下回复最有可能对应的指令是什么：\n甲")


def test_stage_fails_loudly_when_the_model_returns_nothing():
    n = stages.common.ALL_EMPTY_MIN
    with pytest.raises(EngineError, match=f"empty text for all {n} prompts"):
        stages.label(docs([f"文{i}" for i in range(n)]), StageContext(CFG, engine=ScriptedEngine(replies=[""] * n)))
    # two empty replies in a small partition are a weak model's chance: quarantined, counted; the
    # step's tally (every partition it serves) is what fails when nothing at all had text
    res = stages.label(docs(["甲", "乙"]), StageContext(CFG, engine=ScriptedEngine(replies=["", ""])))
    assert res.dropped["reason"].tolist() == ["empty_generation"] * 2 and not len(res.rows)
    from kun_dagster.llm.base import Tally

    tally = Tally(ScriptedEngine(replies=["", "", "", "什么是复利？"]))
    stages.label(docs(["甲", "乙"]), StageContext(CFG, engine=tally))
    with pytest.raises(EngineError, match="empty text for all 2 prompts of the step"):
        tally.require_text("labeled_pairs")
    stages.label(docs(["丙", "丁"]), StageContext(CFG, engine=tally))
    tally.require_text("labeled_pairs")  # one generation of the step had text
    assert (tally.generations, tally.with_text) == (4, 1)


def test_score_reads_probabilities_where_the_model_answers_in_the_format():
    pairs = docs(["甲", "乙", "丙"]).assign(instruction=["好指令", "坏指令", "中指令"])
    eng = ScriptedEngine(probs=[[0.81, 0.09], [0.14, 0.56], [0.3, 0.3]])  # answer mass 0.9, 0.7, 0.6
    res = stages.score(pairs, StageContext(CFG, engine=eng))
    rows = res.rows
    assert rows["score"].round(6).tolist() == [0.9, 0.2, 0.5] and kept(rows) == [True, False, True] and "keep" not in rows
    assert rows["answer_mass"].round(6).tolist() == [0.9, 0.7, 0.6] and rows["p_good"].round(6).tolist() == [0.81, 0.14, 0.3]
    assert set(rows["score_rule"]) == {"probability"} and rows["score_reply"].isna().all()
    assert res.stats["scored_by"] == {"probability": 3, "freetext": 0} and res.stats["fallback_rate"] == 0
    assert sum(res.stats["histogram"].values()) == 3 and res.dropped.empty
    assert eng.prompts[0].count("指令: 【好指令】 回复：") == 1  # the instruction alone, not the text
    assert eng.prompts[0].endswith("<|im_start|>assistant\n")  # the answers themselves open the reply


def test_rows_the_model_would_not_answer_in_the_format_are_scored_by_kuns_free_text_rule():
    """A model with log P(【好】) around -59 would write neither answer: its P(【好】) / P(【差】)
    ratio says nothing, so those rows are generated and parsed as Kun does, in the same step."""
    pairs = docs(["甲", "乙", "丙", "丁"]).assign(instruction=["a", "b", "c", "d"])
    little = [math.exp(-59), math.exp(-79)]  # normalised over the two answers this would be 1.0
    eng = ScriptedEngine(probs=[little, [0.7, 0.2], little, little], replies=["【差】这条指令含糊。", "嗯【好】", "随便说说"])
    res = stages.score(pairs, StageContext(CFG, engine=eng))
    rows = res.rows
    assert rows["score_rule"].tolist() == ["freetext", "probability", "freetext", "freetext"]
    assert rows["score"].tolist()[0] == 0.0 and rows["score"].tolist()[2] == 1.0 and math.isnan(rows["score"].tolist()[3])
    assert kept(rows) == [False, True, True, False]
    assert rows["score_reply"].tolist()[:3] == ["【差】这条指令含糊。", None, "嗯【好】"]
    assert rows.loc[0, "answer_mass"] < 1e-20  # recorded, so the row says why it fell back
    assert res.stats["scored_by"] == {"probability": 1, "freetext": 3} and res.stats["fallback_rate"] == 0.75
    assert res.stats["parse_failures"] == 1
    assert eng.prompts[4:] == [eng.prompts[i] for i in (0, 2, 3)]  # free text asked for exactly the low-mass rows


def test_min_answer_mass_zero_scores_every_row_by_probability():
    pairs = docs(["甲"]).assign(instruction=["a"])
    cfg = parse_config({**CFG.model_dump(), "score": {"min_answer_mass": 0.0}}, env={})
    res = stages.score(pairs, StageContext(cfg, engine=ScriptedEngine(probs=[[math.exp(-59), math.exp(-79)]])))
    assert res.rows["score_rule"].tolist() == ["probability"] and res.rows["score"].tolist()[0] == pytest.approx(1.0)


def test_the_sampled_decision_is_kuns_rule_in_distribution():
    """decision: sampled draws the verdict one reply at the sampling temperature would give, from
    the two answers' probabilities: P(keep) = q = P(【好】)^2 / (P(【好】)^2 + P(【差】)^2) at T 0.5, the
    mode's 0/1 elsewhere. Rows at P(【好】) / mass = 0.6, so q = 0.692: the mode keeps all of them."""
    n = 3000
    pairs = docs(["文"] * n).assign(instruction=[f"指令{i}" for i in range(n)])
    probs = [[0.54, 0.36]] * n
    cfg = parse_config({**CFG.model_dump(), "score": {"decision": "sampled"}}, env={})
    rows = stages.score(pairs, StageContext(cfg, engine=ScriptedEngine(probs=probs))).rows
    assert set(rows["score"]) == {0.0, 1.0} and set(rows["score_rule"]) == {"probability"}
    assert abs(rows["score"].mean() - 0.36 / 0.52) < 0.03  # sd 0.008
    assert rows["p_good"].round(6).eq(0.54).all()  # the probabilities stay on the row
    mode = stages.score(pairs, StageContext(CFG, engine=ScriptedEngine(probs=probs))).rows
    assert all(kept(mode)) and (mode["score"].round(6) == 0.6).all()
    # seeded per row by its prompt: the same verdicts in another batch, and another seed draws others
    again = stages.score(pairs.iloc[::-1].reset_index(drop=True), StageContext(cfg, engine=ScriptedEngine(probs=probs))).rows
    assert again["score"].tolist()[::-1] == rows["score"].tolist()
    other = parse_config({**cfg.model_dump(), "sampling": {"seed": 1}}, env={})
    assert stages.score(pairs, StageContext(other, engine=ScriptedEngine(probs=probs))).rows["score"].tolist() != rows["score"].tolist()
    # humpback: a digit drawn from the five, at T 0.5 (p^2): 5 then 4 about 64% / 36% of the time
    cfg_h = parse_config({**CFG.model_dump(), "score": {"method": "humpback_choice", "decision": "sampled"}}, env={})
    got = stages.score(pairs, StageContext(cfg_h, engine=ScriptedEngine(probs=[[0.0, 0.0, 0.0, 0.3, 0.4]] * n))).rows["score"]
    assert set(got) == {4.0, 5.0} and abs((got == 5.0).mean() - 0.16 / 0.25) < 0.03


def test_a_draw_from_vanishing_probabilities_still_follows_their_ratio():
    """In log space: P(【好】) = e^-80 against e^-81 is a 73 / 27 draw at T 1, not a division by 0."""
    p = np.exp(np.array([[-80.0, -81.0]] * 2000))
    u = scoring.uniforms(0, [f"p{i}" for i in range(2000)])
    picked = scoring.drawn(p, u, 1.0)
    assert abs((picked == 0).mean() - 1 / (1 + math.exp(-1))) < 0.03
    assert (scoring.drawn(p, u, 0.0) == 0).all() and 0 <= u.min() and u.max() < 1


def test_free_text_scoring_counts_parse_failures():
    pairs = docs(["甲", "乙", "丙"]).assign(instruction=["a", "b", "c"])
    cfg = parse_config({**CFG.model_dump(), "score": {"method": "kun_freetext"}}, env={})
    res = stages.score(pairs, StageContext(cfg, engine=ScriptedEngine(replies=["【好】", "【差】", "我不知道"])))
    assert kept(res.rows, cfg) == [True, False, False] and res.stats["parse_failures"] == 1
    assert res.stats["fallback_rate"] is None and res.rows["answer_mass"].isna().all()


def test_the_scorer_sees_the_raw_instruction_and_polish_cleans_it_after():
    """Kun's order, with the point prompt's own 【差】 examples: the scorer must see the blank lines
    and the repeated question it was taught to reject; the cleaning comes after."""
    raw = [
        "什么是民窿？  \n\n什么是民窿？",
        "教育具有哪些社会发展功能？\n \n \n \n \n \n \n教育具有哪些社会发展功能？",
        "什么是排他性许可？ \n \n   -> 什么是  \n     什么是  \n",
    ]
    labeler = ScriptedEngine(replies=raw)
    labeled = stages.label(docs(["甲文", "乙文", "丙文"]), StageContext(CFG, engine=labeler))
    assert labeled.rows["instruction"].tolist() == [r.rstrip() for r in raw]
    scorer = ScriptedEngine(probs=[[0.3, 0.6]] * 2 + [[0.6, 0.3]])
    scored = stages.score(labeled.rows, StageContext(CFG, engine=scorer))
    for prompt, r in zip(scorer.prompts, raw):
        assert f"指令: 【{r.rstrip()}】 回复：" in prompt
    assert kept(scored.rows) == [False, False, True]
    answer = "排他性许可是指在约定范围内只许可一家被许可人使用的许可方式。"
    polisher = ScriptedEngine(replies=[answer])
    polished = stages.polish(scored.rows, StageContext(CFG, engine=polisher))
    assert polished.rows["instruction"].tolist() == ["什么是排他性许可？"]  # cut at the whitespace run, after scoring
    assert polisher.prompts[0] == prompts.render(polisher.tokenizer, " 已知：\n丙文,请回答:什么是排他性许可？")


def test_polish_repairs_instructions_as_kun_does_before_the_answer_prompt():
    """Kun's deplicate.py: the longest repeated line where it opens the instruction, else the row
    is dropped (repeated_instruction), and never sent to the chat model."""
    answer = "复利是把每一期的利息计入本金，下一期一起计息的方法。"
    scored = docs(["甲文", "乙文", "丙文"]).assign(
        instruction=["什么是复利？\n什么是复利？\n请举例。", "请介绍北京。\n北京有什么？\n北京有什么？", "什么是单利？"],
        score=0.9,
        score_method="kun_choice",
        score_rule="probability",
    )
    eng = ScriptedEngine(replies=[answer, answer.replace("复利", "单利")])
    res = stages.polish(scored, StageContext(CFG, engine=eng))
    assert res.rows["instruction"].tolist() == ["什么是复利？", "什么是单利？"]
    assert dict(zip(res.dropped["doc_id"], res.dropped["reason"])) == {"d1": "repeated_instruction"}
    assert res.dropped["detail"].tolist() == ["its longest repeated line does not open it (Kun drops it)"]
    assert len(eng.prompts) == 2 and "请回答:什么是复利？" in eng.prompts[0]


def test_humpback_scores_the_pair_with_its_prompt_and_keeps_at_five():
    pairs = docs(["甲文", "乙文", "丙文", "丁文"]).assign(instruction=["问一", "问二", "问三", "问四"])
    cfg = parse_config({**CFG.model_dump(), "score": {"method": "humpback_choice"}}, env={})
    assert cfg.score.threshold == 5
    five = [0.02, 0.02, 0.06, 0.3, 0.5]  # most likely 5, though the expected score is 4.3
    four = [0.0, 0.05, 0.1, 0.45, 0.3]
    tiny = [1e-9] * 5
    eng = ScriptedEngine(probs=[five, four, tiny, tiny], replies=["理由：答案完整清晰，专业。\n得分：5", "写得不错。\n得分：4"])
    res = stages.score(pairs, StageContext(cfg, engine=eng))
    rows = res.rows
    assert rows["score"].tolist() == [5.0, 4.0, 5.0, 4.0] and kept(rows, cfg) == [True, False, True, False]
    assert rows["score_rule"].tolist() == ["probability", "probability", "freetext", "freetext"]
    assert rows["p_good"].isna().all() and rows["answer_mass"].round(6).tolist()[:2] == [0.9, 0.9]
    assert "得分：<评分>" in eng.prompts[0] and "指令：问一\n\n答案：甲文" in eng.prompts[0]
    # the probability path reads the replies that open with the score ('得分：N', the prompt's own
    # format), after the plain assistant turn: their mass is how often the model skips the reasons
    assert eng.prompts[0] == prompts.render(eng.tokenizer, prompts.humpback_user("问一", "甲文"))
    assert eng.prompts[4:] == eng.prompts[2:4]  # the unsure rows write their reasons, then the score


def test_humpback_free_text_parses_the_last_score():
    from kun_dagster.scoring import parse_humpback_reply

    assert parse_humpback_reply("得分：3\n再想想，得分：5") == 5.0
    assert parse_humpback_reply("Reasoning...\nScore: 4") == 4.0
    assert math.isnan(parse_humpback_reply("得分：10")) and math.isnan(parse_humpback_reply("很好"))


def test_polish_applies_output_filters_and_dedup():
    scored = docs(["甲文", "乙文", "丙文", "丁文", "戊文", "己文"]).assign(
        instruction="问题", score=[0.9] * 5 + [0.1], score_method="kun_choice", score_rule="probability"
    )
    good = "复利是把每一期的利息计入本金，下一期一起计息。"
    eng = ScriptedEngine(replies=[good, "太短了", "作为一个AI，" + good, good, "好的" * 8 + good])
    res = stages.polish(scored, StageContext(CFG, engine=eng))
    assert res.rows[["doc_id", "output"]].values.tolist() == [["d0", good]]
    assert dict(zip(res.dropped["doc_id"], res.dropped["reason"])) == {
        "d1": "too_short",
        "d2": "banned_keyword",
        "d3": "duplicate_output",
        "d4": "repeated_phrase",
    }
    assert res.stats["not_kept_by_score"] == 1 and res.stats["keep_rate"] == round(5 / 6, 4)
    # a new threshold changes what polish keeps, from the same scores: nothing is re-scored
    strict = parse_config({**CFG.model_dump(), "score": {"threshold": 0.95}}, env={})
    assert stages.polish(scored, StageContext(strict, engine=ScriptedEngine())).stats["not_kept_by_score"] == 6
    assert eng.prompts[0] == prompts.render(eng.tokenizer, " 已知：\n甲文,请回答:问题")


def test_answers_are_released_as_generated_and_a_looping_one_is_dropped():
    """Kun never edits an answer: repeated lines in code and a poem's refrain stay; an answer that
    loops on one sentence reaches the repeated-phrase filter whole and is dropped, not repaired."""
    code = "def sign(x):\n    if x > 0:\n        return 1\n    else:\n        return -1\n\ndef abs_(x):\n    if x < 0:\n        return -x\n    else:\n        return x"
    js = "function f(a) {\n  if (a) {\n    return 1;\n  }\n  return 0;\n}"
    poem = "春眠不觉晓，\n处处闻啼鸟。\n春眠不觉晓，\n夜来风雨声。\n春眠不觉晓，\n花落知多少。"
    loop = "这个问题的答案是复利。\n" * 8
    scored = docs(["甲文", "乙文", "丙文", "丁文"]).assign(
        instruction="问题", score=0.9, score_method="kun_choice", score_rule="probability"
    )
    res = stages.polish(scored, StageContext(CFG, engine=ScriptedEngine(replies=["\n" + code + "\n", js, poem, loop])))
    assert dict(zip(res.rows["doc_id"], res.rows["output"])) == {"d0": code, "d1": js, "d2": poem}
    assert dict(zip(res.dropped["doc_id"], res.dropped["reason"])) == {"d3": "repeated_phrase"}


def test_an_empty_partition_flows_through_every_stage():
    eng = ScriptedEngine()
    empty = docs([])
    filtered = stages.filter_corpus(empty, StageContext(CFG, engine=eng, tokenizer=eng.tokenizer))
    labeled = stages.label(filtered.rows, StageContext(CFG, engine=eng))
    scored = stages.score(labeled.rows, StageContext(CFG, engine=eng))
    polished = stages.polish(scored.rows, StageContext(CFG, engine=eng))
    for res in (filtered, labeled, scored, polished):
        assert res.rows.empty and res.dropped.empty
    assert {"instruction", "score", "answer_mass", "score_rule"} <= set(scored.rows.columns)
    assert {"instruction", "output", "score"} <= set(polished.rows.columns)
