"""The answers the probability paths read, on real vocabularies (tests/vocab.py): Qwen's byte-level
BPE and a SentencePiece model with a dummy prefix. Each answer is read as the tokens the model
writes after its prompt, and the fast path only where its first differing token stands for its
answer alone; the transformers engine on tiny random models of both vocabularies reads exactly
those tokens."""

import numpy as np
import pytest
import torch

from kun_dagster import prompts, scoring
from kun_dagster.evaluation import JUDGE_CHOICES, judge_user
from kun_dagster.llm import load_engine
from kun_dagster.llm.base import Answers, EngineSpec, encode
from kun_dagster.tagging import letters

from . import vocab

INSTRUCTIONS = ["什么是复利？", "请介绍长城的历史。", "写一首关于春天的诗。", "How do I boil an egg?", "  前导空格的指令", "解释光合作用\n"]


@pytest.fixture(scope="module")
def tokenizers():
    return {"qwen": vocab.qwen(), "sentencepiece": vocab.sentencepiece(), "sentencepiece_llama2": vocab.sentencepiece(vocab.LLAMA2)}


def _asks(tok):
    """(prompt, answers) as the scorer, Humpback's scorer, the tagger and the judge ask them."""
    out = []
    for s in INSTRUCTIONS:
        out.append((prompts.render(tok, prompts.point_user(s)), prompts.replies(tok, scoring.KUN.choices)))
        user = prompts.humpback_user(s, "答案。")
        out.append((prompts.render(tok, user), prompts.replies(tok, prompts.HUMPBACK_ANSWERS)))
        out.append((prompts.render(tok, prompts.tag_user("domain", s, "答。", ["通用", "医学", "其他"])), prompts.replies(tok, letters(3))))
        out.append((prompts.render(tok, judge_user(s, "一", "二")), prompts.replies(tok, JUDGE_CHOICES)))
    return out


@pytest.mark.parametrize("name", ["qwen", "sentencepiece", "sentencepiece_llama2"])
def test_answers_are_the_tokens_that_continue_each_prompt(tokenizers, name):
    tok = tokenizers[name]
    for prompt, answers in _asks(tok):
        head = encode(tok, [prompt], special=False)[0]
        (a, rows), *more = Answers.by_prompt(tok, [prompt], answers)
        assert not more and rows == [0]
        for ids, answer in zip(a.ids, answers):
            assert encode(tok, [prompt + answer], special=False)[0] == head + ids
            assert a.ids[0][: len(a.common)] == a.common


def test_a_dummy_prefix_is_not_read_as_the_answer(tokenizers):
    """Encoded alone, SentencePiece's dummy prefix makes 【好】 `▁【 好 】`, a token the model never
    writes after `assistant\\n`: read that way the answer mass is about 0 and every row silently
    goes to free text. After `[/INST]` (Llama-2), the reply does open with a space: `▁【` there."""
    chatml, llama2 = tokenizers["sentencepiece"], tokenizers["sentencepiece_llama2"]
    alone = chatml.convert_ids_to_tokens(encode(chatml, [scoring.KUN_GOOD], special=False)[0])
    assert alone[0] == "▁【"
    a = Answers.after(chatml, prompts.render(chatml, prompts.point_user("什么是复利？")), prompts.replies(chatml, scoring.KUN.choices))
    assert chatml.convert_ids_to_tokens(a.ids[0]) == ["【", "好", "】"]
    assert prompts.reply_lead(chatml) == "" and prompts.reply_lead(llama2) == " "
    b = Answers.after(llama2, prompts.render(llama2, prompts.point_user("什么是复利？")), prompts.replies(llama2, scoring.KUN.choices))
    assert llama2.convert_ids_to_tokens(b.ids[0]) == ["▁【", "好", "】"]
    assert prompts.render(llama2, "问", "得分：").endswith("[/INST] 得分：")  # a prefix opens the reply


