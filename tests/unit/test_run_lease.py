"""One driver per run directory: the lease a job holds on its run (`inbol_ray.run_lease`).

Real holders throughout: threads racing for one lease, and subprocesses that take it and are SIGKILLed
(a driver that dies without releasing) or see it taken from them. Leases last a second or two here,
passed to `hold_lease` directly (the config insists on >= 10 s); the jobs' tests hold a lease in the test
process and check that a job started on the same run exits naming it, before anything else happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from inbol_ray import run_lease
from inbol_ray.lease_stores import ReadBackStore, S3ConditionalStore, store_for
from inbol_ray.run_lease import Lease, LeaseHeld, LeaseTakeover, hold_lease

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def lease_of(run: Path) -> dict:
    return json.loads((run / ".lease.json").read_text())


def holder(run: Path, job: str, lease_s: float, host: str = "", then: str = "time.sleep(60)"):
    """A driver in another process that takes the run's lease (as `host`, default this one), says `held`,
    then does `then`."""
    code = (
        "import sys, time\n"
        "from inbol_ray import run_lease\n"
        f"run_lease.HOST = {host!r} or run_lease.HOST\n"
        f"with run_lease.hold_lease({str(run)!r}, {job!r}, {lease_s}):\n"
        "    print('held', flush=True)\n"
        "    try:\n"
        f"        {then}\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted', flush=True)\n"
        "        sys.exit(3)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)  # reaped: the pid is gone, not a zombie


def test_a_second_driver_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    with hold_lease(str(tmp_path), "pipeline", 30.0):
        t0 = time.monotonic()
        with pytest.raises(LeaseHeld) as held, hold_lease(str(tmp_path), "evaluate", 30.0):
            pass
        assert time.monotonic() - t0 < 1.0
        message = str(held.value)
        for part in ("job 'pipeline'", f"host {run_lease.HOST}", f"pid {os.getpid()}", "started at ",
                     "expires in ", str(tmp_path)):  # fmt: skip
            assert part in message, (part, message)
        assert lease_of(tmp_path)["job"] == "pipeline"
    assert not (tmp_path / ".lease.json").exists()
    with hold_lease(str(tmp_path), "evaluate", 30.0):  # released: the next driver takes it
        assert lease_of(tmp_path)["job"] == "evaluate"


def test_of_drivers_starting_together_exactly_one_holds_the_run(tmp_path: Path) -> None:
    start = threading.Barrier(8)
    won: list[Lease] = []
    refused: list[LeaseHeld] = []

    def driver(n: int) -> None:
        lease = Lease(str(tmp_path), f"driver-{n}", 30.0, store_for(str(tmp_path)))
        start.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld as exc:
            refused.append(exc)

    threads = [threading.Thread(target=driver, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert all(f"job '{won[0].job}'" in str(exc) for exc in refused)
    won[0].release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp or set-aside file left either


def test_a_killed_driver_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    proc = holder(tmp_path, "victim", 30.0)
    with pytest.raises(LeaseHeld, match="job 'victim'"), hold_lease(str(tmp_path), "next", 30.0):
        pass  # alive: held
    kill(proc)
    t0 = time.monotonic()
    with (
        pytest.warns(LeaseTakeover, match=f"job 'victim'.*its process {proc.pid} on this host is gone"),
        hold_lease(str(tmp_path), "next", 30.0),
    ):
        assert lease_of(tmp_path)["job"] == "next" and lease_of(tmp_path)["pid"] == os.getpid()
    assert time.monotonic() - t0 < 2.0  # not after its 30 s lease: a dead process renews nothing
    assert not (tmp_path / ".lease.json").exists()


def test_a_killed_driver_on_another_host_is_taken_over_once_its_lease_expires(tmp_path: Path) -> None:
    proc = holder(tmp_path, "victim", 1.0, host="elsewhere")
    time.sleep(0.5)  # past a renewal
    kill(proc)
    with pytest.raises(LeaseHeld, match="host elsewhere.*expires in"), hold_lease(str(tmp_path), "n", 1.0):
        pass  # its pid means nothing here: only its expiry tells
    time.sleep(max(0.0, lease_of(tmp_path)["expires_at"] - time.time()) + 0.05)
    finished = False
    with (
        pytest.warns(LeaseTakeover, match="job 'victim' on host elsewhere.*lease expired"),
        hold_lease(str(tmp_path), "next", 1.0),
    ):
        time.sleep(1.5)  # outlives its own lease_s: renewed meanwhile
        finished = True
    assert finished and not (tmp_path / ".lease.json").exists()


def test_renewal_keeps_a_live_lease_valid_past_lease_s(tmp_path: Path) -> None:
    with hold_lease(str(tmp_path), "long", 1.0) as lease:
        time.sleep(2.5)
        with pytest.raises(LeaseHeld, match="job 'long'"), hold_lease(str(tmp_path), "second", 1.0):
            pass
        record = lease_of(tmp_path)
        assert record["serial"] >= 3 and record["expires_at"] > time.time() and not lease.lost


def take_over(run: Path, job: str) -> None:
    """Replace the run's lease as another driver would after judging this one stalled."""
    successor = {**lease_of(run), "job": job, "token": "f" * 32, "serial": 1, "expires_at": time.time() + 60}
    (run / ".lease.json").write_text(json.dumps(successor))


