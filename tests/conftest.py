"""Shared test options.

Tests run on CPU by default. ``pytest --device cuda`` (or ``ONLINEAUG_TEST_DEVICE=cuda``) reruns the
device-aware tests on a GPU.
"""
import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default=os.environ.get("ONLINEAUG_TEST_DEVICE", "cpu"),
        help="device for device-aware tests: cpu (default) or cuda",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slower case (still run in CI)")
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker with the group's other "
                                       "tests (they share a module fixture: a Ray cluster, a torchrun group)")
    # Triton binds interpreted or compiled mode when it is first imported: on CPU, choose the
    # interpreter before any test module imports it.
    if not config.getoption("--device").startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"--device {name} was asked for but torch.cuda.is_available() is False")
    return torch.device(name)
