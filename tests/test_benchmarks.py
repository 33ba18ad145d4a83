"""Smoke runs of the benchmarks (tiny generator, few steps) and their output, plus the shared helpers.

The smoke runs write to ``tmp_path`` (``--out``, ``--results-md``): never to ``benchmarks/RESULTS.md``.
They follow ``pytest --device``: on CUDA the generator benchmark also reports MFU (for GPUs in the peak table).
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package; spawned producers inherit sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

ENV_FIELDS = ("device", "versions", "settings", "date")


def _check_environment(data: dict) -> None:
    for key in ENV_FIELDS:
        assert key in data, key
    assert data["versions"]["torch"] == torch.__version__
    assert data["versions"]["diffusers"] and data["versions"]["python"]


# ------------------------------------------------------------------------------------------------- common
@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_table(name, peak):
    assert common.lookup_peak(name)[0] == peak


def test_no_peak_on_cpu_or_fp32():
    assert common.peak_flops("cpu", torch.float16)[0] is None
    if torch.cuda.is_available():
        assert common.peak_flops("cuda", torch.float32)[0] is None


def test_environment_fields():
    env = common.environment("cpu")
    for key in ("date", "device", "versions", "cpu_count"):
        assert key in env
    for package in ("torch", "diffusers", "transformers", "timm", "torchvision", "kornia", "python"):
        assert package in env["versions"]


def test_write_json_turns_nan_into_null(tmp_path):
    path = common.write_json(tmp_path / "sub" / "x.json", {"a": math.nan, "b": [1.5, math.inf], "c": torch.float16})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": "torch.float16"}


def test_append_results_md_creates_the_header_then_appends(tmp_path):
    path = tmp_path / "RESULTS.md"
    env = {"date": "2026-01-01T00:00:00", "device": "test device", "versions": {"torch": "9.9"}, "cpu_count": 2}
    for i in range(2):
        common.append_results_md(path, f"run {i}", ("provider", "images/s"), [["ours", 12.345], ["base", None]],
                                 env=env, settings={"size": 64, "batch_sizes": [1, 2]}, notes=["a note"])
    text = path.read_text()
    assert text.count("# Benchmark results") == 1
    assert "## run 0 (2026-01-01T00:00:00)" in text and "## run 1" in text
    assert "test device" in text and "torch 9.9" in text and "batch_sizes=1 2" in text and "note: a note" in text
    assert "| ours | 12.3 |" in text and "| base | n/a |" in text
    assert common.append_results_md(None, "skipped", ("a",), [[1]], env=env, settings={}) is None


def test_generator_settings_are_validated():
    from benchmarks import generator

    parse = generator.build_parser().parse_args
    with pytest.raises(ValueError, match="multiple of 16"):
        generator.resolve_settings(parse(["--quick", "--size", "40"]))
    with pytest.raises(ValueError, match="strength"):
        generator.resolve_settings(parse(["--quick", "--task", "img2img", "--steps", "1", "--strength", "0.5"]))
    settings = generator.resolve_settings(parse(["--quick", "--device", "cpu"]))
    assert settings["generator"] == "tiny" and settings["compile"] is False and settings["threads"] == 1


def test_overhead_settings_are_validated():
    from benchmarks import overhead

    parse = overhead.build_parser().parse_args
    with pytest.raises(ValueError, match="even batch size"):
        overhead.resolve_settings(parse(["--quick", "--batch-size", "31"]))
    with pytest.raises(ValueError, match="exceeds"):
        overhead.resolve_settings(parse(["--quick", "--warmup", "100", "--pool-size", "16"]))
    settings = overhead.resolve_settings(parse(["--quick", "--device", "cpu"]))
    assert settings["model"] == "small-cnn" and settings["generator_devices"] == ["cpu"]
    assert settings["producers"] == ["local"]
    assert overhead.resolve_settings(parse(["--quick", "--producers", "ray", "local", "ray"]))["producers"] == [
        "ray", "local"]
    assert overhead.ray_arguments.__doc__ and overhead.PRODUCER_KINDS == ("local", "ray")
    with pytest.raises(SystemExit):
        parse(["--producers", "remote"])


def test_cached_images_are_not_pickled():
    import pickle

    from benchmarks.overhead import CachedImages

    dataset = CachedImages(num_classes=1000, size=16, length=50, cache=4)
    image, label = dataset[45]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 45
    assert torch.equal(image, dataset[1][0])  # cycles over the cache
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._images is None and torch.equal(clone[45][0], image)


# --------------------------------------------------------------------------------------------- smoke runs
@pytest.mark.slow
def test_generator_smoke(tmp_path, device, capsys):
    from benchmarks import generator

    md = tmp_path / "RESULTS.md"
    result = generator.main(["--quick", "--device", str(device), "--size", "32", "--steps", "2", "--batch-sizes",
                             "1", "2", "--repeats", "1", "--baseline-images", "2", "--out", str(tmp_path),
                             "--results-md", str(md)])
    data = json.loads((tmp_path / "generator_instruct-pix2pix.json").read_text())
    assert (tmp_path / "generator_instruct-pix2pix.png").stat().st_size > 0
    _check_environment(data)
    assert data["images_per_s"] == pytest.approx(result["images_per_s"]) and data["images_per_s"] > 0
    assert data["weights"]["random"] and "tiny" in data["weights"]["label"]
    if device.type == "cpu":
        assert data["mfu"] is None and data["peak_flops"] is None
    else:
        assert (data["mfu"] is None) == (data["peak_flops"] is None)
    rows = [data["baseline"], *data["ours"]]
    assert [r["batch_size"] for r in rows] == [1, 1, 2]
    # the work timed is the work asked for: --baseline-images 2 one at a time, then batch x --repeats 1
    assert [r["images"] for r in rows] == [2, 1, 2]
    for row in rows:
        # InstructPix2Pix's guidance runs the UNet on 3 copies of each latent, once per step
        assert row["unet_batch_per_image"] == 3 and row["unet_forwards_per_call"] == 2
        assert row["unet_flops_per_image"] == pytest.approx(rows[0]["unet_flops_per_image"])  # linear in batch
        assert row["unet_flops_per_image"] > 0
    text = md.read_text()
    assert text.count("| ours (producer path) |") == 2 and "tiny random weights" in text
    assert "best: batch" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("task, forwards, copies", [("img2img", 1, 2), ("text2img", 2, 2)])
def test_generator_other_tasks(task, forwards, copies):
    from benchmarks import generator

    args = generator.build_parser().parse_args([
        "--quick", "--device", "cpu", "--task", task, "--size", "32", "--steps", "2", "--batch-sizes", "2",
        "--repeats", "1", "--baseline-images", "1", "--warmup", "0", "--scheduler", "ddim"])
    result = generator.benchmark(args, progress=False)
    row = result["ours"][0]
    # DDIM runs exactly the steps asked for (SD 1.5's stored PNDM runs one more): img2img (SDEdit) runs
    # int(steps x strength) = int(2 x 0.8) = 1 of them, text2img all 2; both guide with 2 copies of each latent
    assert row["unet_forwards_per_call"] == forwards and row["unet_batch_per_image"] == copies
    assert result["images_per_s"] > 0 and result["mfu"] is None


@pytest.mark.slow
def test_overhead_smoke(tmp_path, device, capsys):
    from benchmarks import overhead

    md = tmp_path / "RESULTS.md"
    overhead.main(["--quick", "--device", str(device), "--steps", "3", "--warmup-steps", "1", "--recipes", "genmix",
                   "cutmix", "--baselines", "tv-cutmix", "timm-mixup", "--pool-size", "16", "--warmup", "4",
                   "--out", str(tmp_path), "--results-md", str(md)])
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert (tmp_path / "overhead.png").stat().st_size > 0
    _check_environment(data)
    names = [r["provider"] for r in data["providers"]]
    assert names == ["vanilla", "onlineaug genmix", "onlineaug cutmix", "torchvision CutMix", "timm Mixup (mixup)"]
    settings = data["settings"]
    assert settings["rounds"] == 2
    vanilla_runs = data["vanilla_runs_seconds"]
    assert len(vanilla_runs) == 2 and data["vanilla_seconds"] == pytest.approx(sum(vanilla_runs) / 2)
    assert data["noise_floor"] == pytest.approx((max(vanilla_runs) - min(vanilla_runs)) / data["vanilla_seconds"])
    for row in data["providers"]:
        for key in ("seconds", "steps_per_s", "images_per_s", "A_O", "generated_share", "fresh", "reused", "misses",
                    "runs_seconds", "within_noise"):
            assert key in row
        assert len(row["runs_seconds"]) == 2 and row["seconds"] == pytest.approx(sum(row["runs_seconds"]) / 2)
        assert row["steps_per_s"] > 0
        assert data["A_O"][row["provider"]] == row["A_O"]
        assert row["within_noise"] == overhead.within_noise(row["runs_seconds"], vanilla_runs, row["A_O"],
                                                            data["noise_floor"])
    genmix = data["providers"][1]
    assert genmix["generated"] + genmix["real"] == 2 * settings["steps"] * settings["batch_size"]  # both rounds
    assert genmix["fresh"] + genmix["reused"] == genmix["generated"]  # every generated serve is one or the other
    assert 0 <= genmix["generated_share"] <= 1 and genmix["misses"] >= 0
    assert data["headline"]["provider"] == "onlineaug genmix"
    assert data["providers"][2]["generated_share"] == 0  # cutmix: batch-time only
    assert data["providers"][3]["fresh"] is None  # torchvision: no pool
    text = md.read_text()
    assert "| onlineaug genmix |" in text and "noise floor:" in text
    out = capsys.readouterr().out
    assert "A_O" in out and "round 2/2 vanilla" in out and "noise floor:" in out


# --------------------------------------------------------------------------------- noise floor, no training
def fake_result(vanilla, others, *, applies=False):
    """An overhead result from run times alone, through the benchmark's own combining code."""
    from benchmarks import overhead

    settings = {"steps": 10, "batch_size": 4, "rounds": len(vanilla), "model": "small-cnn", "image_size": 32,
                "generator_devices": ["cpu"], "generator": "tiny", "p_aug": 0.5, "max_reuse": 8}
    base = {"gpu_seconds": None, "loader_wait_ms_per_step": 1.0, "final_loss": 2.0, "generated_share": None}
    rows = []
    for name, kind, runs in [("vanilla", "vanilla", vanilla), *others]:
        row = overhead.combine_runs([{**base, "provider": name, "kind": kind, "seconds": t} for t in runs], settings)
        rows.append(row)
    t_van = sum(vanilla) / len(vanilla)
    noise = overhead.noise_floor(vanilla)
    for row in rows:
        row["A_O"] = (row["seconds"] - t_van) / t_van
        row["runs_A_O"] = [(t - t_van) / t_van for t in row["runs_seconds"]]
        row["within_noise"] = overhead.within_noise(row["runs_seconds"], vanilla, row["A_O"], noise)
    return {"providers": rows, "noise_floor": noise, "vanilla_runs_seconds": vanilla, "settings": settings,
            "device": "cpu", "targets": {"applies": applies}}


