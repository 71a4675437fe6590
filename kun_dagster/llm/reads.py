"""choice_logprobs and perplexity as a vLLM engine reads them, in the step's process
(vllm_engine.py) or from a fleet of vLLM servers (server.py): one algorithm over four requests
each engine serves its own way.

- _greedy(prompts, steps, tokens): greedy decoding, the log-probabilities of `tokens` read at each step;
- _next_token_logprobs(prompts, tokens): one step, the log-probability of each candidate next token;
- _prompt_logprobs(seqs, first): log p(seq[k] | seq[:k]) for k >= first, the prompt's own tokens;
- _answer_logprobs(prompts, answers): each answer appended to its prompt, its tokens summed (the
  exact path; by default from _prompt_logprobs, the in-process engine reads it through its prefix cache).
"""

from __future__ import annotations

import math

import numpy as np

from .base import Answers, choice_logprobs, encode


class LogprobReads:
    tokenizer: object
    max_len: int
    kv_tokens: int | None = None  # the engine's KV cache in tokens, where it knows it

    def _greedy(self, prompt_ids: list[list[int]], steps: int, tokens: list[int]) -> list[tuple[list[int], list[dict[int, float]]]]:
        raise NotImplementedError

    def _next_token_logprobs(self, prompt_ids: list[list[int]], tokens: list[int]) -> np.ndarray:
        raise NotImplementedError

    def _prompt_logprobs(self, seqs: list[list[int]], first: list[int]) -> list[np.ndarray]:
        raise NotImplementedError

    def _answer_logprobs(self, prompt_ids: list[list[int]], answers: list[list[int]]) -> np.ndarray:
        jobs = [(r, c) for r in range(len(prompt_ids)) for c in range(len(answers))]
        rows = self._prompt_logprobs([prompt_ids[r] + answers[c] for r, c in jobs], [len(prompt_ids[r]) for r, _ in jobs])
        scores = np.zeros((len(prompt_ids), len(answers)))
        for (r, c), lp in zip(jobs, rows):
            scores[r, c] = lp.sum()
        return scores

    # -- the protocol's reads --------------------------------------------------------------------
    def choice_logprobs(self, prompts: list[str], choices: list[str], exact: bool = False) -> np.ndarray:
        """log P(answer | prompt) per prompt and answer (not normalised)."""
        return choice_logprobs(self.tokenizer, prompts, choices, lambda ps, a: self._read(ps, a, exact or not a.fast))

    def _read(self, prompts: list[str], a: Answers, exact: bool) -> np.ndarray:
        prompt_ids = encode(self.tokenizer, prompts, special=False)
        if exact:
            return self._answer_logprobs(prompt_ids, a.ids)
        scores, left = self._greedy_reads(prompt_ids, a.common, a.firsts)
        if left:
            scores[left] = self._opening_in_prompt([prompt_ids[r] for r in left], a.common, a.firsts)
        return scores

    def _greedy_reads(self, prompt_ids: list[list[int]], common: list[int], firsts: list[int]) -> tuple[np.ndarray, list[int]]:
        """One greedy request per prompt, len(common) + 1 steps, each step's log-probabilities of the
        opening token and of the differing ones read on the way. A row whose answer mass is at least
        0.5 always follows the opening (each of its tokens then holds over half the mass, so it is
        the greedy choice); a row that leaves it (the rows under the mass, mostly) is returned to
        be read the slower way."""
        scores, left = np.zeros((len(prompt_ids), len(firsts))), []
        for r, (tokens, steps) in enumerate(self._greedy(prompt_ids, len(common) + 1, sorted(set(common) | set(firsts)))):
            if tokens[: len(common)] != common or len(steps) < len(common) + 1:
                left.append(r)
                continue
            opening = sum(steps[j][t] for j, t in enumerate(common))
            scores[r] = [opening + steps[len(common)][t] for t in firsts]
        return scores, left

    def _opening_in_prompt(self, prompt_ids: list[list[int]], common: list[int], firsts: list[int]) -> np.ndarray:
        """The opening's tokens put in the prompt one at a time: one max_tokens=1 request per
        opening token, then one for the differing ones, each extending the last round's prompts by
        one token so the prefix cache serves them."""
        scores = np.zeros((len(prompt_ids), len(firsts)))
        step = self._chunk(prompt_ids)
        for start in range(0, len(prompt_ids), step):
            rows = list(range(start, min(start + step, len(prompt_ids))))
            for j in range(len(common) + 1):
                wanted = [common[j]] if j < len(common) else firsts
                got = self._next_token_logprobs([prompt_ids[r] + common[:j] for r in rows], wanted)
                scores[rows] += got if j == len(common) else got[:, :1]
        return scores

    def _chunk(self, prompt_ids: list[list[int]]) -> int:
        """Prompts per scoring round: few enough that their KV stays cached between the two rounds."""
        if not self.kv_tokens or not prompt_ids:
            return 256
        longest = max(len(p) for p in prompt_ids) + 8
        return max(1, self.kv_tokens // (2 * longest))

    def perplexity(self, texts: list[str]) -> np.ndarray:
        """exp of the mean next-token negative log-likelihood; NaN for a text of under two tokens."""
        encoded = [ids[: self.max_len - 1] for ids in encode(self.tokenizer, texts, special=True)]  # room for the one sampled token
        out = np.full(len(texts), math.nan)
        idx = [i for i, ids in enumerate(encoded) if len(ids) >= 2]
        for i, rows in zip(idx, self._prompt_logprobs([encoded[i] for i in idx], [1] * len(idx))):
            out[i] = float(np.exp(-rows.mean()))
        return out
