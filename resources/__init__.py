"""Dagster resources: the Kun config, the LLM engines per model role, the IO managers."""

from .io import ModelRefIOManager, ParquetIOManager
from .kun import KunResource
from .llm import LLMResource

__all__ = ["KunResource", "LLMResource", "ModelRefIOManager", "ParquetIOManager"]
