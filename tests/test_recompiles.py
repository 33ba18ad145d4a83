"""Nothing recompiles after warm-up: every generating recipe's producer path under ``torch.compile``, on the CPU.

A producer compiles its UNet with ``dynamic=False`` (``LoadPolicy(compile=True)``): every new input shape compiles
a new graph, and any guard on a Python value (a float timestep, a strength) recompiles per value, until dynamo's
``recompile_limit`` (8) is hit and the UNet silently runs eager. On a GPU that costs minutes of compilation and
the speed of the compiled graph; here it is caught on the CPU, on the tiny pipelines:

* the producer (:class:`onlineaug.producer.Producer`, the step a producer process runs) is built under
  ``LoadPolicy(compile=True)`` for each generating recipe of the registry, with a tiny config per recipe;
* warm-up steps run until the UNet has seen every shape bucket the recipe can make (one per batch size, plus the
  padded strength buckets of recipes with per-sample strengths: ``strength_calls``), and every recompilation in
  them must be a batch-size change to a shape not compiled before;
* then more steps must compile nothing: no recompilation logged by dynamo (``TORCH_LOGS=recompiles``'s records,
  with their reasons) and no new graph (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``).

Backend: the policy's own ``torch.compile`` call runs with ``backend="aot_eager"`` by default: dynamo traces,
guards and recompiles exactly as under inductor (with ``dynamic=False`` inductor adds no guard), and AOTAutograd
builds the same graph, but no C++ is generated, which on a 2-core machine costs 2-4 minutes per UNet graph (cold
cache). ``ONLINEAUG_RECOMPILE_BACKEND=inductor`` runs the unpatched inductor compile of the policy instead (a few
minutes per distinct graph cold, about 20 s warm; the recipes share four graphs: InstructPix2Pix, and
img2img/text2img at UNet batch 2, 4 and 8).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.producer_loop import EncodedImages, make_producer, producer_settings  # noqa: E402
from onlineaug.models import LoadPolicy  # noqa: E402
from onlineaug.recipes import available_recipes, get_recipe  # noqa: E402

pytestmark = pytest.mark.slow

BACKEND = os.environ.get("ONLINEAUG_RECOMPILE_BACKEND", "aot_eager")
BATCH = 4  # generator_batch_size: with two strengths, calls of 1-4 rows, padded to the buckets 1, 2 and 4
GENERATION = 32  # tiny generation size (the tiny VAE x UNet downsample by 16)
# Per-recipe tiny config: two denoising steps and two strengths (calls of 3 rows occur: unpadded, they would make
# a fourth shape).
TINY = {
    "diffusemix": {"num_inference_steps": 2, "generation_size": GENERATION},
    "genmix": {"num_inference_steps": 2, "generation_size": GENERATION},
    "diffmix": {"num_inference_steps": 2, "generation_size": GENERATION, "strengths": (0.5, 1.0)},
    "diffaug": {"num_inference_steps": 2, "generation_size": GENERATION, "strengths": (0.5, 1.0)},
    "dafusion": {"num_inference_steps": 2, "generation_size": GENERATION, "strengths": (0.5, 1.0)},
    "diffgen": {"num_inference_steps": 2, "generation_size": GENERATION},
}
DEFAULT_TINY = {"num_inference_steps": 2, "generation_size": GENERATION}  # a recipe landing without an entry
MAX_WARMUP_STEPS = 12
STEPS_AFTER_WARMUP = 3


def tiny_options(name: str) -> dict:
    if name in TINY:
        return dict(TINY[name])
    valid = get_recipe(name).option_names()
    return {key: value for key, value in DEFAULT_TINY.items() if key in valid}


def generating_recipes() -> list[str]:
    """The built-in generating recipes (other test modules register test recipes of their own)."""
    from onlineaug.recipes import _REGISTRY

    built_in = [name for name in available_recipes() if _REGISTRY[name].__module__.startswith("onlineaug.recipes.")]
    return [name for name in built_in if get_recipe(name, **tiny_options(name)).generative]


def expected_buckets(recipe) -> set[int]:
    """The pipeline-call batch sizes a producer of ``BATCH`` rows makes: ``BATCH``, or for img2img recipes with
    several strengths (one call per strength) every padded bucket ``min(2**ceil(log2 m), BATCH)``, m = 1..BATCH."""
    kind = recipe.model_roles()[recipe.main_role].kind
    if kind == "img2img" and len(getattr(recipe, "strengths", ())) > 1:
        return {min(1 << (m - 1).bit_length(), BATCH) for m in range(1, BATCH + 1)}
    return {BATCH}


class RecompileLog(logging.Handler):
    """Dynamo's recompilation records (the ``recompiles`` logging artifact): each names its guard failure."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "Recompiling function" in message:
            self.reasons.append(message)


