"""Dagster resources: the Kun config, the LLM engines per model role, the IO managers."""

from .io import STREAM, ModelRefIOManager, ParquetIOManager
from .kun import KunResource
from .llm import LLMResource

__all__ = ["STREAM", "KunResource", "LLMResource", "ModelRefIOManager", "ParquetIOManager"]
