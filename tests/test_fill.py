"""onlineaug.fill: the push-pull pyramid fill and the mask dilation against their definitions."""

import math

import pytest
import torch

from onlineaug.fill import default_dilation, dilate, fill_holes, push_pull_fill


def disc(size, cy, cx, radius):
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return (y - cy) ** 2 + (x - cx) ** 2 <= radius**2


@pytest.mark.parametrize("shape", [(40, 40), (37, 23), (1, 9)])
def test_a_hole_in_a_constant_image_is_filled_with_that_constant_exactly(shape):
    h, w = shape
    g = torch.Generator().manual_seed(0)
    hole = torch.rand((2, h, w), generator=g) < 0.6
    hole[:, 0, 0] = False  # at least one known pixel
    colour = torch.tensor([[17, 200, 93], [255, 0, 128]], dtype=torch.uint8)
    image = colour[:, :, None, None].expand(2, 3, h, w).contiguous()
    garbage = torch.where(hole[:, None], torch.randint(0, 256, image.shape, generator=g, dtype=torch.uint8), image)
    assert torch.equal(fill_holes(garbage, hole), image)


def test_a_hole_inside_a_constant_region_takes_the_region_value():
    # a 64 px image: a constant 60 px square region (value 77) around a hole, noise only in a 2 px border;
    # the first pyramid levels that see known pixels see only the region, so the hole is exactly 77
    size = 64
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (1, 3, size, size), generator=g, dtype=torch.uint8)
    image[:, :, 2:-2, 2:-2] = 77
    hole = disc(size, 32, 32, 6)[None]
    out = fill_holes(image, hole)
    assert torch.equal(out[0][:, hole[0]], torch.full((3, int(hole.sum())), 77, dtype=torch.uint8))


def test_values_outside_the_hole_are_untouched_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    image = torch.randn((3, 4, 31, 47), generator=g) * 100
    known = (torch.rand((3, 1, 31, 47), generator=g) > 0.3).float()
    out = push_pull_fill(image, known)
    assert torch.equal(out[known.bool().expand_as(out)], image[known.bool().expand_as(image)])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("radius", [4, 8, 16])
def test_a_linear_ramp_is_continued_within_tolerance(radius):
    size = 64
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    ramp = (2.0 * x + 1.0 * y)[None, None]
    hole = disc(size, 30.5, 34.5, radius)[None, None]
    out = push_pull_fill(ramp, (~hole).float())
    error = (out - ramp).abs()[hole]
    spread = float(ramp[hole].max() - ramp[hole].min())
    # the fill is smooth and close to the plane: the error is a fraction of the ramp's rise across the hole
    assert float(error.max()) <= 0.16 * spread
    assert float(error.mean()) <= 0.06 * spread
    # and it is monotone along x through the hole's centre row, like the ramp
    row = out[0, 0, 30, 34 - radius + 1:34 + radius]
    assert bool((row[1:] > row[:-1]).all())


def test_soft_weights_blend_between_the_value_and_the_fill():
    image = torch.zeros((1, 1, 8, 8))
    image[..., :, :4] = 10.0
    weight = torch.ones((1, 1, 8, 8))
    weight[..., 2, 2] = 0.25
    out = push_pull_fill(image, weight)
    # the pixel keeps 1/4 of its own value and takes 3/4 of the fill of its neighbourhood (all 10 there)
    assert out[0, 0, 2, 2].item() == pytest.approx(10.0)
    image[..., 2, 2] = 2.0
    out = push_pull_fill(image, weight)
    upsampled = (out[0, 0, 2, 2].item() - 0.25 * 2.0) / 0.75
    assert 9.0 < upsampled <= 10.0 + 1e-5


def test_an_image_without_known_pixels_fills_with_zero():
    out = push_pull_fill(torch.full((1, 3, 5, 6), 9.0), torch.zeros((1, 1, 5, 6)))
    assert torch.equal(out, torch.zeros((1, 3, 5, 6)))


@pytest.mark.parametrize("radius", [0, 1, 2.5, 4, 7.9])
def test_dilation_covers_exactly_the_pixels_within_the_euclidean_radius(radius):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand((2, 29, 35), generator=g) < 0.01
    mask[1] = False
    mask[1, 0, 34] = True  # a corner pixel: the disc is cut by the frame
    out = dilate(mask, radius)
    y, x = torch.meshgrid(torch.arange(29.0), torch.arange(35.0), indexing="ij")
    points = torch.stack([y.flatten(), x.flatten()], 1)
    for i in range(2):
        seeds = points[mask[i].flatten()]
        nearest = torch.cdist(points, seeds).min(1).values.view(29, 35)
        assert torch.equal(out[i], nearest <= radius + 1e-6)


def test_default_dilation_is_two_percent_of_the_side_at_least_two_pixels():
    assert default_dilation(64) == 2.0 and default_dilation(100) == 2.0
    assert default_dilation(448) == pytest.approx(8.96) and default_dilation(512) == pytest.approx(10.24)


@pytest.mark.parametrize("call, message", [
    (lambda: dilate(torch.zeros(3, 4), 1), r"mask must be a bool tensor \(n, H, W\)"),
    (lambda: dilate(torch.zeros(1, 3, 4, dtype=torch.bool), -1), "radius must be a finite number >= 0"),
    (lambda: dilate(torch.zeros(1, 3, 4, dtype=torch.bool), math.inf), "radius must be a finite number >= 0"),
    (lambda: push_pull_fill(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.ones(1, 1, 4, 4)),
     r"image must be a float tensor \(n, C, H, W\)"),
    (lambda: push_pull_fill(torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)),
     r"weight must be a float tensor of shape \(1, 1, 4, 4\)"),
    (lambda: fill_holes(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool)), "image must be uint8"),
    (lambda: fill_holes(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, 4, 5, dtype=torch.bool)),
     r"hole must be a bool tensor of shape \(1, 4, 4\)"),
])
def test_bad_arguments_say_what_is_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
