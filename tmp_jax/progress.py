"""Progress bars of every long loop (calibration, search, distillation, export, checkpoint loading).

One helper, :func:`progress_bar`, so the behaviour lives in one place. On a terminal it is tqdm's live bar. When
the stream is not a terminal (a log file, a pipe, a batch job's stdout/stderr) tqdm would still redraw the bar
with a carriage return on every refresh, leaving hundreds of ``\\r``-joined updates in the log; there it writes
plain lines instead: the first state, then at most one line every :data:`LOG_INTERVAL_S` seconds, and the final
state when the bar closes.

:func:`phase` names the long phases of a run (``[phase] loading ...`` / ``[phase] loading done in 12.3 s``), one
line each at start and end on stderr, so a cold run that compiles for minutes before its first bar is never
silent; the bars inside a phase give its ETA.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from tqdm import tqdm as _tqdm

LOG_INTERVAL_S = 10.0  # seconds between two lines of a bar written to a log (not a terminal)


class _LineWriter:
    """Stream wrapper for tqdm outside a terminal: each redraw (``\\r`` + bar + padding) becomes one plain
    line; the blank redraws tqdm uses to clear a bar, and its closing newline, write nothing."""

    def __init__(self, fp: IO[str]):
        self.fp = fp

    def write(self, s: str) -> int:
        line = s.replace("\r", "").rstrip()
        if line:
            self.fp.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        flush = getattr(self.fp, "flush", None)
        if flush is not None:
            flush()

    def isatty(self) -> bool:
        return False


class _LogBar(_tqdm):
    """tqdm for logs: a new postfix / description is shown with the next timed line, not at once (loops set
    the postfix every step, and tqdm redraws on every such call by default)."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)


def is_terminal(fp: Any) -> bool:
    """Whether ``fp`` shows a live bar: an interactive terminal, or a Jupyter output stream (tqdm.auto draws
    a widget there). Closed or odd streams count as not."""
    if type(fp).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(fp.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, file: IO[str] | None = None, **kw: Any) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one: ``total=``, ``.update()``) with tqdm's keyword arguments
    (``desc``, ``unit``, ``total``, ``initial``, ``disable``, ``leave``, ...); ``file`` defaults to the CURRENT
    ``sys.stderr``. Not a terminal: plain lines, at most one per :data:`LOG_INTERVAL_S` s plus the first and the
    final state (``leave`` is ignored there: a log should end with where the loop got to)."""
    fp = file if file is not None else sys.stderr
    if is_terminal(fp):
        from tqdm.auto import tqdm

        return tqdm(iterable, file=fp, **kw)
    kw.pop("dynamic_ncols", None)  # no terminal width to follow
    kw["leave"] = True
    kw["mininterval"] = max(float(kw.get("mininterval") or 0.0), LOG_INTERVAL_S)
    kw["maxinterval"] = max(float(kw.get("maxinterval") or 0.0), kw["mininterval"])
    kw.setdefault("ascii", True)  # logs are often read without a UTF-8 terminal
    return _LogBar(iterable, file=_LineWriter(fp), **kw)


@contextmanager
def phase(name: str, *, enabled: bool = True, file: IO[str] | None = None) -> Iterator[None]:
    """Announce a phase of a run: ``[phase] NAME ...`` on entry, ``[phase] NAME done in 12.3 s`` on a normal exit
    (``[phase] NAME failed after 12.3 s`` when it raises; the error itself is reported by whoever catches it).

    Plain lines, flushed at once, on the CURRENT ``sys.stderr`` by default: they are meant for logs as much as
    for terminals, and are printed with progress bars off too (``enabled=False`` silences them)."""
    if not enabled:
        yield
        return
    fp = file if file is not None else sys.stderr
    print(f"[phase] {name} ...", file=fp, flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        print(f"[phase] {name} failed after {time.perf_counter() - t0:.1f} s", file=fp, flush=True)
        raise
    print(f"[phase] {name} done in {time.perf_counter() - t0:.1f} s", file=fp, flush=True)
