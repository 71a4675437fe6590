from kun_dagster.text import (
    clean_text,
    cut_at_whitespace_run,
    dedup_key,
    find_keyword,
    repair_repeated_lines,
    starts_with_repeated_phrase,
    strip_stop_strings,
)


def test_clean_text_keeps_chinese_punctuation_and_drops_controls():
    raw = "  标题：你好，世界！\r\n\r\n\r\n\r\n第二段\x00\u200b。  \n"
    assert clean_text(raw) == "标题：你好，世界！\n\n第二段。"


def test_keyword_and_whitespace_rules():
    assert find_keyword("请根据上文回答", ["新闻", "根据"]) == "根据"
    assert find_keyword("什么是复利？", ["新闻", "根据"]) is None
    assert cut_at_whitespace_run("什么是排他性许可？ \n \n   -> 什么是", 5) == "什么是排他性许可？"
    assert cut_at_whitespace_run("a    b", 5) == "a    b"


def test_repeated_lines_and_phrases():
    assert repair_repeated_lines("甲\n乙\n甲\n\n乙\n丙") == "甲\n乙\n\n丙"
    assert starts_with_repeated_phrase("好的好的好的好的好的好的，然后", 6)
    assert not starts_with_repeated_phrase("好的好的好的好的好的，然后", 6)
    assert not starts_with_repeated_phrase("复利是指把利息计入本金。", 6)


def test_dedup_key_ignores_whitespace_only():
    assert dedup_key("复利 是\n指") == dedup_key("复利是指")
    assert dedup_key("复利是指") != dedup_key("复利是")


def test_stop_strings():
    assert strip_stop_strings("指令内容<|endoftext|>垃圾", ("<|endoftext|>", "</s>")) == "指令内容"
    assert strip_stop_strings("a</s>b<|endoftext|>", ("<|endoftext|>", "</s>")) == "a"
