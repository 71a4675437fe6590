"""Dagster resources: the Kun config, the LLM engines per model role, the IO managers."""

from .io import ALL, ARROW, STREAM, TALLY, ModelRefIOManager, ParquetIOManager, ReportIOManager
from .kun import KunResource
from .llm import LLMResource

__all__ = ["ALL", "ARROW", "STREAM", "TALLY", "KunResource", "LLMResource", "ModelRefIOManager", "ParquetIOManager", "ReportIOManager"]
