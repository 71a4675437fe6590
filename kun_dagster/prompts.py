"""The Kun and Humpback prompts (reference/kun_prompts.json, from COIG-Kun @ a9c6df1), rendered
as one user turn with no system message, in the format the model was trained with: its chat
template when it has one (less any default system message the template would add), else Kun's
literal ChatML. Training (training.py) renders through the same `chat`, so the two never differ."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

KUN_GOOD, KUN_BAD = "【好】", "【差】"
# Humpback's prompt asks for its reasons, then '得分：<评分>' on the last line: a reply that opens with
# the score writes one of these (the probability path's answers; their mass says how often it does).
HUMPBACK_ANSWERS = tuple(f"得分：{n}" for n in "12345")
# Kun's CHATML as its Conversation.get_prompt writes it (reference/kun_prompts.json, rendered_Yi-*):
# no newline after the role; each turn closed by <|im_end|> and a newline.
KUN_CHATML_USER = "<|im_start|>user{user}<|im_end|>\n<|im_start|>assistant\n"
KUN_CHATML_SYSTEM = "<|im_start|>system{system}<|im_end|>\n"  # a system turn, in the same style
# Humpback's tags (Li et al. 2023, 2.3): a system prompt on every training example that says where
# its answer came from; the model is then prompted as an assistant (round_data: segments).
HUMPBACK_SEED_TAG = "Answer in the style of an AI Assistant."
HUMPBACK_WEB_TAG = "Answer with knowledge from web search."
KUN_CHATML_END = "<|im_end|>\n"
_SENTINEL, _USER, _REPLY = "\x00kun-system\x00", "\x00kun-user\x00", "\x00kun-reply\x00"


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


def _apply(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


_SYSTEM_TURNS: dict[str, tuple[int, str]] = {}


def _default_system_turn(tokenizer) -> tuple[int, str]:
    """(where, turn): the system turn a chat template adds when a conversation has none (Qwen2.5's
    "You are Qwen, created by Alibaba Cloud. ..."), and its offset in the rendering; (0, "") when
    it adds none. Found by rendering once with a system message of our own: the template's turn
    stands where ours does. The turn's header is the user turn's header with the role renamed,
    which places its start."""
    template = tokenizer.chat_template
    if template in _SYSTEM_TURNS:
        return _SYSTEM_TURNS[template]
    user = [{"role": "user", "content": _USER}]
    plain, found = _apply(tokenizer, user, True), (0, "")
    try:
        ours = _apply(tokenizer, [{"role": "system", "content": _SENTINEL}] + user, True)
    except Exception:  # noqa: BLE001 - a template that refuses system messages adds none itself
        ours = ""
    if _SENTINEL in ours and _USER in ours:
        before, after = ours.split(_SENTINEL, 1)
        default = plain[len(before) : len(plain) - len(after)] if plain.startswith(before) and plain.endswith(after) else ""
        between = after[: after.index(_USER)]  # the system footer, then the user header
        for k in range(len(between)) if default else ():
            header = between[k:].replace("user", "system", 1)
            if "user" in between[k:] and before.endswith(header):
                start = len(before) - len(header)
                found = (start, plain[start : len(plain) - len(after) + k])
                break
    _SYSTEM_TURNS[template] = found
    return found


def chat(tokenizer, user: str, assistant: str | None = None, keep_system: bool | str = False) -> str:
    """One user turn ready for the reply (assistant None), or the whole exchange (training).

    With no chat template (a base such as Yi's), Kun's literal ChatML; a template's default system
    message is left out unless keep_system. keep_system as a string is a system message of our own
    (Humpback's tags), in place of any default."""
    own = keep_system if isinstance(keep_system, str) else None
    if getattr(tokenizer, "chat_template", None) is None:
        prompt = (KUN_CHATML_SYSTEM.replace("{system}", own) if own else "") + KUN_CHATML_USER.replace("{user}", user)
        return prompt if assistant is None else prompt + assistant + KUN_CHATML_END
    messages = [{"role": "user", "content": user}] + ([] if assistant is None else [{"role": "assistant", "content": assistant}])
    if own:
        return _apply(tokenizer, [{"role": "system", "content": own}] + messages, assistant is None)
    text = _apply(tokenizer, messages, assistant is None)
    where, turn = (0, "") if keep_system else _default_system_turn(tokenizer)
    if turn and text[where : where + len(turn)] == turn:
        text = text[:where] + text[where + len(turn) :]
    return text


def system_of(engine, cfg) -> bool | str:
    """How a model is prompted: with the system message it was trained under (a Humpback-tagged
    round model's, on its reference), else as models.keep_default_system says."""
    return getattr(engine, "system", None) or cfg.models.keep_default_system


_LEADS: dict[tuple, str] = {}


def reply_lead(tokenizer, keep_system: bool | str = False) -> str:
    """What the chat template writes between the prompt and the reply's own text: "" for ChatML,
    " " for Llama-2's `[/INST] reply`. A model trained on the template opens its reply with it, so
    the probability paths read an answer with it (a `▁【` after `[/INST]`, never a bare `【`).
    Found once per template by rendering a reply of our own."""
    key = (getattr(tokenizer, "chat_template", None), keep_system)
    if key not in _LEADS:
        prompt, whole = chat(tokenizer, _USER, keep_system=keep_system), chat(tokenizer, _USER, _REPLY, keep_system=keep_system)
        after = whole[len(prompt) :] if whole.startswith(prompt) else ""
        _LEADS[key] = after[: after.index(_REPLY)] if _REPLY in after else ""
    return _LEADS[key]


def render(tokenizer, user: str, assistant_prefix: str = "", keep_system: bool | str = False) -> str:
    """The prompt for one user turn, ready for the assistant's reply (which opens with
    assistant_prefix, written where the template writes a reply)."""
    opened = reply_lead(tokenizer, keep_system) + assistant_prefix if assistant_prefix else ""
    return chat(tokenizer, user, keep_system=keep_system) + opened


def replies(tokenizer, answers: list[str] | tuple[str, ...], assistant_prefix: str = "", keep_system: bool | str = False) -> list[str]:
    """The answers as the model writes them after render(tokenizer, user, assistant_prefix): with
    the template's lead, unless the prefix already opened the reply."""
    lead = "" if assistant_prefix else reply_lead(tokenizer, keep_system)
    return [lead + a for a in answers]


def choice_prompts(
    tokenizer, users: list[str], answers: list[str] | tuple[str, ...], assistant_prefix: str = "", keep_system: bool | str = False
) -> tuple[list[str], list[str]]:
    """What a probability path reads (the scorer, the tags, the judge): each user turn rendered
    for a reply that opens with assistant_prefix, and the answers as written after it."""
    rendered = [render(tokenizer, u, assistant_prefix, keep_system) for u in users]
    return rendered, replies(tokenizer, answers, assistant_prefix, keep_system)


# User turns, without the chat template (training renders them with their answers).
def label_user(text: str) -> str:
    return f"{label_prompt_text()}\n{text}"


def point_user(instruction: str) -> str:
    return f"{point_prompt_text()}\n指令: 【{instruction}】 回复："


def answer_user(text: str, instruction: str) -> str:
    return f" 已知：\n{text},请回答:{instruction}"


def humpback_user(instruction: str, answer: str) -> str:
    return f"{humpback_prompt_text()}\n\n指令：{instruction}\n\n答案：{answer}"


# Tags (tagging.py): the chat model picks one option of a fixed taxonomy by its letter.
TAG_KINDS = {"task_type": "任务类型", "domain": "所属领域"}


def tag_user(kind: str, instruction: str, answer: str, options: list[str], most: int = 1) -> str:
    listed = "\n".join(f"{chr(65 + i)}. {name}" for i, name in enumerate(options))
    ask = "只回答选项的字母。" if most == 1 else f"只回答选项的字母，至多{most}个，最贴切的在前。"
    return f"下面是一条指令和它的回答。请从选项中选出这条指令的{TAG_KINDS[kind]}，{ask}\n选项：\n{listed}\n\n指令：{instruction}\n回答：{answer}"


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_prompt(tokenizer, text: str, instruction: str, budget: int, keep_system: bool | str = False) -> tuple[str, bool] | None:
    """The polishment prompt with the instruction cut so the whole prompt fits `budget` tokens.

    Returns (prompt, truncated), or None when the text alone leaves no room for an instruction.
    """
    full = render(tokenizer, answer_user(text, instruction), keep_system=keep_system)
    if n_tokens(tokenizer, full) <= budget:
        return full, False
    room = budget - n_tokens(tokenizer, render(tokenizer, answer_user(text, ""), keep_system=keep_system))
    ids = tokenizer(instruction, add_special_tokens=False)["input_ids"]
    while room > 0:
        cut = tokenizer.decode(ids[:room], skip_special_tokens=True).rstrip("\ufffd")
        prompt = render(tokenizer, answer_user(text, cut), keep_system=keep_system)
        if cut and n_tokens(tokenizer, prompt) <= budget:
            return prompt, True
        room -= 1
    return None