@pytest.fixture
def recompiles(monkeypatch):
    import torch._dynamo
    import torch._logging

    if BACKEND != "inductor":  # the policy's call, with the backend swapped (see the module docstring)
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=BACKEND))
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread keeps compile and steps predictable
    handler = RecompileLog()
    logger = logging.getLogger("torch._dynamo")
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", generating_recipes())
def test_no_recompile_after_warmup(name, recompiles, tmp_path):
    from torch._dynamo.utils import counters

    recipe = get_recipe(name, **tiny_options(name))
    dataset = EncodedImages(num_classes=4, size=48, length=12)
    settings = producer_settings(recipe, dataset, num_classes=4, image_size=16, batch_size=BATCH, generator="tiny",
                                 policy=LoadPolicy(compile=True), workdir=str(tmp_path))
    producer = make_producer(settings, device="cpu")
    pipe = producer.models[recipe.main_role]
    assert type(pipe.unet).__name__ == "OptimizedModule", "LoadPolicy(compile=True) did not compile the UNet"
    shapes: list[tuple] = []  # every UNet input shape
    calls: list[int] = []  # the rows of every pipeline call (the VAE decodes each call's latents once)
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(
        tuple((args[0] if args else kwargs["sample"]).shape)), with_kwargs=True)
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(int(args[0].shape[0])))

    buckets = expected_buckets(recipe)
    steps = 0
    while set(calls) != buckets:
        assert set(calls) <= buckets, f"{name}: pipeline calls of {sorted(set(calls) - buckets)} rows, outside the " \
                                      f"shape buckets {sorted(buckets)}: each new size compiles a new graph"
        assert steps < MAX_WARMUP_STEPS, (f"{name}: after {steps} steps the pipeline was called with "
                                          f"{sorted(set(calls))} rows, not every bucket of {sorted(buckets)}")
        producer.step()
        steps += 1
    seen = set(shapes)
    assert len(seen) == len(buckets), f"{name}: UNet shapes {sorted(seen)} for call sizes {sorted(buckets)}"
    for reason in recompiles.reasons:  # a new bucket may compile; nothing else may
        assert "size mismatch at index 0" in reason, f"{name}: a recompile that is not a new batch bucket:\n{reason}"
    graphs = counters["stats"]["unique_graphs"]
    warmup_recompiles = len(recompiles.reasons)

    for _ in range(STEPS_AFTER_WARMUP):
        producer.step()
    assert set(calls) == buckets and set(shapes) == seen, f"{name}: new shapes after warm-up"
    assert recompiles.reasons[warmup_recompiles:] == [], \
        f"{name}: recompiled after warm-up:\n" + "\n".join(recompiles.reasons[warmup_recompiles:])
    assert counters["stats"]["unique_graphs"] == graphs, f"{name}: new graphs compiled after warm-up"
    assert producer.counts.get("rejected:non_finite", 0) == 0


def test_the_recompile_log_names_value_guards(recompiles):
    """The detector itself: a float argument specialised by dynamo recompiles per value, and is reported so."""
    scale = torch.compile(lambda x, t: x * t, backend="eager", dynamic=False)
    scale(torch.ones(2), 0.5)
    scale(torch.ones(2), 0.7)
    scale(torch.ones(3), 0.7)
    assert len(recompiles.reasons) == 2
    assert "t == 0.5" in recompiles.reasons[0] and "size mismatch at index 0" not in recompiles.reasons[0]
    assert "size mismatch at index 0. expected 2, actual 3" in recompiles.reasons[1]
