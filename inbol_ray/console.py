"""What a job shows on the console, and what it only writes to the run's `logs/` folder.

    with console.session(layout.root, "pipeline", verbose=args.verbose) as out:
        run_pipeline(cfg, layout, log=out.log)

Why: a run of `make demo` printed 364 lines, most of them Ray Data execution plans and per-set tables,
and the lines that say where the run is (which stage, how far, how long) were lost among them. The
console now shows each stage's head and summary lines, warnings and errors, and one live line for the
work in progress (`inbol_ray.progress`); `logs/<job>.log` keeps every line with its time, including the
rows that stages indent under a summary (evaluation's per-set scores, the base model's per-family
accuracy: both are in report.md and the manifests too), and `logs/ray.log` keeps Ray's own output
(`runtime.ray_output_to`). `--verbose` shows everything, as before.

The rule for a line is its indentation, which every stage already follows: a line indented by four or
more spaces is a row under a summary, anything else is a summary or a stage line.

On a terminal, bars share one status line at the bottom, redrawn in place, and other lines print above it.
Elsewhere (CI, `ray job submit` logs, a test capturing stdout) a bar prints a line when it has passed a
quarter of its work not shown yet, once its previous line (or its start) is `QUIET_S` old and it has a
rate for the ETA, plus one every `HEARTBEAT_S` on very long work: at most three lines per bar and a
heartbeat, none for work that ends within `QUIET_S`, never one per step.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import TextIO

from inbol_ray.data import io as dio
from inbol_ray.progress import Bar

LOGS_DIR = "logs"
RAY_LOG = "ray.log"
ROW = re.compile(r"^ {4,}\S")
"""A row under a summary line (see the module docstring): the log file's, not the console's."""
QUIET_S = 15.0
"""Off a terminal, a bar's quarter line is skipped when its previous line is younger than this."""
HEARTBEAT_S = 600.0
"""Off a terminal, a bar that has printed nothing for this long prints a line anyway (CI timeouts)."""
REDRAW_S = 0.1
"""On a terminal, the status line is redrawn at most this often."""
LOG_EVERY = 10
"""The log file gets a bar's line at every tenth of its work."""


class Console:
    """Lines to the terminal (`out`, or whatever `sys.stdout` is when writing) and to a log file.

    `verbose` shows rows as well as summaries (the default console, outside any job, is verbose: a
    library caller sees what it saw before). `tty` None asks the output stream.
    """

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        log_file: TextIO | None = None,
        verbose: bool = True,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out, self.log_file, self.verbose, self._tty, self.clock = out, log_file, verbose, tty, clock
        self._lock = threading.RLock()
        self._bars: list[Bar] = []
        self._status = ""
        self._drawn_at = -1e9
        self._last_line: dict[int, float] = {}
        self._next_quarter: dict[int, int] = {}
        self._next_tenth: dict[int, int] = {}
        self.ray_log_path = ""
        """A local file for Ray's own output (`session` sets it; `runtime.ray_output_to` writes it)."""

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        isatty = getattr(self.out, "isatty", None)
        return bool(isatty and isatty())

    # --- lines ---------------------------------------------------------------------------------------
    def line(self, text: str) -> None:
        """A line for the console and the log file."""
        with self._lock:
            self._record(text)
            self._show(text)

    def detail(self, text: str) -> None:
        """A line for the log file; on the console only when verbose."""
        with self._lock:
            self._record(text)
            if self.verbose:
                self._show(text)

    def log(self, text: str) -> None:
        """The pipeline's `log`: rows (indented by 4+ spaces) are details, everything else a line."""
        for part in str(text).splitlines() or [""]:
            (self.detail if ROW.match(part) else self.line)(part)

    def _record(self, text: str) -> None:
        if self.log_file is not None:
            self.log_file.write(f"{time.strftime('%H:%M:%S')} {text}\n")
            self.log_file.flush()

    def _show(self, text: str) -> None:
        out = self.out
        if self.tty and self._status:
            out.write("\r\x1b[2K")
        out.write(text + "\n")
        if self.tty and self._status:
            out.write(self._status)
        out.flush()

    # --- bars ----------------------------------------------------------------------------------------
    def bar(self, label: str, total: int, unit: str = "items") -> Bar:
        bar = Bar(self, label, total, unit, self.clock)
        with self._lock:
            self._bars.append(bar)
            self._last_line[id(bar)] = bar.started
            self._next_quarter[id(bar)] = 1
            self._next_tenth[id(bar)] = 1
        return bar

    def bar_changed(self, bar: Bar) -> None:
        with self._lock:
            if bar.closed or bar not in self._bars:
                return
            key, now = id(bar), self.clock()
            tenth = int(10 * bar.fraction + 1e-9)
            if tenth >= self._next_tenth[key] and bar.total:
                self._next_tenth[key] = tenth + 1
                self._record(f"  {bar.line()}")
            if self.tty:
                if now - self._drawn_at >= REDRAW_S or bar.done >= bar.total:
                    self._draw()
                return
            quarter = int(4 * bar.fraction + 1e-9)
            due = 0 < quarter < 4 and quarter >= self._next_quarter[key]
            quiet = now - self._last_line[key]
            # a due quarter waits for a quiet console and a known rate (the first update has none)
            if (due and quiet >= QUIET_S and bar.eta() is not None) or quiet >= HEARTBEAT_S:
                self._next_quarter[key] = max(self._next_quarter[key], quarter + 1)
                self._last_line[key] = now
                self._show(f"  {bar.line()}")

    def bar_closed(self, bar: Bar) -> None:
        with self._lock:
            if bar in self._bars:
                self._bars.remove(bar)
            for table in (self._last_line, self._next_quarter, self._next_tenth):
                table.pop(id(bar), None)
            if self.tty:
                self._draw()

    def _draw(self) -> None:
        """The status line: one bar in full, several side by side (label, %, ETA), cut to the width."""
        if len(self._bars) == 1:
            text = self._bars[0].text()
        else:
            text = " | ".join(b.text(compact=True) for b in self._bars)
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self._status = text[:width]
        self.out.write("\r\x1b[2K" + self._status)
        self.out.flush()
        self._drawn_at = self.clock()

    def clear(self) -> None:
        """Take the status line off the terminal (at the end of a job)."""
        with self._lock:
            if self.tty and self._status:
                self.out.write("\r\x1b[2K")
                self.out.flush()
            self._status = ""


