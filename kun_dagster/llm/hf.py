"""The transformers engine: the CPU default and the reference the other backends are tested against."""

from __future__ import annotations

import gc
import math

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..text import strip_stop_strings
from .base import EngineError, EngineSpec, Generation, SamplingParams, encode, normalise, stop_token_ids

hf_logging.disable_progress_bar()  # progress bars would flood the Dagster run logs


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' was asked for but torch sees no GPU")
    return name


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


class HFEngine:
    backend = "transformers"

    def __init__(self, spec: EngineSpec):
        self.model_name = spec.model_name
        self.batch_size = spec.batch_size
        self.device = _device(spec.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.path)
            self.model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=_dtype(spec.dtype, self.device))
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"transformers could not load model {spec.model_name} from {spec.path}: {e}") from e
        self.model.to(self.device).eval()
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_ids = stop_token_ids(tok)
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 4096))

    # -- helpers -------------------------------------------------------------------------------
    def _pad(self, seqs: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Left padding (generation) repeats the row's own first token: the attention mask hides it
        from the model, and transformers' repetition penalty, which also reads padding, then sees no
        token the row does not have. With a shared pad token (<|endoftext|>, a stop token) that
        token was penalised in padded rows only, so results depended on batching (and on vLLM)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            if left and s:
                ids[i, : width - len(s)] = s[0]
            ids[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def _token_logprobs(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence (right-padded batch)."""
        ids, mask = self._pad(seqs, left=False)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        return [logp[i, : len(s) - 1].cpu().numpy() for i, s in enumerate(seqs)]

    # -- protocol ------------------------------------------------------------------------------
    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        encoded = encode(self.tokenizer, prompts, special=False)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # less padding
        out: list[Generation | None] = [None] * len(prompts)
        torch.manual_seed(params.seed)
        sample = params.temperature > 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask = self._pad([encoded[i] for i in idx], left=True)
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=sample,
                    temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
                    top_k=0 if sample else None, repetition_penalty=params.repetition_penalty,
                    max_new_tokens=params.max_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                )
            for row, i in enumerate(idx):
                new = gen[row, ids.shape[1]:].tolist()
                ended = next((k for k, t in enumerate(new) if t in self.eos_ids), None)
                tokens = new if ended is None else new[:ended]
                raw = self.tokenizer.decode(tokens, skip_special_tokens=False)
                text = strip_stop_strings(raw, params.stop)
                stopped = ended is not None or len(text) < len(raw.strip())
                out[i] = Generation(text=text, num_tokens=len(tokens), finish_reason="stop" if stopped else "length")
        return out  # type: ignore[return-value]

    def choice_probs(self, prompts: list[str], choices: list[str]) -> np.ndarray:
        """Sum of the answer's token log-probabilities after the prompt, normalised over the answers."""
        if not choices:
            raise ValueError("choice_probs needs at least one choice")
        prompt_ids = encode(self.tokenizer, prompts, special=False)
        choice_ids = encode(self.tokenizer, choices, special=False)
        scores = np.zeros((len(prompts), len(choices)))
        step = max(1, self.batch_size // len(choices))
        for start in range(0, len(prompts), step):
            rows = range(start, min(start + step, len(prompts)))
            seqs = [prompt_ids[r] + c for r in rows for c in choice_ids]
            logps = self._token_logprobs(seqs)
            for k, (r, c) in enumerate((r, c) for r in rows for c in range(len(choices))):
                n = len(choice_ids[c])
                scores[r, c] = float(logps[k][-n:].sum())
        return normalise(scores)

    def perplexity(self, texts: list[str]) -> np.ndarray:
        encoded = [ids[: self.max_len] for ids in encode(self.tokenizer, texts, special=True)]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        out = np.full(len(texts), math.nan)
        for start in range(0, len(order), self.batch_size):
            idx = [i for i in order[start : start + self.batch_size] if len(encoded[i]) >= 2]
            if not idx:
                continue
            for i, lp in zip(idx, self._token_logprobs([encoded[i] for i in idx])):
                out[i] = float(np.exp(-lp.mean()))
        return out

    def close(self) -> None:
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
