"""``python -m onlineaug``: help that names every default and choice, outputs under the current directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onlineaug.__main__ import build_parser
from onlineaug.recipes import available_recipes

ROOT = Path(__file__).resolve().parents[1]


def subcommand(name: str):
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return commands.choices[name]


def option_blocks(help_text: str) -> dict[str, str]:
    """``--option`` -> its whole entry in the help text (invocation and help, over several lines)."""
    body = help_text.split("options:", 1)[1]
    blocks, current = {}, None
    for line in body.splitlines():
        match = re.match(r"^  (-\w|--[\w-]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current is not None:
            blocks[current] += " " + line.strip()
    return {name: re.sub(r"\s+", " ", text) for name, text in blocks.items()}


@pytest.mark.parametrize("name", ["demo", "plan"])
def test_every_option_has_help_a_default_and_its_choices(name):
    parser = subcommand(name)
    blocks = option_blocks(parser.format_help())
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 15
    for action in options:
        flag = action.option_strings[-1]
        block = blocks[flag]
        assert action.help and len(action.help) > 10, flag
        assert "(default: " in block, f"{flag}: {block}"
        if action.choices:
            assert all(str(choice) in block for choice in action.choices), flag


def test_recipe_choices_are_the_registered_recipes():
    recipe = next(a for a in subcommand("demo")._actions if a.dest == "recipe")
    assert list(recipe.choices) == available_recipes()
    assert {"genmix", "diffusemix", "cutmix", "mixup", "none"} <= set(recipe.choices)
    block = option_blocks(subcommand("demo").format_help())["--recipe"]
    assert "{" + ",".join(available_recipes()) + "}" in block and "(default: genmix)" in block


def test_an_unknown_recipe_is_refused_with_the_list(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--recipe", "genmixx"])
    error = capsys.readouterr().err
    assert "invalid choice: 'genmixx'" in error and "genmix" in error and "cutmix" in error


def test_flags_read_off_and_words_are_kept():
    blocks = option_blocks(subcommand("plan").format_help())
    assert "(default: off)" in blocks["--measure"]
    assert "(default: runs/plan/plan.json)" in blocks["--out"]
    assert "(default: none; make bench passes benchmarks/RESULTS.md)" in blocks["--results-md"]
    assert "(default: None)" not in " ".join(blocks.values())  # a None default is said in words


# ---------------------------------------------------------------------------------- outputs land in the cwd
def _snapshot(root: Path) -> dict[str, int]:
    files = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in names:
            path = Path(folder, name)
            files[str(path.relative_to(root))] = path.stat().st_mtime_ns
    return files


def run_here(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "onlineaug", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_plan_from_an_empty_directory_writes_only_there(tmp_path):
    before = _snapshot(ROOT)
    out = run_here(tmp_path, "plan", "--trainer-images-per-s", "2500", "--producer-images-per-s", "3").stdout
    assert _snapshot(ROOT) == before  # nothing written into the package's own tree (benchmarks/, RESULTS.md)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == ["runs/plan/plan.json"]
    assert "wrote runs/plan/plan.json" in out


@pytest.mark.slow
def test_demo_from_an_empty_directory_writes_only_there_and_names_its_recipe(tmp_path):
    before = _snapshot(ROOT)
    out = run_here(tmp_path, "demo", "--recipe", "cutmix", "--steps", "2", "--batch-size", "8", "--image-size", "32",
                   "--length", "64", "--num-workers", "0", "--no-progress").stdout
    assert _snapshot(ROOT) == before
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "runs/demo/metrics.json"]  # a batch-time recipe pools nothing: no preview
    assert "onlineaug demo: recipe cutmix," in out and "no generator (batch-time only)" in out
    assert re.search(r"^\s+recipe\s+cutmix \(Yun et al., CutMix, ICCV 2019\)$", out, re.MULTILINE)
    assert "online cutmix steps/s" in out and "GenMix" not in out and "genmix" not in out
