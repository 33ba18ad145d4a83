"""onlineaug.ops against the papers' formulas; parameter sampling is explicit and deterministic."""

import math

import pytest
import torch

from onlineaug import ops
from onlineaug.seeding import derive_seed, sample_beta, sample_gamma


def hand_mask(height, width, split, flip, blend_width):
    """Direct evaluation: 0 over the first half, 1 over the second, a linear ramp of blend_width px centred."""
    length = height if split == "top_bottom" else width
    values = []
    for i in range(length):
        distance = (i + 0.5) - length / 2  # pixel centre relative to the middle
        if blend_width == 0:
            w = 1.0 if distance >= 0 else 0.0
        else:
            w = min(1.0, max(0.0, distance / blend_width + 0.5))
        values.append(1 - w if flip else w)
    line = torch.tensor(values)
    return line[:, None].expand(height, width) if split == "top_bottom" else line[None, :].expand(height, width)


@pytest.mark.parametrize("split", ["top_bottom", "left_right"])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("blend_width", [0.0, 1.0, 5.0, 20.0])
@pytest.mark.parametrize("height, width", [(64, 64), (31, 47)])
def test_smooth_mask_matches_the_formula(split, flip, blend_width, height, width):
    mask = ops.smooth_mask(height, width, split=split, flip=flip, blend_width=blend_width)
    torch.testing.assert_close(mask, hand_mask(height, width, split, flip, blend_width), rtol=0, atol=1e-6)


def test_smooth_mask_halves_and_ramp():
    mask = ops.smooth_mask(64, 64, split="top_bottom", blend_width=20)
    assert (mask[:22] == 0).all() and (mask[42:] == 1).all()  # ramp spans rows 22..41 (centres 22.5..41.5)
    ramp = mask[22:42, 0]
    assert (ramp.diff() > 0).all()
    torch.testing.assert_close(ramp.diff(), torch.full((19,), 1 / 20))
    torch.testing.assert_close(mask[31, 0] + mask[32, 0], torch.tensor(1.0))  # symmetric about the middle
    hard = ops.smooth_mask(64, 64, split="left_right", blend_width=0)
    assert (hard[:, :32] == 0).all() and (hard[:, 32:] == 1).all()
    flipped = ops.smooth_mask(64, 64, split="left_right", flip=True, blend_width=0)
    torch.testing.assert_close(flipped, 1 - hard)


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="diagonal"), r"split must be one of \['left_right', 'top_bottom'\], got 'diagonal'"),
    (dict(split="top_bottom", blend_width=-1), r"blend_width must be >= 0 pixels, got -1"),
])
def test_smooth_mask_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.smooth_mask(8, 8, **kwargs)


def test_concat_blend_is_the_papers_equation():
    g = torch.Generator().manual_seed(0)
    original, generated, fractal = (torch.rand(4, 3, 9, 11, generator=g) for _ in range(3))
    mask = ops.smooth_mask(9, 11, split="left_right", blend_width=3)
    lam = torch.tensor([0.0, 0.2, 0.5, 1.0])
    out = ops.concat_blend(original, generated, mask, fractal, lam)
    for b in range(4):
        expected = (1 - lam[b]) * (mask * generated[b] + (1 - mask) * original[b]) + lam[b] * fractal[b]
        torch.testing.assert_close(out[b], expected)
    # a float lam and a per-sample (B,1,H,W) mask give the same
    per_sample = mask.expand(4, 1, 9, 11)
    torch.testing.assert_close(ops.concat_blend(original, generated, per_sample, fractal, 0.2),
                               ops.concat_blend(original, generated, mask, fractal, torch.full((4,), 0.2)))


def test_concat_blend_refuses_uint8():
    x = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="concat_blend works on float images"):
        ops.concat_blend(x, x, torch.zeros(4, 4), x, 0.2)


