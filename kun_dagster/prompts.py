"""The Kun and Humpback prompts (reference/kun_prompts.json, from COIG-Kun @ a9c6df1), rendered
through the model's own chat template as one user turn with no system message."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

KUN_GOOD, KUN_BAD = "【好】", "【差】"
HUMPBACK_SCORES = ("1", "2", "3", "4", "5")


@lru_cache(maxsize=1)
def templates() -> dict[str, str]:
    return json.loads(resources.files("kun_dagster").joinpath("data/kun_prompts.json").read_text("utf-8"))


def label_prompt_text() -> str:
    return templates()["labelPrompt"]


def point_prompt_text() -> str:
    return templates()["pointPrompt"]


def humpback_prompt_text() -> str:
    key = next(k for k in templates() if k.startswith("POINT_PROMPT"))
    return templates()[key]


def render(tokenizer, user: str, assistant_prefix: str = "") -> str:
    """The chat-template rendering of one user turn, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix


# User turns, without the chat template (training renders them with their answers).
def label_user(text: str) -> str:
    return f"{label_prompt_text()}\n{text}"


def point_user(instruction: str) -> str:
    return f"{point_prompt_text()}\n指令: 【{instruction}】 回复："


def answer_user(text: str, instruction: str) -> str:
    return f" 已知：\n{text},请回答:{instruction}"


def humpback_user(instruction: str, answer: str) -> str:
    return f"{humpback_prompt_text()}\n\n指令：{instruction}\n\n答案：{answer}"


HUMPBACK_PREFIX = "得分："  # the reply opens at the score, so choice_probs reads 1..5 directly


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_prompt(tokenizer, text: str, instruction: str, budget: int) -> tuple[str, bool] | None:
    """The polishment prompt with the instruction cut so the whole prompt fits `budget` tokens.

    Returns (prompt, truncated), or None when the text alone leaves no room for an instruction.
    """
    full = render(tokenizer, answer_user(text, instruction))
    if n_tokens(tokenizer, full) <= budget:
        return full, False
    room = budget - n_tokens(tokenizer, render(tokenizer, answer_user(text, "")))
    ids = tokenizer(instruction, add_special_tokens=False)["input_ids"]
    while room > 0:
        cut = tokenizer.decode(ids[:room], skip_special_tokens=True).rstrip("\ufffd")
        prompt = render(tokenizer, answer_user(text, cut))
        if cut and n_tokens(tokenizer, prompt) <= budget:
            return prompt, True
        room -= 1
    return None
