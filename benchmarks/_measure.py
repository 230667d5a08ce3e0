"""Shared measuring helpers for the benchmarks: peak memory, median time, isolation, environment, tables.

Why a helper: every benchmark here reports ratios measured in one run (DESIGN.md section 4), and they
must measure memory and time the same way to be comparable.

API
---
`peak_memory(fn, device="cpu") -> (result, peak_bytes)`
    Runs `fn()` once and returns its result and the peak memory it *added* over what was live just before.
    CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (exact, allocator-level).
    CPU: torch's CPU allocator is invisible to tracemalloc, so we use the kernel's peak resident set size:
    write "5" to /proc/self/clear_refs (resets VmHWM to the current RSS), read VmRSS as the baseline, run,
    read VmHWM. Exact at page granularity and catches short-lived peaks that a sampling thread would miss.
    Caveat: freed heap memory that malloc keeps resident is reused without raising RSS, so run the
    measured call in a fresh process (`run_isolated`) before any other work of the same size. Where
    clear_refs is unavailable (non-Linux), a psutil sampling thread (1 ms) is used and flagged by
    `cpu_memory_method()`.
`median_time(fn, repeats=3, warmup=1, sync=None) -> (median_s, all_s)`
    Wall time of `fn()` (time.perf_counter), `warmup` untimed calls first; `sync` (e.g.
    torch.cuda.synchronize) is called before each clock read when given.
`run_isolated(fn, *args, timeout_s=None, **kwargs) -> result`
    Calls the module-level function `fn(*args, **kwargs)` in a fresh spawned process and returns its
    (picklable) result; an exception in the child is re-raised here as RuntimeError with its traceback.
    Fresh processes give each case a clean heap so RSS peaks do not hide in memory freed by a previous
    case. With `timeout_s` the child is killed after that many seconds (TimeoutError).
`environment() -> dict[str, str]`
    Machine (CPU model, cores, RAM, GPU), Python/torch/transformers versions, torch threads, git commit.
`format_table(rows, columns) -> str`
    A Markdown table of `rows` (dicts) in the order of `columns`; floats printed with 3 significant digits.
`fmt_bytes(n) -> str`
    "1.25 GiB"-style sizes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _can_reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def cpu_memory_method() -> str:
    """Which CPU peak-memory method `peak_memory` uses on this machine (printed with the results)."""
    if _can_reset_hwm():
        return "peak RSS growth (VmHWM reset via /proc/self/clear_refs)"
    return "peak RSS growth (psutil sampling every 1 ms; may miss sub-ms peaks)"


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_memory(fn: Callable[[], Any], device: str = "cpu") -> tuple[Any, int]:
    """Run `fn()` once; return (result, peak bytes added over the memory live before the call)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    if _can_reset_hwm():  # resets VmHWM to the current RSS
        before = _status_kib("VmRSS")
        result = fn()
        return result, (_status_kib("VmHWM") - before) * 1024
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], _rss_bytes()) - before


def median_time(
    fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, sync: Callable[[], None] | None = None
) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _child(conn: Any, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException:  # report everything, including MemoryError, to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
    """Call module-level `fn(*args, **kwargs)` in a fresh spawned process and return its result."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs))
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            raise TimeoutError(f"{fn.__name__} ran past {timeout_s} s")
        status, payload = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(
            f"{fn.__name__} died with exit code {proc.exitcode} (killed for memory?)"
        ) from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
    if status == "error":
        raise RuntimeError(f"{fn.__name__} failed in its subprocess:\n{payload}")
    return payload


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, str]:
    """What a reader needs to reproduce or judge the numbers."""
    import torch

    info = {
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "commit": _git_commit(),
    }
    try:
        import psutil

        info["machine"] += f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def fmt_bytes(n: float) -> str:
    """Human-readable binary size."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Markdown table, one row per dict, missing keys shown as an empty cell."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
