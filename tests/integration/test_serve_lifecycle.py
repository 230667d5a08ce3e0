"""`python -m serve` stops cleanly: SIGTERM (what Kubernetes, systemd and Docker send) and Ctrl-C (SIGINT)
shut Serve down and the Ray it started, and leave no process behind.

Each case starts the real command in a fresh process with its own Ray (as a user would; the two cases
side by side), waits until it answers, records every process under it (Ray's GCS, raylet, workers, Serve's
controller, proxy and replicas), sends the signal, and checks the command exits 0 and every one of those
processes is gone.
Both serve one checkpoint on the transformers engine (its replica loads in seconds, where a vLLM replica
takes a minute on 2 cores): what a signal does (`serve/__main__.py`: raise in the main thread, shut Serve
down, then the Ray the command started) does not depend on the engine, and vLLM replicas are Ray workers like
any other.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 90


def _serve(args: list[str], port: int, tmp: Path) -> subprocess.Popen:
    temp_dir = Path("/tmp") / f"inbol_sig_{os.getpid()}_{port}"  # Ray's socket paths must stay short
    cmd = [sys.executable, "-m", "serve", "--config", str(ROOT / "configs" / "tiny.yaml"), "--port", str(port),
           *args, f"ray.temp_dir={temp_dir}"]  # fmt: skip
    log = (tmp / "serve.log").open("w")
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""}
    )


def _wait_ready(proc: subprocess.Popen, url: str, tmp: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"python -m serve exited {proc.returncode}:\n{(tmp / 'serve.log').read_text()[-3000:]}"
            )
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    pytest.fail(f"not ready in {START_TIMEOUT_S} s:\n{(tmp / 'serve.log').read_text()[-3000:]}")


CASES = {"SIGTERM": signal.SIGTERM, "Ctrl-C": signal.SIGINT}


def test_sigterm_and_ctrl_c_stop_serve_and_the_ray_each_started(
    tmp_path: Path, tiny_checkpoint: Path, free_port
) -> None:
    """Both commands run side by side (each with its own Ray, port and log), so their minute of start-up
    overlaps; then one gets SIGTERM and the other Ctrl-C."""
    runs = {}
    try:
        for case in CASES:
            port, tmp = free_port(), tmp_path / case
            tmp.mkdir()
            proc = _serve(["--checkpoint", str(tiny_checkpoint), "--engine", "transformers"], port, tmp)
            runs[case] = (proc, port, tmp)
        for proc, port, tmp in runs.values():
            _wait_ready(proc, f"http://127.0.0.1:{port}", tmp)
        for case, (proc, port, tmp) in runs.items():
            started = psutil.Process(proc.pid).children(recursive=True)
            names = {p.name() for p in started}
            assert any("raylet" in n for n in names) and any("gcs_server" in n for n in names), (case, names)
            proc.send_signal(CASES[case])
            assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, (case, (tmp / "serve.log").read_text()[-3000:])
            _, alive = psutil.wait_procs(started, timeout=30)
            assert not alive, (case, [(p.pid, p.name()) for p in alive])
            assert "shutting down" in (tmp / "serve.log").read_text(), case
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        for proc, _, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
