"""`ray job submit` of the pipeline's first stage against a real local head node on 127.0.0.1.

The head runs as `ray start --head --block` in its own process group, so the test ends exactly the
processes it started (never `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inbol_ray.data import io as dio

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def head_node(tmp_path_factory: pytest.TempPathFactory, free_port):
    port, dash = free_port(), free_port()
    temp_dir = Path("/tmp") / f"inbol_head_{os.getpid()}"
    # Ray >= 2.59 protects local clusters with a token; a per-test token shared by head and client
    # keeps the test off the user's ~/.ray/auth_token.
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            # fixed default agent ports would collide with any other Ray on the machine (the test session's)
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"ray start --head exited with {proc.returncode}")
                time.sleep(1)
        else:
            pytest.fail("the head node's dashboard did not come up in 90 s")
        yield address, env
    finally:
        # `ray start --block` stops an idle head in ~2 s on SIGTERM, but after a job it waited out the whole
        # 30 s (every time): the group is ours alone (start_new_session), so after 5 s it is killed.
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # raised when it all stopped in time
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left (workers, agents)
        proc.wait(timeout=30)


@pytest.mark.integration
def test_submit_prepare_stage(head_node: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    address, env = head_node
    run_dir = tmp_path / "run"
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--runtime-env",
        str(ROOT / "cluster" / "runtime_env.yaml"),
        "--",
        sys.executable,
        "-m",
        "jobs.prepare",
        "--config",
        "configs/tiny.yaml",
        "--run-dir",
        str(run_dir),
        "ray.address=auto",
        "data.shapes.n_pretrain=30",
        "data.shapes.n_train=20",
        "data.shapes.n_val=10",
        "data.shapes.n_id_test=10",
        "data.shapes.n_ood_test=10",
        "data.shapes.n_unanswerable_test=10",
    ]
    deadline = time.time() + 120
    while True:  # the dashboard answers before the node's job agent is up: retry that case only
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        output = done.stdout + done.stderr
        if "No available agent to submit job" not in output or time.time() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, output[-3000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", output)
    assert job_id, output[-3000:]
    probe = (
        "import sys; from ray.job_submission import JobSubmissionClient as C; "
        "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)"
    )
    status = subprocess.run(
        [sys.executable, "-c", probe, address, job_id.group(1)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.stdout.strip() == "SUCCEEDED", status.stdout + status.stderr
    items = dio.read_table(str(run_dir / "items"))
    assert items.num_rows == 30 + 20 + 10 + 10 + 10 + 10 + 10  # pretrain, train, val, the four test sets
