"""Progress bars: tqdm on a terminal, one plain line per interval in logs.

Without a terminal (a batch job, ``2> log``), tqdm's carriage-return frames fill a log with redraws; `progress_bar`
then returns a `LineProgress`, which writes ``desc: 1200/4096 pair (29%), 41.3 pair/s, eta 1m10s [loss=0.12]``
to stderr at most once per interval (30 s, or ``LMM_PROGRESS_INTERVAL`` seconds) and once more on close.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, Union

from tqdm import tqdm

INTERVAL_ENV = "LMM_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def _interval() -> float:
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


class LineProgress:
    """tqdm's update/set_postfix/close/iteration/context-manager subset, writing whole lines, no carriage returns."""

    def __init__(self, total: int | None = None, *, desc: str, unit: str = "it", enabled: bool = True,
                 initial: int = 0, iterable: Iterable | None = None, interval: float | None = None,
                 file: TextIO | None = None) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n = self.initial = initial
        self.iterable = iterable
        self.interval = interval if interval is not None else _interval() if enabled else DEFAULT_INTERVAL
        self.file = file
        self.postfix: dict[str, str] = {}
        self.closed = False
        self.start = self.last = time.monotonic()

    def line(self, final: bool = False) -> str:
        """The status line: count, share of total, rate, eta (elapsed time when final), postfix."""
        elapsed = time.monotonic() - self.start
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{count} {self.unit}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{_number(rate)} {self.unit}/s")
        if final:
            parts.append(f"in {_duration(elapsed)}")
        elif rate > 0 and self.total is not None and self.total > self.n:
            parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        text = f"{self.desc}: {', '.join(parts)}"
        if self.postfix:
            text += " [" + ", ".join(f"{k}={v}" for k, v in self.postfix.items()) + "]"
        return text

    def _write(self, final: bool = False) -> None:
        out = self.file or sys.stderr
        out.write(self.line(final) + "\n")
        out.flush()
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Advance by n; write a line if the interval has passed since the last one (or the start)."""
        self.n += n
        if self.enabled and not self.closed and time.monotonic() - self.last >= self.interval:
            self._write()

    def set_postfix(self, refresh: bool = True, **kwargs: Any) -> None:
        """Values shown in brackets on the following lines (floats as 4 significant digits)."""
        self.postfix = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in kwargs.items()}

    def close(self) -> None:
        """Write the final line (once)."""
        if self.enabled and not self.closed:
            self._write(final=True)
        self.closed = True

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LineProgress: nothing to iterate (no iterable given)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Progress = Union[tqdm, LineProgress]


def progress_bar(total: int | None = None, *, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
             iterable: Iterable | None = None, leave: bool = True, dynamic_ncols: bool = False) -> Progress:
    """A progress bar over `total` units (or over `iterable`): tqdm when stderr is a terminal, else a `LineProgress`.

    enabled=False writes nothing. leave and dynamic_ncols apply to tqdm only.
    """
    if enabled and sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                    dynamic_ncols=dynamic_ncols)
    return LineProgress(total, desc=desc, unit=unit, enabled=enabled, initial=initial, iterable=iterable)