def test_noise_floor_is_the_spread_of_vanilla_against_itself():
    from benchmarks import overhead

    assert overhead.noise_floor([1.0, 1.1]) == pytest.approx(0.1 / 1.05)
    assert overhead.noise_floor([2.0, 1.0, 1.5]) == pytest.approx(1.0 / 1.5)
    assert overhead.noise_floor([1.0]) is None  # one round cannot tell noise from overhead


def test_an_a_o_inside_the_noise_floor_or_straddling_vanilla_is_within_noise():
    from benchmarks import overhead

    result = fake_result([1.0, 1.1], [("inside", "onlineaug", [1.11, 1.13]),  # A_O +6.7% < floor 9.5%
                                      ("above", "tv", [1.3, 1.4]),  # +28.6%, its runs clear of vanilla's
                                      ("unstable", "timm", [0.7, 1.9])])  # +23.8%, but its runs straddle vanilla's
    verdicts = {r["provider"]: overhead.noise_verdict(r) for r in result["providers"]}
    assert verdicts == {"vanilla": "(the floor)", "inside": "within noise", "above": "above noise",
                        "unstable": "within noise"}
    assert result["providers"][1]["A_O"] == pytest.approx(1.12 / 1.05 - 1)
    assert "noise floor: 9.5%" in overhead.noise_line(result) and "1, 1.1 s" in overhead.noise_line(result)
    single = fake_result([1.0], [("x", "tv", [1.5])])
    assert overhead.noise_verdict(single["providers"][1]) == "n/a (1 round)"
    assert "n/a (one round" in overhead.noise_line(single)


