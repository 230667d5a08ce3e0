"""Process environment shared by jobs, tests and Serve: no telemetry, loopback-only Ray, the checkpoint cache,
and where Ray's own output goes (`ray_output_to`: the run's `logs/ray.log`, warnings and errors on the console).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inbol_ray.config import CheckpointConfig, RayConfig

# Ray Train's controller polls its workers every 2 s by default, and each phase of a training (group started,
# each report, done) waits for the next poll: measured here, 0.25 s takes 3-5 s off every training (a 2-step
# full fine-tune 22.0 -> 18.6 s, a 2-worker FSDP run 27.3 -> 22.2 s). Ray Train hands the driver's value to
# its controller and workers, so it holds on a cluster too; a user's own value wins.
RAY_TRAIN_POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# No HF_HUB_OFFLINE here: a model named by Hub id resolves through huggingface_hub as in the user's own
# scripts (inbol_ray/hub.py), and offline mode is the user's choice; local folders never reach the Hub.
_QUIET = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0"),
    RAY_TRAIN_POLL[0]: RAY_TRAIN_POLL[1],
}


def quiet_env() -> None:
    """Set telemetry (and Ray Train polling) variables unless the user already set them (their choice
    wins)."""
    for key, value in _QUIET.items():
        os.environ.setdefault(key, value)


def configure_checkpoint_cache(checkpoint: CheckpointConfig) -> None:
    """`checkpoint.*` into this process's environment, before Ray starts: local Ray workers inherit it, and
    every reader of the cache (checkpoint_cache.local_dir) reads it there. Cluster workers and Serve replicas
    read the same variables from the manifests' runtime_env (cluster/*.yaml)."""
    from inbol_ray.checkpoint_cache import configure

    configure(checkpoint.cache_dir, checkpoint.cache_bytes)


def init_ray(
    address: str = "", num_cpus: int = 2, temp_dir: str = "", checkpoint: CheckpointConfig | None = None
) -> bool:
    """Connect to `address` or start a local Ray with explicit CPUs; return True when we started it.

    The caller shuts down only what it started (a job submitted to a cluster must not stop the cluster).
    `checkpoint` (the config's section) sets up the checkpoint cache first, so the workers see it.
    """
    import ray

    quiet_env()
    if checkpoint is not None:
        configure_checkpoint_cache(checkpoint)
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level="WARNING")
        return False
    kwargs = {"num_cpus": num_cpus, "include_dashboard": False, "logging_level": "WARNING"}
    if temp_dir:
        kwargs["_temp_dir"] = temp_dir
    ray.init(**kwargs)
    return True


@contextmanager
def ray_session(ray_cfg: RayConfig, checkpoint: CheckpointConfig | None = None) -> Iterator[None]:
    """`with ray_session(cfg.ray, cfg.checkpoint):` what every job wraps its stage in: connect or start, and
    on the way out shut down only a Ray this job started (a job submitted to a cluster must leave the
    cluster up)."""
    started = init_ray(ray_cfg.address, ray_cfg.num_cpus, ray_cfg.temp_dir, checkpoint)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


WORKER_ALERT = re.compile(
    r"\b(WARNING|ERROR|CRITICAL|FATAL)\b|Traceback \(most recent call last\)|\w(Error|Exception|Warning):"
)
"""A worker's output line the console still shows: a log record at WARNING or above, a traceback's first
line, a Python warning or an exception (`UserWarning: ...`, `ValueError: ...`)."""
DELIBERATE_NOTICES = ("Progress bars disabled",)
"""Ray warnings about a setting this module makes on purpose (Ray Data's bars, off on a terminal where the
job draws its own): filed, not shown; they would tell the user to undo it."""
RAY_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _NotDeliberate(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DELIBERATE_NOTICES)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _ray_loggers() -> list[logging.Logger]:
    """`ray` and every `ray.*` logger with handlers of its own (`ray.data` has a console handler and does
    not propagate). Ray Data configures its logger on import, so it is imported first."""
    import ray.data  # noqa: F401

    names = sorted(
        name
        for name, found in logging.root.manager.loggerDict.items()
        if name.startswith("ray.") and isinstance(found, logging.Logger) and found.handlers
    )
    return [logging.getLogger(name) for name in ["ray", *names]]