def test_concat_blend_normalize_equals_the_composed_formula(device):
    g = torch.Generator().manual_seed(1)
    original, generated = (torch.randint(0, 256, (6, 3, 16, 20), generator=g, dtype=torch.uint8) for _ in range(2))
    fractals = torch.randint(0, 256, (5, 3, 16, 20), generator=g, dtype=torch.uint8)
    active = torch.tensor([True, False, True, True, False, True])
    params = ops.sample_concat_blend_params(active, splits=("top_bottom", "left_right"), flips=(False, True),
                                            blend_width=4.0, lam=0.2, num_fractals=5, generator=g)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    out = ops.concat_blend_normalize(original.to(device), generated.to(device), fractals.to(device),
                                     ops.ConcatBlendParams(**{k: v.to(device) for k, v in vars(params).items()}),
                                     mean=mean.to(device), std=std.to(device)).cpu()
    names = {v: k for k, v in ops.SPLITS.items()}
    for b in range(6):
        o, gen = original[b].float() / 255, generated[b].float() / 255
        if not active[b]:
            assert params.split[b] == 0 and params.lam[b] == 0
            expected = o
        else:
            mask = ops.smooth_mask(16, 20, split=names[int(params.split[b])], flip=bool(params.flip[b]), blend_width=4)
            expected = ops.concat_blend(o[None], gen[None], mask, fractals[params.fractal_index[b]][None].float() / 255,
                                        0.2)[0]
        torch.testing.assert_close(out[b], (expected - mean[:, None, None]) / std[:, None, None], rtol=1e-5, atol=1e-5)


def test_parameter_sampling_is_deterministic_by_seed():
    active = torch.ones(64, dtype=torch.bool)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        blend = ops.sample_concat_blend_params(active, splits=("top_bottom", "left_right"), flips=(False, True),
                                               blend_width=5, lam=0.2, num_fractals=16, generator=g)
        box = ops.sample_box_mix_params(active, 32, 32, alpha=1.0, generator=g)
        pix = ops.sample_pixel_mix_params(active, alpha=1.0, generator=g)
        return [*vars(blend).values(), *vars(box).values(), *vars(pix).values()]

    for a, b in zip(draw(3), draw(3)):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(draw(3), draw(4)))
    blend = draw(3)[:5]
    assert set(blend[0].tolist()) == {ops.SPLITS["top_bottom"], ops.SPLITS["left_right"]}  # all masks are drawn
    assert set(blend[1].tolist()) == {False, True}


def test_inactive_samples_are_left_alone():
    active = torch.tensor([True, False] * 8)
    g = torch.Generator().manual_seed(0)
    box = ops.sample_box_mix_params(active, 32, 32, alpha=1.0, generator=g)
    assert (box.boxes[~active] == 0).all()
    pix = ops.sample_pixel_mix_params(active, alpha=1.0, generator=g)
    assert (pix.lam[~active] == 1).all()


def test_derived_seeds_differ_by_role_rank_and_epoch():
    seeds = {derive_seed(0, role, rank, epoch) for role in ("a", "b") for rank in (0, 1) for epoch in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, "a") == derive_seed(0, "a")


@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.2, 0.2), (2.0, 5.0)])
def test_beta_sampler_matches_the_distribution_moments(alpha, beta):
    g = torch.Generator().manual_seed(0)
    x = sample_beta(alpha, beta, 200_000, g)
    assert ((x >= 0) & (x <= 1)).all()
    mean = alpha / (alpha + beta)
    var = alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1))
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / x.numel()) + 1e-3
    assert abs(x.var().item() - var) < 0.03 * var + 1e-4


@pytest.mark.parametrize("alpha", [0.01, 0.05])
def test_beta_sampler_stays_finite_for_small_alpha(alpha):
    x = sample_beta(alpha, alpha, 200_000, torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all() and ((x >= 0) & (x <= 1)).all()
    assert abs(x.mean().item() - 0.5) < 0.01  # symmetric


def test_gamma_sampler_rejects_a_bad_shape():
    with pytest.raises(ValueError, match="gamma shape must be > 0"):
        sample_gamma(0.0, 4, torch.Generator())
