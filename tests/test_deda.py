"""De-DA: segmentation -> CDP/CIP -> edits on the producer side, compositing and area labels on the trainer side.

The ground truth is :class:`~onlineaug.datasets.SyntheticShapes`: its exact foreground masks, and plain-class
shapes drawn in one colour.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onlineaug.images import ItemFormat
from onlineaug import kernels
from onlineaug.datasets import SyntheticShapes
from onlineaug.fill import dilate
from onlineaug.models import ModelSpec
from onlineaug.pool import Field
from onlineaug.producer import standalone_context
from onlineaug.recipes import Batch, BatchContext, SourceBatch, get_recipe
from onlineaug.recipes.deda import (
    SEG_MISSES,
    Decoupled,
    IndexCache,
    area_weights,
    cdp_rgba,
    crop_square,
    over_matte,
    square_box,
)

SIZE = 32
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def shapes():
    return SyntheticShapes(num_classes=6, size=SIZE, length=48, seed=0)


def image_of(dataset, index):
    return dataset[index][0]


def entry_of(dataset, index, size=SIZE):
    """The Decoupled entry of ``index`` built from the dataset's true mask (as the recipe builds it)."""
    recipe = get_recipe("deda", segmenter="dataset")
    mask = dataset.foreground_mask(index)
    image = image_of(dataset, index)
    background = recipe.fill_background(None, image[None], image[None], mask[None], None)[0]
    box = square_box(mask)
    return Decoupled(True, box, crop_square(mask[None], box)[0], background, float(mask.float().mean()))


# ------------------------------------------------------------------------------------- CDP geometry
def test_the_cdp_square_is_centred_on_the_true_mask_box(shapes):
    for index in range(12):
        mask = shapes.foreground_mask(index)
        rows, cols = np.nonzero(mask.numpy())
        top, left, side = square_box(mask)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert side == max(height, width)
        assert top == rows.min() - (side - height) // 2 and left == cols.min() - (side - width) // 2
        # the square holds the whole mask: cropping and pasting back loses nothing
        alpha = crop_square(mask[None], (top, left, side))[0]
        assert int(alpha.sum()) == int(mask.sum())
    with pytest.raises(ValueError, match="the mask is empty"):
        square_box(torch.zeros(4, 4, dtype=torch.bool))


def test_crop_square_pads_with_zeros_outside_the_frame():
    image = torch.arange(1, 17, dtype=torch.uint8).view(1, 4, 4)
    out = crop_square(image, (-1, 2, 3))
    expected = torch.tensor([[0, 0, 0], [3, 4, 0], [7, 8, 0]], dtype=torch.uint8)
    assert torch.equal(out[0], expected)


def test_cdp_alpha_and_colour_equal_the_dataset_mask_and_object_exactly_at_native_scale(shapes):
    for index in range(6):  # plain classes: the object is one colour
        entry = entry_of(shapes, index)
        image, mask = image_of(shapes, index), shapes.foreground_mask(index)
        top, left, side = entry.box
        cdp = cdp_rgba(image, entry, side)  # letterboxed at its own size: no resampling
        square_mask = crop_square(mask[None], entry.box)[0]
        assert torch.equal(cdp[3], square_mask.to(torch.uint8) * 255)
        colour = torch.tensor(shapes.sample_params(index).color, dtype=torch.uint8)
        assert torch.equal(cdp[:3][:, square_mask], colour[:, None].expand(3, int(square_mask.sum())))
        assert entry.area == float(mask.sum()) / SIZE**2


def test_cdp_pasted_back_at_its_box_recovers_the_mask_up_to_the_rim(shapes):
    size = 48  # the bank is larger than the frame: the CDP is resampled twice
    for index in range(8):
        entry = entry_of(shapes, index)
        mask = shapes.foreground_mask(index)
        cdp = cdp_rgba(image_of(shapes, index), entry, size)
        top, left, side = entry.box
        white = torch.cat([torch.full((3, size, size), 255, dtype=torch.uint8), cdp[3:]])[None]
        center = torch.tensor([[[top + side / 2, left + side / 2], [0.0, 0.0]]])
        out, visible = kernels.composite_reference(
            torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), white, torch.tensor([[0, -1]]),
            torch.tensor([[side / SIZE, 1.0]]), center, torch.zeros(1, 2, dtype=torch.bool))
        pasted = out[0, 0] > 0.5
        rim = dilate(mask[None], 1.5)[0] & ~(~dilate((~mask)[None], 1.5)[0])
        assert torch.equal(pasted[~rim], mask[~rim])  # exact away from the one-pixel rim
        assert float(visible[0, 0]) == pytest.approx(entry.area, rel=0.08)


def test_transparent_texels_take_the_edge_colour_not_black(shapes):
    entry = entry_of(shapes, 0)
    cdp = cdp_rgba(image_of(shapes, 0), entry, 40)
    colour = torch.tensor(shapes.sample_params(0).color, dtype=torch.int16)
    transparent = cdp[3] == 0
    assert transparent.any()
    assert int((cdp[:3][:, transparent].to(torch.int16) - colour[:, None]).abs().max()) <= 1


# ------------------------------------------------------------------------------------------ the CIP
def test_the_cip_keeps_the_background_and_removes_every_object_pixel(shapes):
    recipe = get_recipe("deda", segmenter="dataset")
    for index in range(12):
        image, mask = image_of(shapes, index), shapes.foreground_mask(index)
        cip = recipe.fill_background(None, image[None], image[None], mask[None], None)[0]
        hole = dilate(mask[None], recipe.dilation_at(SIZE))[0]
        assert torch.equal(cip[:, ~hole], image[:, ~hole])  # untouched outside the dilated mask
        assert torch.equal(hole, dilate(mask[None], 2.0)[0])  # max(2, 0.02 * 32) = 2 px
        params = shapes.sample_params(index)
        fills = [params.color] + ([params.stripe_color] if params.striped else [])
        for fill in fills:
            distance = (cip[:, hole].to(torch.int16) - torch.tensor(fill, dtype=torch.int16)[:, None]).abs()
            assert int(distance.max(0).values.min()) > 24  # no pixel of the object's colour is left in the hole