_DEFAULT = Console()
_current: Console = _DEFAULT


def current() -> Console:
    """The console of the running job, or a plain verbose one (library use, tests, Ray workers)."""
    return _current


def note(text: str) -> None:
    """A progress line for the log, not the console (a job's console has a bar for it). Outside a job it
    is printed, as before; in a Ray worker that is its log, which the driver files under `logs/ray.log`."""
    _current.detail(text)


class _LogFile:
    """A run's log file, appended to: written in place for a local run directory (so `tail -f` works), in
    a local temporary file uploaded (after what the run's log already held) for one on object storage."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.remote = dio.is_uri(uri)
        if self.remote:
            fd, self.path = tempfile.mkstemp(prefix="inbol-log-", suffix=".log")
            os.close(fd)
        else:
            self.path = uri
            os.makedirs(os.path.dirname(uri), exist_ok=True)
        self.stream: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def close(self) -> None:
        self.stream.close()
        if not self.remote:
            return
        try:
            with open(self.path, "rb") as f:
                new = f.read()
            old = dio.read_bytes(self.uri) if dio.exists(self.uri) else b""
            dio.write_bytes(self.uri, old + new)
        finally:
            os.remove(self.path)


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """No tqdm bars from Hugging Face libraries in this process for the block: transformers draws one per
    model load and save ("Loading weights", "Writing model shards", ~4 per training) on stderr, under the
    job's own status line. transformers reads huggingface_hub's switch when it is first imported and keeps
    its own afterwards, so both are set, and put back as they were. `HF_HUB_DISABLE_PROGRESS_BARS` set by
    the user decides instead."""
    if "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ:
        yield
        return
    from huggingface_hub import utils as hub

    def transformers_logging():
        return sys.modules.get("transformers.utils.logging")

    hub_was_off = hub.are_progress_bars_disabled()
    before = transformers_logging()
    transformers_was_on = before.is_progress_bar_enabled() if before else not hub_was_off
    hub.disable_progress_bars()
    if before:
        before.disable_progress_bar()
    try:
        yield
    finally:
        after = transformers_logging()
        if after and transformers_was_on:
            after.enable_progress_bar()  # turns huggingface_hub's on too
        if hub_was_off:
            hub.disable_progress_bars()
        else:
            hub.enable_progress_bars()


@contextlib.contextmanager
def session(
    run_root: str, prog: str, *, verbose: bool = False, out: TextIO | None = None
) -> Iterator[Console]:
    """The job's console for the block: lines to the terminal by the rules above and every line to
    `<run_root>/logs/<prog>.log`; also opens `logs/ray.log` for Ray's output (`ray_log_path`), which
    the caller routes (`runtime.ray_output_to`) once Ray is up. An exception's traceback goes to the
    log too (Python prints it on the console as it leaves)."""
    global _current
    job_log = _LogFile(dio.join(run_root, LOGS_DIR, f"{prog}.log"))
    ray_log = _LogFile(dio.join(run_root, LOGS_DIR, RAY_LOG))
    for log in (job_log, ray_log):
        log.stream.write(
            f"==== python -m jobs.{prog} {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})\n"
        )
        log.stream.flush()
    console = Console(out, log_file=job_log.stream, verbose=verbose)
    console.ray_log_path = ray_log.path
    previous, _current = _current, console
    try:
        with contextlib.nullcontext() if verbose else library_bars_off():
            yield console
    except BaseException:
        console._record(traceback.format_exc().rstrip())
        raise
    finally:
        _current = previous
        console.clear()
        job_log.close()
        ray_log.close()
