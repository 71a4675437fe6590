"""COIG-CQIA tags of each record: task_type.minor and domain, chosen by the chat model from the
taxonomy in kun.yaml (`tags`), with the scorer's rule (scoring.py).

The prompt lists the options as letters (A. 百科问答, B. 知识问答, ...) and asks for the letter, so
every option is one token and the probability path reads all of them in one decode step. Where the
model puts at least score.min_answer_mass on the letters, the most likely letter is the tag
(rule `probability`); elsewhere the model's free-text reply is parsed for a letter or an option's
name (`freetext`). Where neither names an option, no option is invented from the little mass left
on the letters (2e-5 on the demo's model): the tag is the taxonomy's catch-all, `tags.other` (其他)
(`undetermined`). Each record carries the rule that decided each tag.

A record may carry several minors (tags.max_minors; COIG-CQIA's carry one or two): the prompt asks
for up to that many letters, most fitting first. The probability path reads only the first letter,
so a further minor is one the model would name first with at least tags.minor_share of the answer
mass (where it hesitates between two kinds, the record carries both); a free-text reply gives the
letters or names it lists, in its order. task_type.major is each minor's major (config.TagsConfig).
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
# A further letter after the first: 'A、C', 'A, C', '【A】【C】', 'A和C'.
_NEXT = re.compile(r"^[\s】\])）」”\"',，、;；和及与/【\[(（]*([A-Z])(?![A-Za-z])")


def parse_reply(reply: str, options: list[str], most: int = 1) -> list[int]:
    """The options a free-text reply names, at most `most`, in its order: its opening letters
    (A, 【B】, 选项C, 'A、C'), else the option names it mentions; [] when it names none."""
    reply = reply or ""
    picked, rest, m = [], reply, _LEADING.match(reply)
    while m and ord(m.group(1)) - 65 < len(options) and len(picked) < most:
        if ord(m.group(1)) - 65 not in picked:
            picked.append(ord(m.group(1)) - 65)
        rest = rest[m.end() :]
        m = _NEXT.match(rest)
    if picked:
        return picked
    found = sorted((reply.find(name), -len(name), i) for i, name in enumerate(options) if name in reply)
    return list(dict.fromkeys(i for _, _, i in found))[:most]


def picks(p: np.ndarray, most: int, share: float) -> list[int]:
    """The options one row's letter probabilities name: the most likely, then (up to `most`) each
    next one with at least `share` of the mass on the letters."""
    order = np.argsort(-p, kind="stable")
    mass = p.sum()
    return [int(order[0])] + [int(i) for i in order[1:most] if p[i] >= share * mass]


def choose(
    engine: Engine, users: list[str], options: list[str], cfg: KunConfig, sampling: SamplingParams, most: int = 1
) -> tuple[list[list[str]], list[str], np.ndarray]:
    """(tags, rule, answer mass) per user turn; each row's tags are 1 to `most` options."""
    keep_system, tok = prompts.system_of(engine, cfg), engine.tokenizer
    if not users:
        return [], [], np.zeros(0)
    rendered, answers = prompts.choice_prompts(tok, users, letters(len(options)), keep_system=keep_system)
    p = np.exp(np.asarray(engine.choice_logprobs(rendered, answers), dtype=float))
    mass = p.sum(axis=1)
    rules = [PROBABILITY if m >= cfg.score.min_answer_mass else FREETEXT for m in mass]
    tags = [[options[i] for i in picks(row, most, cfg.tags.minor_share)] for row in p]
    free = [i for i, r in enumerate(rules) if r == FREETEXT]
    if free:
        gens = engine.generate([rendered[i] for i in free], sampling)
        for i, g in zip(free, gens):
            named = parse_reply(g.text, options, most)
            tags[i] = [options[k] for k in named] or [cfg.tags.other]
            rules[i] = FREETEXT if named else UNDETERMINED
    return tags, rules, mass


def tag(engine: Engine, instructions: list[str], answers: list[str], cfg: KunConfig, sampling: SamplingParams) -> dict:
    """Per row: task_minor (a list of 1 to tags.max_minors), domain, and the rule of each; stats
    count by rule and by tag."""
    t = cfg.tags
    shown = [a[: t.answer_chars] for a in answers]
    sp = dataclasses.replace(sampling, max_tokens=t.max_tokens)  # a reply names an option, or it never will
    out, stats = {}, {}
    for kind, column, options, most in (("task_type", "task_minor", t.minors, t.max_minors), ("domain", "domain", t.domains, 1)):
        users = [prompts.tag_user(kind, i, a, options, most) for i, a in zip(instructions, shown)]
        tags, rules, mass = choose(engine, users, options, cfg, sp, most)
        out[column] = tags if column == "task_minor" else [x[0] for x in tags]
        out[f"{column}_rule"] = rules
        stats[f"{column}_by_rule"] = dict(Counter(rules))
        stats[f"{column}_answer_mass_p50"] = round(float(np.median(mass)), 4) if len(mass) else None
        stats[f"{column}_tags"] = dict(Counter(x for row in tags for x in row).most_common(10))
    return {"columns": out, "stats": stats}
