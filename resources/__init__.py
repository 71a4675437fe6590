"""Dagster resources: the Kun config, the LLM engines per model role, the IO managers."""

from .io import ARROW, STREAM, ModelRefIOManager, ParquetIOManager, ReportIOManager
from .kun import KunResource
from .llm import LLMResource

__all__ = ["ARROW", "STREAM", "KunResource", "LLMResource", "ModelRefIOManager", "ParquetIOManager", "ReportIOManager"]
