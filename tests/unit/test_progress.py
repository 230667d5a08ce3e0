"""The job console's rules, on real streams, files and threads: which lines reach the terminal, what the
log file keeps, how a bar shows on a terminal and off one, and a training followed through its file.

Time is a parameter (`clock`), not patched: a bar's quiet and heartbeat rules are about elapsed time, and
a test that sleeps 15 s per case would not be run.
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest

from inbol_ray import console, progress
from inbol_ray.console import HEARTBEAT_S, QUIET_S, Console


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tty: bool, verbose: bool = False) -> tuple[Console, io.StringIO, io.StringIO, Clock]:
    out, log, clock = io.StringIO(), io.StringIO(), Clock()
    return Console(out, log_file=log, verbose=verbose, tty=tty, clock=clock), out, log, clock


def test_rows_under_a_summary_go_to_the_log_only() -> None:
    con, out, log, _ = make(tty=False)
    con.log("[12/13] evaluate: running")
    con.log("  base: evaluate_base[transformers]: items 80")
    con.log("    shapes_val                   n=16    acc=  0.0%")
    assert out.getvalue().splitlines() == [
        "[12/13] evaluate: running",
        "  base: evaluate_base[transformers]: items 80",
    ]
    logged = log.getvalue().splitlines()
    assert len(logged) == 3 and logged[2].endswith("    shapes_val                   n=16    acc=  0.0%")
    assert logged[0][:8].count(":") == 2  # every log line starts with its time

    verbose, out, _, _ = make(tty=False, verbose=True)
    verbose.log("    a row")
    assert out.getvalue() == "    a row\n"


def test_off_a_terminal_a_bar_prints_a_few_quarter_lines() -> None:
    """1000 steps over 100 s: a line at 25, 50 and 75%, none per step; the log gets every tenth."""
    con, out, log, clock = make(tty=False)
    bar = con.bar("train cadpo", 1000, unit="steps")
    for step in range(1, 1001):
        clock.now += 0.1
        bar.update(step, loss=1.0 / step)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[1].split("(")[1].split(")")[0] for line in lines] == ["25%", "50%", "75%"]
    assert lines[1].startswith("  train cadpo: 500/1000 steps (50%), 0:50 elapsed, ETA 0:50, loss 0.002")
    assert len(log.getvalue().splitlines()) == 10  # 10%, 20%, ... 100%


def test_off_a_terminal_a_short_bar_prints_nothing_and_a_stalled_one_a_heartbeat() -> None:
    con, out, _, clock = make(tty=False)
    with con.bar("sample", 100) as bar:
        for done in range(0, 101, 10):
            clock.now += 1.0  # 10 s in all: every quarter line is within QUIET_S of the start
            bar.update(done)
    assert out.getvalue() == ""
    assert QUIET_S > 10

    with con.bar("evaluate", 100) as bar:
        bar.update(1)
        clock.now += HEARTBEAT_S + 1
        bar.update(2)  # no quarter passed, but nothing was printed for HEARTBEAT_S
    assert out.getvalue().splitlines() == ["  evaluate: 2/100 items (2%), 10:01 elapsed, ETA 16:21:38"]


def test_on_a_terminal_bars_share_one_status_line_under_the_lines() -> None:
    con, out, _, clock = make(tty=True)
    con.line("[5/10] train_sft: running")
    sft, idk = con.bar("train sft", 100, "steps"), con.bar("train idk_it", 200, "steps")
    clock.now += 1
    sft.update(10)
    clock.now += 1
    idk.update(50)
    con.line("[6/10] train_idk_it: running")
    text = out.getvalue()
    # the line printed while bars run comes after the status line is wiped, and the status is redrawn under it
    assert "\r\x1b[2K[6/10] train_idk_it: running\ntrain sft  10% ETA ? | train idk_it  25% ETA ?" in text
    assert text.endswith("train sft  10% ETA ? | train idk_it  25% ETA ?")
    idk.close()  # one bar left: drawn in full
    assert out.getvalue().endswith("\r\x1b[2Ktrain sft [##..................] 10/100 steps  10%, 0:02, ETA ?")
    sft.close()
    con.clear()
    assert out.getvalue().endswith("\r\x1b[2K")
    assert out.getvalue().count("\n") == 2  # two lines; every bar state was drawn in place


def test_a_quarter_line_waits_for_a_rate() -> None:
    """Start-up took a minute and the first batch brought 38%: no line with "ETA ?", the next one says it."""
    con, out, _, clock = make(tty=False)
    bar = con.bar("evaluate (5 models)", 400)
    clock.now += 110
    bar.update(152)
    assert out.getvalue() == ""
    clock.now += 10
    bar.update(200)
    assert out.getvalue() == "  evaluate (5 models): 200/400 items (50%), 2:00 elapsed, ETA 0:42\n"


def test_eta_is_measured_from_the_first_update() -> None:
    """Start-up (a worker group forming) is not work: 60 s before step 1 must not inflate the ETA."""
    con, _, _, clock = make(tty=False)
    bar = con.bar("train", 100, "steps")
    clock.now += 60
    bar.update(1)
    clock.now += 10
    bar.update(11)
    assert bar.eta() == pytest.approx(89.0)
    assert progress.clock_text(bar.eta()) == "1:29" and progress.clock_text(3725) == "1:02:05"
    bar.update(100)
    assert bar.eta() == 0.0


def test_a_terminal_is_detected_on_a_real_pty() -> None:
    master, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as tty:
            assert Console(tty).tty and not Console(io.StringIO()).tty
    finally:
        os.close(master)
        os.close(follower)


def test_session_writes_the_job_log_and_note_goes_there(tmp_path: Path) -> None:
    out = io.StringIO()
    with console.session(str(tmp_path), "demo", out=out) as con:
        assert console.current() is con and Path(con.ray_log_path) == tmp_path / "logs" / "ray.log"
        con.log("[1/1] stage: running")
        console.note("[train x] step 1/2 | loss 1.0")  # the loop's per-step line, in the driver
    assert console.current() is not con
    assert out.getvalue() == "[1/1] stage: running\n"
    log = (tmp_path / "logs" / "demo.log").read_text()
    assert "==== python -m jobs.demo" in log and "[train x] step 1/2 | loss 1.0" in log
    with pytest.raises(RuntimeError), console.session(str(tmp_path), "demo", out=out):
        raise RuntimeError("stage failed")
    assert "RuntimeError: stage failed" in (tmp_path / "logs" / "demo.log").read_text()  # appended


def test_a_training_is_followed_through_its_progress_file(tmp_path: Path) -> None:
    """A worker thread publishes 40 steps (throttled) while the driver follows the file: the job log gets
    the bar's lines up to the last step, and a stale file from an earlier run is not shown."""
    uri = progress.file_for(str(tmp_path), "train_cadpo")
    progress.Publisher(uri).publish(7, 9)  # an earlier run's last state

    def work() -> None:
        publisher = progress.Publisher(uri, min_interval_s=0.02)
        for step in range(1, 41):
            time.sleep(0.005)
            publisher.publish(step, 40, loss=1.0 / step)

    with (
        console.session(str(tmp_path), "train", out=io.StringIO()),
        progress.follow(uri, "train cadpo", poll_s=0.02),
    ):
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    log = (tmp_path / "logs" / "train.log").read_text()
    assert "train cadpo: 40/40 steps (100%)" in log and "loss 0.025" in log
    assert "/9 steps" not in log
    assert progress.read_progress(uri) == {"done": 40, "total": 40, "fields": {"loss": 0.025}}


def test_publisher_throttles_but_always_writes_the_last_step(tmp_path: Path) -> None:
    clock = Clock()
    publisher = progress.Publisher(str(tmp_path / "p.json"), min_interval_s=1.0, clock=clock)
    assert publisher.publish(1, 10) and not publisher.publish(2, 10)
    clock.now += 1.0
    assert publisher.publish(3, 10) and publisher.publish(10, 10)
    assert progress.read_progress(str(tmp_path / "missing.json")) is None


def test_verbose_is_a_flag_of_every_job() -> None:
    from inbol_ray.cli import _parse

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    _, args = _parse("pipeline", "doc", ["--config", tiny, "--verbose", "eval.batch_size=8"])
    assert args.verbose and args.overrides == ["eval.batch_size=8"]
    assert not _parse("pipeline", "doc", ["--config", tiny])[1].verbose
