"""Diff-Mix / Diff-Aug / Diff-Gen (Wang et al., CVPR 2024): labels vs the formula, pair and strength sampling,
one pipeline call per strength, prompts with and without textual-inversion tokens, option checks, end to end."""

import math

import numpy as np
import pytest
import torch

from onlineaug import OnlineGenAugLoader
from onlineaug.datasets import SyntheticShapes
from onlineaug.images import resize_uint8
from onlineaug.models import LoadPolicy, ModelSpec, load_model, resolve_models
from onlineaug.producer import standalone_context
from onlineaug.recipes import Batch, BatchContext, Jobs, SourceBatch, get_recipe
from onlineaug.recipes.diffmix import edit_by_strength, is_compiled, strength_calls
from onlineaug.sources import SourceSet

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])
NAMES = ["circle", "square", "triangle", "star"]
GEN = 32  # generation size of the tiny pipelines
SIZE = 16  # training size in the producer tests


class CountingPipeline:
    """The real pipeline, with a record of every call's arguments (batch size, strength, prompts, images)."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny pipelines are too small to gain from intra-op threads; on a shared CI box they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def img2img():
    return load_model(get_recipe("diffmix").model_roles()["edit"], ModelSpec("tiny"), device="cpu",
                      policy=LoadPolicy())


@pytest.fixture(scope="module")
def text2img():
    return load_model(get_recipe("diffgen").model_roles()["edit"], ModelSpec("tiny"), device="cpu",
                      policy=LoadPolicy())


def batch_context(num_classes=4, smoothing=0.0):
    return BatchContext(num_classes=num_classes, image_size=SIZE, mean=MEAN, std=STD, label_smoothing=smoothing,
                        out_dtype=torch.float32, p_aug=1.0, fractals=None)


def labelled_sources(length=40, num_classes=4):
    indices = np.arange(length)
    return SourceSet(indices, labels=indices % num_classes)


def source_batch(jobs: Jobs, num_classes=4, seed=0) -> SourceBatch:
    """The jobs' source images as the producer loads them (random pixels; labels index % num_classes)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(jobs), 3, GEN, GEN), generator=g, dtype=torch.uint8)
    indices = torch.from_numpy(jobs.indices.copy())
    labels = torch.where(indices >= 0, indices % num_classes, -1)
    return SourceBatch(images=images, originals=resize_uint8(images, SIZE), labels=labels, indices=indices,
                       values={k: torch.as_tensor(v) for k, v in jobs.values.items()})


# ------------------------------------------------------------------------------------------- the label
def hand_label(source, target, s, gamma, scaler, num_classes, smoothing=0.0):
    """soft_scaler * ((1 - s**gamma) e_source + s**gamma e_target), then (1 - eps) y + eps / K, in plain Python."""
    row = [0.0] * num_classes
    row[source] += scaler * (1 - math.pow(s, gamma))
    row[target] += scaler * math.pow(s, gamma)
    return [(1 - smoothing) * v + smoothing / num_classes for v in row]