def _route_loggers(handler: logging.Handler, verbose: bool, undo: list[Callable[[], None]]) -> None:
    """The file handler on each Ray logger whose records would not reach it through `ray`; unless verbose,
    their console handlers raised to WARNING and `ray` lowered to INFO, so INFO reaches the file only."""
    quiet = _NotDeliberate()
    for logger in _ray_loggers():
        if logger.name == "ray" or not logger.propagate:
            logger.addHandler(handler)
            undo.append(lambda lg=logger: lg.removeHandler(handler))
        if verbose:
            continue
        for console in [h for h in logger.handlers if _is_console(h)]:
            level = console.level
            console.setLevel(max(level, logging.WARNING))
            console.addFilter(quiet)
            undo.append(lambda h=console, lv=level: (h.setLevel(lv), h.removeFilter(quiet)))
        if logger.getEffectiveLevel() > logging.INFO:
            level = logger.level
            logger.setLevel(logging.INFO)
            undo.append(lambda lg=logger, lv=level: lg.setLevel(lv))


def _route_worker_output(handler: logging.Handler, verbose: bool, undo: list[Callable[[], None]]) -> None:
    """Worker stdout/stderr that Ray forwards to the driver (`log_to_driver`): every line to the file, and
    to Ray's own printer only the alerts (`WORKER_ALERT`), or everything when verbose. Ray exposes no
    public hook for this; without its dispatcher (another Ray layout) the output stays as Ray prints it,
    and a Ray started with `log_to_driver=False` forwards nothing to route."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - depends on the Ray version
        return
    name = "ray_print_logs"  # Ray's own printer; ray.shutdown removes the handler of this name
    original = next((h for n, h in dispatcher.handlers if n == name), None)
    if original is None:
        return
    workers = logging.getLogger("inbol_ray.ray_workers")
    workers.propagate, workers.level = False, logging.INFO
    workers.addHandler(handler)

    def printer(data: dict[str, Any]) -> None:
        if data.get("pid") == "autoscaler":  # Ray prints only its events (infeasible requests, scaling)
            original(data)
            return
        lines = data.get("lines") or []
        who = data.get("actor_name") or data.get("task_name") or "worker"
        alerts = [line for line in lines if WORKER_ALERT.search(line)]
        for line in lines:
            level = logging.WARNING if line in alerts else logging.INFO
            workers.log(level, "(%s pid=%s) %s", who, data.get("pid"), line)
        shown = lines if verbose else alerts
        if shown:
            original({**data, "lines": shown})

    dispatcher.remove_handler(name)
    dispatcher.add_handler(name, printer)

    def restore() -> None:
        import ray

        workers.removeHandler(handler)
        dispatcher.remove_handler(name)
        if ray.is_initialized():
            dispatcher.add_handler(name, original)

    undo.append(restore)


@contextmanager
def ray_output_to(path: str, *, verbose: bool = False, tty: bool = False) -> Iterator[None]:
    """While the block runs (Ray up), Ray's own output goes to the file `path` and the console shows only
    its warnings and errors; with `verbose` the console shows everything as before and the file gets a copy.

    Three sources: the driver's Ray loggers (Ray Data's execution plans and progress lines, Ray Train's
    and Serve's records), worker output forwarded to the driver, and Ray Data's progress bars, which on a
    terminal are drawn on stderr beside the job's own status line and are turned off there (off a
    terminal they are log lines, filed with the rest). Everything is put back on the way out: tests and
    notebooks run several jobs in one process.
    """
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(RAY_LOG_FORMAT))
    undo: list[Callable[[], None]] = []
    try:
        _route_loggers(handler, verbose, undo)
        _route_worker_output(handler, verbose, undo)
        if tty and not verbose:
            from ray.data import DataContext

            context = DataContext.get_current()
            bars = context.enable_progress_bars
            context.enable_progress_bars = False
            undo.append(lambda: setattr(context, "enable_progress_bars", bars))
        yield
    finally:
        for step in reversed(undo):
            step()
        handler.close()
