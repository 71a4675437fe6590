"""Pick and build an engine for a model role."""

from __future__ import annotations

import importlib.util

from .base import Engine, EngineError, EngineSpec

BACKENDS = ("vllm", "transformers", "server")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    """`auto` is vLLM wherever it is installed, else the transformers engine."""
    if backend == "auto":
        return "vllm" if vllm_installed() else "transformers"
    if backend not in BACKENDS:
        raise EngineError(f"unknown LLM backend {backend!r}; known: auto, {', '.join(BACKENDS)}")
    return backend


def load_engine(spec: EngineSpec) -> Engine:
    backend = resolve_backend(spec.settings.backend)
    if backend == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(spec)
    if backend == "server":
        from .server import ServerEngine

        return ServerEngine(spec)
    from .hf import HFEngine

    return HFEngine(spec)
