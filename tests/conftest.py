"""Session-wide fixtures: one local Ray per test session, one tiny checkpoint per session.

Both are expensive (Ray ~5 s to start, the checkpoint a few seconds) and read-only for tests, so they are
built once; tests that need a trained model build their own small one from `tiny_checkpoint`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from inbol_ray.runtime import quiet_env

quiet_env()
# The tests never reach the Hub (a Hub id resolves from a cache the test builds); jobs no longer set this
# themselves (inbol_ray/hub.py), and Ray workers inherit it from this process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# ... and a Hub id resolves from this session's own hub cache (`hub_tiny`), never the user's: set before Ray
# starts, so its workers resolve ids in the same cache, as a cluster's nodes do in theirs.
HUB_CACHE = Path(tempfile.mkdtemp(prefix="inbol-hub-cache-"))
os.environ["HF_HUB_CACHE"] = str(HUB_CACHE)
atexit.register(shutil.rmtree, HUB_CACHE, True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3-compatible server on a loopback port, named by the standard `AWS_ENDPOINT_URL`.

    Started before the session's Ray (`ray_local` depends on it) because Ray's workers take their
    environment from the process that starts Ray: that is how a user's workers see the endpoint too. Dummy
    credentials, and a checkpoint cache inside the session's temp folder, never the user's `/tmp`.
    """
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        # This interpreter's moto, not whatever `moto_server` is first on PATH (a pyenv shim ran another
        # Python's older moto, whose CompleteMultipartUpload reply pyarrow rejects).
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start (see {log.name})") from None
                time.sleep(0.2)
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
                "INBOL_CHECKPOINT_CACHE": str(tmp_path_factory.mktemp("checkpoint_cache")),
            }
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str):
    """A real local Ray on 2 CPUs bound to 127.0.0.1, shut down at the end of the session."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    temp_dir = Path("/tmp") / f"inbol_ray_test_{os.getpid()}"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


class MlflowServer:
    """A real MLflow tracking server (`mlflow server`, SQLite store, artifacts proxied to a folder) on a
    loopback port, in its own process group so that `stop` ends it and the workers it spawns, and nothing
    else. Job execution is off: the tests need tracking only, and its runner costs start-up time."""

    def __init__(self, folder: Path) -> None:
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = folder / "server.log"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                   "--artifacts-destination", str(folder / "artifacts")]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )
        deadline = time.monotonic() + 180  # ~10 s on an idle machine; minutes on a loaded 2-core one
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start (see {self.log})")
            time.sleep(0.5)

    def stop(self) -> None:
        """End the server's process group (the one this object started: its pid is the group id)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """The session's MLflow tracking server: `smoke_pipeline` reports to it (tests/integration/test_tracking.py
    reads it back)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def own_mlflow_server(tmp_path: Path):
    """An MLflow tracking server of the test's own, one it may stop mid-run (stopped at the end if not)."""
    folder = tmp_path / "mlflow"
    folder.mkdir()
    server = MlflowServer(folder)
    try:
        yield server
    finally:
        server.stop()