def test_the_plot_draws_the_noise_band_and_the_target_line():
    from benchmarks import overhead

    result = fake_result([1.0, 1.1], [("inside", "onlineaug", [1.11, 1.13]), ("above", "tv", [1.3, 1.4])])
    fig, ax = overhead.figure(result)
    try:
        band = [p for p in ax.patches if "noise floor" in p.get_label()]
        assert len(band) == 1
        floor = result["noise_floor"] * 100  # axvspan: a rectangle over the whole height from -floor to +floor
        assert band[0].get_x() == pytest.approx(-floor) and band[0].get_width() == pytest.approx(2 * floor)
        target = [line for line in ax.get_lines() if line.get_label().startswith("target A_O 2%")]
        assert len(target) == 1 and list(target[0].get_xdata()) == [2.0, 2.0]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "inside: +6.7%, within noise" in labels and "above: +28.6%" in labels
    finally:
        overhead.common.pyplot().close(fig)


@pytest.mark.slow
def test_plan_measure_quick(tmp_path, capsys):
    from onlineaug.__main__ import main

    out, md = tmp_path / "plan.json", tmp_path / "RESULTS.md"
    main(["plan", "--measure", "--quick", "--device", "cpu", "--out", str(out), "--results-md", str(md),
          "--no-progress"])
    data = json.loads(out.read_text())
    _check_environment(data)
    measured = data["measured"]
    assert measured["trainer_images_per_s"] > 0 and measured["producer_images_per_s"] > 0
    assert data["plan"]["trainer_images_per_s"] == measured["trainer_images_per_s"]
    assert data["plan"]["producer_images_per_s"] == measured["producer_images_per_s"]
    plan = data["plan"]  # G = p_aug x R_train x T / (max_reuse x R_gen), from the measured rates
    assert plan["generator_gpus_exact"] == pytest.approx(
        plan["p_aug"] * measured["trainer_images_per_s"] * plan["trainer_gpus"]
        / (plan["max_reuse"] * measured["producer_images_per_s"]))
    assert [r["provider"] for r in measured["overhead"]["providers"]] == ["vanilla", "onlineaug genmix"]
    assert "plan (measured here)" in md.read_text()
    assert "measured producer" in capsys.readouterr().out