def test_the_dilation_option_sets_the_hole_radius(shapes):
    recipe = get_recipe("deda", segmenter="dataset", dilation=5)
    image, mask = image_of(shapes, 3), shapes.foreground_mask(3)
    cip = recipe.fill_background(None, image[None], image[None], mask[None], None)[0]
    changed = (cip != image).any(0)
    assert (changed & ~dilate(mask[None], 5.0)[0]).sum() == 0
    assert (changed & ~dilate(mask[None], 4.0)[0]).sum() > 0  # the fill reaches beyond 4 px


# --------------------------------------------------------------------------------- the per-index cache
def test_the_index_cache_is_an_lru_bounded_in_bytes_over_a_folder(tmp_path, shapes):
    entry = entry_of(shapes, 0)
    cache = IndexCache(max_bytes=int(2.5 * entry.nbytes), folder=str(tmp_path))
    for index in range(4):
        cache.put(index, entry_of(shapes, index) if index else entry)
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes and 3 in cache and 0 not in cache
    assert cache.computed == 4 and cache.loaded == 0
    again = cache.get(0)  # evicted from memory, read back from disk
    assert cache.loaded == 1 and again.box == entry.box and torch.equal(again.alpha, entry.alpha)
    assert torch.equal(again.background, entry.background) and again.area == entry.area
    fresh = IndexCache(max_bytes=2**20, folder=str(tmp_path))  # another producer, another run
    assert fresh.get(2).box == entry_of(shapes, 2).box and fresh.loaded == 1 and fresh.computed == 0
    assert IndexCache(max_bytes=2**20).get(2) is None


# ------------------------------------------------------------------------------------------ editing
def test_plan_jobs_repeats_each_index_num_edits_times(shapes):
    recipe = get_recipe("deda", segmenter="dataset", num_edits=3)
    ctx = standalone_context(num_classes=6, image_size=SIZE, dataset=shapes)
    jobs = recipe.plan_jobs(ctx, 7)
    assert len(jobs) == 7
    assert (jobs.indices[0:3] == jobs.indices[0]).all() and (jobs.indices[3:6] == jobs.indices[3]).all()
    assert jobs.indices[6] != jobs.indices[3] or len(set(jobs.indices.tolist())) >= 2


class Recording:
    """Forwards to the real pipeline and keeps what it was called with."""

    def __init__(self, pipeline):
        self.pipeline, self.calls, self.outputs = pipeline, [], []

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        output = self.pipeline(**kwargs)
        self.outputs.append(output.images)
        return output


@pytest.fixture(scope="module")
def tiny_img2img():
    from onlineaug.generators.tiny import build_tiny_pipeline

    return build_tiny_pipeline("img2img")


def test_edits_run_over_a_grey_matte_and_keep_the_real_alpha(shapes, tiny_img2img):
    recipe = get_recipe("deda", segmenter="dataset", num_inference_steps=5, strength=0.4, guidance_scale=7.0)
    ctx = standalone_context(num_classes=6, image_size=SIZE, dataset=shapes, class_names=shapes.classes, seed=3)
    indices = [0, 0, 0, 4]
    entries = [entry_of(shapes, i) for i in indices]
    to_edit = torch.stack([cdp_rgba(image_of(shapes, i), e, 64) for i, e in zip(indices, entries)])
    fg_real = torch.stack([cdp_rgba(image_of(shapes, i), e, SIZE) for i, e in zip(indices, entries)])
    pipeline = Recording(tiny_img2img)
    fg_syn, finite = recipe.edit(pipeline, to_edit, fg_real, torch.tensor([0, 0, 0, 4]), ctx)
    call = pipeline.calls[0]
    a = to_edit[:, 3:].float() / 255
    torch.testing.assert_close(call["image"], a * to_edit[:, :3].float() / 255 + (1 - a) * 0.5, rtol=0, atol=1e-6)
    assert torch.equal(call["image"][:, :, to_edit[0, 3] == 0][0], torch.full_like(call["image"][:, :, to_edit[0, 3] == 0][0], 0.5))
    assert call["prompt"] == ["a photo of a circle"] * 3 + ["a photo of a ring"]
    assert (call["strength"], call["guidance_scale"], call["num_inference_steps"]) == (0.4, 7.0, 5)
    assert finite.all() and fg_syn.shape == (4, 4, SIZE, SIZE) and fg_syn.dtype == torch.uint8
    assert torch.equal(fg_syn[:, 3], fg_real[:, 3])  # the edit never changes the silhouette
    visible = fg_real[0, 3] > 0
    assert not torch.equal(fg_syn[0, :3, visible], fg_syn[1, :3, visible])  # three different edits of one CDP
    assert not torch.equal(fg_syn[0, :3, visible], fg_real[0, :3, visible])
    assert torch.equal(over_matte(to_edit, 0.5), call["image"])


def test_class_tokens_prompt_the_edit_and_must_be_known_to_the_tokenizer(shapes, tiny_img2img):
    tokens = [f"<shape-{c}>" for c in range(6)]
    recipe = get_recipe("deda", segmenter="dataset", class_tokens=tokens, num_inference_steps=2)
    ctx = standalone_context(num_classes=6, image_size=SIZE, dataset=shapes)  # no class names needed
    assert recipe.prompt_text(2, ctx) == "a photo of a <shape-2>" and not recipe.needs_class_names
    entry = entry_of(shapes, 2)
    cdp = cdp_rgba(image_of(shapes, 2), entry, SIZE)[None]
    with pytest.raises(ValueError, match=r"tokenizer does not know the class tokens \['<shape-0>'"):
        recipe.edit(tiny_img2img, cdp, cdp, torch.tensor([2]), ctx)
    with pytest.raises(ValueError, match="class_tokens has 6 tokens but there are 4 classes"):
        recipe.prompt_text(0, standalone_context(num_classes=4, image_size=SIZE))
    # without class_tokens, the tokens a textual-inversion file maps to class names, else the class name
    named = get_recipe("deda", segmenter="dataset")
    ctx = standalone_context(num_classes=6, image_size=SIZE, class_names=shapes.classes)
    assert named.prompt_text(1, ctx, {"square": "<square>"}) == "a photo of a <square>"
    assert named.prompt_text(2, ctx, {"square": "<square>"}) == "a photo of a triangle"


