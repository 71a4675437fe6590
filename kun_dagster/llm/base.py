"""The engine protocol (DESIGN.md, "LLM work").

- generate(prompts, params): one completion per prompt, in order.
- choice_probs(prompts, choices): for each prompt, the normalised probability of each answer
  string as the prompt's continuation (【好】 vs 【差】, or 1..5): a reply that cannot be parsed
  does not exist.
- perplexity(texts): exp of the mean next-token negative log-likelihood of each text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

# Kun cuts generations at these, whatever the model's own EOS is.
DEFAULT_STOPS = ("<|endoftext|>", "</s>", "<|im_end|>")


def stop_token_ids(tokenizer) -> list[int]:
    """The token ids a generation ends at: the tokenizer's EOS and whichever of DEFAULT_STOPS it has."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in DEFAULT_STOPS if t in vocab}
    return sorted(i for i in ids if i is not None)


def encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of each text, in one batch call: every engine feeds its model exactly these."""
    return tokenizer(list(texts), add_special_tokens=special)["input_ids"] if texts else []


def request_seed(seed: int, prompt: str) -> int:
    """A request's own sampling seed: the run's seed and the prompt, nothing about its batch."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{prompt}".encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") & 0x7FFFFFFF


def normalise(log_scores: np.ndarray) -> np.ndarray:
    """Per-row softmax of summed answer log-probabilities: choice_probs' common last step."""
    probs = np.exp(log_scores - log_scores.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


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

    def choice_probs(self, prompts: list[str], choices: list[str]) -> np.ndarray: ...

    def perplexity(self, texts: list[str]) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass
class EngineSpec:
    """What a resource hands to load_engine: the weights and how to run them."""

    path: str
    model_name: str
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    extra: dict = field(default_factory=dict)  # backend settings, e.g. {"vllm": VLLMSettings fields}