def test_kernels_benchmark_smoke(tmp_path, device):
    from benchmarks import kernels as kernels_benchmark

    out, results_md = tmp_path / "kernels.json", tmp_path / "RESULTS.md"
    assert kernels_benchmark.main(["--device", device.type, "--ops", "mixup", "concat_blend", "--batch-sizes", "2",
                                   "--size", "32", "--reps", "1", "--no-compile", "--out", str(out),
                                   "--results-md", str(results_md)]) == 0
    record = json.loads(out.read_text())
    assert record["environment"]["device"] and record["environment"]["versions"]["torch"] == torch.__version__
    assert record["settings"]["batch_sizes"] == [2] and record["settings"]["size"] == 32
    timed = {(r["op"], r["provider"]): r for r in record["results"] if r["median_s"] is not None}
    assert ("concat_blend", "torch eager (reference)") in timed
    for row in timed.values():
        assert row["median_s"] > 0
    # the memory traffic the bandwidth figures divide by, for B = 2 images of 3 x 32 x 32:
    pixels = 2 * 3 * 32 * 32
    for row in record["results"]:
        if row["op"] == "mixup":  # fp32: own and partner read, output written
            assert row["bytes"] == 3 * 4 * pixels
        else:  # one uint8 source byte per pixel at least (two along a ramp, plus the fractal), fp32 output
            assert 4 * pixels + pixels <= row["bytes"] <= 4 * pixels + 3 * pixels
    if device.type == "cpu":  # the interpreter is not a speed measure: ours is skipped, with the reason
        ours = [r for r in record["results"] if "triton" in r["provider"]]
        assert ours and all(r["median_s"] is None and "interpreter" in r["note"] for r in ours)
    text = results_md.read_text()
    assert text.startswith(common.RESULTS_MD_HEADER) and "| concat_blend | 2 |" in text