@pytest.mark.parametrize("gamma, soft_scaler", [(0.5, 1.0), (0.1, 1.0), (1.0, 1.0), (0.5, 0.9), (2.0, 0.8)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_generated_rows_get_the_strength_weighted_label_and_real_rows_their_own(gamma, soft_scaler, smoothing):
    recipe = get_recipe("diffmix", gamma=gamma, soft_scaler=soft_scaler)
    ctx = batch_context(num_classes=5, smoothing=smoothing)
    rows = [  # (generated, label, source, target, s): real rows hold stale pool fields that must be ignored
        (True, 3, 0, 3, 0.5), (True, 1, 2, 1, 0.7), (True, 4, 4, 4, 0.9), (False, 2, 0, 1, 0.9),
        (True, 0, 1, 0, 0.3), (False, 4, 3, 3, 0.5), (True, 2, 3, 2, 1.0),
    ]
    generated = torch.tensor([r[0] for r in rows])
    fields = {"image": torch.zeros(len(rows), 3, SIZE, SIZE, dtype=torch.uint8),
              "label": torch.tensor([r[1] for r in rows]), "source_label": torch.tensor([r[2] for r in rows]),
              "target_label": torch.tensor([r[3] for r in rows]),
              "strength": torch.tensor([r[4] for r in rows], dtype=torch.float32)}
    images, targets, info = recipe.apply(Batch(fields, generated), recipe.sample_params(Batch(fields, generated), ctx,
                                                                                       torch.Generator()), ctx)
    for i, (is_generated, label, source, target, s) in enumerate(rows):
        if is_generated:
            expected = hand_label(source, target, s, gamma, soft_scaler, 5, smoothing)
            assert info["strength"][i].item() == pytest.approx(s)
            assert (info["source_label"][i].item(), info["target_label"][i].item()) == (source, target)
            assert targets[i].sum().item() == pytest.approx((1 - smoothing) * soft_scaler + smoothing, abs=1e-6)
        else:
            expected = hand_label(label, label, 0.0, 1.0, 1.0, 5, smoothing)  # one-hot, never scaled
            assert (info["strength"][i].item(), info["source_label"][i].item(), info["target_label"][i].item()) \
                == (0.0, label, label)
        torch.testing.assert_close(targets[i], torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(images, ((fields["image"].float() / 255 - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)))


def test_the_target_class_gets_s_to_the_gamma_as_in_table_6():
    """Table 6's caption: (gamma=0.5, s=0.7) -> 0.16 y_source + 0.84 y_target; (0.1, 0.7) -> 0.04 / 0.96."""
    for gamma, source_weight, target_weight in [(0.5, 0.16, 0.84), (0.1, 0.04, 0.96)]:
        recipe = get_recipe("diffmix", gamma=gamma)
        fields = {"image": torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), "label": torch.tensor([1]),
                  "source_label": torch.tensor([0]), "target_label": torch.tensor([1]),
                  "strength": torch.tensor([0.7])}
        _, targets, _ = recipe.apply(Batch(fields, torch.tensor([True])), {}, batch_context(num_classes=2))
        assert targets[0].tolist() == pytest.approx([source_weight, target_weight], abs=0.005)


def test_diffaug_and_diffgen_labels_are_one_hot_of_the_prompted_class(img2img, text2img):
    ctx = standalone_context(num_classes=4, image_size=SIZE, class_names=NAMES, sources=labelled_sources(), seed=3)
    aug = get_recipe("diffaug", generation_size=GEN, num_inference_steps=2)
    jobs = aug.plan_jobs(ctx, 64)
    assert np.array_equal(jobs.values["target_label"], jobs.indices % 4)  # target = the reference's class
    gen = get_recipe("diffgen", generation_size=GEN, num_inference_steps=1)
    jobs = gen.plan_jobs(ctx, 64)
    assert (jobs.indices == -1).all() and (jobs.values["strength"] == 1.0).all()  # text-to-image: no reference
    for recipe, pipe in ((aug, img2img), (gen, text2img)):
        jobs = recipe.plan_jobs(ctx, 3)
        payload = recipe.produce({"edit": pipe}, source_batch(jobs), ctx).payload
        assert torch.equal(payload["target_label"], torch.from_numpy(jobs.values["target_label"]))
        assert torch.equal(payload["source_label"], payload["target_label"])
        assert torch.equal(payload["label"], payload["target_label"])
        batch = Batch({"image": payload["image"], **{k: v for k, v in payload.items() if k != "image"}},
                      torch.ones(3, dtype=torch.bool))
        _, targets, _ = recipe.apply(batch, {}, batch_context())
        assert torch.equal(targets, torch.nn.functional.one_hot(payload["target_label"], 4).float())


# ------------------------------------------------------------------------------------------- planning
def test_plan_jobs_draws_only_from_the_sources_with_uniform_independent_classes():
    recipe = get_recipe("diffmix")
    allowed = np.array([1, 2, 4, 7, 9, 10, 13, 15, 16, 19, 22, 23])  # a subset: classes 1, 2, 3 (index % 4 != 0)
    allowed = allowed[allowed % 4 != 0]
    sources = SourceSet(allowed, labels=allowed % 4)
    ctx = standalone_context(num_classes=4, image_size=SIZE, class_names=NAMES, sources=sources, seed=11)
    n = 18000
    jobs = recipe.plan_jobs(ctx, n)
    assert set(jobs.indices.tolist()) <= set(allowed.tolist())
    source, target = jobs.indices % 4, jobs.values["target_label"]
    assert set(source.tolist()) == set(target.tolist()) == {1, 2, 3}  # only classes the sampler yields
    # joint (source, target) uniform over the 3 x 3 pairs: independence and uniformity in one chi-square (8 dof)
    counts = np.zeros((3, 3))
    np.add.at(counts, (source - 1, target - 1), 1)
    chi2 = ((counts - n / 9) ** 2 / (n / 9)).sum()
    assert chi2 < 30, counts  # p < 2e-4 under the null
    # the reference is uniform among its class's images
    for label in (1, 2, 3):
        members = allowed[allowed % 4 == label]
        hits = np.array([(jobs.indices == m).sum() for m in members])
        expected = hits.sum() / len(members)
        assert ((hits - expected) ** 2 / expected).sum() < 25, hits
    # strengths uniform over {0.5, 0.7, 0.9}
    values, hits = np.unique(jobs.values["strength"], return_counts=True)
    assert values.tolist() == [0.5, 0.7, 0.9]
    assert ((hits - n / 3) ** 2 / (n / 3)).sum() < 20, hits


def test_plan_jobs_keeps_the_configured_strengths_exactly():
    recipe = get_recipe("diffmix", strengths=[0.3, 0.6], num_inference_steps=10)
    ctx = standalone_context(num_classes=4, image_size=SIZE, class_names=NAMES, sources=labelled_sources(), seed=0)
    strengths = recipe.plan_jobs(ctx, 200).values["strength"]
    assert strengths.dtype == np.float64 and set(strengths.tolist()) == {0.3, 0.6}


# ---------------------------------------------------------------------------------------- producing
def test_produce_makes_one_pipeline_call_per_strength(img2img):
    recipe = get_recipe("diffmix", generation_size=GEN, num_inference_steps=2, metaclass="shape")
    ctx = standalone_context(num_classes=4, image_size=SIZE, class_names=NAMES, sources=labelled_sources(), seed=5)
    strengths = np.array([0.5, 0.9, 0.5, 0.7, 0.9, 0.5])
    targets = np.array([1, 2, 3, 0, 1, 2])
    jobs = Jobs(np.array([4, 9, 2, 7, 12, 3]), {"target_label": targets, "strength": strengths})
    batch = source_batch(jobs)
    pipe = CountingPipeline(img2img)
    produced = recipe.produce({"edit": pipe}, batch, ctx)
    assert sorted((call["strength"], len(call["prompt"])) for call in pipe.calls) == [(0.5, 3), (0.7, 1), (0.9, 2)]
    for call in pipe.calls:
        sent = (call["image"] * 255).round().to(torch.uint8)
        rows = [next(r for r in range(6) if torch.equal(batch.images[r], image)) for image in sent]
        assert all(strengths[r] == call["strength"] for r in rows)  # every row of a call has the call's strength
        assert call["prompt"] == [f"a photo of a {NAMES[targets[r]]} shape" for r in rows]
        assert call["num_inference_steps"] == 2 and call["guidance_scale"] == 7.5
    payload = produced.payload
    assert produced.rejected == {} and payload["image"].shape == (6, 3, SIZE, SIZE)
    assert torch.equal(payload["source_label"], batch.labels) and torch.equal(payload["index"], batch.indices)
    assert torch.equal(payload["target_label"], torch.from_numpy(targets))
    assert torch.equal(payload["label"], payload["target_label"])
    assert torch.equal(payload["strength"], torch.from_numpy(strengths).float())
    again = recipe.produce({"edit": img2img}, batch, standalone_context(
        num_classes=4, image_size=SIZE, class_names=NAMES, sources=labelled_sources(), seed=5)).payload
    assert torch.equal(again["image"], payload["image"])  # deterministic by seed


def test_strength_groups_pad_to_power_of_two_buckets_for_a_compiled_unet():
    strengths = torch.tensor([0.5, 0.9, 0.5, 0.7, 0.9, 0.5, 0.5, 0.9], dtype=torch.float64)
    plain = strength_calls(strengths, pad=False)
    assert [(s, r.tolist(), n) for s, r, n in plain] == [(0.5, [0, 2, 5, 6], 4), (0.7, [3], 1), (0.9, [1, 4, 7], 3)]
    padded = strength_calls(strengths, pad=True)
    assert [(s, n) for s, _, n in padded] == [(0.5, 4), (0.7, 1), (0.9, 4)]
    assert [n for _, _, n in strength_calls(torch.full((6,), 0.5, dtype=torch.float64), pad=True)] == [6]  # cap: n


@pytest.mark.slow  # imports torch._dynamo
def test_a_compiled_unet_is_detected(img2img):
    from types import SimpleNamespace

    assert is_compiled(SimpleNamespace(unet=torch.compile(torch.nn.Linear(2, 2))))  # wrapping compiles nothing yet
    assert not is_compiled(img2img) and not is_compiled(SimpleNamespace())


def test_padded_calls_keep_every_row(img2img):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, GEN, GEN), generator=g, dtype=torch.uint8)
    strengths = torch.tensor([1.0, 0.5, 1.0, 1.0], dtype=torch.float64)
    prompts = ["a photo of a circle", "a photo of a square", "a photo of a star", "a photo of a triangle"]
    results = {}
    for pad in (False, True):
        pipe = CountingPipeline(img2img)
        generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
        results[pad] = edit_by_strength(pipe, images, prompts, strengths, generators, pad=pad, num_inference_steps=2,
                                        guidance_scale=7.5)
        sizes = sorted((call["strength"], len(call["prompt"])) for call in pipe.calls)
        assert sizes == ([(0.5, 1), (1.0, 4)] if pad else [(0.5, 1), (1.0, 3)])  # 3 rows -> bucket 4
        if pad:
            call = next(c for c in pipe.calls if c["strength"] == 1.0)
            assert call["prompt"] == [prompts[0], prompts[2], prompts[3], prompts[3]]  # padding repeats the last row
    assert results[True].shape == (4, 3, GEN, GEN)
    torch.testing.assert_close(results[True], results[False], atol=2e-3, rtol=0)  # padding changes no kept row