def test_the_fast_path_only_where_each_first_differing_token_stands_for_its_answer(tokenizers):
    qwen = tokenizers["qwen"]
    prompt = prompts.render(qwen, prompts.point_user("什么是复利？"))
    kun = Answers.after(qwen, prompt, list(scoring.KUN.choices))
    assert qwen.convert_ids_to_tokens(kun.common) == ["ãĢĲ"] and kun.fast  # 【, then 好 / 差: one token each
    assert Answers.after(qwen, prompt, list("12345")).fast and Answers.after(qwen, prompt, letters(26)).fast
    # 好 opens 好的 (one token in Qwen's vocabulary): P(好) holds every reply opening with 好的 too
    assert not Answers.after(qwen, prompt, ["好", "好的", "不好"]).fast
    # a vocabulary that merges 【好 but not 【差: 【差】's first token 【 opens 【好】 spelt 【 好 】 too
    merged = vocab.qwen()
    merged.add_tokens(["【好"])
    m = Answers.after(merged, prompt, list(scoring.KUN.choices))
    assert m.common == [] and merged.convert_ids_to_tokens(m.firsts)[1] == "ãĢĲ" and not m.fast


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tokenizers):
    """The transformers engine on a tiny random Qwen2 with Qwen's vocabulary, one with 【好 merged,
    and a tiny random Llama on the SentencePiece vocabulary."""
    root = tmp_path_factory.mktemp("real_vocab")
    merged = vocab.qwen()
    merged.add_tokens(["【好"])
    made = {
        "qwen": vocab.tiny_model(tokenizers["qwen"], root / "qwen"),
        "qwen_merged": vocab.tiny_model(merged, root / "qwen_merged"),
        "sentencepiece": vocab.tiny_model(tokenizers["sentencepiece"], root / "sp", kind="llama"),
    }
    out = {k: load_engine(EngineSpec.of(str(p), k, backend="transformers", dtype="float32", batch_size=4)) for k, p in made.items()}
    yield out
    for e in out.values():
        e.close()


def _logp(engine, head: list[int], ids: list[int]) -> float:
    """log P(ids | head) from one forward pass over head + ids."""
    with torch.inference_mode():  # the rows that predict ids only: the vocabulary is 151k wide
        logits = engine.model(torch.tensor([head + ids]), logits_to_keep=len(ids) + 1).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return sum(logp[i, t].item() for i, t in enumerate(ids))


def _by_hand(engine, prompt: str, answer: str, tokens: int | None = None) -> float:
    """log P(answer | prompt) over encode(prompt + answer): the first `tokens` of the answer's
    tokens (all by default)."""
    head, whole = encode(engine.tokenizer, [prompt, prompt + answer], special=False)
    return _logp(engine, head, whole[len(head) :][:tokens])


@pytest.mark.parametrize("name", ["qwen", "qwen_merged", "sentencepiece"])
def test_the_engine_reads_the_answers_as_the_model_writes_them(engines, name):
    eng = engines[name]
    tok = eng.tokenizer
    ps = [prompts.render(tok, prompts.point_user(s)) for s in INSTRUCTIONS]
    answers = prompts.replies(tok, scoring.KUN.choices)
    exact = eng.choice_logprobs(ps, answers, exact=True)
    want = np.array([[_by_hand(eng, p, a) for a in answers] for p in ps])
    assert np.allclose(exact, want, atol=1e-3)
    a = Answers.after(tok, ps[0], answers)
    fast = eng.choice_logprobs(ps, answers)
    if a.fast:  # the opening and the first differing token, exactly
        partial = np.array([[_by_hand(eng, p, c, len(a.common) + 1) for c in answers] for p in ps])
        assert np.allclose(fast, partial, atol=1e-3) and not np.allclose(fast, exact, atol=1e-2)
    else:  # 【好 merged: no fast path, the exact one
        assert name == "qwen_merged" and np.allclose(fast, exact, atol=1e-5)
    if name == "sentencepiece":  # read as encoded alone (`▁【`), the figures differ: this test can fail
        alone = encode(tok, answers, special=False)
        assert alone != a.ids
        misread = _logp(eng, encode(tok, [ps[0]], special=False)[0], alone[0])
        assert abs(misread - exact[0, 0]) > 0.1
