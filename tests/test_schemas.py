"""Each dataset version's Pandera schema passes a good partition and fails a crafted bad one, with
the failing check named and the failing rows sampled (kun_dagster.schemas)."""

import numpy as np
import pandas as pd
import pytest

from kun_dagster import dataset, schemas

from .test_stages import CFG  # max_tokens 40, kun_choice scores in [0, 1]


def raw(n=3):
    return pd.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(n)],
            "source": "web",
            "shard": 0,
            "file": "f.jsonl",
            "row": range(1, n + 1),
            "title": None,
            "text": [f"第{i}段正文。" for i in range(n)],
        }
    )


def filtered(n=3):
    return raw(n).assign(n_tokens=[5] * n, perplexity=[3.0] * n)


def labeled(n=3):
    return filtered(n).assign(instruction=["什么是复利？"] * n, label_tokens=[6] * n, label_finish=["stop"] * n)


def scored(n=3):
    return labeled(n).assign(
        p_good=[0.81] * n,
        p_bad=[0.09] * n,
        answer_mass=[0.9] * n,
        score=[0.9] * n,
        score_rule="probability",
        score_method="kun_choice",
        score_reply=None,
    )


def polished(n=3):
    return labeled(n).assign(
        score=[0.9] * n,
        score_method="kun_choice",
        score_rule="probability",
        output=["复利就是利息也计算利息的方法。" * 2] * n,
        instruction_truncated=False,
        polish_tokens=[30] * n,
        polish_finish="stop",
        task_minor=[["kun:web"]] * n,  # tags off in CFG: the constants
        domain="通用",
        task_minor_rule="off",
        domain_rule="off",
    )


def records(n=3):
    return dataset.records(polished(n), CFG, "kun-label", "kun-chat")


GOOD = {
    "raw_corpus": raw,
    "filtered_corpus": filtered,
    "labeled_pairs": labeled,
    "scored_pairs": scored,
    "polished_pairs": polished,
    "instruction_dataset": records,
}


def _set(df, column, i, value):
    df = df.copy()
    df[column] = df[column].astype(object)
    df.at[i, column] = value
    return df


BAD = [
    ("raw_corpus", lambda: _set(raw(), "doc_id", 2, "d0"), "doc_id: field_uniqueness"),
    ("raw_corpus", lambda: _set(raw(), "text", 1, "  \n"), "text: str_contains"),
    ("filtered_corpus", lambda: _set(filtered(), "n_tokens", 0, 41), "n_tokens: less_than_or_equal_to(40)"),
    ("filtered_corpus", lambda: _set(filtered(), "perplexity", 1, -2.0), "perplexity: greater_than(0)"),
    ("labeled_pairs", lambda: _set(labeled(), "instruction", 0, "请总结这篇文章"), "instruction: no banned keyword (新闻、材料"),
    ("labeled_pairs", lambda: _set(labeled(), "label_tokens", 2, -1), "label_tokens: greater_than_or_equal_to(0)"),
    ("scored_pairs", lambda: _set(scored(), "score", 0, 1.7), "score: in_range(0.0, 1.0)"),
    ("scored_pairs", lambda: _set(scored(), "answer_mass", 1, 1.5), "answer_mass: less_than_or_equal_to"),
    ("scored_pairs", lambda: _set(scored(), "score_rule", 2, "guess"), "score_rule: isin"),
    ("polished_pairs", lambda: _set(polished(), "output", 1, "太短了"), "output: str_length(20"),
    (
        "polished_pairs",
        lambda: _set(polished(), "output", 2, "作为一个人工智能模型，我认为复利就是利息计算利息。"),
        "output: no banned keyword (作为、根据",
    ),
    ("instruction_dataset", lambda: _set(records(), "task_type", 0, {"major": ["问答"]}), "task_type: coig_task_type"),
    ("instruction_dataset", lambda: records().assign(extra=1), "column_in_schema"),
    ("instruction_dataset", lambda: _set(records(), "domain", 1, ["医学"]), "domain: in the taxonomy (tags off"),
    ("polished_pairs", lambda: _set(polished(), "task_minor", 0, ["翻译"]), "task_minor: in the taxonomy (tags off"),
    # keywords hidden by a zero-width space or full-width digits are the keywords
    ("labeled_pairs", lambda: _set(labeled(), "instruction", 0, "请总结这篇新\u200b闻"), "instruction: no banned keyword"),
    (
        "polished_pairs",
        lambda: _set(polished(), "output", 0, "据统计，２０２３年的复利计算方法与往年一致，没有变化。"),
        "output: no banned keyword",
    ),
    # the release holds the threshold and the keywords now in force, whatever its inputs were made under
    ("instruction_dataset", lambda: _set(records(), "score", 0, 0.1), "score: greater_than_or_equal_to(0.5)"),
    ("instruction_dataset", lambda: _set(records(), "instruction", 1, "这篇新闻讲了什么？"), "instruction: no banned keyword"),
]


@pytest.mark.parametrize("asset", list(GOOD))
def test_a_good_partition_passes(asset):
    v = schemas.validate(asset, GOOD[asset](), CFG)
    assert v.passed and v.rows == 3, v.by_check


def test_an_empty_partition_passes():
    assert schemas.validate("raw_corpus", pd.DataFrame(columns=raw().columns), CFG).passed


@pytest.mark.parametrize("asset,bad,check", BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_a_crafted_bad_partition_fails_naming_the_check(asset, bad, check):
    v = schemas.validate(asset, bad(), CFG)
    assert not v.passed
    assert any(check in k for k in v.by_check), v.by_check
    assert v.failures == sum(v.by_check.values())


def test_failing_rows_are_sampled_and_doc_ids_checked_across_batches():
    df = _set(raw(4), "text", 2, " ")
    v = schemas.validate("raw_corpus", df, CFG)
    assert v.sample["doc_id"].tolist() == ["d2"]
    again = schemas.validate("raw_corpus", [raw(2), raw(3).iloc[1:]], CFG)  # d1 in both batches
    assert again.by_check == {"doc_id: unique across batches": 1} and again.rows == 4


def test_score_scale_follows_the_method():
    from kun_dagster.config import parse_config

    humpback = parse_config(
        {"sources": [{"name": "web", "uri": "x", "format": "jsonl"}], "seed": {"uri": "s"}, "score": {"method": "humpback_choice"}}, env={}
    )
    five = scored().assign(score=[4.6, 5.0, np.nan], score_method="humpback_choice")
    assert schemas.validate("scored_pairs", five, humpback).passed
    assert not schemas.validate("scored_pairs", five, CFG).passed
