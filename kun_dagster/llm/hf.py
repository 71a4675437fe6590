"""The transformers engine: the CPU default and the reference the other backends are tested against."""

from __future__ import annotations

import gc
import math

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..text import strip_stop_strings
from .base import Answers, EngineError, EngineSpec, Generation, SamplingParams, choice_logprobs, encode, stop_token_ids

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
        s = spec.settings
        self.model_name = spec.model_name
        self.batch_size = s.batch_size
        self.device = _device(s.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.path)
            self.model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=_dtype(s.dtype, self.device))
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

    def token_logprobs(self, seqs: list[list[int]]) -> list[np.ndarray]:
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
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=sample,
                    temperature=params.temperature if sample else None,
                    top_p=params.top_p if sample else None,
                    top_k=0 if sample else None,
                    repetition_penalty=params.repetition_penalty,
                    max_new_tokens=params.max_tokens,
                    eos_token_id=self.eos_ids,
                    pad_token_id=self.pad_id,
                )
            for row, i in enumerate(idx):
                new = gen[row, ids.shape[1] :].tolist()
                ended = next((k for k, t in enumerate(new) if t in self.eos_ids), None)
                tokens = new if ended is None else new[:ended]
                raw = self.tokenizer.decode(tokens, skip_special_tokens=False)
                text = strip_stop_strings(raw, params.stop)
                stopped = ended is not None or len(text) < len(raw.strip())
                out[i] = Generation(text=text, num_tokens=len(tokens), finish_reason="stop" if stopped else "length")
        return out  # type: ignore[return-value]

    def choice_logprobs(self, prompts: list[str], choices: list[str], exact: bool = False) -> np.ndarray:
        """log P(answer | prompt) per prompt and answer. One forward pass over prompt + the answers'
        shared opening gives that opening's log-probability and the next-token distribution, from
        which each answer's first differing token is read (the fast path). exact=True continues
        each answer's remaining tokens from the same KV cache, cropped back after each answer: the
        prompt is computed once however many answers there are."""
        return choice_logprobs(self.tokenizer, prompts, choices, lambda ps, a: self._read(ps, a, exact or not a.fast))

    def _read(self, prompts: list[str], a: Answers, exact: bool) -> np.ndarray:
        common, tails = a.common, a.tails
        prompt_ids = encode(self.tokenizer, prompts, special=False)
        scores = np.zeros((len(prompts), len(tails)))
        order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))  # less padding
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask = self._pad([prompt_ids[i] + common for i in idx], left=True)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                out = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=exact, logits_to_keep=len(common) + 1
                )  # only the rows that are read: a 150k vocabulary is large
                logp = torch.log_softmax(out.logits.float(), dim=-1)
                opening = sum((logp[:, j, t] for j, t in enumerate(common)), torch.zeros(len(idx), device=logp.device))
                nxt = logp[:, -1]
                for c, tail in enumerate(tails):
                    lp = opening + nxt[:, tail[0]]
                    if exact and len(tail) > 1:
                        lp = lp + self._continue(out.past_key_values, mask, pos, tail)
                        out.past_key_values.crop(-(len(tail) - 1))  # back to the prompt's KV
                    scores[idx, c] = lp.cpu().numpy()
        return scores

    def _continue(self, cache, mask: torch.Tensor, pos: torch.Tensor, tail: list[int]) -> torch.Tensor:
        """Sum of log p(tail[k] | prompt, tail[:k]) for k >= 1, the prompt's KV read from `cache`."""
        n = len(mask)
        ids = torch.tensor(tail[:-1], device=self.device).expand(n, -1)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        pos = pos[:, -1:] + 1 + torch.arange(ids.shape[1], device=self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
        want = torch.tensor(tail[1:], device=self.device).expand(n, -1)
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, want[..., None])[..., 0].sum(dim=1)

    def perplexity(self, texts: list[str]) -> np.ndarray:
        encoded = [ids[: self.max_len] for ids in encode(self.tokenizer, texts, special=True)]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        out = np.full(len(texts), math.nan)
        for start in range(0, len(order), self.batch_size):
            idx = [i for i in order[start : start + self.batch_size] if len(encoded[i]) >= 2]
            if not idx:
                continue
            for i, lp in zip(idx, self.token_logprobs([encoded[i] for i in idx])):
                out[i] = float(np.exp(-lp.mean()))
        return out

    def close(self) -> None:
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
