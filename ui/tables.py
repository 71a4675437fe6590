"""Frames and figure maps as Dagster table metadata: the UI shows these inline as tables on asset,
partition and check pages (JSON and Markdown values sit behind a "Show" button on check pages)."""

from collections.abc import Mapping

import dagster as dg
import numpy as np
import pandas as pd

_TYPES = {"i": "int", "u": "int", "f": "float", "b": "bool"}
BAR = 24  # characters of the longest bar in a bar column


def _cell(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return None if isinstance(v, float) and np.isnan(v) else v
    if isinstance(v, np.generic):
        return _cell(v.item())
    return str(v.tolist() if isinstance(v, np.ndarray) else v)  # lists, dicts: as text


def table(df: pd.DataFrame, rows: int | None = 5, width: int = 60) -> dg.MetadataValue:
    """The first `rows` rows (all with None), texts cut to `width` characters."""
    head = df if rows is None else df.head(rows)
    cut = lambda v: (v[:width] + "…" if len(v) > width else v).replace("\n", " ") if isinstance(v, str) else v  # noqa: E731
    records = [dg.TableRecord({c: _cell(cut(v)) for c, v in zip(head.columns, r)}) for r in head.itertuples(index=False)]
    schema = dg.TableSchema([dg.TableColumn(str(c), _TYPES.get(head[c].dtype.kind, "string")) for c in head.columns])
    return dg.MetadataValue.table(records, schema)


def figures(values: Mapping, key: str, value: str, bars: bool = False) -> dg.MetadataValue:
    """A {name: figure} map as a two-column table (a histogram gets a third column of text bars)."""
    df = pd.DataFrame({key: [str(k) for k in values], value: list(values.values())})
    if bars:
        top = max([v for v in df[value] if isinstance(v, (int, float))] or [0]) or 1
        df["bar"] = ["█" * round(BAR * v / top) if isinstance(v, (int, float)) else "" for v in df[value]]
    return table(df, rows=None)
