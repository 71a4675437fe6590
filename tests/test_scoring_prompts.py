import copy
import math

import numpy as np
import pytest

from kun_dagster import prompts, scoring
from kun_dagster.training import CHATML_TEMPLATE, is_multiple_choice, label_examples, sft_features

from .fakes import tokenizer


def test_kun_reply_parse_and_keep():
    assert scoring.parse_kun_reply("答：【好】") == 1.0
    assert scoring.parse_kun_reply("【好】还是【差】") == 0.0
    assert math.isnan(scoring.parse_kun_reply("不好说"))
    assert scoring.keep(np.array([0.7, math.nan, 0.2]), 0.5).tolist() == [True, False, False]


def test_probability_scores_keep_the_mass_the_model_puts_elsewhere():
    lp = np.log([[0.6, 0.2], [1e-26, 1e-34], [0.1, 0.3]])
    got = scoring.from_logprobs(lp, scoring.KUN)
    assert np.allclose(got["answer_mass"], [0.8, 1e-26, 0.4]) and np.allclose(got["p_good"], [0.6, 1e-26, 0.1])
    assert np.allclose(got["score"], [0.75, 1.0, 0.25])  # among the two answers; the mass says whether that means anything
    five = np.log([[0.01, 0.01, 0.08, 0.4, 0.3], [0.1, 0.1, 0.1, 0.1, 0.1]])
    hb = scoring.from_logprobs(five, scoring.HUMPBACK)
    assert hb["score"].tolist() == [4.0, 1.0] and np.isnan(hb["p_good"]).all() and np.allclose(hb["answer_mass"], [0.8, 0.5])
    assert np.isnan(scoring.from_logprobs(np.full((1, 2), -np.inf), scoring.KUN)["score"][0])


def _kun_forms():
    return (
        ("label", prompts.label_user("{RAW_TEXT}")),
        ("point", prompts.point_user("{INSTRUCTION}")),
        ("answer", prompts.answer_user("{RAW_TEXT}", "{INSTRUCTION_TRUNCATED}")),
    )


def test_a_model_without_a_chat_template_gets_kuns_literal_chatml_byte_for_byte():
    """A base with no chat template (Yi's) is prompted, and trained, exactly as Kun prompts it."""
    t = prompts.templates()
    tok = copy.deepcopy(tokenizer())
    tok.chat_template = None
    for kind, user in _kun_forms():
        assert prompts.render(tok, user).encode() == t[f"rendered_Yi-{kind}"].encode()
    f = sft_features(tok, prompts.point_user("什么是复利？"), "【好】", 4096)
    n_prompt = f["labels"].count(-100)
    assert tok.decode(f["input_ids"][:n_prompt]) == t["rendered_Yi-point"].replace("{INSTRUCTION}", "什么是复利？")
    assert tok.decode(f["input_ids"][n_prompt:]) == "【好】<|im_end|>\n"


def test_a_chatml_template_renders_kuns_prompts():
    t = prompts.templates()
    # Kun's CHATML renders "<|im_start|>user" + content; the tiny model's template puts a newline after the role
    for kind, user in _kun_forms():
        assert prompts.render(tokenizer(), user).replace("user\n", "user", 1) == t[f"rendered_Yi-{kind}"]
    assert "\u200b" in prompts.point_prompt_text()  # the original's zero-width spaces are kept


QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = 'Cutting Knowledge Date: December 2023' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("template, default, bos", [(QWEN25, "You are Qwen", ""), (LLAMA3, "Cutting Knowledge", "<|endoftext|>")])
def test_a_templates_default_system_message_is_left_out_unless_asked_for(template, default, bos):
    tok = copy.deepcopy(tokenizer())
    tok.chat_template, tok.bos_token = template, "<|endoftext|>"
    user = prompts.point_user("什么是复利？")
    plain, kept = prompts.render(tok, user), prompts.render(tok, user, keep_system=True)
    assert default in kept and default not in plain and "system" not in plain
    assert plain.startswith(bos) and kept.startswith(bos) and plain.endswith(kept[-200:]) and user in plain
    f = sft_features(tok, user, "【好】", 4096)  # training renders the same prompt
    assert tok.decode(f["input_ids"][: f["labels"].count(-100)]) == plain
    assert default in tok.decode(sft_features(tok, user, "【好】", 4096, keep_system=True)["input_ids"])


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


def test_encode_gives_the_tokenizers_own_ids():
    from kun_dagster.llm.base import encode

    tok = tokenizer()
    texts = ["", "什么是复利？", " 开头空格\n\n换行", "<|im_start|>user\n你好<|im_end|>\n", "emoji 😀 \udcff", "a" * 3000]
    texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
    for special in (False, True):
        assert encode(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]
    assert encode(tok, [], False) == []
