"""Progress of the long stages (base training, sampling, every training, evaluation) as the driver sees it.

    with progress.bar("sample", total=items, unit="items") as bar:
        bar.update(done, loss=0.31)

A `Bar` only counts; the console (`inbol_ray.console`) decides how it shows: an updating line with an ETA
on a terminal, a few lines elsewhere (CI logs, `ray job submit`), every tenth in the run's log file.

Work that runs in other processes (Ray Train workers) tells the driver through a small file instead:
rank 0 `publish`es its step count (throttled, so a fast loop on object storage is not a PUT per step) and
the driver `follow`s it into a bar. A file, not an actor or `ray.train.report`: it costs nothing when
nobody follows, works in Ray Train's local mode and on a cluster alike, and Ray Train reports only at
checkpoints (each one ~1 s, inbol_ray/train/loop.py).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from inbol_ray.data import io as dio

if TYPE_CHECKING:
    from inbol_ray.console import Console

PROGRESS_DIR = "logs/progress"
"""Under the run directory: one `<name>.json` per followed piece of work (`file_for`)."""


def clock_text(seconds: float | None) -> str:
    """1:05, 12:40, 2:03:07; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _field_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Bar:
    """How far one piece of work is: `done` of `total` `unit`s, plus a few named values (a loss).

    The rate, and so the ETA, is measured from the first update on: start-up (actors starting, models
    loading, a worker group forming) is not work done and would make the first ETA far too long.
    """

    def __init__(self, console: Console, label: str, total: int, unit: str, clock: Callable[[], float]):
        self.console, self.label, self.total, self.unit = console, label, max(0, int(total)), unit
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.fields: dict[str, Any] = {}
        self._first: tuple[float, int] | None = None
        self.closed = False

    def update(self, done: int, **fields: Any) -> None:
        """Set the count (not add to it: a resumed worker or a retried batch cannot count twice)."""
        done = max(0, min(int(done), self.total)) if self.total else max(0, int(done))
        if self._first is None:
            self._first = (self.clock(), done)
        self.done = done
        self.fields.update(fields)
        self.console.bar_changed(self)

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.update(self.done + n, **fields)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.console.bar_closed(self)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    def elapsed(self) -> float:
        return self.clock() - self.started

    def eta(self) -> float | None:
        """Seconds left at the rate since the first update; None until there is a rate."""
        if self._first is None or not self.total:
            return None
        if self.done >= self.total:
            return 0.0
        t1, d1 = self._first
        spent, moved = self.clock() - t1, self.done - d1
        if moved <= 0 or spent <= 0:
            return None
        return (self.total - self.done) / (moved / spent)

    def text(self, width: int = 20, compact: bool = False) -> str:
        """`label [#####.....] 120/248 steps 48% 0:32, ETA 0:35, loss 1.23` (compact: label, %, ETA)."""
        pct = f"{100 * self.fraction:3.0f}%"
        if compact:
            return f"{self.label} {pct} ETA {clock_text(self.eta())}"
        filled = int(round(width * self.fraction))
        parts = [
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self.unit} {pct}",
            f"{clock_text(self.elapsed())}, ETA {clock_text(self.eta())}",
        ]
        parts += [f"{k} {_field_text(v)}" for k, v in self.fields.items()]
        return ", ".join(parts)

    def line(self) -> str:
        """The bar as a plain log line (no drawn bar): what a non-terminal console and the log file get."""
        parts = [
            f"{self.label}: {self.done}/{self.total} {self.unit} ({100 * self.fraction:.0f}%)",
            f"{clock_text(self.elapsed())} elapsed",
            f"ETA {clock_text(self.eta())}",
        ]
        parts += [f"{k} {_field_text(v)}" for k, v in self.fields.items()]
        return ", ".join(parts)


def bar(label: str, total: int, unit: str = "items") -> Bar:
    """A bar on the current console (`inbol_ray.console.current`): the job's, or a plain one."""
    from inbol_ray.console import current

    return current().bar(label, total, unit)


# --- across processes --------------------------------------------------------------------------------


def file_for(run_root: str, name: str) -> str:
    """Where the progress of `name` (e.g. `train_cadpo`) is published under a run directory."""
    return dio.join(run_root, PROGRESS_DIR, f"{name}.json")


class Publisher:
    """The working side: `publish(done, total, **fields)` writes `{done, total, fields}` to `uri`, at most
    once per `min_interval_s` (always the last step). A failed write is dropped: progress is for the eye,
    and a storage hiccup must never fail a training."""

    def __init__(self, uri: str, min_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.uri, self.min_interval_s, self.clock = uri, min_interval_s, clock
        self._last: float | None = None

    def publish(self, done: int, total: int, **fields: Any) -> bool:
        now = self.clock()
        if done < total and self._last is not None and now - self._last < self.min_interval_s:
            return False
        self._last = now
        payload = {"done": int(done), "total": int(total), "fields": fields}
        try:
            dio.write_bytes(self.uri, json.dumps(payload, default=float).encode())
        except OSError:
            return False
        return True


def read_progress(uri: str) -> dict[str, Any] | None:
    """The last published state, or None (nothing published yet, or caught mid-replace)."""
    try:
        state = json.loads(dio.read_bytes(uri))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("total"), int):
        return None
    return state


@contextmanager
def follow(uri: str, label: str, unit: str = "steps", poll_s: float = 1.0) -> Iterator[None]:
    """The driver's side: while the block runs, a bar on the current console follows what is published at
    `uri`. A file left there by an earlier run is removed first: it is not this run's progress."""
    from inbol_ray.console import current

    with suppress(OSError):
        dio.remove(uri)
    console, stop = current(), threading.Event()
    shown: list[Bar] = []

    def poll_once() -> None:
        state = read_progress(uri)
        if state is None:
            return
        if not shown:
            shown.append(console.bar(label, state["total"], unit))
        shown[0].update(state["done"], **(state.get("fields") or {}))

    def run() -> None:
        while not stop.wait(poll_s):
            poll_once()

    thread = threading.Thread(target=run, name=f"progress-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll_once()  # the last state, so the log file has the finished count
        if shown:
            shown[0].close()
