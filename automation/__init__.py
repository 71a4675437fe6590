"""Keeping the graph fresh: the source files observed per partition (their data versions), the
automation conditions the daemon evaluates, and what `kun run` must make (stale.to_make)."""

from .conditions import apply_automation, automation_sensors
from .sources import SOURCE_FILES, observe_sources, record_observations, source_files

__all__ = ["SOURCE_FILES", "apply_automation", "automation_sensors", "observe_sources", "record_observations", "source_files"]
