"""The client side of the Serve benchmark: HTTP requests timed from send to parsed reply, fixed-size runs
and open-ended load, and the latency summary every case is reported with.

Kept apart from benchmarks/serve.py (what is deployed and measured) because these parts know nothing of
Ray, Serve or the model: they only post JSON bodies to a URL and time the replies, so each case,
in-process engine included, is summarised the same way.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def summarise(
    case: str, clients: int, replicas: str, latencies: list[float], wall: float, errors: int = 0
) -> dict:
    lat = sorted(latencies) or [float("nan")]
    return {
        "case": case,
        "clients": clients,
        "replicas": replicas,
        "requests": len(latencies),
        "errors": errors,
        "req/s": len(latencies) / wall if wall else 0.0,
        "p50 ms": statistics.median(lat) * 1000,
        "p99 ms": percentile(lat, 0.99) * 1000,
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(session, url: str, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    r = session.post(url, json=body, timeout=180)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    return time.perf_counter() - start


def run_http(url: str, bodies: list[dict], clients: int, per_client: int) -> tuple[list[float], float]:
    import requests

    def client(i: int) -> list[float]:
        with requests.Session() as session:
            return [
                _post(session, url, bodies[(i * per_client + j) % len(bodies)]) for j in range(per_client)
            ]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for ts in pool.map(client, range(clients)) for t in ts]
    return latencies, time.perf_counter() - start


class Load:
    """Clients sending requests back to back until stopped; every result kept with its finish time."""

    def __init__(self, url: str, bodies: list[dict], clients: int) -> None:
        self.url, self.bodies, self.clients = url, bodies, clients
        self.done: list[tuple[float, float]] = []
        self.failed: list[tuple[float, str]] = []
        self.in_flight = 0
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.pool = ThreadPoolExecutor(clients)
        self.futures = [self.pool.submit(self._client, i) for i in range(clients)]

    def _client(self, i: int) -> None:
        import requests

        with requests.Session() as session:
            j = 0
            while not self.stop.is_set():
                with self.lock:
                    self.in_flight += 1
                try:
                    latency = _post(session, self.url, self.bodies[(i + j) % len(self.bodies)])
                    with self.lock:
                        self.done.append((time.perf_counter(), latency))
                except Exception as exc:  # counted, the client goes on
                    with self.lock:
                        self.failed.append((time.perf_counter(), str(exc)[:120]))
                finally:
                    with self.lock:
                        self.in_flight -= 1
                j += 1

    def finish(self) -> None:
        self.stop.set()
        for f in self.futures:
            f.result()
        self.pool.shutdown()


def wait_for(predicate, limit_s: float) -> float | None:
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if predicate():
            return time.perf_counter() - start
        time.sleep(0.5)
    return None