@pytest.mark.parametrize("metaclass, tokens, expected", [
    ("", None, ["a photo of a square", "a photo of a star"]),
    ("bird", None, ["a photo of a square bird", "a photo of a star bird"]),
    ("bird", {}, ["a photo of a square bird", "a photo of a star bird"]),
    ("bird", {n: f"<class_{i}>" for i, n in enumerate(NAMES)}, ["a photo of a <class_1> bird",
                                                                  "a photo of a <class_3> bird"]),
])
def test_prompts_use_the_textual_inversion_token_when_the_pipeline_has_one(img2img, metaclass, tokens, expected):
    recipe = get_recipe("diffmix", generation_size=GEN, num_inference_steps=2, metaclass=metaclass)
    pipe = CountingPipeline(img2img)
    if tokens is not None:
        pipe.class_tokens = tokens  # what the model loader sets from a TI file (class name -> placeholder)
    assert recipe.prompts(pipe, torch.tensor([1, 3]), standalone_context(
        num_classes=4, image_size=SIZE, class_names=NAMES)) == expected


def test_a_class_missing_from_the_textual_inversion_file_is_a_clear_error(img2img):
    recipe = get_recipe("diffmix", generation_size=GEN, num_inference_steps=2)
    pipe = CountingPipeline(img2img)
    pipe.class_tokens = {"circle": "<class_0>"}
    ctx = standalone_context(num_classes=4, image_size=SIZE, class_names=NAMES)
    with pytest.raises(ValueError, match="the textual-inversion file has no token for class 'square' "
                                         r"\(it maps 1 classes: circle\)"):
        recipe.prompts(pipe, torch.tensor([1]), ctx)


