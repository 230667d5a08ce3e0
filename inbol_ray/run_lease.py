"""One driver per run directory: the job that runs on a run holds a lease on it, `<run_dir>/.lease.json`.

    with hold_lease(layout.root, "pipeline", cfg.ray.driver_lease_s):
        ...  # the only driver writing this run

Why: two drivers on one run overwrite each other's outputs, and a stage that finds shards made under
another plan deletes their folder (`generation.shards.finished_shards`) while the other driver may still
be writing it. Nothing else stops a second driver: a retried cluster submission, a user restarting a job
they thought dead, a model job started beside the pipeline.

The lease names its holder (host, pid, job, start time) and an expiry that the holder pushes forward every
third of `lease_s` from a daemon thread. A second driver fails at once (`LeaseHeld`) naming the holder
and when its lease expires. A holder that died without releasing (killed, out of memory, a lost node) is
taken over with a warning (`LeaseTakeover`): at once when it ran on this host and its process is gone;
otherwise once its lease expired, since a process on another host cannot be asked, only outlived.
Leaving removes the lease only while it is still this holder's (a random token), so a driver that lost
its lease never deletes its successor's. A holder that finds its lease taken over (it could not renew for
`lease_s`: a paused process, a partitioned node) is told through `on_lost`, by default an interrupt of
the main thread: it must stop writing, not finish a stage beside the new driver.

Every change to the lease is conditional on the write it replaces, made atomic per storage (hard links
on a local or shared folder, S3's conditional writes, else create-then-read-back with the race that leaves
named): `inbol_ray.lease_stores`.

The lease file's name starts with `.`, which every listing of the run skips (`data.io.list_files`, Parquet
discovery), and it is removed when the job ends. Expiry is the holder's wall clock plus `lease_s`, read
against the reader's: hosts' clocks must agree to well within `lease_s` (NTP does; default 300 s).
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import secrets
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from inbol_ray.data import io as dio
from inbol_ray.lease_stores import LEASE_FILE, LocalStore, Store, store_for

__all__ = ["LEASE_FILE", "Lease", "LeaseHeld", "LeaseLost", "LeaseTakeover", "hold_lease", "store_for"]

HOST = socket.gethostname()
"""This machine as leases name it (a module attribute so a test can play another host)."""


class LeaseHeld(RuntimeError):
    """Another live driver holds the run directory."""

    def __init__(self, run_dir: str, holder: dict[str, Any]) -> None:
        self.run_dir, self.holder = run_dir, holder
        super().__init__(
            f"{run_dir} is held by another driver: {describe(holder)}. Two drivers on one run overwrite "
            f"each other's outputs; wait for it to finish (a driver that died without releasing is taken "
            f"over once its lease expires, at once when it ran on this host)"
        )


class LeaseTakeover(UserWarning):
    """A lease whose holder is gone or stopped renewing was taken over."""


class LeaseLost(UserWarning):
    """This driver's lease was taken over by another driver, or could not be renewed before it expired."""


def describe(lease: dict[str, Any], now: float | None = None) -> str:
    """The holder as an error message names it: job, host, pid, started at, expires in."""
    if not lease:
        return "a driver that kept changing the lease while this one looked"
    if lease.get("unreadable"):
        return "an unreadable lease file"
    left = float(lease.get("expires_at", 0)) - (time.time() if now is None else now)
    expires = f"expires in {left:.1f} s" if left >= 0 else f"expired {-left:.1f} s ago"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(lease.get("started_at", 0))))
    who = f"job {lease.get('job')!r} on host {lease.get('host')}, pid {lease.get('pid')}"
    return f"{who}, started at {started}, {expires}"


# --- is the holder still there ------------------------------------------------------------------------


