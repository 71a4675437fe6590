"""Each asset's code version: a hash of the kun.yaml keys and the prompt texts that shape its output,
and the package version. Dagster compares it with the version each partition was materialized
under: a changed key makes exactly the assets it shapes stale (their downstream follow by data
version). Keys that change how, not what (storage, checks, deploy, batch sizes, KV cache) are left
out. docs/ARCHITECTURE.md has the table.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata

from . import dedup, evaluation, prompts, registry, secrets
from .config import KunConfig, TrainSettings
from .llm.factory import resolve_backend
from .registry import FILTERED, SIGNATURES, split_round


def _engine(role: str) -> tuple[str, ...]:
    """What of a role's engine settings shapes its outputs: which engine, its numerics, its seeds."""
    m = f"models.{role}"
    return (
        f"{m}.backend",
        f"{m}.dtype",
        f"{m}.vllm.quantization",
        f"{m}.vllm.seed",
        f"{m}.vllm.seed_per_request",
        "models.keep_default_system",
    )


def _prompts() -> dict[str, str]:
    """The prompt texts as the stages render them, placeholders for the row's fields."""
    return {
        "label": prompts.label_user("{text}"),
        "point": prompts.point_user("{instruction}"),
        "humpback": prompts.humpback_user("{instruction}", "{answer}"),
        "answer": prompts.answer_user("{text}", "{instruction}"),
        "tag_task_type": prompts.tag_user("task_type", "{instruction}", "{answer}", ["{options}"]),
        "tag_domain": prompts.tag_user("domain", "{instruction}", "{answer}", ["{options}"]),
        "judge": evaluation.judge_user("{instruction}", "{first}", "{second}"),
    }


def _shapes(asset: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(kun.yaml keys, prompt names) that shape an asset, from its spec: a later round's chat model
    has its own keys (it is always trained); a stage's engine settings follow its role.
    Models' own weights reach their consumers as data versions."""
    stage, round_ = split_round(asset)
    spec = registry.BY_NAME[stage]
    keys = spec.later_shapes if round_ > 1 and spec.later_shapes is not None else spec.shapes
    return keys + (_engine(spec.engine) if spec.engine else ()), spec.prompts


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def shaping(asset: str, cfg: KunConfig) -> dict:
    """The keys, prompt texts and versions an asset's output depends on, by name."""
    keys, names = _shapes(asset)
    role = asset.removesuffix("_model")
    if role in ("base", "label", "chat") and getattr(cfg.models, role).path:  # a given checkpoint is used as it is
        keys, names = (f"models.{role}.path",), ()
    if asset == FILTERED and cfg.filter.perplexity_max is not None:
        keys = keys + _engine(cfg.filter.perplexity_model)
    tree = cfg.model_dump(mode="json")
    texts = _prompts()
    out = {"package": metadata.version("kun-dagster"), **{k: _get(tree, k) for k in keys}, **{f"prompt.{n}": texts[n] for n in names}}
    for k in keys:
        if k.endswith(".backend"):  # the engine that runs: `auto` on a machine that gains or loses vLLM is another
            out[k] = resolve_backend(out[k])
        elif k.endswith(".train"):  # how often training saves a checkpoint changes no weight
            out[k] = {x: v for x, v in out[k].items() if x not in TrainSettings.NOT_SHAPING}
    if asset == SIGNATURES:
        out["algorithm"] = dedup.ALGORITHM
    return out


def data_keys() -> set[str]:
    """Every kun.yaml key that shapes some asset's output: what a dataset card may publish."""
    keys = {k for spec in registry.SPECS for k in (*spec.shapes, *(spec.later_shapes or ()))}
    keys |= {k for role in ("base", "label", "chat") for k in _engine(role)}
    return {k for k in keys if not any(k.startswith(other + ".") for other in keys)}  # "filter" covers "filter.max_tokens"


def published_config(cfg: KunConfig) -> dict:
    """The config as a card publishes it: only the keys that shape the data (storage, credentials,
    engine_kwargs, deploy and checks are not among them), in kun.yaml's order, with credential-shaped
    values and URI passwords masked all the same."""
    keys = data_keys()

    def pick(node, path: str):
        if path in keys:
            return secrets.published(node)
        if not isinstance(node, dict):
            return _SKIP
        out = {k: pick(v, f"{path}.{k}" if path else k) for k, v in node.items()}
        return {k: v for k, v in out.items() if v is not _SKIP} or _SKIP

    picked = pick(cfg.model_dump(mode="json"), "")
    return {} if picked is _SKIP else picked


_SKIP = object()


def code_version(asset: str, cfg: KunConfig) -> str:
    return hashlib.sha256(json.dumps(shaping(asset, cfg), sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