# ---------------------------------------------------------------------------------------- the models
def test_model_roles_follow_the_paper_and_carry_the_fine_tuned_files(tmp_path):
    ti, lora = str(tmp_path / "learned_embeds-steps-last.bin"), str(tmp_path / "pytorch_lora_weights.safetensors")
    for name, kind in (("diffmix", "img2img"), ("diffaug", "img2img"), ("diffgen", "text2img")):
        recipe = get_recipe(name, textual_inversion=ti, lora=lora)
        role = recipe.model_roles()["edit"]
        assert (role.kind, role.default, role.architecture, role.scheduler) == (
            kind, "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", "dpm++")
        assert (role.textual_inversion, role.lora) == (ti, lora)
        spec = resolve_models(recipe.model_roles(), recipe.main_role, "tiny", None)["edit"]
        assert (spec.source, spec.textual_inversion, spec.lora) == ("tiny", ti, lora)
    recipe = get_recipe("diffmix")
    assert (recipe.strengths, recipe.gamma, recipe.soft_scaler, recipe.metaclass) == ((0.5, 0.7, 0.9), 0.5, 1.0, "")
    assert (recipe.num_inference_steps, recipe.guidance_scale, recipe.generation_size) == (25, 7.5, 512)
    assert recipe.serve_match is None and get_recipe("diffaug").serve_match is None
    assert get_recipe("diffaug", match="index").serve_match == "index"


