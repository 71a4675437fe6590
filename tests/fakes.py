"""A scripted engine for testing the stages' own logic (filters, reasons, failure) without a model.
It keeps the protocol's contract: one result per prompt, in order, with a real tokenizer."""

import numpy as np

from kun_dagster.llm.base import Generation
from kun_dagster.training import train_tokenizer

_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from .demo_texts import texts

        _TOKENIZER = train_tokenizer(texts(), 1000)
    return _TOKENIZER


class ScriptedEngine:
    backend = "scripted"
    model_name = "scripted"

    def __init__(self, replies=(), probs=(), ppl=()):
        self.tokenizer = tokenizer()
        self.replies, self.probs, self.ppl = list(replies), probs, ppl
        self.prompts: list[str] = []

    def generate(self, prompts, params):
        self.prompts += prompts
        out, self.replies = self.replies[: len(prompts)], self.replies[len(prompts):]
        assert len(out) == len(prompts), "script ran out of replies"
        return [Generation(text=t, num_tokens=len(t), finish_reason="stop") for t in out]

    def choice_probs(self, prompts, choices):
        self.prompts += prompts
        return np.asarray(self.probs[: len(prompts)], dtype=float).reshape(len(prompts), len(choices))

    def perplexity(self, texts):
        return np.asarray(self.ppl[: len(texts)], dtype=float)

    def close(self):
        pass
