"""The install layout: the kernels are ``onlineaug.kernels``, never a top-level ``kernels`` package.

A top-level ``kernels`` would clash with the registry's ``kernels`` package (the compute-kernels loader used
with transformers): installing both overwrites one with the other.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_installed_package_provides_onlineaug_kernels_and_no_top_level_kernels(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what is installed
    code = ("import importlib.util, onlineaug.kernels as k; print(k.__name__, callable(k.box_mix)); "
            "print(importlib.util.find_spec('kernels'))")
    result = _run(code, tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["onlineaug.kernels True", "None"]


def test_a_source_checkout_on_pythonpath_imports_onlineaug_kernels(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = _run("import sys, onlineaug.kernels.box_mix; print(sys.modules['onlineaug.kernels.box_mix'].__file__)",
                  tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == REPO_ROOT / "kernels" / "box_mix.py"


@pytest.mark.slow
def test_the_wheel_holds_onlineaug_kernels_only(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path), str(REPO_ROOT)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("onlineaug-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "onlineaug/kernels/box_mix.py" in names and "onlineaug/kernels/_backend.py" in names
    assert not any(name.startswith("kernels/") for name in names)