# --------------------------------------------------------------------------------- options and roles
def test_defaults_follow_the_paper():
    recipe = get_recipe("deda")
    assert (recipe.strength, recipe.guidance_scale, recipe.num_inference_steps) == (0.4, 7.0, 25)
    assert (recipe.generation_size, recipe.num_edits) == (512, 3)
    assert (recipe.p_syn, recipe.p_mix, recipe.cip_class) == (0.25, 0.5, "other")
    assert (recipe.box_threshold, recipe.text_threshold) == (0.3, 0.25)
    assert recipe.scale_range == (0.5, 1.0) and recipe.scale_bounds == (0.05, 1.0) and recipe.flip_p == 0.5
    assert recipe.prompt_template == "a photo of a {token}" and recipe.inpaint == "pyramid"
    assert recipe.reject_reasons == (SEG_MISSES, "non_finite")


def test_model_roles_follow_the_segmenter_and_inpaint_options():
    roles = get_recipe("deda").model_roles()
    assert set(roles) == {"edit", "segmenter"}
    assert roles["edit"].kind == "img2img" and roles["edit"].default == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert roles["edit"].architecture == "sd15"
    assert roles["segmenter"].kind == "lang-sam"
    assert roles["segmenter"].options == {"box_threshold": 0.3, "text_threshold": 0.25}
    clipseg = get_recipe("deda", segmenter="clipseg", clipseg_threshold=0.3).model_roles()["segmenter"]
    assert clipseg.kind == "clipseg" and clipseg.options == {"threshold": 0.3}
    dataset = get_recipe("deda", segmenter="dataset").model_roles()["segmenter"]
    assert (dataset.kind, dataset.default) == ("dataset-masks", "dataset")
    sd = get_recipe("deda", inpaint="sd").model_roles()
    assert set(sd) == {"edit", "segmenter", "inpaint"}
    assert sd["inpaint"].kind == "inpaint" and sd["inpaint"].architecture == "sd15"
    ti = get_recipe("deda", textual_inversion="/tmp/ti.safetensors").model_roles()["edit"]
    assert ti.textual_inversion == "/tmp/ti.safetensors"


def test_the_index_cache_key_names_only_what_segmentation_and_the_cip_depend_on():
    base = get_recipe("deda").index_cache_key()
    assert base["roles"] == ("segmenter",)
    assert get_recipe("deda", strength=0.2, p_mix=0.1, num_edits=6).index_cache_key() == base  # edits only
    assert get_recipe("deda", dilation=4).index_cache_key() != base
    assert get_recipe("deda", inpaint="sd").index_cache_key()["roles"] == ("segmenter", "inpaint")


@pytest.mark.parametrize("options, error, message", [
    (dict(segmenter="sam"), ValueError,
     r"recipe 'deda': option segmenter='sam' is invalid: expected one of \['lang-sam', 'clipseg', 'dataset'\]"),
    (dict(inpaint="lama"), ValueError, r"option inpaint='lama' is invalid: expected one of \['pyramid', 'sd'\]"),
    (dict(cip_class="intra"), ValueError, r"cip_class='intra' is invalid: expected one of \['other', 'same', 'any'\]"),
    (dict(p_syn=1.5), ValueError, r"p_syn=1.5 is invalid: expected a number in \[0.0, 1.0\]"),
    (dict(p_mix="0.5"), TypeError, "p_mix='0.5' is invalid: expected a number"),
    (dict(strength=0), ValueError, r"strength=0 is invalid: expected a number in \(0.0, 1.0\]"),
    (dict(num_edits=0), ValueError, "num_edits=0 is invalid: expected an int >= 1"),
    (dict(num_edits=2.5), TypeError, r"num_edits=2.5 is invalid: expected an int \(2.9 would be truncated"),
    (dict(dilation=-1), ValueError, "dilation=-1 is invalid: expected a number >= 0.0"),
    (dict(generation_size=100), ValueError, "generation_size=100 is invalid: expected a positive multiple of 8"),
    (dict(prompt_template="a photo of a {class}"), ValueError,
     "prompt_template='a photo of a {class}' is invalid: expected a template containing '{token}'"),
    (dict(class_tokens="<bird>"), TypeError, r"class_tokens='<bird>' is invalid: expected a list"),
    (dict(scale_range=(1.0, 0.5)), ValueError,
     r"scale_range=\(1.0, 0.5\) is invalid: expected a pair \(low, high\) with 0 < low <= high"),
    (dict(scale_range=(0.5,)), ValueError, r"scale_range=\(0.5,\) is invalid: expected a pair"),
    (dict(scale_bounds=(0, 1)), ValueError, r"scale_bounds\[0\]=0 is invalid: expected a number > 0.0"),
    (dict(segment_text=""), TypeError, "segment_text='' is invalid: expected a non-empty string"),
    (dict(matte=2), ValueError, r"matte=2 is invalid: expected a number in \[0.0, 1.0\]"),
])
def test_bad_options_say_what_is_expected(options, error, message):
    with pytest.raises(error, match=message):
        get_recipe("deda", **options)


