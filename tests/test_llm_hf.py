"""The transformers engine on the tiny model built by the session (the reference engine)."""

import numpy as np
import pytest
import torch

from kun_dagster import prompts
from kun_dagster.llm import EngineError, SamplingParams, load_engine, resolve_backend
from kun_dagster.llm.base import EngineSpec

pytestmark = pytest.mark.slow


def _by_hand(model, tok, prompt: str, c_ids: list[int]) -> float:
    """log P(answer tokens | prompt) the slow way: the whole sequence through the model, answer tokens summed."""
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([p_ids + c_ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[len(p_ids) - 1 + i, t].item() for i, t in enumerate(c_ids))


def test_choice_logprobs_are_the_answers_continuation_logprobs(label_engine):
    eng = label_engine
    tok = eng.tokenizer
    ps = [prompts.render(tok, prompts.point_user(s)) for s in ("什么是复利？", "你认识黄丰吗？", "教育具有哪些社会发展功能？" * 4)]
    choices = ["【好】", "【差】"]
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
    exact = eng.choice_logprobs(ps, choices, exact=True)
    want = np.array([[_by_hand(eng.model, tok, p, i) for i in ids] for p in ps])
    assert np.allclose(exact, want, atol=1e-3)  # the prompt's KV computed once, each answer continued from it
    # the fast path: the shared opening 【 (its byte tokens) exactly, then only the first token that differs
    k = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    fast = eng.choice_logprobs(ps, choices)
    partial = np.array([[_by_hand(eng.model, tok, p, i[: k + 1]) for i in ids] for p in ps])
    assert np.allclose(fast, partial, atol=1e-3) and (fast >= exact - 1e-4).all()  # reads fewer tokens: never less likely


def test_perplexity_separates_text_from_noise(base_engine):
    ppl = base_engine.perplexity(["复利是指把每一期获得的利息加入本金，在下一期一起计算利息。", "噢嗯 qz#@ 喵 x7 9&* 乒 乓 ¥ 〇", "一"])
    assert 1 < ppl[0] < ppl[1]
    one_token = len(base_engine.tokenizer("一")["input_ids"]) < 2  # nothing to predict: perplexity is undefined
    assert np.isnan(ppl[2]) if one_token else ppl[2] > 1


def test_generate_is_reproducible_and_stops(label_engine):
    eng = label_engine
    ps = [prompts.render(eng.tokenizer, prompts.label_user(t)) for t in ("复利是把利息计入本金的计息方式。", "蜜蜂分工明确。")]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    a, b = eng.generate(ps, greedy), eng.generate(ps[::-1], greedy)
    assert [g.text for g in a] == [g.text for g in b[::-1]]  # order-independent, results in prompt order
    sampled = SamplingParams(max_tokens=24, seed=7)
    assert [g.text for g in eng.generate(ps, sampled)] == [g.text for g in eng.generate(ps, sampled)]
    for g in a:
        assert g.finish_reason in ("stop", "length") and 0 < g.num_tokens <= 24
        assert "<|im_end|>" not in g.text and "<|endoftext|>" not in g.text


def test_unloadable_model_is_a_clear_engine_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineError, match=r"transformers could not load model broken from .*"):
        load_engine(EngineSpec.of(str(tmp_path), "broken", backend="transformers"))
    with pytest.raises(EngineError, match="unknown LLM backend 'tensorrt'"):
        resolve_backend("tensorrt")
    with pytest.raises(ValueError, match="backend"):  # a spec holds kun.yaml's typed settings: no unknown backend gets this far
        EngineSpec.of(str(tmp_path), "x", backend="tensorrt")
