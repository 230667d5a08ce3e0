"""The GPU tier: `make test-gpu` on a CUDA machine (one short run, under 10 minutes on one GPU).

Every test here carries the `gpu` marker and takes its device from the `device` fixture: CUDA, or the device
INBOL_GPU_TESTS_DEVICE names (`cpu` checks the tests' own logic on a CPU machine; it proves nothing about
CUDA). Without CUDA and without that variable, tests/conftest.py deselects them.
"""

from __future__ import annotations

import os

import pytest
import torch

GPU_DEVICE_ENV = "INBOL_GPU_TESTS_DEVICE"


@pytest.fixture(scope="session")
def device() -> torch.device:
    dev = torch.device(os.environ.get(GPU_DEVICE_ENV, "cuda"))
    if dev.type == "cuda":
        assert torch.cuda.is_available(), "the gpu tier needs CUDA (or INBOL_GPU_TESTS_DEVICE=cpu)"
        print(
            f"\n[gpu] {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        )
    return dev
