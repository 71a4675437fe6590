"""Progress of long work (training steps; documents and prompts per stage and partition) for
whoever is watching. `kun run` and `kun demo` choose how: bars with rate and ETA on a terminal
(tqdm, on stderr), plain lines where output goes to a log (CI, a Kubernetes pod, `kun run > log`):
whenever `interval` seconds have passed without a progress line, the work under way writes one
(done / total, rate, ETA; a heartbeat thread, so a single long batch or training step still
reports), and work that wrote a line writes its total when it ends. Short work writes nothing:
a log of a thousand small partitions stays readable. Inside Dagster's own runs nothing is drawn
(the run's metadata and logs report the counts)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

OFF, BARS, LINES = "off", "bars", "lines"
INTERVAL = 30.0  # seconds without a progress line, at most, while work is under way

_mode = OFF
_interval = INTERVAL
_out: TextIO | None = None  # None: sys.stdout as it is when a line is written (pytest swaps it)
_last = time.monotonic()  # when the last progress line was written (or lines were turned on)
_lock = threading.Lock()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Lines:
    """A tqdm-like counter that writes plain lines: `desc: done/total unit (pct), rate, ETA`."""

    def __init__(self, desc: str, total: int | None, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = 0
        self.t0 = time.monotonic()
        self.said = False
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"progress {desc}", daemon=True)
        self._beat.start()

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total is not None and rate > 0 and self.n < self.total:
            eta = f", ETA {_clock((self.total - self.n) / rate)}"
        return f"{self.desc}: {done} {self.unit}{pct}, {rate:.2f} {self.unit}/s, {_clock(elapsed)} elapsed{eta}"

    def _due(self) -> None:
        with _lock:
            if time.monotonic() - _last >= _interval:
                _write(self.line())
                self.said = True

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.05, _last + _interval - time.monotonic())):
            self._due()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._due()

    def close(self) -> None:
        self._stop.set()
        self._beat.join()
        if self.said:  # long work: its total; short work said nothing and says nothing now
            elapsed = time.monotonic() - self.t0
            with _lock:
                _write(f"{self.desc}: {self.n} {self.unit} in {_clock(elapsed)} ({self.n / max(elapsed, 1e-9):.2f} {self.unit}/s)")


def _write(line: str) -> None:
    """One progress line (under _lock); the interval counts from here."""
    global _last
    print(line, file=_out or sys.stdout, flush=True)
    _last = time.monotonic()


def show(on: bool | str = True, interval: float = INTERVAL, out: TextIO | None = None) -> None:
    """From now on in this process (the CLI runs Dagster's steps in-process): `bars` (or True),
    `lines` every `interval` seconds to `out` (default stdout), or `off` (or False)."""
    global _mode, _interval, _out, _last
    chosen = BARS if on is True else OFF if on is False else on
    if chosen not in (OFF, BARS, LINES):
        raise ValueError(f"progress: {on!r} is not one of {OFF}, {BARS}, {LINES}")
    _mode, _interval, _out, _last = chosen, interval, out, time.monotonic()


def mode(choice: str, stdout_tty: bool, stderr_tty: bool) -> str:
    """What `--progress auto` means here: bars where a person watches a terminal, lines where
    standard output is a log (bars on stderr would reach no log, and redraw into a pod's)."""
    if choice == "on":
        return BARS
    if choice != "auto":
        return choice
    return BARS if stdout_tty and stderr_tty else LINES


@contextmanager
def task(desc: str, total: int | None = None, unit: str = "rows") -> Iterator[object]:
    """Progress of one piece of work: `update(n)` as it goes; closed at the end, also on failure."""
    if _mode == OFF:
        yield _Silent()
        return
    if _mode == LINES:
        bar = _Lines(desc, total, unit)
    else:
        from tqdm import tqdm

        bar = tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, leave=True)
    try:
        yield bar
    finally:
        bar.close()
