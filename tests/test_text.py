import pytest

from kun_dagster.text import (
    clean_text,
    dedup_key,
    find_keyword,
    repair_instruction,
    starts_with_repeated_phrase,
    strip_stop_strings,
)


def test_clean_text_keeps_chinese_punctuation_and_drops_controls():
    raw = "  标题：你好，世界！\r\n\r\n\r\n\r\n第二段\x00\u200b。  \n"
    assert clean_text(raw) == "标题：你好，世界！\n\n第二段。"


def test_keyword_and_whitespace_rules():
    assert find_keyword("请根据上文回答", ["新闻", "根据"]) == "根据"
    assert find_keyword("什么是复利？", ["新闻", "根据"]) is None


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        # a run of 5+ whitespace characters: cut there (no repeated-line check after a cut)
        ("什么是排他性许可？ \n \n   -> 什么是  \n     什么是  \n", "什么是排他性许可？"),
        ("教育具有哪些社会发展功能？\n \n \n \n \n \n \n教育具有哪些社会发展功能？", "教育具有哪些社会发展功能？"),
        ("a    b", "a    b"),  # four spaces are not a run
        # a repeated line that opens the instruction: the instruction becomes that line
        ("什么是民窿？  \n\n什么是民窿？", "什么是民窿？"),
        ("什么是复利？\n什么是复利？\n请举例。", "什么是复利？"),
        ("短\n短\n长一点的问题？\n长一点的问题？", None),  # the longest repeated line does not open it: dropped
        ("请介绍北京。\n北京有什么？\n北京有什么？", None),
        ("如何学习？\n多读书。\n多练习。", "如何学习？\n多读书。\n多练习。"),  # no repeat: as it is
        ("\n\n\n\n\n什么是复利？", "什么是复利？"),  # stripped first: Kun's cut at 0 would leave nothing
        ("      ", ""),
    ],
)
def test_instruction_repair_is_kuns(raw, want):
    assert repair_instruction(raw, 5) == want


def test_repeated_phrases():
    assert starts_with_repeated_phrase("好的好的好的好的好的好的，然后", 6)
    assert not starts_with_repeated_phrase("好的好的好的好的好的，然后", 6)
    assert not starts_with_repeated_phrase("复利是指把利息计入本金。", 6)
    long = "复利是把每一期的利息计入本金，下一期连同本金一起计息的计算方法，银行存款、贷款和各类理财产品都常用它来计算收益。" * 6
    assert len(long) > 6 * 50 and starts_with_repeated_phrase(long, 6)  # a sentence of any length (Kun's rule)
    assert not starts_with_repeated_phrase("------" * 3 + "标题", 6)  # one character over and over: not a phrase


def test_dedup_key_ignores_whitespace_only():
    assert dedup_key("复利 是\n指") == dedup_key("复利是指")
    assert dedup_key("复利是指") != dedup_key("复利是")


def test_stop_strings():
    assert strip_stop_strings("指令内容<|endoftext|>垃圾", ("<|endoftext|>", "</s>")) == "指令内容"
    assert strip_stop_strings("a</s>b<|endoftext|>", ("<|endoftext|>", "</s>")) == "a"