# ------------------------------------------------------------------------------------- trainer side
def batch_context(device, num_classes=6, smoothing=0.0, backend="auto"):
    return BatchContext(num_classes=num_classes, image_size=SIZE, mean=MEAN.to(device), std=STD.to(device),
                        label_smoothing=smoothing, out_dtype=torch.float32, p_aug=1.0, fractals=None,
                        backend=backend)


def make_batch(dataset, indices, generated, device):
    """A batch as the loader assembles it: real rows hold their image, pooled rows the De-DA payload."""
    count = len(indices)
    fields = {name: torch.zeros((count, *f.shape), dtype=getattr(torch, f.dtype))
              for name, f in get_recipe("deda").pool_fields(SIZE).items()}
    fields["image"] = torch.stack([image_of(dataset, i) for i in indices])
    fields["label"] = torch.tensor([dataset[i][1] for i in indices])
    fields["index"] = torch.tensor(indices)
    for row, index in enumerate(indices):
        if not generated[row]:
            continue
        entry = entry_of(dataset, index)
        fields["fg_real"][row] = cdp_rgba(image_of(dataset, index), entry, SIZE)
        syn = fields["fg_real"][row].clone()
        syn[:3] = 255 - syn[:3]  # a stand-in edit: another colour, the same alpha
        fields["fg_syn"][row] = syn
        fields["background"][row] = entry.background
        top, left, side = entry.box
        fields["fg_box"][row] = torch.tensor([top, left, top + side, left + side]) / SIZE
        fields["fg_area"][row] = entry.area
    return Batch(fields={k: v.to(device) for k, v in fields.items()}, generated=torch.tensor(generated).to(device))


def reference_layers(batch, params):
    """Each row's background and layer images, chosen from the batch by ``params`` (independently of apply)."""
    f, generated = batch.fields, batch.generated
    count = batch.size
    backgrounds, layers = [], [[], []]
    for b in range(count):
        backgrounds.append(f["background"][params["background_row"][b]] if generated[b] else f["image"][b])
        rows = [b if generated[b] else -1, int(params["second_row"][b])]
        for layer, row in enumerate(rows):
            source = f["fg_syn"] if params["synthetic"][b, layer] else f["fg_real"]
            layers[layer].append(source[max(row, 0)] if row >= 0 else torch.zeros_like(f["fg_real"][0]))
    active = torch.stack([generated, params["second_row"] >= 0], dim=1)
    return torch.stack(backgrounds), torch.stack(layers[0]), torch.stack(layers[1]), active


def alpha_in_frame(fg, scale, center, flip, size):
    """The foreground's alpha drawn in the frame with F.affine_grid (the composite docstring's theta)."""
    theta = torch.zeros(fg.shape[0], 2, 3, device=fg.device)
    sign = torch.where(flip, -1.0, 1.0)
    theta[:, 0, 0] = sign / scale
    theta[:, 0, 2] = sign * (size - 2 * center[:, 1]) / (scale * size)
    theta[:, 1, 1] = 1 / scale
    theta[:, 1, 2] = (size - 2 * center[:, 0]) / (scale * size)
    grid = F.affine_grid(theta, (fg.shape[0], 1, size, size), align_corners=False)
    return F.grid_sample(fg[:, 3:].float() / 255, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


GENERATED = [True, True, False, True, True, False, True, True]
INDICES = [0, 7, 2, 9, 4, 11, 13, 20]  # classes 0 1 2 3 4 5 1 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_apply_composites_the_chosen_layers_and_labels_by_visible_area(shapes, device, backend):
    recipe = get_recipe("deda", p_mix=1.0, p_syn=0.5)
    batch = make_batch(shapes, INDICES, GENERATED, device)
    ctx = batch_context(device, backend=backend)
    params = recipe.sample_params(batch, ctx, torch.Generator(device).manual_seed(0))
    images, targets, info = recipe.apply(batch, params, ctx)

    background, first, second, active = reference_layers(batch, params)
    bank = torch.cat([first, second]).contiguous()
    rows = torch.arange(batch.size, device=device)
    fg_index = torch.stack([torch.where(active[:, 0], rows, -1), torch.where(active[:, 1], rows + batch.size, -1)], 1)
    expected, _ = kernels.composite_reference(background.contiguous(), bank, fg_index, params["scale"],
                                              params["center"], params["flip"], mean=ctx.mean, std=ctx.std)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)

    a1 = alpha_in_frame(first, params["scale"][:, 0], params["center"][:, 0], params["flip"][:, 0], SIZE)
    a2 = alpha_in_frame(second, params["scale"][:, 1], params["center"][:, 1], params["flip"][:, 1], SIZE)
    a1, a2 = a1 * active[:, 0, None, None, None], a2 * active[:, 1, None, None, None]
    v1, v2 = (a1 * (1 - a2)).mean((1, 2, 3)), a2.mean((1, 2, 3))
    torch.testing.assert_close(info["visible"], torch.stack([v1, v2], 1), rtol=1e-4, atol=1e-5)
    labels = batch.fields["label"]
    eye = torch.eye(6, device=device)
    for b in range(batch.size):
        if not GENERATED[b]:
            assert torch.equal(targets[b], eye[labels[b]])  # real rows: one-hot of their own class
            assert info["second_label"][b] == -1 and info["background_label"][b] == -1
            continue
        c2 = int(info["second_label"][b])
        assert c2 >= 0 and c2 != int(labels[b])  # p_mix = 1 and another class is in the batch
        expected_target = (v1[b] * eye[labels[b]] + v2[b] * eye[c2]) / (v1[b] + v2[b])
        torch.testing.assert_close(targets[b], expected_target, rtol=1e-4, atol=1e-5)
        background_class = int(info["background_label"][b])
        assert background_class != int(labels[b])  # cip_class="other"
        if background_class != c2:
            assert targets[b, background_class] == 0  # the background's class never gets label weight
    torch.testing.assert_close(targets.sum(1), torch.ones(batch.size, device=device))
    assert torch.equal(info["label"], labels)


