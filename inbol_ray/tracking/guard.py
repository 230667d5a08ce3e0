"""The tracker is never why a run fails: every call to it goes through a `Guard`.

A tracking server that is down, slow or refuses a value must not cost hours of sampling or training: the
run's own files (manifests, metrics.jsonl, metrics.parquet, report.md) are the record, the tracker a copy.
So the first failure warns once and turns tracking off for the rest of that pipeline run (retrying a dead
server at every step would slow training and flood the console); later calls return None at once.

"Once" is per pipeline run (`session`) and per process: the trainer's local mode runs the loop in the
driver, which shares the driver's state, so a server that dies mid-training gives one warning, not one
from the loop and another from the driver. A Ray Train worker is its own process and warns in its log.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class TrackingWarning(UserWarning):
    """The experiment tracker failed; tracking is off for the rest of the run, its files are complete."""


_down: set[str] = set()
_lock = threading.Lock()


class Guard:
    """Calls into a tracker for one pipeline run (`session`), off for good after the first failure."""

    def __init__(self, session: str, what: str) -> None:
        self.session = session
        self.what = what
        """Named in the warning: the backend and where it is (`mlflow at http://...`)."""

    @property
    def on(self) -> bool:
        return self.session not in _down

    def __call__(self, doing: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`fn(*args, **kwargs)`, or None when tracking is off or `fn` raises (then warn, once)."""
        if not self.on:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # any failure of a tracker client: it must not reach the stage
            self.fail(doing, exc)
            return None

    def fail(self, doing: str, exc: BaseException) -> None:
        """Turn tracking off for this session; warn if it was still on."""
        with _lock:
            first = self.session not in _down
            _down.add(self.session)
        if first:
            detail = " ".join(str(exc).split())[:300]
            warnings.warn(
                f"tracking ({self.what}) failed while {doing}: {type(exc).__name__}: {detail}. Tracking is "
                "off for the rest of this run; the run's own files (manifests, metrics.jsonl, metrics.parquet, "
                "report.md) are complete.",
                TrackingWarning,
                stacklevel=3,
            )
