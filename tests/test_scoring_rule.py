"""The default scorer's number means Kun's rule, on the demo's own chat model (the transformers
engine): where the model answers in the format the rows are scored by probability, and that
decision is the one Kun's generate-and-parse makes."""

import numpy as np
import pandas as pd
import pytest

from kun_dagster import scoring, stages
from kun_dagster.config import parse_config
from kun_dagster.stages import StageContext

from .test_stages import CFG, docs

pytestmark = pytest.mark.slow

INSTRUCTIONS = [
    "什么是复利？请举例说明。",
    "如何提高睡眠质量？",
    "简述光合作用的过程。",
    "请介绍一下端午节的习俗。",
    "为什么天空是蓝色的？",
    "如何挑选新鲜的鱼？",
    "解释一下什么是惯性。",
    "写一段鼓励考生的话。",
    "什么是云计算？",
    "如何预防感冒？",
    "你认识黄丰吗？",
    "帮我搜索一下“李四”的百度百科。",
    "这个怎么办？",
    "继续。",
    "王小明现在住在哪里？",
    "什么是民窿？  \n\n什么是民窿？",
    "教育具有哪些社会发展功能？\n \n \n \n \n \n \n教育具有哪些社会发展功能？",
    "什么是排他性许可？ \n \n   -> 什么是  \n     什么是  \n",
    "简述？",
    "怎样？",
    "给进行？",
    "如何做适合自己的跌倒一个？",
    "请写好吃的米饭安全地",
    "牛顿的话。",
    "什么是高血压？",
    "简述什么是云计算？",
    "写一段几个提高专注惯性。",
    "为什么说作用？",
]


def _pairs():
    return docs(["正文。"] * len(INSTRUCTIONS)).assign(instruction=INSTRUCTIONS)


def _kept(rows) -> pd.Series:
    return pd.Series(scoring.keep(rows["score"].to_numpy(dtype=float), CFG.score.threshold), index=rows.index)


def _cfg(**changes):
    raw = CFG.model_dump()
    for key, value in changes.items():
        section, name = key.split(".")
        raw[section][name] = value
    return parse_config(raw, env={})


def test_a_model_that_answers_in_the_format_is_scored_by_probability_as_kuns_rule_decides(chat_engine):
    choice = stages.score(_pairs(), StageContext(_cfg(**{"sampling.max_tokens": 16}), engine=chat_engine))
    rows = choice.rows
    assert (rows["score_rule"] == "probability").all() and choice.stats["fallback_rate"] == 0
    keep = _kept(rows)
    assert rows["answer_mass"].min() >= 0.5 and keep.any() and not keep.all()
    # greedy free text opens with the more likely answer: the same decision on every row it parses
    greedy = stages.score(
        _pairs(),
        StageContext(_cfg(**{"score.method": "kun_freetext", "sampling.temperature": 0.0, "sampling.max_tokens": 16}), engine=chat_engine),
    ).rows
    parsed = greedy["score"].notna()
    assert parsed.mean() >= 0.9
    ties = (rows["p_good"] - rows["p_bad"]).abs() < 1e-3 * rows["answer_mass"]
    same = (keep == _kept(greedy))[parsed & ~ties]
    assert same.all(), rows.loc[same.index[~same], ["instruction", "p_good", "p_bad"]]
    # Kun's own setting samples one reply at temperature 0.5: agreement near what that noise predicts
    sampled = stages.score(
        _pairs(), StageContext(_cfg(**{"score.method": "kun_freetext", "sampling.max_tokens": 16}), engine=chat_engine)
    ).rows
    ok = sampled["score"].notna()
    g, b = rows["p_good"] ** 2, rows["p_bad"] ** 2
    predicted = np.maximum(g, b) / (g + b)
    observed = (keep == _kept(sampled))[ok].mean()
    assert observed >= predicted[ok].mean() - 0.25, (observed, predicted[ok].mean())


def test_rows_under_min_answer_mass_fall_back_to_free_text_on_a_real_model(chat_engine):
    """The fallback on a real engine: with the bound above every row's mass, every row is generated
    and parsed in the same step, and still records the mass that sent it there."""
    cfg = _cfg(**{"score.min_answer_mass": 1.0, "sampling.max_tokens": 16})  # no row can reach it
    res = stages.score(_pairs(), StageContext(cfg, engine=chat_engine))
    assert (res.rows["score_rule"] == "freetext").all() and res.stats["fallback_rate"] == 1.0
    assert res.rows["score_reply"].notna().all() and res.rows["answer_mass"].notna().all()
