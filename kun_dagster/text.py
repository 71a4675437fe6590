"""Pure text rules of the Kun method: cleaning, keyword filters, repetition rules, dedup keys.

Each rule answers "keep" (None) or a drop reason code, so stages can count reasons and write the
dropped rows aside (datatrove's filter interface).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

# Control characters other than tab and newline; they survive web scraping and break tokenizers.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
# ANSI terminal escapes (colours, cursor moves) in scraped logs and console dumps: removed whole,
# not just their ESC byte, so no "[31m" is left in the text.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_BLANK_LINES = re.compile(r"\n{3,}")
_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """NFC (not NFKC: it would turn full-width Chinese punctuation into ASCII), no control
    characters, Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", _ANSI.sub("", text))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


NON_SPACE = re.compile(r"\S")
# A character clean_text keeps that is not a space: anything but whitespace and _CONTROL's set.
_KEPT = re.compile(r"[^\s\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")


def has_content(text: str) -> bool:
    """clean_text(text) != "", without building the cleaned text (ingest asks this of every
    record). Exact: NFC never turns a visible character into a space, and an ANSI escape (whose
    printable tail clean_text removes) takes the slow path."""
    if "\x1b" in text:
        return bool(clean_text(text))
    return _KEPT.search(text) is not None


def has_text(text: str) -> bool:
    """True when the text holds a non-space character anywhere (not only at its start): the rule
    the schemas check with `str_contains(NON_SPACE)`."""
    return NON_SPACE.search(text) is not None


def dedup_key(text: str) -> str:
    """Exact-duplicate key: the text with all whitespace removed, hashed."""
    return hashlib.sha1(_SPACES.sub("", text).encode("utf-8")).hexdigest()


def text_key(text: str) -> bytes:
    """dedup_key as 16 bytes: what a partition's exact dedup and the source-wide dedup compare."""
    return hashlib.blake2b(dedup_key(text).encode("utf-8"), digest_size=16).digest()


# Characters that render as nothing: a keyword split by one of them (新\u200b闻) reads as the keyword.
_INVISIBLE = re.compile(
    r"[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]"
)


def keyword_form(text: str) -> str:
    """The form keywords are matched in: NFKC (full-width ２０２３ is 2023), invisible characters
    removed, case folded. The text itself is never changed."""
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).casefold()


def find_keyword(text: str, keywords: list[str] | tuple[str, ...]) -> str | None:
    """The first banned keyword the text contains (in keyword_form, both of them), or None."""
    form = keyword_form(text)
    for kw in keywords:
        if kw and keyword_form(kw) in form:
            return kw
    return None


def repair_instruction(text: str, run: int = 5) -> str | None:
    """Kun's instruction repair (script/deplicate.py in COIG-Kun v0.1/v0.2): an instruction with a
    run of `run` or more whitespace characters is cut there; else, where a line repeats, it becomes
    its longest repeated line if that line opens it, and is dropped (None) if not. Lines are compared
    stripped. One departure: the text is stripped first, so a reply that opens with newlines keeps
    its instruction (Kun's cut at position 0 would leave an empty one)."""
    text = text.strip()
    m = re.search(rf"\s{{{run},}}", text)
    if m:
        return text[: m.start()].strip()
    counts = Counter(line.strip() for line in text.split("\n") if line.strip())
    repeated = [line for line, n in counts.items() if n > 1]
    if not repeated:
        return text
    longest = max(repeated, key=len)  # the first of the longest, as Kun's max over its dict
    return longest if text.startswith(longest) else None


def starts_with_repeated_phrase(text: str, times: int = 6, min_chars: int = 2) -> bool:
    """True when the text opens with one phrase said `times` or more times in a row (a model stuck
    in a loop; Kun's detect_repetition_improved, any length of phrase). A phrase has at least
    min_chars characters and is not one character over and over: ------, …… or 哈哈哈哈哈哈 are
    punctuation or laughter, not a repeated phrase (Kun counts them)."""
    text = text.lstrip()
    for n in range(max(1, min_chars), len(text) // times + 1):
        phrase = text[:n]
        if len(set(phrase)) > 1 and text.startswith(phrase * times):
            return True
    return False


def strip_stop_strings(text: str, stops: tuple[str, ...]) -> str:
    """Cut a generation at the first stop string (Kun cuts at <|endoftext|> and </s>)."""
    for stop in stops:
        idx = text.find(stop)
        if idx >= 0:
            text = text[:idx]
    return text.strip()