def test_release_removes_only_its_own_lease(tmp_path: Path) -> None:
    lost: list[str] = []
    with hold_lease(str(tmp_path), "slow", 30.0, on_lost=lambda lease, why: lost.append(why)):
        take_over(tmp_path, "successor")  # and leave before a renewal could notice
    assert lease_of(tmp_path)["job"] == "successor" and not lost  # ours was gone: theirs is kept
    (tmp_path / ".lease.json").unlink()

    with hold_lease(str(tmp_path), "slow", 0.6, on_lost=lambda lease, why: lost.append(why)):
        take_over(tmp_path, "successor")
        time.sleep(0.5)  # a renewal finds the lease is not ours any more
        assert lost and "took it over" in lost[0]
    assert lease_of(tmp_path)["job"] == "successor"


def test_a_driver_whose_lease_was_taken_over_is_interrupted(tmp_path: Path) -> None:
    proc = holder(tmp_path, "paused", 0.6, then="time.sleep(30)")
    taker = {**lease_of(tmp_path), "job": "taker", "token": "e" * 32, "expires_at": time.time() + 60}
    (tmp_path / ".lease.json").write_text(json.dumps(taker))
    try:
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 3 and out.strip() == "interrupted"  # stopped, not left writing the run
    assert lease_of(tmp_path)["job"] == "taker"


def test_an_unreadable_lease_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / ".lease.json").write_bytes(b'{"job": "half a wri')
    with pytest.warns(LeaseTakeover, match="unreadable"), hold_lease(str(tmp_path), "next", 5.0):
        assert lease_of(tmp_path)["job"] == "next"


def test_a_run_directory_made_only_for_the_lease_is_not_left_behind(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "new"
    with hold_lease(f"file://{run}", "prepare", 5.0):
        assert (run / ".lease.json").exists()
    assert not (tmp_path / "runs").exists()
    with hold_lease(str(run), "prepare", 5.0):
        (run / "items").mkdir()  # the job wrote something: the run stays
    assert sorted(p.name for p in run.iterdir()) == ["items"]


# --- the jobs ------------------------------------------------------------------------------------------


def test_jobs_on_a_held_run_exit_2_naming_the_holder_before_anything_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs import evaluate_checkpoint, evaluate_endpoint
    from jobs import pipeline as pipeline_job

    run = str(tmp_path / "run")
    common = ["--config", TINY, "--run-dir", run]
    with hold_lease(run, "pipeline", 30.0):
        assert pipeline_job.main(common) == 2
        assert evaluate_endpoint.main([*common, "--name", "x", "--base-url", "http://127.0.0.1:9/v1",
                                       "--model", "m"]) == 2  # fmt: skip
        assert evaluate_checkpoint.main([*common, "--name", "x", "--checkpoint", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        for prog in ("pipeline", "evaluate_endpoint", "evaluate_checkpoint"):
            assert f"{prog}: {run} is held by another driver: job 'pipeline'" in err, err
        assert err.count(f"pid {os.getpid()}") == 3
    # free again: the job gets as far as its input checks (nothing prepared), and leaves no lease behind
    assert pipeline_job.main([*common, "--only", "evaluate"]) == 2
    assert "input problem(s)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- object storage ------------------------------------------------------------------------------------


@pytest.fixture()
def s3_run(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    import boto3

    bucket = "lease-" + request.node.name.lower().replace("_", "-")[-40:].strip("-[]")
    bucket = "".join(c if c.isalnum() or c == "-" else "-" for c in bucket)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs/r"


def s3_store(run: str, conditional: bool):
    return store_for(run) if conditional else ReadBackStore(f"{run}/.lease.json", settle_s=0.1)


@pytest.mark.parametrize("conditional", [True, False], ids=["conditional-writes", "read-back"])
def test_a_lease_on_object_storage(s3_run: str, conditional: bool) -> None:
    from inbol_ray.data import io as dio

    assert isinstance(s3_store(s3_run, conditional), S3ConditionalStore) == conditional
    named = f"job 'pipeline' on host {run_lease.HOST}, pid {os.getpid()}"
    with hold_lease(s3_run, "pipeline", 1.0, store=s3_store(s3_run, conditional)):
        time.sleep(1.2)  # renewed past lease_s
        with (
            pytest.raises(LeaseHeld, match=named),
            hold_lease(s3_run, "2nd", 1.0, store=s3_store(s3_run, conditional)),
        ):
            pass
    assert not dio.exists(f"{s3_run}/.lease.json")

    stale = {"job": "gone", "host": "elsewhere", "pid": 1, "started_at": 0, "renewed_at": 0,
             "expires_at": time.time() - 1, "token": "d" * 32, "serial": 7}  # fmt: skip
    dio.write_bytes(f"{s3_run}/.lease.json", json.dumps(stale).encode())
    with (
        pytest.warns(LeaseTakeover, match="job 'gone'"),
        hold_lease(s3_run, "next", 5.0, store=s3_store(s3_run, conditional)),
    ):
        assert json.loads(dio.read_bytes(f"{s3_run}/.lease.json"))["job"] == "next"
    assert not dio.exists(f"{s3_run}/.lease.json")


def test_of_drivers_starting_together_on_s3_exactly_one_holds_the_run(s3_run: str) -> None:
    start = threading.Barrier(6)
    won: list[Lease] = []

    def driver(n: int) -> None:
        lease = Lease(s3_run, f"driver-{n}", 30.0, store_for(s3_run))
        start.wait()
        with contextlib.suppress(LeaseHeld):
            won.append(lease.acquire())

    threads = [threading.Thread(target=driver, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].release()
