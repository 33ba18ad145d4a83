"""DA-Fusion (Trabucco et al., ICLR 2024): per-image strengths, one call per strength that runs int(T * s) steps,
hard source labels, and serving only edits of the row's own image (match="index")."""

import numpy as np
import pytest
import torch

from onlineaug import OnlineGenAugLoader
from onlineaug.datasets import SyntheticShapes
from onlineaug.images import resize_uint8
from onlineaug.models import LoadPolicy, ModelSpec, load_model
from onlineaug.producer import standalone_context
from onlineaug.recipes import Batch, BatchContext, SourceBatch, get_recipe
from onlineaug.sources import SourceSet

NAMES = ["circle", "square", "triangle", "star"]
GEN, SIZE = 32, 16
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny pipelines are too small to gain from intra-op threads; on a shared CI box they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CountingPipeline:
    """The real pipeline; records each call's arguments and how many UNet forwards (denoising steps) it ran."""

    def __init__(self, pipe):
        self.pipe, self.calls, self._forwards = pipe, [], 0
        self._hook = pipe.unet.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self._forwards += 1

    def __call__(self, **kwargs):
        before = self._forwards
        result = self.pipe(**kwargs)
        self.calls.append({**kwargs, "unet_forwards": self._forwards - before})
        return result

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def close(self):
        self._hook.remove()


@pytest.fixture(scope="module")
def img2img():
    return load_model(get_recipe("dafusion").model_roles()["edit"], ModelSpec("tiny"), device="cpu",
                      policy=LoadPolicy())


def test_defaults_follow_the_paper_and_the_official_code(tmp_path):
    recipe = get_recipe("dafusion")
    assert recipe.strengths == (0.25, 0.5, 0.75, 1.0) and recipe.serve_match == "index"
    assert (recipe.num_inference_steps, recipe.guidance_scale, recipe.generation_size) == (50, 7.5, 512)
    assert recipe.prompt_text("<class_2>") == "a photo of a <class_2>"
    role = recipe.model_roles()["edit"]
    assert (role.kind, role.default, role.architecture, role.scheduler) == (
        "img2img", "CompVis/stable-diffusion-v1-4", "sd15", None)  # the scheduler stored with the weights
    ti, lora = str(tmp_path / "embeds.bin"), str(tmp_path / "lora.safetensors")
    role = get_recipe("dafusion", textual_inversion=ti, lora=lora, match="class").model_roles()["edit"]
    assert (role.textual_inversion, role.lora) == (ti, lora)
    assert get_recipe("dafusion", match="class").serve_match == "class"


def test_plan_jobs_draws_images_from_the_sources_with_uniform_strengths():
    recipe = get_recipe("dafusion")
    allowed = np.array([3, 5, 8, 13, 21, 34])
    ctx = standalone_context(num_classes=4, image_size=SIZE, class_names=NAMES, sources=SourceSet(allowed), seed=4)
    n = 12000
    jobs = recipe.plan_jobs(ctx, n)
    assert set(jobs.indices.tolist()) == set(allowed.tolist())  # only (and every one of) the sampler's indices
    hits = np.array([(jobs.indices == i).sum() for i in allowed])
    assert ((hits - n / 6) ** 2 / (n / 6)).sum() < 25, hits  # uniform images (chi-square, 5 dof)
    values, hits = np.unique(jobs.values["strength"], return_counts=True)
    assert values.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert ((hits - n / 4) ** 2 / (n / 4)).sum() < 20, hits
    # the strength is drawn per image, independently of which image
    pairs = np.zeros((6, 4))
    np.add.at(pairs, (np.searchsorted(allowed, jobs.indices), np.searchsorted(values, jobs.values["strength"])), 1)
    assert ((pairs - n / 24) ** 2 / (n / 24)).sum() < 50, pairs  # 23 dof


