"""Backend selection and the lazy Triton import."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onlineaug.kernels import _backend, pixel_mix

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_importing_kernels_imports_neither_triton_nor_kornia():
    code = ("import sys; import onlineaug.kernels; assert 'triton' not in sys.modules, 'triton was imported'; "
            "assert 'kornia' not in sys.modules, 'kornia was imported'; print('ok')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    images = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"backend='triton' got CPU tensors.*TRITON_INTERPRET=1"):
        pixel_mix(images, torch.tensor([1, 0]), torch.ones(2), backend="triton")
    # auto and torch still work on CPU
    assert torch.equal(pixel_mix(images, torch.tensor([1, 0]), torch.ones(2)), images)


def test_resolve_backend():
    cpu = torch.device("cpu")
    assert _backend.resolve_backend("torch", cpu, "op") == "torch"
    assert _backend.resolve_backend("auto", cpu, "op") == "torch"
    if _backend.triton_available():
        assert _backend.resolve_backend("auto", torch.device("cuda"), "op") == "triton"
    with pytest.raises(ValueError, match=r"op: backend='Triton' is not one of \('auto', 'triton', 'torch'\)"):
        _backend.resolve_backend("Triton", cpu, "op")


def test_validate_flag():
    assert _backend.should_validate(None, torch.device("cpu"), "op") is True
    assert _backend.should_validate(None, torch.device("cuda"), "op") is False
    assert _backend.should_validate(True, torch.device("cuda"), "op") is True
    with pytest.raises(TypeError, match="validate must be None, True or False"):
        _backend.should_validate("yes", torch.device("cpu"), "op")


def test_triton_on_cuda_tensors(device):
    if device.type != "cuda":
        pytest.skip("needs --device cuda")
    images = torch.rand(2, 3, 8, 8, device=device)
    out = pixel_mix(images, torch.tensor([1, 0], device=device), torch.full((2,), 0.5, device=device))
    assert out.device == images.device


def test_interpreter_set_after_triton_import_is_a_clear_error():
    code = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import onlineaug.kernels as kernels\n"
        "try:\n"
        "    kernels.pixel_mix(torch.zeros(2, 3, 4, 4), torch.tensor([1, 0]), torch.ones(2), backend='triton')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Set TRITON_INTERPRET before anything imports triton" in result.stdout


def test_triton_refuses_inputs_that_require_grad(device):
    images = torch.rand(2, 3, 4, 4, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="images requires grad, but the Triton kernel has no backward"):
        pixel_mix(images, torch.tensor([1, 0], device=device), torch.ones(2, device=device), backend="triton")
    out = pixel_mix(images, torch.tensor([1, 0], device=device), torch.ones(2, device=device), backend="torch")
    assert out.requires_grad
