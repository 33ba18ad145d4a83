"""Every ```python block of README.md runs as written: extracted from the README itself, each block is saved as a
script in an empty temporary directory and run there in a fresh interpreter (on CPU, within a minute each)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# ```py blocks need packages the tests do not install (tensorboard, wandb): they are compiled, not run
COMPILED_ONLY = re.compile(r"^```py\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[str, str]]:
    """``(heading, code)`` for each ```python block, named after the ``##`` section it sits in."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in BLOCK.finditer(text):
        heading = re.findall(r"^## (.+)$", text[:match.start()], re.MULTILINE)[-1]
        blocks.append((heading, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_the_blocks_these_tests_check():
    assert [heading for heading, _ in BLOCKS] == ["Use", "Metrics and resuming from a checkpoint",
                                                  "Augmenting the mixed batch on the GPU",
                                                  "Choosing generator and trainer GPUs", "Multi-GPU and multi-node"]


def test_the_metrics_logger_lines_compile_and_define_the_log_fn_the_loader_takes():
    import inspect

    from onlineaug import OnlineGenAugLoader

    blocks = COMPILED_ONLY.findall(README.read_text(encoding="utf-8"))
    assert len(blocks) == 2 and "SummaryWriter" in blocks[0] and "wandb.log" in blocks[1]
    for code in blocks:
        assert len(code.strip().splitlines()) == 3  # three lines each, as the README says
        compile(code, "README.md", "exec")
        assert "log_fn = lambda stats, step:" in code and "flat_stats(stats)" in code
    assert {"log_every", "log_fn"} <= set(inspect.signature(OnlineGenAugLoader).parameters)


def run_block(code: str, tmp_path: Path) -> tuple[str, float]:
    script = tmp_path / "readme_block.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "TRITON_INTERPRET": "1"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)
    seconds = time.monotonic() - start
    assert result.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{result.stderr[-4000:]}"
    # the blocks write nothing: the directory holds the script alone
    assert [p.name for p in tmp_path.iterdir()] == ["readme_block.py"]
    return result.stdout, seconds


def heading_of(code: str) -> str:
    return next(h for h, c in BLOCKS if c == code)


@pytest.mark.slow
@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[h.split()[0].lower() for h, _ in BLOCKS])
def test_readme_block_runs_as_written(code, tmp_path):
    out, seconds = run_block(code, tmp_path)
    print(f"{heading_of(code)}: {seconds:.1f} s")
    assert seconds < 120  # a minute each on an idle 2-core CPU; the bound leaves room for a loaded machine
    heading = heading_of(code)
    if heading == "Use":  # the example generates on a CPU: generated samples reach the batches
        generated, served, misses = map(int, re.search(r"generated (\d+) of (\d+) samples, (\d+) misses", out).groups())
        assert served == 2 * (256 // 32) * 32 and generated > 0
        assert float(re.search(r"final loss ([\d.]+)", out).group(1)) > 0
    elif heading == "Metrics and resuming from a checkpoint":  # 8 batches: 3 before the stop, 5 after
        assert out.splitlines() == ["step 4: 128 real samples served", "step 8: 256 real samples served",
                                    "5 of 8 batches after the restart, 8 served in all"]
    elif heading == "Augmenting the mixed batch on the GPU":
        assert out.splitlines() == [
            "torchvision: images (32, 3, 32, 32) on cpu, targets (32, 10) summing to 1.00",
            "kornia: images (32, 3, 32, 32) on cpu, targets (32, 10) summing to 1.00"]
    elif heading == "Multi-GPU and multi-node":  # Ray is imported, not started
        assert out == "16 Ray producer actors, started: False\n"
    else:
        trainer = "cuda:0" if torch.cuda.is_available() else "cpu"
        assert out.startswith(f"trainer on {trainer}, ")


def test_plain_cross_entropy_takes_the_soft_targets_as_the_readme_says():
    # F.cross_entropy with class probabilities is -sum_k t_k log softmax(z)_k, averaged over the batch
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    targets = torch.softmax(torch.randn(6, 10, generator=torch.Generator().manual_seed(1)), 1)
    expected = -(targets * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(F.cross_entropy(logits, targets), expected)
    assert "plain `torch.nn.functional.cross_entropy(logits, targets)` accepts them" in README.read_text()
