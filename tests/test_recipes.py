"""Recipes: paper defaults, the producer step on the tiny generator, and batch-time mixing vs formulas."""

import re

import pytest
import torch

from onlineaug import ops
from onlineaug.images import resize_uint8
from onlineaug.pool import Field
from onlineaug.recipes import Batch, BatchContext, Recipe, SourceBatch, available_recipes, get_recipe, register_recipe

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def context(device, size=16, num_classes=5, smoothing=0.0, p_aug=1.0, fractals=4):
    g = torch.Generator().manual_seed(7)
    bank = torch.randint(0, 256, (fractals, 3, size, size), generator=g, dtype=torch.uint8).to(device)
    return BatchContext(num_classes=num_classes, image_size=size, mean=MEAN.to(device), std=STD.to(device),
                        label_smoothing=smoothing, out_dtype=torch.float32, p_aug=p_aug, fractals=bank)


def test_registry_lists_the_built_in_recipes():
    expected = {"diffusemix", "genmix", "cutmix", "mixup", "none", "diffmix", "diffaug", "diffgen", "dafusion", "deda",
                "diffcoremix"}
    assert expected <= set(available_recipes())
    assert available_recipes() == sorted(available_recipes())
    with pytest.raises(ValueError, match="unknown recipe 'nope'; available recipes: " +
                       re.escape(", ".join(available_recipes())) + "$"):
        get_recipe("nope")
    with pytest.raises(ValueError, match=r"recipe 'genmix' has no option\(s\) \['bogus'\]; its options are: "
                                         r"prompt_set, prompts, .*num_inference_steps"):
        get_recipe("genmix", bogus=1)


def test_a_new_recipe_plugs_in_by_registration_alone():
    @register_recipe
    class Identity(Recipe):
        name = "test-identity"
        paper = "none"

        def sample_params(self, batch, ctx, generator):
            return {}

        def apply(self, batch, params, ctx):
            return batch.fields["image"].float(), ops.one_hot_targets(batch.fields["label"], ctx.num_classes)

    assert isinstance(get_recipe("test-identity"), Identity)
    with pytest.raises(ValueError, match="already registered"):
        register_recipe(type("Other", (Identity,), {"name": "test-identity"}))


def test_diffusemix_defaults_follow_the_paper_and_official_code():
    recipe = get_recipe("diffusemix")
    assert recipe.prompts == ("autumn", "snowy", "watercolor art", "sunset", "rainbow", "aurora", "mosaic",
                              "ukiyo-e", "a sketch with crayon")
    assert (recipe.guidance_scale, recipe.image_guidance_scale, recipe.generation_size) == (4.0, 1.5, 256)
    assert recipe.lam == 0.2 and recipe.blend_width == 20 and recipe.flips == (False,)
    assert recipe.splits == ("top_bottom", "left_right")
    assert recipe.prompt_text(0) == "autumn"
    assert recipe.blend_width_at(256) == 20 and recipe.blend_width_at(64) == 5  # scales with the working size


def test_genmix_defaults_follow_the_paper():
    recipe = get_recipe("genmix")
    assert recipe.generation_size == 512 and recipe.flips == (False, True)  # four masks, Table 12
    assert recipe.prompt_text(1) == "A transformed version of image into snowy"
    assert recipe.blend_width_at(512) == 20 and recipe.blend_width_at(224) == pytest.approx(8.75)
    da = get_recipe("genmix", prompt_set="domain_adaptation")
    assert da.prompts == ("graffiti", "retro comic", "chalk drawing", "watercolor painting", "digital art",
                          "cartoon style")
    with pytest.raises(ValueError, match=r"recipe 'genmix': option prompt_set='x' is invalid: expected one of "
                                         r"\['domain_adaptation', 'general'\]"):
        get_recipe("genmix", prompt_set="x")


