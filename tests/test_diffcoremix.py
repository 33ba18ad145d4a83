"""DiffCoRe-Mix: prompts and negative prompts, Eq. 5 thresholds and the hard-cosine filter, Eqs. 6-8 mixing."""

import math
import os
import time

import numpy as np
import pytest
import torch

from onlineaug import ops
from onlineaug.recipes import Batch, BatchContext, get_recipe, register_recipe
from onlineaug.recipes.diffcoremix import (
    CONTEXTS,
    COSXL_SCHEDULER_CONFIG,
    MODE_PATCH,
    MODE_PIXEL,
    MODE_RAW,
    MODE_REAL,
    NEGATIVE_PROMPT,
    DiffCoReMix,
    clean_class_name,
    negative_prompt_for,
    sample_inner_boxes,
    sample_pairs,
)
from onlineaug.sources import SourceSet

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])
WORD = r"[a-z0-9]+"


def words(text):
    import re

    return set(re.findall(WORD, text.lower()))


# ------------------------------------------------------------------------------------------- prompts
def test_contexts_templates_and_negatives_are_the_official_ones():
    recipe = get_recipe("diffcoremix")
    assert recipe.contexts == CONTEXTS and len(CONTEXTS) == 16
    assert CONTEXTS[0] == "in the garden" and CONTEXTS[-1] == "cutting through thick clouds in an overcast sky."
    assert recipe.prompt_text("024.Red_faced_Cormorant", 0) == "A Red faced Cormorant, a photo, in the garden"
    assert get_recipe("diffcoremix", dataset_type="cub200").prompt_text("tabby_cat", 11) == \
        "A tabby cat, a cub200, casting a shadow over an expansive ocean."
    snow = get_recipe("diffcoremix", prompt_set="heavy_snow", dataset_type="bird")
    assert snow.contexts == () and snow.num_prompts == 1
    assert snow.prompt_text("001.Black_footed_Albatross", 0) == \
        "Generate heavy snow to the Black footed Albatross, a bird object"
    assert NEGATIVE_PROMPT[:3] == ("train", "car", "newspaper") and len(NEGATIVE_PROMPT) == 22
    assert (recipe.num_inference_steps, recipe.guidance_scale, recipe.generation_size) == (50, 12.0, 512)
    assert (recipe.z, recipe.max_retries, recipe.p_pixel, recipe.p_raw) == (64, 3, 0.5, 0.0)
    assert recipe.threshold is None and recipe.reference == "source"
    roles = recipe.model_roles()
    assert roles["generate"].kind == "text2img" and roles["generate"].architecture == "sdxl"
    assert roles["generate"].scheduler == "edm_euler"
    assert dict(roles["generate"].scheduler_config) == dict(sigma_min=0.002, sigma_max=120.0, sigma_data=1.0,
                                                            prediction_type="v_prediction",
                                                            sigma_schedule="exponential") == COSXL_SCHEDULER_CONFIG
    assert roles["filter"].kind == "clip" and roles["filter"].default == "openai/clip-vit-base-patch32"
    plain = get_recipe("diffcoremix", scheduler=None).model_roles()["generate"]
    assert plain.scheduler is None and dict(plain.scheduler_config) == {}  # keep the weights' own scheduler


def test_clean_class_name_follows_the_official_code():
    assert clean_class_name("024.Red_faced_Cormorant") == "Red faced Cormorant"
    assert clean_class_name("sports car") == "sports car" and clean_class_name("7_up") == "7 up"


def test_negative_prompt_drops_phrases_that_share_a_word_with_the_prompt_or_class():
    negatives = ("car", "road lines", "traffic lights", "sky", "bus", "paper texture")
    assert negative_prompt_for(negatives, "A cat, a photo, in the garden", "cat") == \
        "car, road lines, traffic lights, sky, bus, paper texture"
    # "sky" is in the prompt; "lights" matches "light" (plural); the class "Cars" removes "car"
    assert negative_prompt_for(negatives, "A Cars, a photo, soft light under a stormy sky", "Cars") == \
        "road lines, bus, paper texture"
    assert negative_prompt_for(negatives, "on the road", "buses") == "car, traffic lights, sky, paper texture"
    assert negative_prompt_for(negatives, "x", "Paper") == "car, road lines, traffic lights, sky, bus"


