"""Pick and build an engine for a model role."""

from __future__ import annotations

from .base import Engine, EngineError, EngineSpec

BACKENDS = ("transformers",)


def resolve_backend(backend: str) -> str:
    """`auto` is the transformers engine until another backend is installed beside it."""
    if backend == "auto":
        return "transformers"
    if backend not in BACKENDS:
        raise EngineError(f"unknown LLM backend {backend!r}; known: auto, {', '.join(BACKENDS)}")
    return backend


def load_engine(spec: EngineSpec) -> Engine:
    backend = resolve_backend(spec.backend)
    if backend == "transformers":
        from .hf import HFEngine

        return HFEngine(spec)
    raise EngineError(f"backend {backend!r} has no engine")  # pragma: no cover