# ------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("name, options, error, message", [
    ("diffmix", dict(strengths=[]), ValueError, r"strengths=\[\] is invalid: expected a list of at least 1 item"),
    ("diffmix", dict(strengths=0.5), TypeError, "strengths=0.5 is invalid: expected a list"),
    ("diffmix", dict(strengths=[0.5, 0]), ValueError,
     r"strengths\[1\]=0 is invalid: expected a number in \(0.0, 1.0\]"),
    ("diffaug", dict(strengths=[1.5]), ValueError, r"strengths\[0\]=1.5 is invalid: expected a number in \(0.0, 1.0\]"),
    ("diffmix", dict(strengths=["0.5"]), TypeError, r"strengths\[0\]='0.5' is invalid: expected a number"),
    ("diffmix", dict(strengths=[0.5, 0.5]), ValueError, r"strengths=\[0.5, 0.5\] is invalid: expected distinct values"),
    ("diffmix", dict(gamma=0), ValueError, "gamma=0 is invalid: expected a number > 0.0"),
    ("diffmix", dict(soft_scaler=1.5), ValueError, r"soft_scaler=1.5 is invalid: expected a number in \(0.0, 1.0\]"),
    ("diffgen", dict(soft_scaler=0), ValueError, r"soft_scaler=0 is invalid: expected a number in \(0.0, 1.0\]"),
    ("diffmix", dict(metaclass=None), TypeError, "metaclass=None is invalid: expected a string"),
    ("diffmix", dict(num_inference_steps=1), ValueError,
     r"num_inference_steps=1 is invalid: expected an int with int\(num_inference_steps \* s\) >= 1 for every "
     r"strength s \(strength 0.5 would run 0 denoising steps\): use num_inference_steps >= 2"),
    ("diffmix", dict(guidance_scale=float("inf")), ValueError, "guidance_scale=inf is invalid: expected a finite"),
    ("diffgen", dict(generation_size=100), ValueError, "generation_size=100 is invalid: expected a positive multiple"),
    ("diffaug", dict(match="image"), ValueError,
     r"match='image' is invalid: expected one of \[None, 'class', 'index'\]"),
    ("diffmix", dict(textual_inversion=3), TypeError, "textual_inversion=3 is invalid: expected a non-empty string"),
    ("diffaug", dict(lora=""), TypeError, "lora='' is invalid: expected a non-empty string"),
])
def test_options_are_validated_with_the_recipe_name(name, options, error, message):
    with pytest.raises(error, match=rf"^recipe '{name}': option " + message):
        get_recipe(name, **options)