@pytest.mark.parametrize("class_name", ["car", "Sports_Car", "airliner", "bus", "tree frog", "Ferrari 458"])
def test_the_negative_prompt_never_holds_a_word_of_its_positive_prompt(class_name):
    recipe = get_recipe("diffcoremix", dataset_type="stanford cars")
    for prompt_id in range(recipe.num_prompts):
        positive = recipe.prompt_text(class_name, prompt_id)
        negative = recipe.negative_text(class_name, positive)
        assert not words(negative) & words(positive), (positive, negative)
        singular = {w[:-1] for w in words(positive) if w.endswith("s")}
        assert not words(negative) & singular, (positive, negative)  # nor the singular of a plural
        kept = {p for p in negative.split(", ") if p}
        assert kept <= set(NEGATIVE_PROMPT)  # whole phrases, never a phrase cut into another
        assert "sky" not in kept or "sky" not in words(positive)
    assert "car" not in recipe.negative_text("car", recipe.prompt_text("car", 0)).split(", ")
    assert "car" not in recipe.negative_text("cat", recipe.prompt_text("cat", 0)).split(", ")  # dataset_type
    recipe = get_recipe("diffcoremix")
    # contexts that name the sky or a landscape lose those negatives; "in the garden" keeps them
    assert "sky" not in recipe.negative_text("cat", recipe.prompt_text("cat", 1)).split(", ")
    assert "landscape" not in recipe.negative_text("cat", recipe.prompt_text("cat", 8)).split(", ")
    assert recipe.negative_text("cat", recipe.prompt_text("cat", 0)) == ", ".join(NEGATIVE_PROMPT)


def test_negative_prompt_as_a_diffusers_string_or_a_list():
    recipe = get_recipe("diffcoremix", negative_prompt="blurry, low quality ,")
    assert recipe.negative_prompt == ("blurry", "low quality")
    assert get_recipe("diffcoremix", negative_prompt=[]).negative_text("cat", "A cat") == ""


