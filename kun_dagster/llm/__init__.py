"""One engine protocol for every LLM stage; backends implement it (vllm_engine.py, hf.py)."""

from .base import Engine, EngineError, Generation, SamplingParams
from .factory import load_engine, resolve_backend

__all__ = ["Engine", "EngineError", "Generation", "SamplingParams", "load_engine", "resolve_backend"]
