"""COIG-CQIA tags of each record: task_type.minor and domain, chosen by the chat model from the
taxonomy in kun.yaml (`tags`), with the scorer's rule (scoring.py).

The prompt lists the options as letters (A. 百科问答, B. 知识问答, ...) and asks for the letter, so
every option is one token and the probability path reads all of them in one decode step. Where the
model puts at least score.min_answer_mass on the letters, the most likely letter is the tag
(rule `probability`); elsewhere the model's free-text reply is parsed for a letter or an option's
name (`freetext`). Where neither names an option, no option is invented from the little mass left
on the letters (2e-5 on the demo's model): the tag is the taxonomy's catch-all, `tags.other` (其他)
(`undetermined`). Each record carries the rule that decided each tag.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np

from . import prompts
from .config import KunConfig
from .llm.base import Engine, SamplingParams

PROBABILITY, FREETEXT, UNDETERMINED, OFF = "probability", "freetext", "undetermined", "off"
TAG_RULES = (PROBABILITY, FREETEXT, UNDETERMINED, OFF)
DEFAULT_DOMAIN = "通用"  # tags off: COIG-CQIA's general domain, and minor kun:<source>


def letters(n: int) -> list[str]:
    return [chr(65 + i) for i in range(n)]


_LEADING = re.compile(r"^[\s【\[(（「“\"'选项答案：:]*([A-Z])(?![A-Za-z])")


def parse_reply(reply: str, options: list[str]) -> int | None:
    """The option a free-text reply names: its opening letter (A, 【B】, 选项C), else the option
    name it mentions first; None when it names none."""
    m = _LEADING.match(reply or "")
    if m and ord(m.group(1)) - 65 < len(options):
        return ord(m.group(1)) - 65
    found = [(reply.find(name), -len(name), i) for i, name in enumerate(options) if name in (reply or "")]
    return min(found)[2] if found else None


def choose(
    engine: Engine, users: list[str], options: list[str], cfg: KunConfig, sampling: SamplingParams
) -> tuple[list[str], list[str], np.ndarray]:
    """(tag, rule, answer mass) per user turn."""
    keep_system, tok = cfg.models.keep_default_system, engine.tokenizer
    if not users:
        return [], [], np.zeros(0)
    rendered, answers = prompts.choice_prompts(tok, users, letters(len(options)), keep_system=keep_system)
    p = np.exp(np.asarray(engine.choice_logprobs(rendered, answers), dtype=float))
    mass = p.sum(axis=1)
    best = p.argmax(axis=1)
    rules = [PROBABILITY if m >= cfg.score.min_answer_mass else FREETEXT for m in mass]
    tags = [options[b] for b in best]
    free = [i for i, r in enumerate(rules) if r == FREETEXT]
    if free:
        gens = engine.generate([rendered[i] for i in free], sampling)
        for i, g in zip(free, gens):
            picked = parse_reply(g.text, options)
            tags[i] = options[picked] if picked is not None else cfg.tags.other
            rules[i] = FREETEXT if picked is not None else UNDETERMINED
    return tags, rules, mass


def tag(engine: Engine, instructions: list[str], answers: list[str], cfg: KunConfig, sampling: SamplingParams) -> dict:
    """Per row: task_minor, domain, and the rule of each; stats counts by rule and by tag."""
    t = cfg.tags
    shown = [a[: t.answer_chars] for a in answers]
    sp = dataclasses.replace(sampling, max_tokens=t.max_tokens)  # a reply names an option, or it never will
    out, stats = {}, {}
    for kind, column, options in (("task_type", "task_minor", t.task_types), ("domain", "domain", t.domains)):
        users = [prompts.tag_user(kind, i, a, options) for i, a in zip(instructions, shown)]
        tags, rules, mass = choose(engine, users, options, cfg, sp)
        out[column], out[f"{column}_rule"] = tags, rules
        stats[f"{column}_by_rule"] = dict(Counter(rules))
        stats[f"{column}_answer_mass_p50"] = round(float(np.median(mass)), 4) if len(mass) else None
        stats[f"{column}_tags"] = dict(Counter(tags).most_common(10))
    return {"columns": out, "stats": stats}