def test_one_cdp_gives_a_one_hot_label_and_smoothing_applies_after(shapes, device):
    recipe = get_recipe("deda", p_mix=0.0)
    batch = make_batch(shapes, INDICES, GENERATED, device)
    ctx = batch_context(device, smoothing=0.1)
    params = recipe.sample_params(batch, ctx, torch.Generator(device).manual_seed(1))
    images, targets, info = recipe.apply(batch, params, ctx)
    assert (info["second_label"] == -1).all() and (info["visible"][:, 1] == 0).all()
    expected = F.one_hot(batch.fields["label"], 6).float() * 0.9 + 0.1 / 6
    torch.testing.assert_close(targets, expected)
    # a real row is its own image, normalised
    real = (batch.fields["image"][2].float() / 255 - ctx.mean[:, None, None]) / ctx.std[:, None, None]
    torch.testing.assert_close(images[2], real)


def test_hidden_layers_fall_back_to_the_first_class():
    visible = torch.tensor([[0.3, 0.1], [0.0, 0.0], [0.2, 0.0], [0.0, 0.4]])
    weights = area_weights(visible, torch.tensor([True, True, False, True]))
    expected = torch.tensor([[0.75, 0.25], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(weights, expected)


def test_sampled_parameters_follow_the_rules(shapes, device):
    recipe = get_recipe("deda")
    batch = make_batch(shapes, INDICES, GENERATED, device)
    ctx = batch_context(device)
    generated, labels = batch.generated, batch.fields["label"]
    draws = [recipe.sample_params(batch, ctx, torch.Generator(device).manual_seed(s)) for s in range(300)]
    side = batch.fields["fg_box"][:, 2] - batch.fields["fg_box"][:, 0]
    mixed, synthetic, flipped, pooled = 0, 0, 0, int(generated.sum()) * len(draws)
    for params in draws:
        bg = params["background_row"]
        assert generated[bg[generated]].all() and (labels[bg] != labels)[generated].all()  # another class, pooled
        assert torch.equal(bg[~generated], torch.arange(8, device=device)[~generated])
        second = params["second_row"]
        has = second >= 0
        assert not has[~generated].any() and generated[second[has]].all() and (labels[second[has]] != labels[has]).all()
        scale = params["scale"]
        assert ((scale[:, 0] >= (0.5 * side).clamp(0.05, 1) - 1e-6) & (scale[:, 0] <= side.clamp(0.05, 1) + 1e-6))[generated].all()
        second_side = side[second.clamp(min=0)]
        assert ((scale[:, 1] >= (0.5 * second_side).clamp(0.05, 1) - 1e-6)
                & (scale[:, 1] <= second_side.clamp(0.05, 1) + 1e-6))[has].all()
        half = scale[..., None] * SIZE / 2
        inside = (params["center"] >= half - 1e-4) & (params["center"] <= SIZE - half + 1e-4)
        assert inside[generated, 0].all() and inside[has, 1].all()  # every layer stays inside the frame
        assert not params["synthetic"][~generated].any() and not params["synthetic"][~has, 1].any()
        mixed += int(has.sum())
        synthetic += int(params["synthetic"][:, 0].sum())
        flipped += int(params["flip"][:, 0].sum())
    assert mixed / pooled == pytest.approx(0.5, abs=0.06)
    assert synthetic / pooled == pytest.approx(0.25, abs=0.05)
    assert flipped / pooled == pytest.approx(0.5, abs=0.06)


@pytest.mark.parametrize("cip_class", ["same", "any"])
def test_cip_class_chooses_where_backgrounds_come_from(shapes, device, cip_class):
    recipe = get_recipe("deda", cip_class=cip_class)
    batch = make_batch(shapes, INDICES, GENERATED, device)  # pooled rows 1 and 6 share class 1
    ctx = batch_context(device)
    labels, generated = batch.fields["label"], batch.generated
    seen_other = False
    for seed in range(50):
        bg = recipe.sample_params(batch, ctx, torch.Generator(device).manual_seed(seed))["background_row"]
        assert generated[bg[generated]].all()
        if cip_class == "same":
            assert bg[1] == 6 and bg[6] == 1  # a pooled row of the same class exists: always taken
            assert bg[0] != 0  # none for class 0: another pooled row rather than its own background
        seen_other |= bool((labels[bg] != labels)[generated].any())
    assert seen_other


def test_a_lone_pooled_row_uses_its_own_background_and_no_second_cdp(shapes, device):
    recipe = get_recipe("deda", p_mix=1.0)
    batch = make_batch(shapes, [0, 7, 2], [False, True, False], device)
    ctx = batch_context(device)
    params = recipe.sample_params(batch, ctx, torch.Generator(device).manual_seed(0))
    assert params["background_row"][1] == 1 and (params["second_row"] == -1).all()
    images, targets, info = recipe.apply(batch, params, ctx)
    assert torch.equal(targets[1], F.one_hot(torch.tensor(1), 6).float().to(device))
    assert info["visible"][1, 0] > 0


# ------------------------------------------------------------------ producing with the dataset's masks
class ShapesWithMisses(SyntheticShapes):
    """SyntheticShapes whose items ``index % 5 == 4`` have no object for the segmenter (an empty mask)."""

    def foreground_mask(self, index):
        mask = super().foreground_mask(index)
        return torch.zeros_like(mask) if index % 5 == 4 else mask


def dataset_models(dataset, tiny_img2img):
    from onlineaug.models import load_model

    segmenter = load_model(get_recipe("deda", segmenter="dataset").model_roles()["segmenter"], ModelSpec("dataset"),
                           device="cpu", dataset=dataset)
    return {"edit": Recording(tiny_img2img), "segmenter": segmenter}


def source_batch(dataset, indices, generation):
    from onlineaug.images import resize_uint8

    images = torch.stack([image_of(dataset, i) for i in indices])
    return SourceBatch(images=resize_uint8(images, generation), originals=images,
                       labels=torch.tensor([dataset[i][1] for i in indices]), indices=torch.tensor(indices))


@pytest.mark.parametrize("generation", [SIZE, 2 * SIZE])
def test_produce_writes_the_true_cdp_the_cip_and_k_edits_per_index(shapes, tiny_img2img, generation):
    recipe = get_recipe("deda", segmenter="dataset", generation_size=generation, num_inference_steps=3)
    models = dataset_models(shapes, tiny_img2img)
    ctx = standalone_context(num_classes=6, image_size=SIZE, dataset=shapes, class_names=shapes.classes, seed=0)
    indices = [3, 3, 3, 10]
    produced = recipe.produce(models, source_batch(shapes, indices, generation), ctx)
    assert produced.rejected == {} and torch.equal(produced.rows, torch.arange(4))
    payload = produced.payload
    for name, field in recipe.pool_fields(SIZE).items():
        assert tuple(payload[name].shape) == (4, *field.shape) and str(payload[name].dtype) == f"torch.{field.dtype}"
    assert payload["index"].tolist() == indices and payload["label"].tolist() == [3, 3, 3, 4]
    for row, index in enumerate(indices):
        entry = entry_of(shapes, index)
        mask = shapes.foreground_mask(index)
        top, left, side = entry.box
        # the box is exact at the mask's own size; at twice that, centring the square rounds to a finer pixel
        box = torch.tensor([top, left, top + side, left + side], dtype=torch.float32) / SIZE
        torch.testing.assert_close(payload["fg_box"][row], box, rtol=0, atol=1e-7 if generation == SIZE else 1 / generation)
        assert float(payload["fg_area"][row]) == pytest.approx(entry.area, abs=1e-7)
        assert torch.equal(payload["background"][row], entry.background)  # the CIP of the true mask
        assert torch.equal(payload["fg_syn"][row, 3], payload["fg_real"][row, 3])
        if generation == SIZE:
            assert torch.equal(payload["fg_real"][row], cdp_rgba(image_of(shapes, index), entry, SIZE))
        assert int((payload["fg_real"][row, 3] > 127).sum()) == pytest.approx(
            int(mask.sum()) * (SIZE / side) ** 2, rel=0.1)
    assert torch.equal(payload["fg_real"][0], payload["fg_real"][2])
    assert not torch.equal(payload["fg_syn"][0], payload["fg_syn"][1])  # K different edits of one CDP
    (call,) = models["edit"].calls
    assert call["image"].shape == (4, 3, generation, generation)  # edited at the generation size
    assert call["prompt"] == ["a photo of a cross"] * 3 + ["a photo of a ring"]


def test_segmentation_and_cip_run_once_per_index(shapes, tiny_img2img, tmp_path):
    recipe = get_recipe("deda", segmenter="dataset", num_inference_steps=2)
    models = dataset_models(shapes, tiny_img2img)
    filled = []
    fill_background = recipe.fill_background
    recipe.fill_background = lambda models, images, *rest: filled.append(len(images)) or \
        fill_background(models, images, *rest)
    ctx = standalone_context(num_classes=6, image_size=SIZE, dataset=shapes, class_names=shapes.classes,
                             cache_dir=str(tmp_path / "index"))
    recipe.produce(models, source_batch(shapes, [1, 1, 2, 1], SIZE), ctx)
    assert models["segmenter"].calls == 2 and filled == [2]  # one segmentation and one CIP per distinct index
    recipe.produce(models, source_batch(shapes, [2, 5, 1, 5], SIZE), ctx)
    assert models["segmenter"].calls == 3 and filled == [2, 1]  # only index 5 is new
    cache = recipe.index_cache(ctx)
    assert cache.computed == 3 and len(cache) == 3
    assert sorted(os.listdir(tmp_path / "index")) == ["1.pt", "2.pt", "5.pt"]
    # a new producer (another process, a restart, the next run) reads them back instead of segmenting
    again = get_recipe("deda", segmenter="dataset", num_inference_steps=2)
    ctx = standalone_context(num_classes=6, image_size=SIZE, dataset=shapes, class_names=shapes.classes,
                             cache_dir=str(tmp_path / "index"))
    models = dataset_models(shapes, tiny_img2img)
    produced = again.produce(models, source_batch(shapes, [5, 2], SIZE), ctx)
    assert models["segmenter"].calls == 0 and again.index_cache(ctx).loaded == 2
    assert torch.equal(produced.payload["background"][0], entry_of(shapes, 5).background)


def test_a_cache_smaller_than_a_batch_still_serves_the_whole_batch(shapes, tiny_img2img):
    recipe = get_recipe("deda", segmenter="dataset", num_inference_steps=2, cache_mb=0)
    models = dataset_models(shapes, tiny_img2img)
    ctx = standalone_context(num_classes=6, image_size=SIZE, dataset=shapes, class_names=shapes.classes)
    produced = recipe.produce(models, source_batch(shapes, [1, 2, 3], SIZE), ctx)
    assert produced.rows.tolist() == [0, 1, 2] and len(recipe.index_cache(ctx)) == 1
    for row, index in enumerate([1, 2, 3]):
        assert torch.equal(produced.payload["background"][row], entry_of(shapes, index).background)


def test_images_without_an_object_are_seg_misses_and_write_no_slot(tiny_img2img):
    dataset = ShapesWithMisses(num_classes=6, size=SIZE, length=20, seed=0)
    recipe = get_recipe("deda", segmenter="dataset", num_inference_steps=2)
    models = dataset_models(dataset, tiny_img2img)
    ctx = standalone_context(num_classes=6, image_size=SIZE, dataset=dataset, class_names=dataset.classes)
    produced = recipe.produce(models, source_batch(dataset, [4, 1, 9, 4], SIZE), ctx)
    assert produced.rows.tolist() == [1] and produced.rejected[SEG_MISSES].tolist() == [0, 2, 3]
    assert produced.payload["index"].tolist() == [1] and len(models["edit"].calls[0]["prompt"]) == 1
    produced = recipe.produce(models, source_batch(dataset, [9, 14], SIZE), ctx)
    assert produced.rows.tolist() == [] and produced.rejected[SEG_MISSES].tolist() == [0, 1]
    assert all(len(value) == 0 for value in produced.payload.values())
    assert models["segmenter"].calls == 4  # misses are cached too: 4, 1, 9, then 14
    assert len(models["edit"].calls) == 1  # nothing to edit in the second batch
    # the producer accepts a batch where every row is a miss, and counts them
    from types import SimpleNamespace

    from onlineaug.producer import Producer

    producer = SimpleNamespace(recipe=recipe, settings=SimpleNamespace(pool_fields=recipe.pool_fields(SIZE)))
    rows, host, rejected = Producer._check(producer, produced, 2)
    assert len(rows) == 0 and rejected == {SEG_MISSES: [0, 1]} and all(len(v) == 0 for v in host.values())


def test_pickling_the_recipe_leaves_its_cache_behind(shapes, tiny_img2img):
    import pickle

    recipe = get_recipe("deda", segmenter="dataset", num_inference_steps=2)
    ctx = standalone_context(num_classes=6, image_size=SIZE, dataset=shapes, class_names=shapes.classes)
    recipe.produce(dataset_models(shapes, tiny_img2img), source_batch(shapes, [0], SIZE), ctx)
    assert len(recipe.index_cache(ctx)) == 1
    assert pickle.loads(pickle.dumps(recipe))._cache is None


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_deda_end_to_end_with_a_real_producer_and_the_datasets_masks(tmp_path, device):
    from onlineaug import OnlineGenAugLoader
    from onlineaug.demo import write_preview

    dataset = ShapesWithMisses(num_classes=6, size=SIZE, length=30, seed=0)
    loader = OnlineGenAugLoader(
        dataset, recipe="deda", num_classes=6, batch_size=10, image_size=SIZE, generator="tiny", device=device,
        recipe_options={"segmenter": "dataset", "num_inference_steps": 2, "p_mix": 1.0}, p_aug=0.6, pool_size=12,
        max_reuse=4, warmup=6, generator_batch_size=3, num_workers=0, seed=0, return_info=True, progress=False,
        cache_dir=tmp_path)
    assert loader.recipe.generation_size == SIZE  # the tiny generator works at the training size
    with loader:
        batches = [batch for _, batch in zip(range(4), loader)]
        stats = loader.stats()
        previewed = write_preview(loader, tmp_path / "preview.png", count=3, tile=32)
    from PIL import Image

    assert previewed == 3 and Image.open(tmp_path / "preview.png").size == (90 + 32 * 3, 32 * 6)
    generated_rows = 0
    eye = torch.eye(6, device=device)
    for images, targets, info in batches:
        assert images.shape == (10, 3, SIZE, SIZE) and torch.isfinite(images).all()
        torch.testing.assert_close(targets.sum(1), torch.ones(10, device=device))
        generated = info["generated"]
        generated_rows += int(generated.sum())
        labels, second = info["label"], info["second_label"]
        assert (info["index"][generated] % 5 != 4).all()  # a seg miss never reaches the pool
        assert torch.equal(targets[~generated], eye[labels[~generated]])
        visible = info["visible"]
        assert (visible[generated, 0] + visible[generated, 1] > 0).all()
        weights = area_weights(visible, second >= 0)
        expected = weights[:, :1] * eye[labels] + weights[:, 1:] * eye[torch.where(second >= 0, second, labels)]
        torch.testing.assert_close(targets[generated], expected[generated])
        mixed = second >= 0
        assert (second[mixed] != labels[mixed]).all() and not mixed[~generated].any()
    assert generated_rows >= 6
    assert stats["rejected"]["seg_misses"] >= 1 and stats["producer_restarts"] == 0
    (folder,) = [p for p in (tmp_path / "prepared").iterdir() if p.name.startswith("deda-index-")]
    cached = {int(name.split(".")[0]) for name in os.listdir(folder)}
    assert cached and any(i % 5 == 4 for i in cached) and any(i % 5 != 4 for i in cached)


def test_preview_rows_show_the_decoupling_of_each_sample(shapes, device):
    recipe = get_recipe("deda")
    batch = make_batch(shapes, [0, 7, 9], [True, True, True], device)
    samples = [{name: value[row].cpu().numpy() for name, value in batch.fields.items() if name != "image"}
               for row in range(3)]
    rows = recipe.preview_rows(samples, shapes, batch_context(device), torch.Generator(device).manual_seed(0))
    assert list(rows) == ["original", "mask", "CIP", "CDP", "edited CDP", "composite"]
    for row, index in enumerate([0, 7, 9]):
        assert torch.equal((rows["original"][row] * 255).round().byte(), image_of(shapes, index))
        mask = shapes.foreground_mask(index)
        assert float(((rows["mask"][row] > 0.5) != mask).float().mean()) < 0.03  # the alpha back in its frame
        assert torch.equal((rows["CIP"][row] * 255).round().byte(), batch.fields["background"][row].cpu())
        assert rows["composite"][row].shape == (3, SIZE, SIZE) and 0 <= float(rows["composite"][row].min())


def test_the_demo_reads_recipe_options_as_json_or_text():
    import argparse

    from onlineaug.demo import _recipe_option

    assert _recipe_option("p_mix=0.25") == ("p_mix", 0.25)
    assert _recipe_option("segmenter=clipseg") == ("segmenter", "clipseg")
    assert _recipe_option("scale_range=[0.4, 0.9]") == ("scale_range", [0.4, 0.9])
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE, got 'p_mix'"):
        _recipe_option("p_mix")


def test_a_textual_inversion_file_gives_the_edit_prompts_their_class_tokens(tmp_path, shapes):
    from onlineaug.models import load_model, resolve_models

    torch.save({"<circle>": torch.randn(32)}, tmp_path / "learned_embeds.bin")  # the tiny text encoder is 32 wide
    recipe = get_recipe("deda", segmenter="dataset", textual_inversion=str(tmp_path / "learned_embeds.bin"),
                        num_inference_steps=2)
    roles = recipe.model_roles()
    spec = resolve_models(roles, "edit", "tiny", None)["edit"]
    assert spec.textual_inversion == str(tmp_path / "learned_embeds.bin")
    pipeline = Recording(load_model(roles["edit"], spec, device="cpu"))
    ctx = standalone_context(num_classes=6, image_size=SIZE, class_names=shapes.classes)
    cdp = torch.stack([cdp_rgba(image_of(shapes, i), entry_of(shapes, i), SIZE) for i in (0, 1)])
    recipe.edit(pipeline, cdp, cdp, torch.tensor([0, 1]), ctx)
    assert pipeline.calls[0]["prompt"] == ["a photo of a <circle>", "a photo of a square"]


def test_sd_inpainting_fills_only_the_dilated_hole(shapes):
    from onlineaug.models import load_model, resolve_models
    from onlineaug.recipes.generation import to_uint8

    recipe = get_recipe("deda", segmenter="dataset", inpaint="sd", num_inference_steps=2, generation_size=64)
    roles = recipe.model_roles()
    inpaint = Recording(load_model(roles["inpaint"], resolve_models(roles, "edit", "tiny", None)["inpaint"],
                                   device="cpu"))
    ctx = standalone_context(num_classes=6, image_size=SIZE, class_names=shapes.classes)
    batch = source_batch(shapes, [2, 8], 64)
    masks = torch.stack([shapes.foreground_mask(i) for i in (2, 8)])
    masks_g = F.interpolate(masks[:, None].float(), size=(64, 64), mode="nearest-exact")[:, 0].bool()
    cip = recipe.fill_background({"inpaint": inpaint}, batch.images, batch.originals, masks_g, ctx)
    (call,) = inpaint.calls
    hole = dilate(masks, 2.0)
    assert torch.equal(call["mask_image"][:, 0].bool(), dilate(masks_g, 4.0))  # the same radius at 64 px
    assert call["prompt"] == ["", ""] and torch.equal(call["image"], batch.images.float() / 255)
    painted, _ = to_uint8(inpaint.outputs[0], SIZE)
    assert torch.equal(cip.permute(1, 0, 2, 3)[:, ~hole], batch.originals.permute(1, 0, 2, 3)[:, ~hole])
    assert torch.equal(cip.permute(1, 0, 2, 3)[:, hole], painted.permute(1, 0, 2, 3)[:, hole])


def producer_for(recipe, dataset, generator="tiny", batch_size=4):
    """A real Producer (the class producer processes run) for ``recipe``, in this process."""
    from onlineaug.models import LoadPolicy, resolve_models
    from onlineaug.producer import Producer, ProducerSettings
    from onlineaug.sources import SourceSet

    roles = recipe.model_roles()
    settings = ProducerSettings(
        recipe=recipe, dataset=dataset, num_classes=dataset.num_classes, class_names=dataset.classes,
        image_size=SIZE, batch_size=batch_size, seed=0, trainer_rank=0, roles=roles,
        specs=resolve_models(roles, recipe.main_role, generator, None), policy=LoadPolicy(),
        pool_fields=recipe.pool_fields(SIZE), item_format=ItemFormat(resize="squash"))  # whole items: exact checks
    return Producer(settings, rank=0, device="cpu", sources=SourceSet(np.arange(len(dataset))))


@pytest.mark.parametrize("segmenter, options", [
    ("lang-sam", {"box_threshold": 0.0, "text_threshold": 0.0}),  # random weights: keep every box
    ("lang-sam", {"box_threshold": 1.0}),  # no box clears the threshold: every image is a miss
    ("clipseg", {"clipseg_threshold": 0.5}),
])
def test_tiny_text_segmenters_run_in_a_real_producer(shapes, segmenter, options):
    recipe = get_recipe("deda", segmenter=segmenter, segment_text="shape", generation_size=SIZE,
                        num_inference_steps=2, num_edits=2, **options)
    producer = producer_for(recipe, shapes)
    payload = producer.step()
    written = len(payload["index"])
    misses = producer.counts["rejected:seg_misses"]
    assert written + misses == 4 and producer.counts["rejected:non_finite"] == 0
    if options.get("box_threshold") == 1.0:
        assert written == 0
    # what was written is what the segmenter finds, exactly: its mask's area, box and CIP
    cache = recipe.index_cache(producer.context)
    for row, index in enumerate(payload["index"].tolist()):
        entry = cache.get(index)
        assert entry.found
        image = torch.from_numpy(payload["fg_real"][row])
        assert payload["fg_area"][row] == np.float32(entry.area)
        top, left, side = entry.box
        np.testing.assert_array_equal(payload["fg_box"][row], np.float32([top, left, top + side, left + side]) / SIZE)
        assert torch.equal(image, cdp_rgba(image_of(shapes, index), entry, SIZE))
    segment = producer.models["segmenter"]
    indices = sorted(set(cache._entries))
    images = torch.stack([image_of(shapes, i) for i in indices])
    masks, found = segment.segment(images, ["shape"] * len(indices), torch.tensor(indices))
    for i, index in enumerate(indices):
        entry = cache.get(index)
        assert entry.found == bool(found[i] and masks[i].any())
        if entry.found:
            assert entry.area == float(masks[i].float().mean())
            assert torch.equal(crop_square(masks[i][None], entry.box)[0], entry.alpha)
