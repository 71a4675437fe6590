"""The engine protocol (DESIGN.md, "LLM work").

- generate(prompts, params): one completion per prompt, in order.
- choice_logprobs(prompts, choices, exact): for each prompt, log P(answer | prompt) of each answer
  string (【好】 vs 【差】, or 1..5) as the tokens the model writes after that prompt, not normalised:
  what the model puts on neither stays visible (scoring.py turns it into the answer mass). The
  fast path (exact=False) reads the answers' shared opening tokens and then the first token where
  they differ, one decode step each, where that token stands for its answer alone (Answers.fast);
  exact=True, and every other case, sums every token of every answer.
- perplexity(texts): exp of the mean next-token negative log-likelihood of each text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..config import EngineSettings

# Kun cuts generations at these, whatever the model's own EOS is.
DEFAULT_STOPS = ("<|endoftext|>", "</s>", "<|im_end|>")


def stop_token_ids(tokenizer) -> list[int]:
    """The token ids a generation ends at: the tokenizer's EOS and whichever of DEFAULT_STOPS it has."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in DEFAULT_STOPS if t in vocab}
    return sorted(i for i in ids if i is not None)


def encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of each text, in one batch call: every engine feeds its model exactly these. A fast
    tokenizer with no truncation or padding set is called through its Rust `encode_batch_fast`
    (the same ids without offsets: 1.6x faster here, and every stage tokenizes every prompt)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast") and backend.truncation is None and backend.padding is None:
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=special)]
    return tokenizer(list(texts), add_special_tokens=special)["input_ids"]


def request_seed(seed: int, prompt: str) -> int:
    """A request's own sampling seed: the run's seed and the prompt, nothing about its batch."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{prompt}".encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") & 0x7FFFFFFF


# An answer's tokens depend on the prompt's end only: everything after its last added token (a
# chat template's <|im_start|>assistant\n), else its last _WINDOW characters.
_WINDOW = 64


def _ending(prompt: str, added: list[str]) -> str:
    cut = max((prompt.rfind(t) for t in added), default=-1)
    return prompt[cut:] if cut >= 0 and len(prompt) - cut <= 4 * _WINDOW else prompt[-_WINDOW:]


@dataclass(frozen=True)
class Answers:
    """The answer strings of choice_logprobs as the token ids the model reads after a prompt:
    `common`, the tokens every answer opens with (【, one token or a few bytes), then each answer's
    remaining tokens (`tails`, at least one each). The fast path reads `common` and then one token
    per answer (`fast`: only where that token stands for its answer alone)."""

    ids: list[list[int]]
    common: list[int]
    tails: list[list[int]]
    fast: bool

    @classmethod
    def after(cls, tokenizer, prompt: str, choices: list[str]) -> Answers:
        """encode(prompt + answer) minus encode(prompt), never encode(answer): encoded alone, a
        SentencePiece tokenizer's dummy prefix makes the `【` a model writes after `\n` a `▁【`."""
        if not choices:
            raise ValueError("choice_logprobs needs at least one choice")
        head, *wholes = encode(tokenizer, [prompt, *(prompt + c for c in choices)], special=False)
        for c, whole in zip(choices, wholes):
            if whole[: len(head)] != head:
                raise ValueError(
                    f"answer {c!r} merges with the prompt's last tokens ({prompt[-16:]!r}): it cannot be scored as a continuation"
                )
        ids = [w[len(head) :] for w in wholes]
        if any(not a for a in ids) or len({tuple(a) for a in ids}) < len(ids):
            raise ValueError(f"every choice must have at least one token and differ from the others: {choices!r}")
        n = 0
        while n < min(len(a) for a in ids) - 1 and len({a[n] for a in ids}) == 1:
            n += 1
        return cls(ids, list(ids[0][:n]), [a[n:] for a in ids], _first_tokens_decide(tokenizer, head, ids, n))

    @classmethod
    def by_prompt(cls, tokenizer, prompts: list[str], choices: list[str]) -> list[tuple[Answers, list[int]]]:
        """The prompts' rows grouped by the answers' ids after them (one group per chat template).
        Only the added tokens the first prompt holds are looked for (its template's): a vocabulary
        can add hundreds; a prompt cut at another of them, or at its last characters, is cut right too."""
        added = [t for t in tokenizer.get_added_vocab() if prompts and t in prompts[0]]
        endings: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            endings.setdefault(_ending(p, added), []).append(i)
        groups: dict[tuple, tuple[Answers, list[int]]] = {}
        for ending, rows in endings.items():
            a = cls.after(tokenizer, ending, choices)
            groups.setdefault(tuple(map(tuple, a.ids)), (a, []))[1].extend(rows)
        return list(groups.values())

    @property
    def firsts(self) -> list[int]:
        return [t[0] for t in self.tails]