SMOKE = [
    "data.shapes.n_pretrain=200",
    "data.shapes.n_train=64",
    "data.shapes.n_val=16",
    "data.shapes.n_id_test=16",
    "data.shapes.n_ood_test=16",
    "data.shapes.n_unanswerable_test=16",
    "base_train.steps=30",
    "sampling.k=3",
    "sampling.batch_size=16",
    "train.max_steps=2",
    "train.batch_size=16",
    "eval.batch_size=32",
    "train.num_workers=0",
]
"""The embedded default at smoke size: a few hundred items, a few steps per training (local-mode Ray Train)."""


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One run directory of the embedded default at smoke size, and its overrides: `smoke_pipeline` runs
    every stage in it; the rehearsal and seeds tests start from its prepare and base model (whichever runs
    first makes them, the others find them up to date)."""
    return tmp_path_factory.mktemp("smoke") / "run", list(SMOKE)


@pytest.fixture(scope="session")
def smoke_pipeline(
    ray_local, smoke_run: tuple[Path, list[str]], mlflow_server: MlflowServer
) -> tuple[Path, list[str], str]:
    """The embedded default's pipeline with the DPO ablation layer, run once at smoke size in `smoke_run`'s
    directory: (run dir, overrides, what the job printed). The pipeline test checks it; the object-storage
    test compares its own run (other actor counts and batch sizes, on S3) against it, so one fresh run
    serves both checks; it reports to the session's MLflow server, which the tracking test reads back
    (tracking is in no stage's hash: reruns without it find every stage up to date). The overrides
    returned are without tracking."""
    import contextlib
    import io

    from jobs import pipeline as pipeline_job

    run_dir, smoke = smoke_run
    configs = Path(__file__).resolve().parents[1] / "configs"
    # With the ablation layer: every stage, dpo1-3 included (tiny.yaml alone is a subset of the same stages,
    # tests/unit/test_pipeline_runner.py).
    argv = ["--config", str(configs / "tiny.yaml"), "--config", str(configs / "ablation.yaml"),
            "--run-dir", str(run_dir), *smoke, "tracking.backend=mlflow", f"tracking.uri={mlflow_server.uri}"]  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = pipeline_job.main(argv)
    assert rc == 0, out.getvalue()[-3000:]
    return run_dir, smoke, out.getvalue()


@pytest.fixture(scope="session")
def tiny_config():
    """The embedded default config, shrunk to smoke size for tests."""
    from inbol_ray.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config) -> Path:
    """An untrained tiny LLaVA checkpoint (real HF directory), built once per session."""
    from inbol_ray.model.tiny import build_tiny_checkpoint

    out = tmp_path_factory.mktemp("tiny_ckpt") / "model"
    build_tiny_checkpoint(out, tiny_config.model)
    return out


@pytest.fixture(scope="session")
def hub_tiny(tiny_checkpoint: Path) -> str:
    """The tiny checkpoint as the Hub model `org/tiny` in the session's hub cache, the layout
    `huggingface_hub` writes when it downloads (`models--org--tiny/snapshots/<commit>`, `refs/main`);
    returns the commit. Read offline, by the driver and by Ray's workers alike."""
    commit = "c0ffee" + "0" * 34
    folder = HUB_CACHE / "models--org--tiny"
    if not (folder / "snapshots" / commit).exists():
        shutil.copytree(tiny_checkpoint, folder / "snapshots" / commit)
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny Qwen2-VL checkpoint: a second, non-LLaVA architecture, built once per session."""
    from inbol_ray.model.tiny_qwen2_vl import build_tiny_qwen2_vl

    return Path(build_tiny_qwen2_vl(str(tmp_path_factory.mktemp("tiny_qwen2_vl") / "model")))


GPU_DEVICE_ENV = "INBOL_GPU_TESTS_DEVICE"
"""`cuda` by default; `cpu` runs tests/gpu's logic on a CPU machine (a check of the tests, not of CUDA)."""
REQUIRE_GPU_ENV = "INBOL_REQUIRE_GPU"
"""Set by `make test-gpu`: no CUDA there is an error, never a silently empty run."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The `gpu` tier (tests/gpu) runs where CUDA is (or INBOL_GPU_TESTS_DEVICE says where); on a CPU
    machine its tests are deselected, so `make test` neither runs nor skips them."""
    import torch

    if torch.cuda.is_available() or os.environ.get(GPU_DEVICE_ENV):
        return
    if os.environ.get(REQUIRE_GPU_ENV):
        raise pytest.UsageError(f"{REQUIRE_GPU_ENV} is set but torch sees no CUDA device")
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(scope="session")
def device():
    """The gpu tier's device (tests/gpu, `make test-gpu`, under 10 minutes on one GPU): CUDA, or the one
    INBOL_GPU_TESTS_DEVICE names (`cpu` checks the tests' own logic on a CPU machine; it proves nothing
    about CUDA)."""
    import torch

    dev = torch.device(os.environ.get(GPU_DEVICE_ENV, "cuda"))
    if dev.type == "cuda":
        assert torch.cuda.is_available(), f"the gpu tier needs CUDA (or {GPU_DEVICE_ENV}=cpu)"
        print(
            f"\n[gpu] {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        )
    return dev


@pytest.fixture(scope="session")
def free_port():
    """A function returning a free TCP port on 127.0.0.1 (servers under test bind to loopback only)."""
    import socket

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return port


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
)


@pytest.fixture()
def browser(tmp_path: Path):
    """Debian's Chromium, headless, driven by Selenium; Selenium Manager kept offline (`SE_OFFLINE`): the
    driver is /usr/bin/chromedriver and the browser /usr/bin/chromium (`make browser`), nothing is downloaded."""
    import shutil

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: `make test` installs them as root "
            "(apt-get install chromium chromium-driver); install them yourself otherwise"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
