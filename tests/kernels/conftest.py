"""Kernel tests: Triton kernels run under Triton's CPU interpreter unless the test device is CUDA.

``TRITON_INTERPRET=1`` is set here (if unset) when the device is CPU. The kernels build their
``triton.jit`` functions lazily, per interpreter mode, so setting it at configure time is early
enough.
"""
import os
import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:  # plain `pytest` (without `python -m`) from anywhere
    sys.path.insert(0, _REPO_ROOT)


def pytest_configure(config):
    device = str(config.getoption("--device", default=os.environ.get("ONLINEAUG_TEST_DEVICE", "cpu")))
    if not device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