@pytest.mark.parametrize("options, error, message", [
    (dict(prompt_set="snow"), ValueError,
     r"prompt_set='snow' is invalid: expected one of \['contextual', 'heavy_snow'\]"),
    (dict(prompt_template="A photo"), ValueError,
     "prompt_template='A photo' is invalid: expected a template containing '{class_name}'"),
    (dict(prompt_template="A {class_name} {style}"), ValueError,
     r"prompt_template='A {class_name} {style}' is invalid: expected a template with only the fields "
     r"\['class_name', 'dataset_type', 'context'\]"),
    (dict(prompt_set="heavy_snow", contexts=["at night"]), ValueError,
     r"contexts=\['at night'\] is invalid: expected None: the prompt template has no '{context}' field"),
    (dict(prompt_set="heavy_snow", prompt_template="{class_name}, {context}"), ValueError,
     "contexts=None is invalid: expected a list of contexts: prompt_template has a '{context}' field and "
     "prompt_set='heavy_snow' has none"),
    (dict(contexts="in the rain"), TypeError, r"contexts='in the rain' is invalid: expected a list \(for one value"),
    (dict(contexts=[]), ValueError, r"contexts=\[\] is invalid: expected a list of at least 1 item"),
    (dict(dataset_type=""), TypeError, "dataset_type='' is invalid: expected a non-empty string"),
    (dict(negative_prompt=["sky", 3]), TypeError, r"negative_prompt\[1\]=3 is invalid: expected a non-empty string"),
    (dict(threshold=1.5), ValueError, r"threshold=1.5 is invalid: expected a number in \[-1.0, 1.0\]"),
    (dict(threshold="0.6"), TypeError, "threshold='0.6' is invalid: expected a number"),
    (dict(reference="last"), ValueError, r"reference='last' is invalid: expected one of \['source', 'first'\]"),
    (dict(z=0), ValueError, "z=0 is invalid: expected an int >= 1"),
    (dict(z=6.4), TypeError, r"z=6.4 is invalid: expected an int \(2.9 would be truncated silently\)"),
    (dict(max_retries=-1), ValueError, "max_retries=-1 is invalid: expected an int >= 0"),
    (dict(p_pixel=1.2), ValueError, r"p_pixel=1.2 is invalid: expected a number in \[0.0, 1.0\]"),
    (dict(p_raw=float("nan")), ValueError, "p_raw=nan is invalid: expected a finite number"),
    (dict(guidance_scale=-1), ValueError, "guidance_scale=-1 is invalid: expected a number >= 0.0"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps=0 is invalid: expected an int >= 1"),
    (dict(generation_size=500), ValueError, "generation_size=500 is invalid: expected a positive multiple of 8"),
    (dict(scheduler=""), TypeError, "scheduler='' is invalid: expected a non-empty string"),
])
def test_options_are_validated_with_the_recipe_name(options, error, message):
    with pytest.raises(error, match=r"^recipe 'diffcoremix': option " + message):
        get_recipe("diffcoremix", **options)


# ------------------------------------------------------------------------------------- Eq. 5's pairs
@pytest.mark.parametrize("count, z", [(2, 64), (5, 10), (12, 64), (40, 64), (200, 7)])
def test_sample_pairs_are_distinct_unordered_and_all_of_them_when_few(count, z):
    pairs = sample_pairs(count, z, np.random.default_rng(0))
    total = count * (count - 1) // 2
    assert pairs.shape == (min(z, total), 2) and pairs.dtype == np.int64
    assert (pairs[:, 0] < pairs[:, 1]).all() and pairs.min() >= 0 and pairs.max() < count
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    if total <= z:
        expected = [(i, j) for i in range(count) for j in range(i + 1, count)]
        assert [tuple(p) for p in pairs.tolist()] == expected


def test_sample_pairs_are_uniform_over_all_pairs():
    count, rng = 6, np.random.default_rng(1)
    hits = np.zeros((count, count))
    for _ in range(3000):
        for i, j in sample_pairs(count, 5, rng):
            hits[i, j] += 1
    upper = hits[np.triu_indices(count, 1)]
    expected = 3000 * 5 / 15
    assert np.abs(upper - expected).max() < 5 * math.sqrt(expected)  # each of the 15 pairs equally often


# ---------------------------------------------------------------------------------------- job planning
def test_plan_jobs_draws_classes_in_proportion_to_the_sampler_and_sources_of_that_class():
    from onlineaug.producer import standalone_context

    labels = np.array([0] * 6 + [1] * 3 + [2] * 1 + [3] * 2)
    indices = np.arange(len(labels)) + 100
    weights = np.ones(len(labels))
    weights[-2:] = 0  # class 3 is held out by the sampler
    sources = SourceSet(indices, weights, labels)
    recipe = get_recipe("diffcoremix")
    ctx = standalone_context(num_classes=4, image_size=16, sources=sources, seed=3)
    jobs = recipe.plan_jobs(ctx, 6000)
    label_of = dict(zip(indices.tolist(), labels.tolist()))
    drawn = np.array([label_of[i] for i in jobs.indices.tolist()])
    shares = np.bincount(drawn, minlength=4) / len(drawn)
    np.testing.assert_allclose(shares, [0.6, 0.3, 0.1, 0.0], atol=0.02)
    assert set(jobs.indices.tolist()) <= set(indices[:10].tolist())
    ids = jobs.values["prompt_id"]
    assert ids.min() >= 0 and ids.max() == 15 and np.abs(np.bincount(ids) / len(ids) - 1 / 16).max() < 0.015

    first = get_recipe("diffcoremix", reference="first", threshold=0.6).plan_jobs(ctx, 200)
    assert set(first.indices.tolist()) == {100, 106, 109}  # each class's first image (the official code)


# --------------------------------------------------------------------------------------------- mixing
def context(device, size, num_classes=5, smoothing=0.0):
    return BatchContext(num_classes=num_classes, image_size=size, mean=MEAN.to(device), std=STD.to(device),
                        label_smoothing=smoothing, out_dtype=torch.float32, p_aug=1.0, fractals=None)


def make_batch(device, size=16, count=12, num_classes=5, seed=0, generated=None):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (count,), generator=g)
    fields = {
        "image": torch.randint(0, 256, (count, 3, size, size), generator=g, dtype=torch.uint8),
        "generated": torch.randint(0, 256, (count, 3, size, size), generator=g, dtype=torch.uint8),
        "label": labels, "index": torch.arange(count) + 50, "real_index": torch.arange(count),
        "similarity": torch.rand(count, generator=g), "tau": torch.rand(count, generator=g),
        "prompt_id": torch.randint(16, (count,), generator=g), "retries": torch.zeros(count, dtype=torch.int64),
    }
    if generated is None:
        generated = torch.rand(count, generator=g) < 0.8
    return Batch(fields={k: v.to(device) for k, v in fields.items()}, generated=generated.to(device))


