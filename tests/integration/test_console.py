"""A quiet console: what a job prints is its stage lines, summaries, progress, warnings and errors; Ray's
own output and the rows under each summary are in the run's `logs/` folder.

Two runs are checked. The session's smoke pipeline (tests/conftest.py), through the job's CLI: its
console (stdout, what the fixture captured) has a bounded number of lines and no Ray Data output, its
`logs/` holds that output and every line the console left out, and its report shows a training-curve
figure per trained method. And a job that starts its own Ray, as `make demo` does, in a subprocess whose
stdout and stderr are both read: the session's Ray forwards no worker output (`log_to_driver=False`) and
Ray Data's console handler writes to stderr, which the fixture does not capture, so only a job of its own
shows that neither reaches the console, that a worker's warning still does, and that `--verbose`
(`verbose=True`) shows everything again.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inbol_ray import methods as M
from inbol_ray.config import load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MAX_SMOKE_LINES = 70
"""The smoke pipeline (13 stages with the ablation layer, 6 trainings) printed 123 lines on stdout before
the quiet console (and 187 on stderr, Ray Data's among them) and 72 after (2 on stderr): 27 stage lines, a
summary or two per stage, a few progress lines and the local-mode trainings' own step lines (12), which
now go to the job's log."""
RAY_DATA = re.compile(r"streaming_executor|logging_progress|Execution plan of Dataset|Running Dataset")


def test_smoke_console_is_short_and_the_rest_is_in_logs(smoke_pipeline) -> None:
    run_dir, _, out = smoke_pipeline
    lines = out.splitlines()
    assert len(lines) <= MAX_SMOKE_LINES, out
    assert not [line for line in lines if RAY_DATA.search(line) or re.search(r"\bINFO\b", line)], out
    assert sum(": running" in line for line in lines) == 13 and "[13/13] report: done" in out

    ray_log = (run_dir / "logs" / "ray.log").read_text()
    assert "Execution plan of Dataset" in ray_log and "Starting execution of Dataset" in ray_log
    # The log holds every job run on this directory (other tests rerun it): the fixture's is the one
    # with every stage line the fixture printed.
    runs = (run_dir / "logs" / "pipeline.log").read_text().split("==== python -m jobs.pipeline")[1:]
    stage_lines = [line for line in lines if re.match(r"^\[\d+/13\]", line)]
    ours = [run for run in runs if all(f" {line}\n" in run for line in stage_lines)]
    assert len(ours) == 1, runs
    logged = [line.split(" ", 1)[1] for line in ours[0].splitlines()[1:]]
    rows = [line for line in logged if re.match(r"^ {4}shapes_val +n=", line)]
    assert len(rows) == 8, ours[0]  # evaluation's per-set rows, one per method: logged, not shown
    assert not [line for line in lines if line.startswith("    ")]
    assert [line for line in lines if line not in logged] == [
        line for line in lines if line.startswith("[train ") and " step " in line
    ]  # every console line is in the log too, but the trainings' own step lines (printed by the loop)


def test_smoke_report_shows_training_curves(smoke_pipeline) -> None:
    """Done-when of issue 34 item 2: report.md links a figure per trained method, each a real plot (the
    PNG decodes, is not one colour, and the loss line, near-black, is drawn across its panel)."""
    run_dir, smoke, _ = smoke_pipeline
    cfg = load_config([ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "ablation.yaml"], smoke)
    trained = M.training_order(cfg.eval.methods, cfg.train.dpo_init)
    report = (run_dir / "report.md").read_text()
    curves = report.split("## Training curves", 1)[1].split("\n## ", 1)[0]
    for method in trained:
        assert f"](figures/training_{method}.png)" in curves, curves
        with Image.open(run_dir / "figures" / f"training_{method}.png") as img:
            pixels = np.asarray(img.convert("RGB")).astype(int)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
        dark = (np.abs(pixels - 0x22).sum(axis=2) <= 30).any(axis=0).nonzero()[0]
        assert dark.max() - dark.min() > 0.2 * pixels.shape[1], method


JOB = r"""
import logging, sys, time, warnings
import ray, ray.data
from inbol_ray import console
from inbol_ray.runtime import init_ray, ray_output_to

run_root, temp_dir = sys.argv[1], sys.argv[2]
init_ray(num_cpus=1, temp_dir=temp_dir)  # as a job does: log_to_driver on

@ray.remote(num_cpus=0)
def work(tag):
    print(f"plain worker line {tag}")
    logging.getLogger("user").warning("WARNING from a worker %s", tag)
    return tag

def one(verbose, tag):
    with console.session(run_root, "job", verbose=verbose) as out:
        with ray_output_to(out.ray_log_path, verbose=verbose, tty=out.tty):
            out.log(f"[1/1] stage {tag}: running")
            out.log(f"    a row {tag}")
            ray.data.range(8).map_batches(lambda b: b).take_all()
            ray.get(work.remote(tag))
            deadline = time.time() + 60  # worker output reaches the driver asynchronously
            while f"plain worker line {tag}" not in open(out.ray_log_path).read() and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)
        print(f"==== end {tag}", flush=True)
        print(f"==== end {tag}", file=sys.stderr, flush=True)

one(False, "quiet")
one(True, "verbose")
ray.shutdown()
"""


def test_a_job_that_starts_ray_shows_only_warnings_of_ray_and_its_workers(tmp_path: Path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="inbol_con_", dir="/tmp")  # Ray's socket paths must stay short
    try:
        run = subprocess.run(
            [sys.executable, "-c", JOB, str(tmp_path / "run"), temp_dir],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    quiet_out, verbose_out = run.stdout.split("==== end quiet\n")
    quiet_err, verbose_err = run.stderr.split("==== end quiet\n")
    quiet = quiet_out + quiet_err
    assert "[1/1] stage quiet: running" in quiet and "a row quiet" not in quiet
    assert not RAY_DATA.search(quiet) and "plain worker line quiet" not in quiet, quiet
    assert "WARNING from a worker quiet" in quiet  # warnings still shown
    verbose = verbose_out + verbose_err
    assert "a row verbose" in verbose and RAY_DATA.search(verbose) and "plain worker line verbose" in verbose

    ray_log = (tmp_path / "run" / "logs" / "ray.log").read_text()
    for tag in ("quiet", "verbose"):
        assert f"plain worker line {tag}" in ray_log and f"WARNING from a worker {tag}" in ray_log
    assert ray_log.count("Execution plan of Dataset") >= 2
    job_log = (tmp_path / "run" / "logs" / "job.log").read_text()
    assert "    a row quiet" in job_log and job_log.count("==== python -m jobs.job") == 2
