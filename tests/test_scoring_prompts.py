import math

import numpy as np

from kun_dagster import prompts, scoring
from kun_dagster.training import CHATML_TEMPLATE, is_multiple_choice, label_examples, sft_features

from .fakes import tokenizer


def test_kun_reply_parse_and_keep():
    assert scoring.parse_kun_reply("答：【好】") == 1.0
    assert scoring.parse_kun_reply("【好】还是【差】") == 0.0
    assert math.isnan(scoring.parse_kun_reply("不好说"))
    assert scoring.keep(np.array([0.7, math.nan, 0.2]), 0.5).tolist() == [True, False, False]


def test_choice_scores():
    probs = np.array([[0.8, 0.2], [0.1, 0.9]])
    assert scoring.kun_choice_score(probs).tolist() == [0.8, 0.1]
    five = np.array([[0, 0, 0, 0, 1.0], [0.5, 0, 0, 0, 0.5]])
    assert scoring.humpback_expected_score(five).tolist() == [5.0, 3.0]


def test_prompts_match_kuns_rendered_templates():
    t = prompts.templates()
    tok = tokenizer()
    # Kun's CHATML renders "<|im_start|>user" + content; the tiny model's template puts a newline after the role
    for kind, user in (("label", prompts.label_user("{RAW_TEXT}")), ("point", prompts.point_user("{INSTRUCTION}")),
                       ("answer", prompts.answer_user("{RAW_TEXT}", "{INSTRUCTION_TRUNCATED}"))):
        assert prompts.render(tok, user).replace("user\n", "user", 1) == t[f"rendered_Yi-{kind}"]
    assert "\u200b" in prompts.point_prompt_text()  # the original's zero-width spaces are kept


def test_answer_prompt_truncates_the_instruction_to_the_budget():
    tok = tokenizer()
    text, instruction = "复利是指把利息计入本金。", "请详细解释复利的计算方法并举出三个不同的例子" * 5
    full, cut = prompts.answer_prompt(tok, text, instruction, 10_000)
    assert not cut and instruction in full
    budget = prompts.n_tokens(tok, prompts.render(tok, prompts.answer_user(text, ""))) + 8
    short, cut = prompts.answer_prompt(tok, text, instruction, budget)
    assert cut and prompts.n_tokens(tok, short) <= budget and short.startswith(prompts.render(tok, prompts.answer_user(text, ""))[:20])
    assert prompts.answer_prompt(tok, text * 20, instruction, budget) is None


def test_sft_features_mask_the_prompt():
    tok = tokenizer()
    assert tok.chat_template == CHATML_TEMPLATE
    f = sft_features(tok, "什么是复利？", "利滚利。", 512)
    n_prompt = f["labels"].count(-100)
    prompt_ids = tok(prompts.render(tok, "什么是复利？"), add_special_tokens=False)["input_ids"]
    assert n_prompt == len(prompt_ids) and f["input_ids"][:n_prompt] == prompt_ids
    assert tok.decode(f["input_ids"][n_prompt:]) == "利滚利。<|im_end|>\n"
    assert f["labels"][n_prompt:] == f["input_ids"][n_prompt:]


def test_label_examples_and_multiple_choice():
    import pandas as pd

    seeds = pd.DataFrame({"instruction": ["翻译"], "input": ["你好"], "output": ["Hello"]})
    assert label_examples(seeds) == [(prompts.label_user("Hello"), "翻译\n你好")]
    assert is_multiple_choice("A. 上海 B. 北京 C. 广州 D. 深圳") and not is_multiple_choice("A 和 B")