def box_mask(box, size):
    y0, x0, y1, x1 = box.tolist()
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize("p_raw", [0.0, 0.3])
def test_mixing_follows_eqs_6_to_8_row_by_row(device, p_raw):
    size = 16
    recipe = get_recipe("diffcoremix", p_raw=p_raw)
    ctx = context(device, size)
    batch = make_batch(device, size=size, count=24, seed=1)
    params = recipe.sample_params(batch, ctx, torch.Generator(device=device).manual_seed(2))
    images, targets, info = recipe.apply(batch, params, ctx)
    images, targets = images.cpu(), targets.cpu()
    p = {k: v.cpu() for k, v in params.items()}
    info = {k: v.cpu() for k, v in info.items()}
    f = {k: v.cpu() for k, v in batch.fields.items()}
    real, gen = ops.normalize(f["image"], MEAN, STD), ops.normalize(f["generated"], MEAN, STD)
    modes = set()
    for b in range(batch.size):
        mode = int(p["mode"][b])
        modes.add(mode)
        lam = float(p["lam"][b])
        if not batch.generated[b]:
            assert mode == MODE_REAL
            expected, share = real[b], 1.0
        elif mode == MODE_PIXEL:  # Eq. 6
            expected, share = lam * real[b] + (1 - lam) * gen[b], lam
        elif mode == MODE_PATCH:  # Eq. 7: I's patch on G, or G's patch on I
            mask = box_mask(p["boxes"][b], size)
            inside, outside = (real[b], gen[b]) if p["real_in_box"][b] else (gen[b], real[b])
            expected = torch.where(mask, inside, outside)
            share = float(mask.float().mean()) if p["real_in_box"][b] else 1 - float(mask.float().mean())
            assert (info["box"][b] == p["boxes"][b]).all()
        else:
            assert mode == MODE_RAW
            expected, share = gen[b], 0.0
        torch.testing.assert_close(images[b], expected, rtol=1e-5, atol=1e-5)
        assert float(info["real_share"][b]) == pytest.approx(share, abs=1e-6)
        assert int(info["eta"][b]) == {MODE_PIXEL: 1, MODE_PATCH: 0}.get(mode, -1)
        assert math.isnan(info["lam"][b]) == (mode != MODE_PIXEL)
        if mode != MODE_PATCH:
            assert (info["box"][b] == -1).all() and not info["real_in_box"][b]
        assert math.isnan(info["similarity"][b]) == (not batch.generated[b])
        if batch.generated[b]:
            assert info["similarity"][b] == f["similarity"][b] and info["tau"][b] == f["tau"][b]
    assert {MODE_REAL, MODE_PIXEL, MODE_PATCH} <= modes and (MODE_RAW in modes) == (p_raw > 0)
    # I and G share the class: one-hot targets, rows sum to 1
    torch.testing.assert_close(targets, torch.nn.functional.one_hot(f["label"], 5).float())
    assert torch.equal(info["real_index"], f["real_index"])


def test_label_smoothing_keeps_rows_summing_to_one(device):
    recipe = get_recipe("diffcoremix")
    ctx = context(device, 16, num_classes=5, smoothing=0.1)
    batch = make_batch(device, generated=torch.ones(12, dtype=torch.bool))
    targets = recipe.apply(batch, recipe.sample_params(batch, ctx, torch.Generator(device=device)), ctx)[1].cpu()
    torch.testing.assert_close(targets.sum(1), torch.ones(12))
    expected = torch.nn.functional.one_hot(batch.fields["label"].cpu(), 5).float() * 0.9 + 0.1 / 5
    torch.testing.assert_close(targets, expected)


