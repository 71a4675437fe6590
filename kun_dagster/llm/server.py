"""The server engine: a model role's requests sent to vLLM servers (`vllm serve`, one or more
replicas or a load balancer) through their OpenAI-compatible completions API, instead of a vLLM
inside the step's process.

The requests are the in-process engine's (vllm_engine.py), one per prompt: the same token ids
(tokenized here by the model's own tokenizer, checked against the servers' at start), the same
sampling parameters written out in full (a server otherwise fills unset ones from the model's
generation_config.json), the same per-request seeds; choice_logprobs reads `logprob_token_ids`
along a greedy reply, perplexity and the exact path the prompt's own tokens (`prompt_logprobs: 0`).
Checkpoints are the Checkpointed wrapper's, as for any engine: a server killed mid-partition
fails the step once its retries run out, and the rerun resumes at the last finished batch.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from transformers import AutoTokenizer

from ..secrets import mask_uris
from ..text import strip_stop_strings
from .base import EngineError, EngineSpec, Generation, SamplingParams, encode, request_seed, stop_token_ids
from .endpoints import Endpoints
from .reads import LogprobReads

log = logging.getLogger(__name__)

# What the tokenizer check sends: CJK, Latin, digits, spaces and a chat template's tokens.
PROBE = "<|im_start|>user\n你好，世界！ Hello world 123 —— 《坤》\t  两个空格<|im_end|>\n"


class ServerEngine(LogprobReads):
    backend = "server"

    def __init__(self, spec: EngineSpec):
        s = spec.settings.server
        self.model_name = spec.model_name
        self.settings = spec.settings.vllm  # seed_per_request, as in process
        key = None
        if s.api_key_env:
            key = os.environ.get(s.api_key_env)
            if not key:
                raise EngineError(f"models: the servers' key is read from ${s.api_key_env}, which is not set")
        self.fleet = Endpoints(s.urls, f"vLLM server of model {spec.model_name}", key, s.timeout_s, s.retries, s.backoff_s, s.max_in_flight)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.path)
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"could not load the tokenizer of model {spec.model_name} from {spec.path}: {e}") from e
        self.eos_ids = stop_token_ids(self.tokenizer)
        self.served, self.max_len = self._served(s.model)

    def _served(self, wanted: str | None) -> tuple[str, int]:
        """The model every URL that answers serves (`model`, or the one each lists) and the shortest
        context among them; each checked to read text as this model's tokenizer does. A URL that
        does not answer (a replica down) is left to the retries; none answering is an error."""
        names, lengths, down = set(), [], []
        for url in self.fleet.urls:
            try:
                cards = self.fleet.request("/models", url=url).get("data") or []
            except EngineError as e:
                down.append(e)
                continue
            ids = [c.get("id") for c in cards]
            name = wanted or (ids[0] if len(ids) == 1 else None)
            if name is None or name not in ids:
                raise EngineError(
                    f"{self.fleet.what}: {mask_uris(url)} serves {ids or 'no model'}; "
                    + (f"not {wanted!r}" if wanted else "name the one to use (server.model)")
                )
            names.add(name)
            lengths += [c.get("max_model_len") for c in cards if c.get("id") == name and c.get("max_model_len")]
            self._same_tokenizer(url, name)
        if not names:
            raise down[0]
        if len(names) > 1:
            raise EngineError(f"{self.fleet.what}: the URLs serve different models {sorted(names)}; name one (server.model)")
        for e in down:
            log.warning("%s; the other URLs serve it", e)
        return names.pop(), int(min(lengths)) if lengths else 4096

    def _same_tokenizer(self, url: str, name: str) -> None:
        """Prompts go as token ids: a server must read text as this model's tokenizer does (one of
        another model family would otherwise answer other prompts without a word)."""
        mine = encode(self.tokenizer, [PROBE], special=False)[0]
        theirs = self.fleet.request("/tokenize", {"model": name, "prompt": PROBE, "add_special_tokens": False}, url=url.removesuffix("/v1"))
        if theirs.get("tokens") != mine:
            raise EngineError(
                f"{self.fleet.what}: {mask_uris(url)} serves {name!r}, whose tokenizer reads text otherwise than "
                f"model {self.model_name}'s: the servers must serve this role's model"
            )

    # -- requests ----------------------------------------------------------------------------------
    def _complete(self, prompt_ids: list[list[int]], bodies: list[dict] | dict, each) -> list:
        """One completion request per prompt (a body each, or one for all); `each(choice)` of each reply."""
        if not prompt_ids:
            return []
        if isinstance(bodies, dict):
            bodies = [bodies] * len(prompt_ids)
        requests = [{"model": self.served, "prompt": ids, "n": 1, **b} for ids, b in zip(prompt_ids, bodies)]
        return self.fleet.map("/completions", requests, lambda reply: each(self._choice(reply)))

    def _choice(self, reply: dict) -> dict:
        choice = (reply.get("choices") or [None])[0]
        if not choice or choice.get("finish_reason") not in ("stop", "length"):
            reason = choice.get("finish_reason") if choice else "no choice"
            raise EngineError(f"{self.fleet.what}: request {reply.get('id')} ended with {reason!r}")
        return choice

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        body = {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p if params.temperature > 0 else 1.0,
            **_NEUTRAL,
            "repetition_penalty": params.repetition_penalty,
            "stop": list(params.stop),
            "stop_token_ids": self.eos_ids,
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        bodies = body
        if self.settings.seed_per_request and params.temperature > 0:
            bodies = [{**body, "seed": request_seed(params.seed, p)} for p in prompts]

        def generation(c: dict) -> Generation:
            tokens = list(c.get("token_ids") or [])
            if tokens and tokens[-1] in self.eos_ids:
                tokens = tokens[:-1]
            return Generation(
                text=strip_stop_strings(c.get("text") or "", params.stop), num_tokens=len(tokens), finish_reason=c["finish_reason"]
            )

        return self._complete(encode(self.tokenizer, prompts, special=False), bodies, generation)

    def _read_steps(self, prompt_ids: list[list[int]], steps: int, tokens: list[int], greedy_eos: bool) -> list:
        body = {
            "max_tokens": steps,
            "temperature": 0.0,
            **_NEUTRAL,
            "ignore_eos": greedy_eos,
            "logprobs": len(tokens),
            "logprob_token_ids": tokens,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
        }

        def read(c: dict) -> tuple[list[int], list[dict[int, float]]]:
            tops = (c.get("logprobs") or {}).get("top_logprobs") or []
            return list(c.get("token_ids") or []), [
                {int(k.removeprefix("token_id:")): float(v) for k, v in (t or {}).items()} for t in tops
            ]

        return self._complete(prompt_ids, body, read)

    def _greedy(self, prompt_ids: list[list[int]], steps: int, tokens: list[int]) -> list[tuple[list[int], list[dict[int, float]]]]:
        return self._read_steps(prompt_ids, steps, tokens, greedy_eos=True)

    def _next_token_logprobs(self, prompt_ids: list[list[int]], tokens: list[int]) -> np.ndarray:
        reads = self._read_steps(prompt_ids, 1, tokens, greedy_eos=False)
        return np.array([[steps[0][t] for t in tokens] for _, steps in reads], dtype=float).reshape(len(prompt_ids), len(tokens))

    def _prompt_logprobs(self, seqs: list[list[int]], first: list[int]) -> list[np.ndarray]:
        """From `prompt_logprobs: 0`: each position's entry holds the prompt's own token (the
        server computes the whole prompt for it, its prefix cache is not read)."""
        body = {"max_tokens": 1, "temperature": 0.0, **_NEUTRAL, "prompt_logprobs": 0}

        def rows(c: dict) -> list[dict]:
            return c.get("prompt_logprobs") or []

        out = []
        for ids, f, got in zip(seqs, first, self._complete(seqs, body, rows)):
            if len(got) != len(ids) or any(str(t) not in (got[k] or {}) for k, t in enumerate(ids[f:], f)):
                raise EngineError(f"{self.fleet.what} returned prompt logprobs for other tokens than the prompt's")
            out.append(np.array([got[k][str(t)]["logprob"] for k, t in enumerate(ids[f:], f)], dtype=float))
        return out

    def close(self) -> None:
        self.fleet.close()


# Every other sampling parameter at vLLM's own neutral value, so a server's generation_config
# defaults (a top_k, a repetition_penalty) do not change what the in-process engine would do.
_NEUTRAL = {"top_k": 0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