def _pid_namespace() -> str:
    """Two containers can share a host name but not a pid namespace: only within one is a pid meaningful."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_start(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None where there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def _process_gone(lease: dict[str, Any]) -> bool:
    """True only when the holder ran in this host's pid namespace and that process no longer runs (exited,
    a zombie, or its pid now belongs to a process started later)."""
    if lease.get("host") != HOST or lease.get("pid_ns") != _pid_namespace():
        return False
    pid = int(lease.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: alive
    found = _process_start(pid)
    if found is None:
        return False
    state, started = found
    return state == "Z" or (bool(lease.get("pid_start")) and started != lease["pid_start"])


def stale_because(lease: dict[str, Any], now: float | None = None) -> str:
    """Why `lease` may be taken over, or "" while its holder may still be running."""
    if lease.get("unreadable"):
        return "its lease file is unreadable"
    now = time.time() if now is None else now
    expires_at = float(lease.get("expires_at", 0))
    if expires_at <= now:
        return f"not renewed for {now - float(lease.get('renewed_at', expires_at)):.1f} s (lease expired)"
    if _process_gone(lease):
        return f"its process {lease.get('pid')} on this host is gone"
    return ""


# --- the lease ----------------------------------------------------------------------------------------


def _interrupt(lease: Lease, why: str) -> None:
    """The default `on_lost`: say so and stop the driver as Ctrl-C would (it must not keep writing the run).
    A real SIGINT to the main thread, since `_thread.interrupt_main` alone waits until the main thread
    leaves whatever blocking call it is in (a `ray.get`, a sleep); SIGTERM where SIGINT is not Python's
    (a driver started in the background by a shell ignores it)."""
    warnings.warn(LeaseLost(f"{lease.run_dir}: lease lost ({why}); stopping this driver"), stacklevel=1)
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        os.kill(os.getpid(), signal.SIGTERM)
    elif hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
    else:
        _thread.interrupt_main()


class Lease:
    """A held lease: renewed from a daemon thread until `release`."""

    def __init__(
        self,
        run_dir: str,
        job: str,
        lease_s: float,
        store: Store,
        on_lost: Callable[[Lease, str], None] = _interrupt,
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.run_dir, self.job, self.lease_s, self.store, self.on_lost = run_dir, job, lease_s, store, on_lost
        now = time.time()
        started = _process_start(os.getpid())
        self.record: dict[str, Any] = {
            "run_dir": run_dir,
            "job": job,
            "host": HOST,
            "pid": os.getpid(),
            "pid_ns": _pid_namespace(),
            "pid_start": started[1] if started else "",
            "started_at": now,
            "renewed_at": now,
            "expires_at": now + lease_s,
            "lease_s": lease_s,
            "token": secrets.token_hex(16),
            "serial": 0,
        }
        self.version = ""
        self.expires_at = 0.0
        """The expiry of the last write that landed (renewals that failed do not count)."""
        self.lost = ""
        """Why the lease was lost ("" while held)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"lease {run_dir}", daemon=True)

    def _body(self) -> bytes:
        return json.dumps(self.record, indent=1, sort_keys=True).encode()

    def _stamp(self) -> bytes:
        """The next write: a later expiry and a new serial (so each write has its own version)."""
        now = time.time()
        self.record.update(renewed_at=now, expires_at=now + self.lease_s, serial=self.record["serial"] + 1)
        return self._body()

    def acquire(self, attempts: int = 5) -> Lease:
        """Create the lease, or take over a stale one; `LeaseHeld` naming the holder when it is live. Each
        lost race means another driver changed the lease meanwhile: look again, a few times."""
        holder: dict[str, Any] = {}
        for _ in range(attempts):
            self.version = self.store.create(self._stamp()) or ""
            if self.version:
                break
            found = self.store.read()
            if found is None:
                continue  # released between our create and our look
            holder, version = found
            why = stale_because(holder)
            if not why:
                raise LeaseHeld(self.run_dir, holder)
            warnings.warn(
                LeaseTakeover(f"{self.run_dir}: taking over the lease of {describe(holder)}: {why}"),
                stacklevel=2,
            )
            self.version = self.store.take(self._stamp(), version) or ""
            if self.version:
                break
        else:
            raise LeaseHeld(self.run_dir, holder)
        self.expires_at = self.record["expires_at"]
        self._thread.start()
        return self

    def _keep(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            body = self._stamp()
            try:
                version = self.store.renew(body, self.version)
            except Exception as exc:  # a storage hiccup: try again next time, while the lease lasts
                if time.time() < self.expires_at:
                    continue
                version, why = None, f"could not renew it before it expired: {type(exc).__name__}: {exc}"
            else:
                why = "another driver took it over (this one did not renew it in time)"
            if version is not None:
                self.version, self.expires_at = version, self.record["expires_at"]
                continue
            if not self._stop.is_set():  # a release racing this renewal is no loss
                self.lost = why
                self.on_lost(self, why)
            return

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, self.lease_s))
        if self.version and not self.lost:
            self.store.delete(self.version)


@contextlib.contextmanager
def hold_lease(
    run_dir: str,
    job: str,
    lease_s: float,
    *,
    on_lost: Callable[[Lease, str], None] = _interrupt,
    store: Store | None = None,
) -> Iterator[Lease]:
    """Be the only driver of `run_dir` for the block: `LeaseHeld` at once when another driver is, the
    lease renewed every `lease_s` / 3 meanwhile and removed on the way out (if still ours)."""
    run_dir = dio.absolute(run_dir)
    store = store or store_for(run_dir)
    created = _make_folders(store.folder) if isinstance(store, LocalStore) else []
    lease = Lease(run_dir, job, lease_s, store, on_lost)
    try:
        lease.acquire()
    except BaseException:
        _remove_if_empty(created)
        raise
    try:
        yield lease
    finally:
        lease.release()
        _remove_if_empty(created)


def _make_folders(folder: str) -> list[str]:
    """Create `folder` and its missing parents; returns those created, innermost first."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for path in reversed(missing):
        os.makedirs(path, exist_ok=True)
    return missing


def _remove_if_empty(folders: list[str]) -> None:
    """A job that failed before writing anything leaves no empty run directory made only for its lease."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return