def ks_uniform(values):
    """Kolmogorov-Smirnov distance of samples in [0, 1] from U(0, 1)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = len(x)
    return max((np.arange(1, n + 1) / n - x).max(), (x - np.arange(n) / n).max())


def test_eta_lam_and_box_statistics_match_their_distributions(device):
    size, count = 64, 20000
    recipe = get_recipe("diffcoremix", p_pixel=0.5, p_raw=0.2)
    ctx = context(device, size)
    batch = make_batch(device, size=8, count=count,
                       generated=torch.rand(count, generator=torch.Generator().manual_seed(4)) < 0.75)
    batch.fields["image"] = torch.zeros(count, 3, size, size, dtype=torch.uint8, device=device)  # only the shape
    params = recipe.sample_params(batch, ctx, torch.Generator(device=device).manual_seed(9))
    params = {k: v.cpu() for k, v in params.items()}
    mode, generated = params["mode"], batch.generated.cpu()
    assert (mode[~generated] == MODE_REAL).all() and (mode[generated] != MODE_REAL).all()
    n = int(generated.sum())
    bound = 4 * math.sqrt(0.25 / n)
    raw = (mode[generated] == MODE_RAW).float().mean()
    assert abs(raw - 0.2) < bound  # p_raw
    mixed = mode[generated & (mode != MODE_RAW)]
    assert abs((mixed == MODE_PIXEL).float().mean() - 0.5) < bound  # eta ~ Bernoulli(0.5)
    pixel, patch = mode == MODE_PIXEL, mode == MODE_PATCH
    assert ks_uniform(params["lam"][pixel]) < 1.63 / math.sqrt(int(pixel.sum()))  # lam ~ U(0, 1)
    boxes = params["boxes"][patch]
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= size).all() and (boxes[:, 3] <= size).all()  # inside
    assert torch.equal(heights, widths)  # the image's aspect ratio (square here)
    area = (heights * widths).float() / size**2
    np.testing.assert_allclose(area, (torch.floor(params["area"][patch].sqrt() * size + 0.5) / size) ** 2)
    assert ks_uniform(area) < 1.63 / math.sqrt(len(area)) + 1.0 / size  # U(0, 1) up to whole pixels
    free = (size - heights + 1).float()  # the positions where the box fits
    jitter = torch.rand(len(free), generator=torch.Generator().manual_seed(0))
    for start in (boxes[:, 0], boxes[:, 1]):  # y0 and x0 uniform over them (a randomised PIT is then U(0, 1))
        assert ks_uniform((start.float() + jitter) / free) < 1.63 / math.sqrt(len(free))
    assert abs(params["real_in_box"][patch].float().mean() - 0.5) < 4 * math.sqrt(0.25 / len(area))
    assert not params["real_in_box"][~patch].any() and (params["boxes"][~patch] == 0).all()


def test_inner_boxes_have_the_asked_area_and_stay_inside():
    area = torch.tensor([0.0, 1.0, 0.25, 0.5])
    boxes = sample_inner_boxes(area, 20, 40, torch.Generator().manual_seed(0))
    sides = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)
    assert sides.tolist() == [[0, 0], [20, 40], [10, 20], [14, 28]]  # round(sqrt(a) * H) x round(sqrt(a) * W)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 20).all() and (boxes[:, 3] <= 40).all()
    assert boxes[1].tolist() == [0, 0, 20, 40]


# ------------------------------------------------------------------------------ producer side, tiny models
SIZE = 32


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_models(recipe, generate="tiny-sd15"):
    from onlineaug.models import ModelSpec, load_model

    roles = recipe.model_roles()
    return {"generate": load_model(roles["generate"], ModelSpec(generate), device="cpu", seed=0),
            "filter": load_model(roles["filter"], ModelSpec("tiny"), device="cpu", seed=0)}


@pytest.fixture(scope="module")
def models(one_thread):
    return tiny_models(get_recipe("diffcoremix"))


@pytest.fixture(scope="module")
def shapes():
    from onlineaug.datasets import SyntheticShapes

    return SyntheticShapes(num_classes=3, size=SIZE, length=48, seed=0)


def embed(embedder, dataset, indices, size=SIZE):
    """The CLIP embeddings of dataset images at the training size, straight from the embedder."""
    from onlineaug.images import image_to_uint8, resize_uint8

    images = torch.stack([resize_uint8(image_to_uint8(dataset[int(i)][0], int(i)), size) for i in indices])
    return embedder.embed_images(images).double()


def test_tau_k_is_the_mean_cosine_over_z_pairs_of_the_class_real_images(models, shapes):
    from itertools import combinations

    from onlineaug.producer import standalone_context

    # class 0: 8 images (28 pairs > z = 6: 6 random pairs); class 1: 4 images (6 pairs <= z: all); class 2: 1
    indices = np.array([0, 3, 6, 9, 12, 15, 18, 21] + [1, 4, 7, 10] + [2])
    sources = SourceSet(indices, None, indices % 3)
    recipe = get_recipe("diffcoremix", z=6)
    states = [recipe.prepare(models, standalone_context(num_classes=3, image_size=SIZE, sources=sources,
                                                        dataset=shapes, seed=seed)) for seed in (0, 1)]
    state = states[0]
    clip = models["filter"]
    pairs = state["pairs"][0]
    assert pairs.shape == (6, 2) and len({tuple(sorted(p)) for p in pairs.tolist()}) == 6
    assert set(pairs.ravel().tolist()) <= set(indices[:8].tolist()) and (pairs[:, 0] != pairs[:, 1]).all()
    cosine = (embed(clip, shapes, pairs[:, 0]) * embed(clip, shapes, pairs[:, 1])).sum(1)
    assert state["tau"][0].item() == pytest.approx(cosine.mean().item(), abs=1e-6)
    every = list(combinations(indices[8:12].tolist(), 2))  # all 6 pairs of class 1, by hand
    cosine = torch.stack([(embed(clip, shapes, [i]) * embed(clip, shapes, [j])).sum() for i, j in every])
    assert state["tau"][1].item() == pytest.approx(cosine.mean().item(), abs=1e-6)
    assert sorted(map(tuple, state["pairs"][1].tolist())) == sorted(every)
    assert math.isnan(state["tau"][2]) and 2 not in state["pairs"]  # one image: no pair
    assert state["default_tau"] == pytest.approx(float(state["tau"][:2].mean()), abs=1e-6)
    assert recipe.thresholds_for(torch.tensor([2, 1]), state).tolist() == pytest.approx(
        [state["default_tau"], state["tau"][1].item()])
    # the pairs depend on the source set only: whichever producer prepares, the thresholds are the same
    torch.testing.assert_close(states[1]["tau"], state["tau"], rtol=0, atol=0, equal_nan=True)
    assert recipe.prepare_key() == {"z": 6, "eq5": "mean cosine over distinct pairs, v1"}
    fixed = get_recipe("diffcoremix", threshold=0.6)
    assert fixed.prepare_key() is None and fixed.prepare(models, None) is None
    with pytest.raises(ValueError, match="needs two real images of a class.*pass threshold=0.6"):
        recipe.prepare(models, standalone_context(num_classes=3, image_size=SIZE, dataset=shapes,
                                                  sources=SourceSet(np.array([0, 1, 2]), None, np.array([0, 1, 2]))))


def source_batch(dataset, indices, prompt_ids, attempts=None):
    from onlineaug.images import ItemFormat, load_item
    from onlineaug.recipes import SourceBatch

    loaded = [load_item(dataset, int(i), SIZE, 3, ItemFormat(resize="squash")) for i in indices]
    images = torch.stack([image for image, _ in loaded])
    return SourceBatch(images=images, originals=images, labels=torch.tensor([label for _, label in loaded]),
                       indices=torch.tensor(indices), values={"prompt_id": torch.tensor(prompt_ids)},
                       attempts=torch.zeros(len(indices), dtype=torch.int64) if attempts is None else attempts)


def test_the_filter_keeps_exactly_the_rows_above_tau_and_rejects_the_others(models, shapes):
    from onlineaug.producer import standalone_context

    recipe = get_recipe("diffcoremix", generation_size=SIZE, num_inference_steps=2)
    batch = source_batch(shapes, [0, 1, 2, 4, 5, 6], [0, 1, 8, 3, 4, 15])
    calls = []

    def spy(**kwargs):  # the real tiny pipeline, with its arguments recorded
        calls.append(kwargs)
        return models["generate"](**kwargs)

    spied = {**models, "generate": spy}
    def ctx(state):
        return standalone_context(num_classes=3, image_size=SIZE, class_names=shapes.classes, seed=4, dataset=shapes,
                                  state=state)

    everything = {"tau": torch.full((3,), -1.0), "pairs": {}, "default_tau": -1.0}
    first = recipe.produce(spied, batch, ctx(everything))
    assert first.rejected == {} and first.rows.tolist() == list(range(6))
    payload = first.payload
    # S(I, G): the cosine of CLIP embeddings of the real source and of the generated image, recomputed here
    clip = models["filter"]
    expected = (clip.embed_images(payload["generated"]) * clip.embed_images(batch.originals)).sum(1)
    torch.testing.assert_close(payload["similarity"], expected, rtol=0, atol=1e-6)
    call = calls[0]
    assert call["prompt"][2] == "A triangle, a photo, passing through a vast, open desert landscape."
    assert call["negative_prompt"][2] == recipe.negative_text("triangle", call["prompt"][2])
    assert "landscape" not in call["negative_prompt"][2] and "sky" not in call["negative_prompt"][1]
    assert (call["guidance_scale"], call["num_inference_steps"], call["height"], call["width"]) == (12.0, 2, SIZE, SIZE)

    similarity = payload["similarity"]
    labels = batch.labels
    assert labels.tolist() == [0, 1, 2, 1, 2, 0]
    tau = torch.stack([similarity[labels == k].min() for k in range(3)])  # each class's lower row sits at tau
    second = recipe.produce(models, batch, ctx({"tau": tau, "pairs": {}, "default_tau": 0.0}))  # same seed
    torch.testing.assert_close(second.payload["similarity"], similarity[second.rows])
    keep = similarity > tau[labels]  # hard cosine: strictly above the class's threshold
    assert int(keep.sum()) == 3  # equal to tau is not above it
    assert second.rows.tolist() == keep.nonzero().flatten().tolist()
    assert set(second.rejected) == {"clip_filter"}
    assert second.rejected["clip_filter"].tolist() == (~keep).nonzero().flatten().tolist()
    assert (second.payload["similarity"] > second.payload["tau"]).all()
    torch.testing.assert_close(second.payload["tau"], tau[labels][keep])
    assert torch.equal(second.payload["label"], labels[keep])
    assert torch.equal(second.payload["index"], batch.indices[keep])
    assert torch.equal(second.payload["prompt_id"], batch.values["prompt_id"][keep])
    fields = recipe.pool_fields(SIZE)
    assert set(second.payload) == set(fields)
    for name, field in fields.items():
        value = second.payload[name]
        assert tuple(value.shape[1:]) == field.shape and str(value.dtype) == f"torch.{field.dtype}"
    # the official code's fixed threshold needs no preparation
    strict = get_recipe("diffcoremix", generation_size=SIZE, num_inference_steps=2, threshold=1.0)
    assert strict.produce(models, batch, ctx(None)).rejected["clip_filter"].tolist() == list(range(6))
    with pytest.raises(RuntimeError, match="per-class thresholds computed in prepare"):
        recipe.produce(models, batch, ctx(None))


def test_rejected_jobs_are_regenerated_up_to_max_retries_and_counted(models, shapes):
    from onlineaug.models import LoadPolicy, ModelSpec
    from onlineaug.producer import Producer, ProducerSettings

    recipe = get_recipe("diffcoremix", generation_size=SIZE, num_inference_steps=1, threshold=1.0,
                        max_retries=2)
    labels = np.arange(len(shapes)) % 3
    settings = ProducerSettings(
        recipe=recipe, dataset=shapes, num_classes=3, class_names=shapes.classes, image_size=SIZE, batch_size=2,
        seed=0, trainer_rank=0, roles=recipe.model_roles(),
        specs={"generate": ModelSpec("tiny-sd15"), "filter": ModelSpec("tiny")}, policy=LoadPolicy(),
        pool_fields=recipe.pool_fields(SIZE), labels=labels)
    producer = Producer(settings, rank=0, device="cpu", sources=SourceSet(np.arange(len(shapes)), None, labels))
    seen = []
    produce = recipe.produce
    recipe.produce = lambda models, batch, ctx: seen.append((batch.indices.tolist(), batch.attempts.tolist())) or \
        produce(models, batch, ctx)
    rows = [producer.step() for _ in range(4)]
    assert all(len(r["label"]) == 0 for r in rows)  # nothing passes cos > 1
    first, attempts = seen[0]
    assert attempts == [0, 0] and seen[1] == (first, [1, 1]) and seen[2] == (first, [2, 2])  # the same jobs again
    assert seen[3][1] == [0, 0]  # after max_retries regenerations a job is given up; fresh jobs follow
    assert producer.counts["rejected:clip_filter"] == 8 and producer.counts["rejected:dropped"] == 0


def test_sdxl_and_sd15_tiny_pipelines_both_generate_with_cosxl_settings(models, shapes):
    from onlineaug.producer import standalone_context

    recipe = get_recipe("diffcoremix", generation_size=SIZE, num_inference_steps=2)
    sdxl = tiny_models(recipe, generate="tiny-sdxl")["generate"]
    batch = source_batch(shapes, [0, 1], [3, 9])
    accept_all = {"tau": torch.full((3,), -1.0), "pairs": {}, "default_tau": -1.0}
    for architecture, pipe in (("sd15", models["generate"]), ("sdxl", sdxl)):
        assert pipe.architecture == architecture
        scheduler = pipe.scheduler
        assert type(scheduler).__name__ == "EDMEulerScheduler"
        assert {k: scheduler.config[k] for k in COSXL_SCHEDULER_CONFIG} == COSXL_SCHEDULER_CONFIG
        ctx = standalone_context(num_classes=3, image_size=SIZE, class_names=shapes.classes, seed=0, state=accept_all)
        produced = recipe.produce({"generate": pipe, "filter": models["filter"]}, batch, ctx)
        generated = produced.payload["generated"]
        assert produced.rows.tolist() == [0, 1] and generated.shape == (2, 3, SIZE, SIZE)
        assert generated.dtype == torch.uint8 and generated.float().std() > 0
        clip = models["filter"]
        expected = (clip.embed_images(generated) * clip.embed_images(batch.originals)).sum(1)
        torch.testing.assert_close(produced.payload["similarity"], expected, rtol=0, atol=1e-6)


class CountingDiffCoReMix(DiffCoReMix):
    """DiffCoRe-Mix that logs each call of ``prepare`` (from any process) to a file."""

    name = "test-diffcoremix-counting"

    def __init__(self, *, prepare_log: str, **options):
        super().__init__(**options)
        self.prepare_log = prepare_log

    def prepare(self, models, ctx):
        with open(self.prepare_log, "a") as log:
            log.write(f"{os.getpid()} producer {ctx.rank}\n")
        return super().prepare(models, ctx)


register_recipe(CountingDiffCoReMix)


@pytest.mark.slow
def test_end_to_end_two_producers_prepare_once_and_serve_only_filtered_samples_of_the_row_class(
        shapes, tmp_path, device, one_thread):
    from onlineaug import OnlineGenAugLoader
    from onlineaug.recipes.diffcoremix import class_thresholds

    log = tmp_path / "prepare.log"
    recipe = CountingDiffCoReMix(prepare_log=str(log), generation_size=SIZE, num_inference_steps=2, z=8)
    loader = OnlineGenAugLoader(
        shapes, recipe=recipe, num_classes=3, batch_size=8, image_size=SIZE, generator="tiny",
        generator_devices=["cpu", "cpu"], p_aug=0.75, pool_size=8, max_reuse=4, warmup=4, generator_batch_size=2,
        num_workers=0, progress=False, return_info=True, seed=0, device=device, warmup_timeout=300)
    labels = np.arange(len(shapes)) % 3  # SyntheticShapes: label = index % num_classes
    with loader:
        assert loader.class_names == ["circle", "square", "triangle"]
        deadline = time.monotonic() + 240
        while not (loader.pool.produced > 0).all() and time.monotonic() < deadline:  # both producers at work
            loader.producers.poll()
            time.sleep(0.1)
        assert (loader.pool.produced > 0).all()
        batches = list(loader)
        stats = loader.stats()
    assert len(log.read_text().splitlines()) == 1  # prepared once, shared by the second producer
    expected = class_thresholds(tiny_models(recipe)["filter"], shapes, SourceSet(np.arange(48), None, labels),
                                num_classes=3, image_size=SIZE, z=8)["tau"]
    served = 0
    for images, targets, info in batches:
        info = {k: v.cpu() for k, v in info.items()}
        generated = info["generated"]
        assert images.shape == (8, 3, SIZE, SIZE) and torch.isfinite(images).all()
        torch.testing.assert_close(targets.sum(1).cpu(), torch.ones(8))
        real_labels = torch.from_numpy(labels[info["real_index"].numpy()])
        assert torch.equal(info["label"], real_labels)  # every row keeps its real image's class
        torch.testing.assert_close(targets.cpu(), torch.nn.functional.one_hot(real_labels, 3).float())
        g = generated.nonzero().flatten()
        served += len(g)
        source_labels = torch.from_numpy(labels[info["index"][g].numpy()])
        assert torch.equal(source_labels, real_labels[g])  # the pooled sample is of the row's class
        assert (info["similarity"][g] > info["tau"][g]).all()  # never a sample at or below tau_k
        torch.testing.assert_close(info["tau"][g], expected[real_labels[g]])  # both producers used one state
        assert set(info["eta"][g].tolist()) <= {0, 1} and (info["eta"][~generated] == -1).all()
    assert served == stats["generated"] > 0
    assert set(stats["rejected"]) >= {"clip_filter", "non_finite", "dropped"}


def test_preview_rows_show_real_generated_similarity_mode_and_the_mixed_result(device):
    size, count = 16, 4
    recipe = get_recipe("diffcoremix")
    ctx = context(device, size)
    batch = make_batch("cpu", size=size, count=count, seed=5)
    samples = [{name: batch.fields[name][i].numpy() for name in recipe.pool_fields(size)} for i in range(count)]
    real = batch.fields["image"]
    rows = recipe.preview(samples, real, ctx, torch.Generator(device=device).manual_seed(0))
    assert list(rows) == ["real", "generated", "real in mix", "result"] and all(len(r) == count for r in rows.values())
    for i in range(count):
        torch.testing.assert_close(rows["real"][i][0], real[i].float() / 255)
        generated = batch.fields["generated"][i].float() / 255
        torch.testing.assert_close(rows["generated"][i][0], generated)
        similarity, tau = float(batch.fields["similarity"][i]), float(batch.fields["tau"][i])
        assert rows["generated"][i][1] == f"S={similarity:.3f} > tau={tau:.3f}"
        where, caption = rows["real in mix"][i]
        assert caption.startswith("pixel" if i % 2 == 0 else "patch")  # both modes show
        # the result is the real image weighted by the mix map plus the generated one elsewhere
        expected = where * (real[i].float() / 255) + (1 - where) * generated
        torch.testing.assert_close(rows["result"][i][0], expected, rtol=0, atol=2e-6)


@pytest.mark.slow
def test_the_demo_runs_with_diffcoremix_and_writes_its_preview(tmp_path, capsys):
    import json

    from PIL import Image

    from onlineaug.__main__ import main

    out = tmp_path / "demo"
    assert main(["demo", "--recipe", "diffcoremix", "--steps", "2", "--batch-size", "8", "--image-size", "32",
                 "--length", "48", "--num-classes", "3", "--warmup", "2", "--pool-size", "8", "--num-workers", "0",
                 "--num-inference-steps", "2", "--out", str(out), "--no-progress", "--no-cache"]) == 0
    assert "online diffcoremix steps/s" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["name"] == "diffcoremix" and metrics["loader_stats"]["produced"] >= 2
    assert "clip_filter" in metrics["loader_stats"]["rejected"]
    samples = metrics["preview_samples"]
    assert samples >= 1 and Image.open(out / "preview.png").size == (90 + 128 * samples, 128 * 4)