@pytest.mark.parametrize("options, error, message", [
    (dict(lam=1.5), ValueError, r"lam=1.5 is invalid: expected a number in \[0.0, 1.0\]"),
    (dict(generation_size=100), ValueError, "generation_size=100 is invalid: expected a positive multiple of 8"),
    (dict(prompts=[]), ValueError, r"prompts=\[\] is invalid: expected a list of at least 1 item"),
    (dict(prompts="snowy"), TypeError, r"prompts='snowy' is invalid: expected a list \(for one value write \['snowy'\]\)"),
    (dict(prompts=["ok", ""]), TypeError, r"prompts\[1\]='' is invalid: expected a non-empty string"),
    (dict(prompt_template="no placeholder"), ValueError,
     "prompt_template='no placeholder' is invalid: expected a template containing '{prompt}'"),
    (dict(prompt_template="{prompt} {other}"), ValueError,
     r"prompt_template='{prompt} {other}' is invalid: expected a template with only the fields \['prompt'\]"),
    (dict(splits=("diagonal",)), ValueError, r"splits\[0\]='diagonal' is invalid: expected one of"),
    (dict(flips="no"), TypeError, "flips='no' is invalid: expected a list"),
    (dict(flips=["no"]), TypeError, r"flips\[0\]='no' is invalid: expected True or False"),
    (dict(num_inference_steps=2.9), TypeError, r"num_inference_steps=2.9 is invalid: expected an int \(2.9 would "
                                               r"be truncated silently\)"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps=0 is invalid: expected an int >= 1"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale=nan is invalid: expected a finite number"),
    (dict(guidance_scale="high"), TypeError, "guidance_scale='high' is invalid: expected a number"),
    (dict(blend_width=float("inf")), ValueError, "blend_width=inf is invalid: expected a finite number"),
    (dict(blend_width=-1), ValueError, "blend_width=-1 is invalid: expected a number >= 0.0"),
])
def test_recipe_options_are_validated_with_the_recipe_name(options, error, message):
    with pytest.raises(error, match=r"^recipe 'diffusemix': option " + message):
        get_recipe("diffusemix", **options)


def test_batch_time_recipes_validate_their_options():
    with pytest.raises(ValueError, match=r"recipe 'cutmix': option alpha=0 is invalid: expected a number > 0.0"):
        get_recipe("cutmix", alpha=0)
    with pytest.raises(TypeError, match=r"recipe 'mixup': option alpha='1' is invalid: expected a number"):
        get_recipe("mixup", alpha="1")


def test_genmix_produce_with_the_tiny_generator():
    from onlineaug.models import LoadPolicy, ModelSpec, load_model
    from onlineaug.producer import standalone_context

    recipe = get_recipe("genmix", generation_size=32, num_inference_steps=2)
    models = {"edit": load_model(recipe.model_roles()["edit"], ModelSpec("tiny"), device="cpu", policy=LoadPolicy())}
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    sources = SourceBatch(images=images, originals=resize_uint8(images, 16), labels=torch.tensor([1, 2, 3]),
                          indices=torch.tensor([10, 11, 12]))
    produced = recipe.produce(models, sources, standalone_context(num_classes=5, image_size=16, seed=1))
    assert produced.rejected == {} and torch.equal(produced.rows, torch.arange(3))  # every row finite, kept
    payload = produced.payload
    fields = recipe.pool_fields(16)
    assert set(payload) == set(fields)
    for name, field in fields.items():
        assert tuple(payload[name].shape) == (3, *field.shape) and str(payload[name].dtype) == f"torch.{field.dtype}"
    assert torch.equal(payload["original"], sources.originals)
    assert torch.equal(payload["label"], sources.labels) and torch.equal(payload["index"], sources.indices)
    assert ((payload["prompt_id"] >= 0) & (payload["prompt_id"] < len(recipe.prompts))).all()
    again = recipe.produce(models, sources, standalone_context(num_classes=5, image_size=16, seed=1)).payload
    assert torch.equal(payload["generated"], again["generated"])  # deterministic by seed


