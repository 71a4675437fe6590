"""Progress of long work (training steps; documents and prompts per stage and partition) for
whoever is watching. `kun run` and `kun demo` turn on bars with rate and ETA (tqdm, on stderr);
inside Dagster's own runs nothing is drawn (the run's metadata and logs report the counts)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


_bars = False


def show(on: bool = True) -> None:
    """Draw bars from now on in this process (the CLI runs Dagster's steps in-process)."""
    global _bars
    _bars = on


@contextmanager
def task(desc: str, total: int | None = None, unit: str = "rows") -> Iterator[object]:
    """A bar for one piece of work: `update(n)` as it goes; closed at the end, also on failure."""
    if not _bars:
        yield _Silent()
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, leave=True)
    try:
        yield bar
    finally:
        bar.close()
