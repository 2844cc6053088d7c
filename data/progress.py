"""Progress of long loops: tqdm's live bar on a terminal; plain lines in files and CI logs (no carriage returns).

`progress(...)` takes tqdm's common arguments and returns an object with tqdm's `update`, `set_postfix_str`,
`close`, iteration and `with`. When the stream is not a terminal, a bar that is kept (`leave=True`) prints one line
per finished stage (the `set_postfix_str` value, e.g. a split) and one when it closes, each with its count, seconds
and rate, plus a line at most every `interval` seconds while it runs; a transient bar (`leave=False`) prints
nothing. Needs no numpy; tqdm is imported only for a terminal.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO

INTERVAL_S = 60.0  # a running bar's line, when not on a terminal, at most this often


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal (False for files, pipes and streams that cannot say)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             leave: bool = True, disable: bool = False, stream: TextIO | None = None, interval: float = INTERVAL_S,
             **tqdm_kwargs: Any) -> Any:
    """A progress bar over `iterable` (or counted with `update` up to `total`) on `stream` (default stderr).

    On a terminal: `tqdm(iterable, total=..., desc=..., unit=..., leave=..., disable=..., **tqdm_kwargs)`.
    Elsewhere: a `LineProgress` printing at most a few plain lines (see the module docstring); `disable` prints none.
    """
    stream = sys.stderr if stream is None else stream
    if is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, file=stream,
                    **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, quiet=disable or not leave, stream=stream,
                        interval=interval)


class LineProgress:
    """tqdm's interface as plain lines: `desc stage: n unit in s (rate unit/s)` per finished stage and at close,
    `desc stage: n/total unit after s s` at most every `interval` seconds; nothing when `quiet`."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", quiet: bool = False, stream: TextIO | None = None,
                 interval: float = INTERVAL_S) -> None:
        self.iterable, self.desc, self.unit, self.quiet, self.interval = iterable, desc, unit, quiet, interval
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.stream = total, 0, sys.stderr if stream is None else stream
        self.stage: str | None = None
        self._start = self._stage_start = self._last = time.monotonic()
        self._stage_n = 0
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count `n` more units done; a line if `interval` seconds passed since the last one."""
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            of = f"/{self.total:,}" if self.total is not None else ""
            self._line(f"{self._label(self.stage)}: {self.n:,}{of} {self.unit} after {now - self._start:.0f} s")

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Start stage `s` (e.g. a split); the stage before it, if any, gets its line."""
        if s != self.stage:
            self._finish_stage()  # the stage before, if any
            self.stage, self._stage_n, self._stage_start = s, self.n, time.monotonic()

    def close(self) -> None:
        """The last stage's line and the whole bar's line (once)."""
        if self._closed:
            return
        self._closed = True
        self._finish_stage()
        self._line(self._done(None, self.n, self._start))

    def _finish_stage(self) -> None:
        if self.stage is not None:
            self._line(self._done(self.stage, self.n - self._stage_n, self._stage_start))

    def _done(self, stage: str | None, n: int, since: float) -> str:
        seconds = time.monotonic() - since
        rate = f" ({n / seconds:,.1f} {self.unit}/s)" if seconds > 0 and n else ""
        return f"{self._label(stage)}: {n:,} {self.unit} in {seconds:.1f} s{rate}"

    def _label(self, stage: str | None) -> str:
        return " ".join(part for part in (self.desc, stage) if part) or "progress"

    def _line(self, text: str) -> None:
        self._last = time.monotonic()
        if not self.quiet:
            print(text, file=self.stream, flush=True)