def _first_tokens_decide(tokenizer, head: list[int], ids: list[list[int]], n: int) -> bool:
    """Whether each answer's first token after the shared opening stands for that answer alone: its
    text opens no other answer's rest. A tokenizer with `【好` but not `【差` spells 【差】 as 【 差 】, and
    P(【) is then the probability of any reply opening with 【, 【好】 spelt 【 好 】 among them. Read
    as text inside the prompt's end (no decoder strips a leading space there); a token that is part
    of a character is not judged: the exact path then."""
    context = head[-8:] + ids[0][:n]
    base = tokenizer.decode(context, skip_special_tokens=False)

    def text(more: list[int]) -> str | None:
        t = tokenizer.decode(context + more, skip_special_tokens=False)
        return t[len(base) :] if t.startswith(base) and "\ufffd" not in t[len(base) :] else None

    firsts, rests = [text(a[n : n + 1]) for a in ids], [text(a[n:]) for a in ids]
    if any(not t for t in firsts + rests):
        return False
    return not any(i != j and rests[j].startswith(firsts[i]) for i in range(len(ids)) for j in range(len(ids)))


def choice_logprobs(tokenizer, prompts: list[str], choices: list[str], read) -> np.ndarray:
    """An engine's choice_logprobs: `read(prompts, answers)` for each group of prompts that read
    the answers as the same tokens, back in the prompts' order."""
    if not choices:
        raise ValueError("choice_logprobs needs at least one choice")
    scores = np.zeros((len(prompts), len(choices)))
    for answers, rows in Answers.by_prompt(tokenizer, prompts, choices):
        scores[rows] = read([prompts[r] for r in rows], answers)
    return scores


class EngineError(RuntimeError):
    """The model or the engine failed; a stage that meets it fails, it publishes nothing."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.5
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    max_tokens: int = 1024
    seed: int = 0  # the transformers engine seeds torch per call; vLLM seeds each request from it and its prompt
    stop: tuple[str, ...] = DEFAULT_STOPS


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@runtime_checkable
class Engine(Protocol):
    backend: str  # "vllm" or "transformers"
    model_name: str
    tokenizer: object  # a transformers tokenizer: chat template and token counts

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]: ...

    def choice_logprobs(self, prompts: list[str], choices: list[str], exact: bool = False) -> np.ndarray: ...

    def perplexity(self, texts: list[str]) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass
class EngineSpec:
    """What load_engine builds: the weights, and how to run them (the role's engine settings from
    kun.yaml, `models.<role>`, as they are: one typed path from the config to the engine)."""

    path: str
    model_name: str
    settings: EngineSettings = field(default_factory=EngineSettings)

    @classmethod
    def of(cls, path: str, model_name: str, **settings) -> EngineSpec:
        """A spec from engine-settings keys (backend, dtype, batch_size, vllm={...}), validated as
        kun.yaml's `models.<role>` is: for tools and tests that build an engine by hand."""
        return cls(path, model_name, EngineSettings.model_validate(settings))


class Tally:
    """An engine that counts what its generations held: over a whole step (every partition it
    serves), none with text means the engine or the model failed; a few empty ones in a small
    partition are a weak model's chance, quarantined as empty_generation and checked."""

    def __init__(self, engine):
        self._engine, self.generations, self.with_text = engine, 0, 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        gens = self._engine.generate(prompts, params)
        self.generations += len(gens)
        self.with_text += sum(1 for g in gens if g.text)
        return gens

    def require_text(self, what: str) -> None:
        if self.generations and not self.with_text:
            raise EngineError(
                f"{what}: model {self._engine.model_name} returned empty text for all {self.generations} prompts of the step; nothing is published"
            )
