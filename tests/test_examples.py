"""examples/: the Lightning DataModule example trains 10 steps on CPU (run by `make test`)."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_run(result, steps: int, batch_size: int) -> None:
    assert result["global_step"] == steps and len(result["seen"]) == steps
    for step in result["seen"]:
        assert step["device"] == "cpu" and step["shape"] == (batch_size, 3, 32, 32)  # on the loader's device
        torch.testing.assert_close(step["target_sums"], torch.ones(batch_size))  # soft targets, rows sum to 1
        assert torch.isfinite(torch.tensor(step["loss"]))
    stats = result["stats"]
    assert stats["batches"] == steps and stats["real"] + stats["generated"] == steps * batch_size
    assert result["loader_closed"]  # the DataModule's teardown closed the loader


@pytest.mark.slow
def test_lightning_example_trains_10_steps_with_online_genmix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = load_example("lightning_datamodule")
    result = example.main(["--max-steps", "10", "--batch-size", "8", "--warmup", "4"], default_root_dir=tmp_path)
    check_run(result, 10, 8)
    assert result["stats"]["generated"] >= 1 and result["stats"]["produced"] >= 4  # warmup filled the pool


@pytest.mark.slow  # importing pytorch_lightning alone takes ~5 s on a loaded CPU
def test_lightning_example_with_a_batch_time_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = load_example("lightning_datamodule")
    result = example.main(["--max-steps", "10", "--batch-size", "8", "--recipe", "cutmix"], default_root_dir=tmp_path)
    check_run(result, 10, 8)
    assert result["stats"]["generated"] == 0 and result["stats"]["produced"] == 0  # batch-time only: no producer
    assert not any(tmp_path.iterdir())  # logger, checkpoints off: Lightning wrote nothing
