"""The producer-loop benchmark's machinery: UNet FLOPs counted once, module clocks, the stage probe around
``Producer.step``, the pool write, and the load policy reaching producers through the loader."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import producer_loop  # noqa: E402
from benchmarks.profiling import ModuleClock, Stages, pipeline_modules, unet_flops_per_latent  # noqa: E402
from onlineaug.models import LoadPolicy, ModelSpec, load_model  # noqa: E402
from onlineaug.recipes import get_recipe  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def genmix():
    return get_recipe("genmix", num_inference_steps=2, generation_size=SIZE)


@pytest.fixture(scope="module")
def pipe(genmix):
    return load_model(genmix.model_roles()["edit"], ModelSpec("tiny"), device="cpu")


def _edit(pipe, count: int, steps: int):
    images = torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return pipe(prompt=["autumn"] * count, image=images, num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator().manual_seed(1)).images


def test_flops_counted_once_times_latents_equal_a_full_count(pipe):
    """One UNet forward counted, times the latents the UNet was fed, is every forward of a whole call counted."""
    from torch.utils.flop_counter import FlopCounterMode

    once = unet_flops_per_latent(pipe, lambda: _edit(pipe, 1, 3))
    assert once["unet_batch_counted"] == 3  # InstructPix2Pix guidance: 3 copies of the latent
    totals = []

    def pre(module, args, kwargs):
        mode = FlopCounterMode(display=False)
        mode.__enter__()
        totals.append([mode, args[0].shape[0]])

    def post(module, args, output):
        totals[-1][0].__exit__(None, None, None)

    handles = [pipe.unet.register_forward_pre_hook(pre, with_kwargs=True), pipe.unet.register_forward_hook(post)]
    try:
        _edit(pipe, 2, 3)
    finally:
        for handle in handles:
            handle.remove()
    full = sum(mode.get_total_flops() for mode, _ in totals)
    latents = sum(batch for _, batch in totals)
    assert len(totals) == 3 and latents == 2 * 3 * 3  # 3 steps x 2 images x 3 guidance copies
    assert once["unet_flops_per_latent"] * latents == full


def test_flop_count_without_a_unet_forward_fails_clearly(pipe):
    with pytest.raises(RuntimeError, match="ran no UNet forward"):
        unet_flops_per_latent(pipe, lambda: None)


def test_module_clock_counts_forwards_and_latents(pipe):
    with ModuleClock(pipeline_modules(pipe), "cpu") as clock:
        _edit(pipe, 2, 2)
        seconds = clock.seconds()
    assert clock.calls["unet"] == 2 and clock.latents["unet"] == 2 * 2 * 3
    assert clock.calls["vae_decoder"] == 1 and clock.latents["vae_decoder"] == 2
    assert clock.calls["vae_encoder"] == 1 and clock.calls["text_encoder"] == 2  # prompts, then ""
    assert all(seconds[name] > 0 for name in ("unet", "vae_decoder", "vae_encoder", "text_encoder"))
    _edit(pipe, 1, 1)  # detached: nothing more is counted
    assert clock.calls["unet"] == 2


def test_loop_probe_times_every_stage_and_restores_the_producer(genmix, tmp_path):
    dataset = producer_loop.EncodedImages(num_classes=4, size=48, length=8)
    settings = producer_loop.producer_settings(genmix, dataset, num_classes=4, image_size=16, batch_size=3,
                                               generator="tiny", policy=LoadPolicy(), workdir=str(tmp_path))
    producer = producer_loop.make_producer(settings, device="cpu")
    pipe = producer.models["edit"]
    cls = type(pipe)
    pool = producer_loop.make_pool(genmix, 16, 8)
    stages = Stages("cpu")
    probe = producer_loop.LoopProbe(producer, stages)
    try:
        assert isinstance(pipe, cls) and type(pipe) is not cls
        written = sum(producer_loop.write_to_pool(pool, producer.step()) for _ in range(2))
        assert written == 6 and int((pool.seq > 0).sum()) == 6 and (pool.seq % 2 == 0).all()
        assert pool.fields["generated"][pool.seq > 0].any()  # real pixels landed in the slots
    finally:
        probe.close()
        pool.close()
    for name in ("plan", "decode + resize", "h2d", "pipeline", "post + d2h", "check"):
        assert stages.seconds[name] > 0, name
    assert type(pipe) is cls and not hasattr(pipe, "_onlineaug_stages")
    assert "_load_sources" not in vars(producer) and "produce" not in vars(producer.recipe)
    seconds = dict(stages.seconds)
    producer.step()  # restored: nothing is timed any more
    assert dict(stages.seconds) == seconds


def test_load_policies_of_ours_and_the_baseline():
    args = producer_loop.build_parser().parse_args(["--device", "cpu", "--no-compile", "--fuse-qkv", "--compile-vae",
                                                    "--dtype", "bf16", "--generator", "tiny"])
    settings = producer_loop.resolve_settings(args)
    assert producer_loop.load_policy(settings, baseline=False) == LoadPolicy(
        dtype="bf16", compile=False, compile_vae=True, fuse_qkv=True)
    settings["compile"], settings["compile_mode"] = True, "max-autotune"
    assert producer_loop.load_policy(settings, baseline=False).compile == "max-autotune"
    settings["compile_mode"] = "default"
    assert producer_loop.load_policy(settings, baseline=False).compile is True
    assert producer_loop.load_policy(settings, baseline=True) == LoadPolicy(
        dtype="fp32", compile=False, compile_vae=False, fuse_qkv=False, channels_last=False, cudnn_benchmark=False)


def test_applied_policy_is_read_off_the_modules(pipe):
    applied = producer_loop.applied_policy(pipe)
    assert applied["dtype"] == "float32" and applied["unet_compiled"] is False and applied["fused_qkv"] is False
    assert applied["channels_last"] is False and "AttnProcessor2_0" in applied["attention_processors"]


def test_producer_loop_settings_are_validated():
    parse = producer_loop.build_parser().parse_args
    with pytest.raises(ValueError, match="generates nothing"):
        producer_loop.resolve_settings(parse(["--device", "cpu", "--recipe", "cutmix"]))
    with pytest.raises(ValueError, match="--batch-sizes must be positive"):
        producer_loop.resolve_settings(parse(["--quick", "--device", "cpu", "--batch-sizes", "0"]))
    with pytest.raises(ValueError, match="--budget-s must be positive"):
        producer_loop.resolve_settings(parse(["--quick", "--device", "cpu", "--budget-s", "0"]))
    settings = producer_loop.resolve_settings(parse(["--quick", "--device", "cpu", "--recipe", "diffmix",
                                                     "--recipe-options", '{"strengths": [0.7]}']))
    assert settings["recipe"] == "diffmix" and settings["recipe_options"] == {"strengths": [0.7]}
    assert settings["size"] == 32 and settings["steps"] == 2 and settings["compile"] is False


def test_the_loader_takes_a_whole_load_policy():
    from onlineaug import OnlineGenAugLoader
    from onlineaug.datasets import SyntheticShapes

    dataset = SyntheticShapes(num_classes=4, size=16, length=8)
    policy = LoadPolicy(dtype="bf16", compile="max-autotune", compile_vae=True, fuse_qkv=True)
    common = dict(num_classes=4, batch_size=2, image_size=16, pool_size=8, num_workers=0, progress=False)
    assert OnlineGenAugLoader(dataset, load_policy=policy, **common).policy is policy
    assert OnlineGenAugLoader(dataset, load_policy=policy, compile_unet="max-autotune", **common).policy is policy
    assert OnlineGenAugLoader(dataset, compile_unet="reduce-overhead", **common).policy == LoadPolicy(
        compile="reduce-overhead")
    with pytest.raises(ValueError, match=r"compile_unet=True disagrees with load_policy.compile='max-autotune'"):
        OnlineGenAugLoader(dataset, load_policy=policy, compile_unet=True, **common)
    with pytest.raises(TypeError, match="load_policy"):
        OnlineGenAugLoader(dataset, load_policy={"compile": True}, **common)


@pytest.mark.slow
def test_producer_loop_quick(tmp_path, capsys):
    md = tmp_path / "RESULTS.md"
    result = producer_loop.main(["--quick", "--device", "cpu", "--no-compile", "--out", str(tmp_path),
                                 "--results-md", str(md)])
    data = json.loads((tmp_path / "producer_loop_genmix.json").read_text())
    assert (tmp_path / "producer_loop_genmix.png").stat().st_size > 0
    assert data["settings"]["batch_sizes"] == [1, 2] and data["baseline"]["images"] == 2
    assert data["images_per_s"] == pytest.approx(result["images_per_s"])
    per_latent = data["flops"]["unet_flops_per_latent"]
    steps = data["settings"]["steps"]
    # the baseline fed the UNet 3 copies x steps per image; its FLOPs are counted once and scaled by that
    assert data["baseline"]["unet_latents"] == 2 * 3 * steps
    assert data["baseline"]["unet_flops"] == pytest.approx(per_latent * 2 * 3 * steps)
    for loop, pipeline in zip(data["loop"], data["pipeline"]):
        b = loop["batch_size"]
        assert loop["jobs"] == pipeline["images"] == b * loop["batches"]
        assert loop["written"] + loop["rejected"] == loop["jobs"]
        assert loop["unet_latents"] == loop["jobs"] * 3 * steps and loop["unet_forwards"] == loop["batches"] * steps
        stages = loop["stage_seconds"]
        assert sum(stages.values()) == pytest.approx(loop["seconds"], rel=1e-6)  # 'other' closes the sum
        assert pipeline["seconds"] == stages["pipeline"] < loop["seconds"]
        assert "text_encoder" not in loop["module_seconds"]  # prompts were encoded once, in the warm-up batch
    text = md.read_text()
    assert text.count("| ours: producer loop (step + pool write) |") == 2 and "ms per batch by stage" in text
    assert "policy applied" in text and "best: batch" in capsys.readouterr().out
    assert np.isfinite(data["best"]["images_per_s"])