@pytest.mark.parametrize("tokens", [None, {n: f"<class_{i}>" for i, n in enumerate(NAMES)}])
def test_produce_runs_one_call_per_strength_with_int_T_s_steps_and_keeps_the_source_label(img2img, tokens):
    recipe = get_recipe("dafusion", generation_size=GEN, num_inference_steps=4)
    ctx = standalone_context(num_classes=4, image_size=SIZE, class_names=NAMES, seed=1)
    indices = np.array([6, 1, 11, 2, 7])
    strengths = np.array([1.0, 0.25, 0.5, 0.25, 0.75])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, GEN, GEN), generator=g, dtype=torch.uint8)
    labels = torch.from_numpy(indices % 4)
    batch = SourceBatch(images=images, originals=resize_uint8(images, SIZE), labels=labels,
                        indices=torch.from_numpy(indices), values={"strength": torch.from_numpy(strengths)})
    pipe = CountingPipeline(img2img)
    if tokens is not None:
        pipe.class_tokens = tokens
    try:
        produced = recipe.produce({"edit": pipe}, batch, ctx)
    finally:
        pipe.close()
    img2img.scheduler.set_timesteps(4)
    extra = len(img2img.scheduler.timesteps) - 4  # PNDM (SD 1.4's stored scheduler) adds one repeated timestep
    calls = sorted(pipe.calls, key=lambda c: c["strength"])
    assert [(c["strength"], len(c["prompt"])) for c in calls] == [(0.25, 2), (0.5, 1), (0.75, 1), (1.0, 1)]
    assert [c["unet_forwards"] for c in calls] == [int(4 * s) + extra for s in (0.25, 0.5, 0.75, 1.0)]
    for call in calls:
        rows = [int(np.flatnonzero(strengths == call["strength"])[k]) for k in range(len(call["prompt"]))]
        words = [tokens[NAMES[labels[r]]] if tokens else NAMES[labels[r]] for r in rows]
        assert call["prompt"] == [f"a photo of a {w}" for w in words]
        assert call["guidance_scale"] == 7.5 and call["num_inference_steps"] == 4
    payload = produced.payload
    assert produced.rejected == {} and payload["image"].shape == (5, 3, SIZE, SIZE)
    assert torch.equal(payload["label"], labels) and torch.equal(payload["index"], torch.from_numpy(indices))
    assert torch.equal(payload["strength"], torch.from_numpy(strengths).float())


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_labels_are_the_source_class_hard_then_smoothed(smoothing):
    recipe = get_recipe("dafusion")
    ctx = BatchContext(num_classes=4, image_size=SIZE, mean=MEAN, std=STD, label_smoothing=smoothing,
                       out_dtype=torch.float32, p_aug=0.5, fractals=None)
    generated = torch.tensor([True, False, True])
    fields = {"image": torch.zeros(3, 3, SIZE, SIZE, dtype=torch.uint8), "label": torch.tensor([2, 0, 3]),
              "index": torch.tensor([5, 6, 7]), "strength": torch.tensor([0.25, 0.75, 1.0])}
    _, targets, info = recipe.apply(Batch(fields, generated), {}, ctx)
    expected = torch.full((3, 4), smoothing / 4)
    expected[[0, 1, 2], [2, 0, 3]] += 1 - smoothing
    torch.testing.assert_close(targets, expected, atol=1e-6, rtol=0)
    assert info["strength"].tolist() == [0.25, 0.0, 1.0]  # 0 on the real row


@pytest.mark.parametrize("options, error, message", [
    (dict(match=None), ValueError, r"match=None is invalid: expected one of \['index', 'class'\]"),
    (dict(match="any"), ValueError, r"match='any' is invalid: expected one of \['index', 'class'\]"),
    (dict(num_inference_steps=3), ValueError, r"num_inference_steps=3 is invalid: expected an int with "
     r"int\(num_inference_steps \* s\) >= 1 for every strength s \(strength 0.25 would run 0 denoising steps\): "
     r"use num_inference_steps >= 4"),
    (dict(strengths=(0.25, 1.01)), ValueError, r"strengths\[1\]=1.01 is invalid: expected a number in \(0.0, 1.0\]"),
    (dict(guidance_scale=-1), ValueError, "guidance_scale=-1 is invalid: expected a number >= 0.0"),
    (dict(textual_inversion=["a.bin"]), TypeError, r"textual_inversion=\['a.bin'\] is invalid: expected a non-empty"),
])
def test_options_are_validated_with_the_recipe_name(options, error, message):
    with pytest.raises(error, match=r"^recipe 'dafusion': option " + message):
        get_recipe("dafusion", **options)


@pytest.mark.slow
def test_match_index_serves_only_edits_of_the_rows_own_image(device):
    num_classes, batch_size, length = 4, 8, 8
    shapes = SyntheticShapes(num_classes=num_classes, size=32, length=length, seed=0)
    loader = OnlineGenAugLoader(
        shapes, recipe="dafusion", num_classes=num_classes, batch_size=batch_size, image_size=32, generator="tiny",
        device=device, p_aug=1.0, pool_size=16, max_reuse=8, warmup=6, num_workers=0, seed=0, progress=False,
        shuffle=False, generator_batch_size=4, return_info=True, recipe_options={"num_inference_steps": 4})
    assert loader.recipe.serve_match == "index"
    generated = 0
    with loader:
        for epoch in range(3):
            loader.set_epoch(epoch)
            for position, (_, targets, info) in enumerate(loader):
                real_index = torch.arange(position * batch_size, (position + 1) * batch_size)  # sequential sampler
                mask = info["generated"].cpu()
                index, label = info["index"].cpu(), info["label"].cpu()
                assert torch.equal(index[mask], real_index[mask])  # an edit of this very image, never another's
                assert torch.equal(label, real_index % num_classes)  # the source's class, hard
                assert torch.equal(targets.cpu(), torch.nn.functional.one_hot(label, num_classes).float())
                strength = info["strength"].cpu()
                assert set(strength[mask].tolist()) <= {0.25, 0.5, 0.75, 1.0} and (strength[~mask] == 0).all()
                generated += int(mask.sum())
        stats = loader.stats()
    assert generated >= 6 and generated == stats["generated"]
    assert stats["misses"] == stats["real"]  # with p_aug=1 a row stays real only when no edit of it was ready