# ------------------------------------------------------------------------------------------ make bench-gpu
@pytest.mark.filterwarnings("ignore:torch.compile on CPU")
def test_gpu_suite_plan_fits_the_budget_and_its_arguments_parse(tmp_path):
    from benchmarks import gpu_suite, overhead, producer_loop

    default = [step for step in gpu_suite.STEPS if not step.optional]
    assert sum(step.budget_s for step in default) <= gpu_suite.TOTAL_BUDGET_S <= 8 * 60
    assert [s.name for s in default] == ["preflight", "kernels", "producer-ip2p", "producer-img2img", "trainer"]
    assert [s.name for s in gpu_suite.STEPS if s.optional] == ["single-gpu"]
    parsers = {"producer_loop.py": producer_loop, "overhead.py": overhead}
    for step in gpu_suite.STEPS:
        for dry_run in (False, True):
            command = gpu_suite.step_command(step, dry_run=dry_run, out=tmp_path, python="python3")
            if step.script == "-c":
                continue
            assert command[1].endswith(f"benchmarks/{step.script}")
            assert command[command.index("--results-md") + 1] == str(tmp_path / "RESULTS.md")
            assert command[command.index("--out") + 1].startswith(str(tmp_path / step.name))
            assert ("--budget-s" in command) == (step.inner_budget and not dry_run)
            if step.script in parsers:  # every flag of the GPU command exists and resolves (on the CPU here)
                argv = [a if a != "cuda" else "cpu" for a in command[2:]]
                settings = parsers[step.script].resolve_settings(parsers[step.script].build_parser().parse_args(argv))
                if step.script == "producer_loop.py" and not dry_run:
                    assert settings["steps"] == 20 and settings["size"] == 512 and settings["batch_sizes"] == [8, 16]
                    assert settings["compile"] is True and settings["dtype"] == "fp16"
                    assert settings["generator"] == "full-random"
                if step.script == "overhead.py" and not dry_run:
                    assert settings["model"] == "resnet50" and settings["batch_size"] == 256
                    assert settings["image_size"] == 224 and settings["amp"] is True
    ip2p = gpu_suite.step_command(gpu_suite.STEPS[2], dry_run=False, out=tmp_path, python="python3")
    assert ip2p[ip2p.index("--budget-s") + 1] == str(gpu_suite.STEPS[2].budget_s - 45)


def test_gpu_suite_refuses_a_gpu_run_without_cuda(tmp_path, capsys, monkeypatch):
    from benchmarks import gpu_suite

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_suite.main(["--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "DRY_RUN=1" in captured.err and "GPU plan" in captured.out
    assert not (tmp_path / "suite.json").exists()


def test_gpu_suite_output_folder(monkeypatch, tmp_path):
    from benchmarks import gpu_suite

    monkeypatch.setenv("OUT", str(tmp_path / "from-env"))
    assert gpu_suite.main(["--plan"]) == 0
    env = gpu_suite.child_environment(dry_run=False, extra_path="/tmp/site")
    assert env["PYTHONPATH"].split(":")[:2] == ["/tmp/site", str(ROOT)] and "TRITON_INTERPRET" not in env
    assert gpu_suite.child_environment(dry_run=True, extra_path=None)["TRITON_INTERPRET"] == "1"


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path, capsys):
    """`make bench-gpu DRY_RUN=1`: every step of the GPU run, through the same subprocesses, on the CPU."""
    from benchmarks import gpu_suite

    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path)]) == 0
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["dry_run"] is True and [s["step"] for s in suite["steps"]] == [
        "preflight", "kernels", "producer-ip2p", "producer-img2img", "trainer"]  # the opt-in step only when named
    assert [s["status"] for s in suite["steps"]] == ["ok"] * 5
    found = json.loads((tmp_path / "preflight.log").read_text().splitlines()[-1])
    assert found["modules"]["torch"] == torch.__version__.split("+")[0] and found["modules"]["diffusers"]
    for path in ("kernels/kernels.json", "producer-ip2p/producer_loop_genmix.json",
                 "producer-img2img/producer_loop_diffmix.json", "trainer/overhead.json"):
        assert (tmp_path / path).stat().st_size > 0, path
    img2img = json.loads((tmp_path / "producer-img2img/producer_loop_diffmix.json").read_text())
    assert img2img["recipe"]["strengths"] == [0.7] and img2img["pipeline_kind"] == "img2img"
    loop = img2img["loop"][0]
    steps = img2img["settings"]["steps"]
    # img2img runs int(steps x 0.7) denoising steps, on 2 guidance copies of each latent
    assert loop["unet_forwards"] == loop["batches"] * int(steps * 0.7)
    assert loop["unet_latents"] == loop["jobs"] * 2 * int(steps * 0.7)
    text = (tmp_path / "RESULTS.md").read_text()
    for title in ("## Kernels", "## producer loop: genmix", "## producer loop: diffmix", "## overhead:",
                  "## bench-gpu suite (dry run on the CPU: not GPU figures)"):
        assert title in text, title
    out = capsys.readouterr().out
    assert "GPU plan" in out and "producer-img2img  budget 130 s" in out