def test_genmix_apply_mixes_generated_rows_and_normalises_real_ones(device):
    recipe = get_recipe("genmix", generation_size=64)
    ctx = context(device)
    g = torch.Generator().manual_seed(3)
    fields = {
        "original": torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8),
        "generated": torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8),
        "label": torch.tensor([0, 1, 2, 3, 4, 0]),
        "prompt_id": torch.tensor([1, 7, 2, 7, 0, 3]),
    }
    generated = torch.tensor([True, False, True, False, True, True])
    batch = Batch(fields={k: v.to(device) for k, v in fields.items()}, generated=generated.to(device))
    params = recipe.sample_params(batch, ctx, torch.Generator(device=device).manual_seed(0))
    images, targets, info = recipe.apply(batch, params, ctx)
    images, targets = images.cpu(), targets.cpu()
    assert info["prompt_id"].cpu().tolist() == [1, -1, 2, -1, 0, 3]  # -1 on real rows
    params = {k: v.cpu() for k, v in params.items()}
    names = {v: k for k, v in ops.SPLITS.items()}
    for b in range(6):
        o = fields["original"][b].float() / 255
        if generated[b]:
            mask = ops.smooth_mask(16, 16, split=names[int(params["split"][b])], flip=bool(params["flip"][b]),
                                   blend_width=recipe.blend_width_at(16))
            fractal = ctx.fractals[params["fractal_index"][b]].cpu().float() / 255
            o = ops.concat_blend(o[None], fields["generated"][b][None].float() / 255, mask, fractal[None], 0.2)[0]
        torch.testing.assert_close(images[b], (o - MEAN[:, None, None]) / STD[:, None, None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets, torch.nn.functional.one_hot(fields["label"], 5).float())


def distinct_images(count, size=16):
    """Each image a constant colour that identifies it (values 10 * (i + 1))."""
    return torch.stack([torch.full((3, size, size), 10 * (i + 1), dtype=torch.uint8) for i in range(count)])


def test_cutmix_targets_match_the_mixed_pixel_area_exactly(device):
    recipe = get_recipe("cutmix")
    ctx = context(device, size=16, num_classes=8, p_aug=0.75)
    images, labels = distinct_images(8), torch.arange(8)
    batch = Batch(fields={"image": images.to(device), "label": labels.to(device)},
                  generated=torch.zeros(8, dtype=torch.bool, device=device))
    params = recipe.sample_params(batch, ctx, torch.Generator(device=device).manual_seed(5))
    mixed_images, targets, _ = recipe.apply(batch, params, ctx)
    raw, _ = ops.box_mix(images.to(device), ops.BoxMixParams(**params))
    raw, targets, partner = raw.cpu(), targets.cpu(), params["partner"].cpu()
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    for b in range(8):
        own = (raw[b, 0] == 10 * (b + 1)).float().mean()
        if partner[b] != b:
            assert targets[b, b] == pytest.approx(own.item(), abs=1e-6)
            assert targets[b, partner[b]] == pytest.approx(1 - own.item(), abs=1e-6)
        else:
            assert targets[b, b] == pytest.approx(1.0)
    assert (targets.max(1).values < 1).any()  # something was mixed


def test_mixup_targets_and_pixels_use_the_same_per_sample_lambda(device):
    recipe = get_recipe("mixup")
    ctx = context(device, num_classes=8)
    images, labels = distinct_images(8), torch.arange(8)
    batch = Batch(fields={"image": images.to(device), "label": labels.to(device)},
                  generated=torch.zeros(8, dtype=torch.bool, device=device))
    params = recipe.sample_params(batch, ctx, torch.Generator(device=device).manual_seed(5))
    mixed, targets, _ = recipe.apply(batch, params, ctx)
    lam, partner = params["lam"].cpu(), params["partner"].cpu()
    assert lam.unique().numel() > 1  # per sample, not per batch
    normalized = ops.normalize(images, MEAN, STD)
    expected = lam.view(-1, 1, 1, 1) * normalized + (1 - lam.view(-1, 1, 1, 1)) * normalized[partner]
    torch.testing.assert_close(mixed.cpu(), expected, rtol=1e-5, atol=1e-5)
    expected_targets = lam[:, None] * torch.eye(8) + (1 - lam[:, None]) * torch.eye(8)[partner]
    torch.testing.assert_close(targets.cpu(), expected_targets)


@pytest.mark.parametrize("name", ["none", "cutmix", "mixup", "genmix"])
def test_label_smoothing_keeps_rows_summing_to_one(name, device):
    recipe = get_recipe(name) if name != "genmix" else get_recipe(name, generation_size=64)
    ctx = context(device, num_classes=8, smoothing=0.1)
    images = distinct_images(8).to(device)
    fields = {"image": images, "original": images, "generated": images, "label": torch.arange(8, device=device),
              "prompt_id": torch.zeros(8, dtype=torch.int64, device=device)}
    batch = Batch(fields=fields, generated=torch.ones(8, dtype=torch.bool, device=device))
    targets = recipe.apply(batch, recipe.sample_params(batch, ctx, torch.Generator(device=device)), ctx)[1]
    torch.testing.assert_close(targets.sum(1).cpu(), torch.ones(8))
    assert targets.min() >= 0.1 / 8 - 1e-7


def test_pool_fields_are_fixed_size():
    fields = get_recipe("diffusemix").pool_fields(32)
    assert fields["original"] == Field((3, 32, 32), "uint8") and fields["label"] == Field((), "int64")
