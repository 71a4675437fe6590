"""One engine protocol for every LLM stage; backends implement it (hf.py today)."""

from .base import Engine, EngineError, Generation, SamplingParams
from .factory import load_engine, resolve_backend

__all__ = ["Engine", "EngineError", "Generation", "SamplingParams", "load_engine", "resolve_backend"]
