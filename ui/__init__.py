"""What the Dagster UI shows beside the data: frames and figure maps as table metadata. Used by the
assets (stage figures, previews) and the checks (failing rows, figures by partition) alike."""

from .tables import figures, table

__all__ = ["figures", "table"]