@pytest.mark.slow
def test_overhead_host_only(tmp_path, capsys):
    from benchmarks import overhead

    md = tmp_path / "RESULTS.md"
    result = overhead.main(["--host-only", "--runs", "2", "--batches", "2", "--recipes", "none", "genmix",
                            "--baselines", "tv-cutmix", "--batch-size", "8", "--image-size", "32", "--pool-size",
                            "8", "--out", str(tmp_path), "--results-md", str(md)])
    data = json.loads((tmp_path / "host_overhead.json").read_text())
    assert (tmp_path / "host_overhead.png").stat().st_size > 0
    _check_environment(data)
    rows = {r["provider"]: r for r in data["providers"]}
    assert list(rows) == ["plain", "onlineaug none", "onlineaug genmix", "torchvision CutMix"]
    for row in rows.values():
        assert row["batches_timed"] == 4 and len(row["fastest_per_run_ms"]) == 2
        assert row["min_ms"] == min(row["fastest_per_run_ms"]) <= row["median_ms"]
        assert row["median_vs_plain"] == pytest.approx(row["median_ms"] / rows["plain"]["median_ms"])
    genmix = rows["onlineaug genmix"]
    # p_aug 0.5 of 4 batches of 8 from a full pool with enough serves: generated rows, no miss, nothing generated
    assert genmix["generated"] > 0 and genmix["misses"] == 0 and genmix["produced_while_timed"] == 0
    assert rows["onlineaug none"]["generated"] == 0
    assert set(result["targets"]) == {"none_vs_plain"}
    assert result["targets"]["none_vs_plain"]["value"] == rows["onlineaug none"]["median_vs_plain"]
    assert data["settings"]["resize"] == "squash"  # the same no-op crop for every provider: the loaders' own work
    assert any(note.startswith("like with like: the same uint8 items, crop resize=squash") for note in data["notes"])
    out = capsys.readouterr().out
    assert "| onlineaug genmix |" in md.read_text() and "target: onlineaug none" in out
    assert f"torchvision {data['versions']['torchvision']}, timm {data['versions']['timm']}" in out
    with pytest.raises(ValueError, match="--host-only times the loader's host work on the CPU"):
        overhead.main(["--host-only", "--device", "cuda"])


def test_store_write_times_the_shard_writer_on_the_recipes_payload(tmp_path, capsys):
    from benchmarks import store_write

    md = tmp_path / "RESULTS.md"
    result = store_write.main(["--quick", "--dir", str(tmp_path / "stores"), "--shard-size", "4", "--out",
                               str(tmp_path), "--results-md", str(md)])
    data = json.loads((tmp_path / "store_write.json").read_text())
    _check_environment(data)
    (row,) = data["rows"]
    # GenMix at 32 px: original and edit (3 x 32 x 32 uint8 each) and three int64 scalars
    assert row["image_size"] == 32 and row["payload_bytes"] == 2 * 3 * 32 * 32 + 3 * 8
    assert row["written_bytes_per_sample"] > row["payload_bytes"]  # tar headers, .npy headers and the .json
    assert row["shards_per_run"] == 16 // 4 and 0 < row["min_ms_per_sample"] <= row["median_ms_per_sample"]
    assert row["mb_per_s"] == pytest.approx(row["written_bytes_per_sample"] / row["median_ms_per_sample"] / 1e3)
    assert list((tmp_path / "stores").iterdir()) == []  # each run's store is removed
    assert "| 32 |" in md.read_text() and result["settings"]["samples"] == 16
    assert "sample store writes: genmix payload" in capsys.readouterr().out