def test_each_variant_has_only_the_options_that_apply_to_it():
    with pytest.raises(ValueError, match=r"recipe 'diffgen' has no option\(s\) \['strengths'\]"):
        get_recipe("diffgen", strengths=[0.5])
    with pytest.raises(ValueError, match=r"recipe 'diffmix' has no option\(s\) \['match'\]"):
        get_recipe("diffmix", match="index")
    with pytest.raises(ValueError, match=r"recipe 'diffaug' has no option\(s\) \['gamma'\]"):
        get_recipe("diffaug", gamma=0.5)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_served_soft_labels_match_the_pooled_source_target_and_strength(device):
    num_classes, smoothing = 3, 0.1
    shapes = SyntheticShapes(num_classes=num_classes, size=32, length=24, seed=0)
    loader = OnlineGenAugLoader(
        shapes, recipe="diffmix", num_classes=num_classes, batch_size=8, image_size=32, generator="tiny",
        device=device, p_aug=0.75, pool_size=8, max_reuse=4, warmup=4, num_workers=0, seed=0, progress=False,
        label_smoothing=smoothing, generator_batch_size=4, return_info=True,
        recipe_options={"num_inference_steps": 2, "gamma": 0.5, "soft_scaler": 0.9})
    assert loader.recipe.generation_size == 32  # the tiny generator works at the training size
    seen = 0
    with loader:
        for epoch in range(2):
            loader.set_epoch(epoch)
            for images, targets, info in loader:
                assert images.shape == (8, 3, 32, 32)
                info = {k: v.cpu() for k, v in info.items()}
                for row in range(8):
                    label, index = int(info["label"][row]), int(info["index"][row])
                    if info["generated"][row]:
                        seen += 1
                        s = float(info["strength"][row])
                        source, target = int(info["source_label"][row]), int(info["target_label"][row])
                        assert min(abs(s - v) for v in (0.5, 0.7, 0.9)) < 1e-6
                        assert source == index % num_classes and target == label  # the reference's class; the prompt's
                        expected = hand_label(source, target, s, 0.5, 0.9, num_classes, smoothing)
                    else:
                        expected = hand_label(label, label, 0.0, 1.0, 1.0, num_classes, smoothing)
                        assert label == index % num_classes
                    torch.testing.assert_close(targets[row].cpu(), torch.tensor(expected), atol=1e-6, rtol=0)
        stats = loader.stats()
    assert seen >= 4 and seen == stats["generated"]


@pytest.mark.slow
def test_the_demo_previews_source_edit_classes_and_strength(tmp_path, capsys):
    import json

    from PIL import Image

    from onlineaug.__main__ import main

    out = tmp_path / "demo"
    assert main(["demo", "--recipe", "diffmix", "--steps", "2", "--batch-size", "8", "--image-size", "32",
                 "--length", "32", "--warmup", "2", "--pool-size", "8", "--num-workers", "0", "--out", str(out),
                 "--no-progress", "--no-cache"]) == 0
    assert "online diffmix steps/s" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["name"] == "diffmix" and metrics["recipe"]["strengths"] == [0.5, 0.7, 0.9]
    samples = metrics["preview_samples"]
    assert samples >= 1
    preview = Image.open(out / "preview.png").convert("RGB")
    assert preview.size == (90 + 128 * samples, 128 * 2 + 28)  # rows source, edit; a caption line per column
    caption = np.asarray(preview)[256:, 90:90 + 128]
    assert (caption < 128).any()  # the caption (source -> target, s) is written under the first column


# ------------------------------------------------------------------------------------ the CLIP filter (7.1)
def test_the_running_percentile_rejects_below_the_class_quantile_after_warmup():
    from onlineaug.recipes.diffmix import RunningPercentile

    percentile = RunningPercentile(quantile=0.1, window=100, warmup=20)
    first = percentile.keep(torch.linspace(0, 1, 19), torch.zeros(19, dtype=torch.int64))
    assert first.all()  # 19 scores seen: still warming up
    percentile.keep(torch.tensor([0.5]), torch.tensor([0]))
    history = percentile.history[0]
    expected = float(np.quantile(history, 0.1))
    keep = percentile.keep(torch.tensor([expected - 1e-6, expected + 1e-6, 0.0]), torch.tensor([0, 0, 1]))
    assert keep.tolist() == [False, True, True]  # class 1 has no history: kept
    for _ in range(200):
        percentile.keep(torch.tensor([0.9]), torch.tensor([0]))
    assert len(percentile.history[0]) == 100  # a window of recent scores


@pytest.fixture(scope="module")
def clip():
    from onlineaug.models import ModelRole

    return load_model(ModelRole("clip", "openai/clip-vit-base-patch32"), ModelSpec("tiny"), device="cpu")


def test_clip_scores_are_the_softmax_of_with_vs_without(clip):
    from onlineaug.recipes.diffmix import clip_scores

    images = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    scores = clip_scores(clip, images, ["bird", "bird", "car"])
    image = clip.embed_images(images)
    for row, subject in enumerate(["bird", "bird", "car"]):
        text = clip.embed_texts([f"a photo with a {subject} on it", f"a photo without a {subject} on it"])
        logits = clip.model.logit_scale.exp() * image[row] @ text.T
        torch.testing.assert_close(scores[row], logits.softmax(0)[0].cpu(), rtol=1e-5, atol=1e-6)


def test_the_clip_filter_rejects_below_the_percentile_and_the_producer_regenerates_them(clip, img2img):
    from onlineaug.models import LoadPolicy as Policy
    from onlineaug.producer import Producer, ProducerSettings
    from onlineaug.images import ItemFormat
    from onlineaug.recipes.diffmix import CLIP_FILTER, clip_scores

    recipe = get_recipe("diffmix", filter="clip", strengths=[0.5], num_inference_steps=2, generation_size=GEN,
                        max_retries=2)
    assert set(recipe.model_roles()) == {"edit", "filter"} and CLIP_FILTER in recipe.reject_reasons
    shapes = SyntheticShapes(num_classes=4, size=GEN, length=16, seed=0)
    labels = np.array([shapes.sample_params(i).label for i in range(len(shapes))])
    settings = ProducerSettings(
        recipe=recipe, dataset=shapes, num_classes=4, class_names=NAMES, image_size=SIZE, batch_size=4, seed=0,
        trainer_rank=0, roles=recipe.model_roles(), specs={"edit": ModelSpec("tiny"), "filter": ModelSpec("tiny")},
        policy=Policy(), pool_fields=recipe.pool_fields(SIZE), labels=labels, item_format=ItemFormat(resize="squash"))
    producer = Producer(settings, rank=0, device="cpu", sources=SourceSet(np.arange(len(shapes)), None, labels))
    for label in range(4):  # every class has seen only perfect scores: every edit falls below their 10th percentile
        recipe._percentile.history[label] = [2.0] * 50
    seen = []
    produce = recipe.produce
    recipe.produce = lambda models, batch, ctx: seen.append(batch.attempts.tolist()) or produce(models, batch, ctx)
    rows = [producer.step() for _ in range(3)]
    assert all(len(r["image"]) == 0 for r in rows)  # nothing written
    assert seen == [[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2]]  # the same jobs regenerated up to max_retries
    assert producer.counts[f"rejected:{CLIP_FILTER}"] == 12
    for label in range(4):  # below-threshold scores are recorded too
        recipe._percentile.history[label] = [-1.0] * 50
    kept = producer.step()
    assert len(kept["image"]) == 4 and seen[-1] == [0, 0, 0, 0]  # new jobs, all kept
    scores = clip_scores(clip, torch.from_numpy(kept["image"]), [NAMES[c] for c in kept["target_label"].tolist()])
    torch.testing.assert_close(torch.tensor(recipe._percentile.history[0][-1:]).float(),
                               scores[kept["target_label"] == 0][-1:].float(), rtol=1e-4, atol=1e-5) \
        if (kept["target_label"] == 0).any() else None
