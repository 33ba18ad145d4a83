"""composite: kernel vs reference, reference vs affine_grid, visible fractions by pixel count, bad input."""
import pytest
import torch
import torch.nn.functional as F

from kernel_testing import FLOAT_DTYPES, SHAPES, assert_close, generator, mean_std, rand_uint8

from onlineaug.kernels import composite, composite_reference


def sample_inputs(shape, device, seed=0, bank=(4, 20, 13)):
    g = generator(device, seed)
    b, _, h, w = shape
    n, hf, wf = bank
    background = rand_uint8((b, 3, h, w), g)
    foregrounds = rand_uint8((n, 4, hf, wf), g)
    foregrounds[:, 3] = torch.where(foregrounds[:, 3] < 100, 0, foregrounds[:, 3])  # transparent areas too
    params = dict(
        fg_index=torch.randint(-1, n, (b, 2), generator=g, device=device),
        scale=torch.rand(b, 2, generator=g, device=device) + 0.2,
        center=(torch.rand(b, 2, 2, generator=g, device=device) * 1.4 - 0.2)
        * torch.tensor([h, w], dtype=torch.float32, device=device),
        flip=torch.rand(b, 2, generator=g, device=device) < 0.5,
    )
    params["fg_index"][0] = torch.tensor([0, 1], device=device)  # both layers used at least once
    return background, foregrounds, params


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
def test_kernel_matches_reference(device, shape, out_dtype):
    background, foregrounds, params = sample_inputs(shape, device)
    mean, std = mean_std(device)
    out, visible = composite(background, foregrounds, **params, mean=mean, std=std, out_dtype=out_dtype,
                             backend="triton")
    ref, ref_visible = composite_reference(background, foregrounds, **params, mean=mean, std=std,
                                           out_dtype=out_dtype)
    assert out.shape == (shape[0], 3, shape[2], shape[3]) and out.dtype == out_dtype
    assert_close(out, ref)
    assert_close(visible, ref_visible)


def test_kernel_matches_reference_without_normalize(device):
    background, foregrounds, params = sample_inputs((7, 3, 64, 33), device, seed=1)
    out, visible = composite(background, foregrounds, **params, backend="triton")
    ref, ref_visible = composite_reference(background, foregrounds, **params)
    assert_close(out, ref)
    assert_close(visible, ref_visible)
    assert 0 <= out.min() and out.max() <= 1


def test_auto_and_torch_backends_agree(device):
    background, foregrounds, params = sample_inputs((3, 3, 17, 16), device, seed=2)
    out, visible = composite(background, foregrounds, **params)
    ref, ref_visible = composite(background, foregrounds, **params, backend="torch")
    assert_close(out, ref)
    assert_close(visible, ref_visible)


def test_reference_equals_affine_grid_sample(device):
    """The sampling formula equals grid_sample over F.affine_grid with the documented theta."""
    background, foregrounds, params = sample_inputs((3, 3, 17, 16), device, seed=3)
    params["fg_index"][:, 1] = -1  # one layer: compare against a single grid_sample
    params["fg_index"][:, 0] = torch.tensor([0, 1, 2], device=device)
    out, _ = composite_reference(background, foregrounds, **params)

    b, _, h, w = background.shape
    s, cy, cx = params["scale"][:, 0], params["center"][:, 0, 0], params["center"][:, 0, 1]
    sign = torch.where(params["flip"][:, 0], -1.0, 1.0)
    zero = torch.zeros_like(s)
    theta = torch.stack([
        torch.stack([sign / s, zero, sign * (w - 2 * cx) / (s * w)], dim=1),
        torch.stack([zero, 1 / s, (h - 2 * cy) / (s * h)], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [b, 4, h, w], align_corners=False)
    fg = F.grid_sample(foregrounds[params["fg_index"][:, 0]].float() / 255, grid, mode="bilinear",
                       padding_mode="zeros", align_corners=False)
    a = fg[:, 3:]
    expected = a * fg[:, :3] + (1 - a) * background.float() / 255
    assert_close(out, expected)


# ---- visible fractions against pixel counts -----------------------------------------------------

def paste(canvas_rgb, canvas_a, fg, top, left):
    """Integer-aligned, one-to-one paste of a binary-alpha RGBA (4, hf, wf) uint8 tile, clipped."""
    _, h, w = canvas_rgb.shape
    _, hf, wf = fg.shape
    for y in range(max(top, 0), min(top + hf, h)):
        for x in range(max(left, 0), min(left + wf, w)):
            if fg[3, y - top, x - left] == 255:
                canvas_rgb[:, y, x] = fg[:3, y - top, x - left]
                canvas_a[y, x] = 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_visible_fractions_are_pixel_counts_with_occlusion(device, backend):
    g = generator("cpu", 4)
    h = w = 16
    hf = wf = 8
    background = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
    foregrounds = torch.randint(0, 256, (2, 4, hf, wf), generator=g, dtype=torch.uint8)
    foregrounds[:, 3] = torch.where(torch.rand(2, hf, wf, generator=g) < 0.6, 255, 0)  # binary alpha
    # scale * H = hf: one output pixel per foreground texel; integer centres: texel-aligned
    scale = torch.full((2, 2), hf / h)
    center = torch.tensor([
        [[6.0, 7.0], [9.0, 10.0]],  # sample 0: layer 1 overlaps and partly occludes layer 0
        [[3.0, 3.0], [2.0, 14.0]],  # sample 1: both layers partly outside the image
    ])
    flip = torch.tensor([[False, True], [True, False]])
    fg_index = torch.tensor([[0, 1], [1, 0]])

    out, visible = composite(background.to(device), foregrounds.to(device), fg_index.to(device),
                             scale.to(device), center.to(device), flip.to(device), backend=backend)

    for b in range(2):
        rgb, a1, a2 = background[b].clone(), torch.zeros(h, w), torch.zeros(h, w)
        for layer, alpha in ((0, a1), (1, a2)):
            fg = foregrounds[fg_index[b, layer]]
            if flip[b, layer]:
                fg = fg.flip(-1)
            cy, cx = (int(v) for v in center[b, layer])
            paste(rgb, alpha, fg, cy - hf // 2, cx - wf // 2)
        expected_visible = torch.tensor([(a1 * (1 - a2)).sum() / (h * w), a2.sum() / (h * w)])
        if b == 0:  # layer 1 really hides part of layer 0
            assert 0 < expected_visible[0] < a1.sum() / (h * w)
        else:  # both layers really lose texels at the border
            assert a1.sum() < (foregrounds[fg_index[b, 0], 3] == 255).sum()
            assert a2.sum() < (foregrounds[fg_index[b, 1], 3] == 255).sum()
        assert_close(visible[b].cpu(), expected_visible)
        assert_close(out[b].cpu(), rgb.to(torch.float32) / 255)


def test_empty_layers_return_the_background(device):
    background, foregrounds, params = sample_inputs((3, 3, 17, 16), device)
    params["fg_index"][:] = -1
    out, visible = composite(background, foregrounds, **params, backend="triton")
    assert_close(out, background.to(torch.float32) / 255)
    assert (visible == 0).all()


def test_unchecked_bad_fg_index_poisons_only_that_sample(device):
    background, foregrounds, params = sample_inputs((3, 3, 17, 16), device)
    params["fg_index"] = torch.tensor([[0, -1], [1, 4], [-1, 2]], device=device)  # 4 foregrounds
    out, _ = composite(background, foregrounds, **params, backend="triton", validate=False)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (lambda d: dict(foregrounds=torch.zeros(2, 3, 8, 8, dtype=torch.uint8, device=d)), ValueError,
         r"foregrounds has shape \(2, 3, 8, 8\), expected \(N, 4, Hf, Wf\) RGBA"),
        (lambda d: dict(background=torch.zeros(3, 3, 17, 16, device=d)), TypeError,
         r"background has dtype torch.float32, expected torch.uint8"),
        (lambda d: dict(fg_index=torch.tensor([[0, 4], [0, 0], [0, 0]], device=d)), ValueError,
         r"fg_index\[0, 1\] = 4 is out of range; expected 0 <= fg_index < 4 or -1"),
        (lambda d: dict(fg_index=torch.tensor([[0, 0], [-2, 0], [0, 0]], device=d)), ValueError,
         r"fg_index\[1, 0\] = -2 is out of range"),
        (lambda d: dict(fg_index=torch.zeros(3, dtype=torch.int64, device=d)), ValueError,
         r"fg_index has shape \(3,\), expected \(B, 2\) = \(3, 2\)"),
        (lambda d: dict(scale=torch.zeros(3, 2, device=d)), ValueError, r"scale must be finite and > 0"),
        (lambda d: dict(center=torch.zeros(3, 2, device=d)), ValueError,
         r"center has shape \(3, 2\), expected \(B, 2, 2\)"),
        (lambda d: dict(flip=torch.zeros(3, 2, dtype=torch.uint8, device=d)), TypeError,
         r"flip has dtype torch.uint8, expected torch.bool"),
        (lambda d: dict(mean=torch.zeros(3, device=d)), ValueError, r"pass both mean and std"),
        (lambda d: dict(out_dtype=torch.uint8), TypeError, r"out_dtype=torch.uint8 is not supported"),
        (lambda d: dict(scale=torch.ones(2, 3, device=d).t()), ValueError, r"scale .* is not contiguous"),
        (lambda d: dict(backend=None), ValueError, r"backend=None is not one of"),
    ],
)
def test_bad_input(device, overrides, error, match):
    background, foregrounds, params = sample_inputs((3, 3, 17, 16), device)
    kwargs = dict(background=background, foregrounds=foregrounds, **params, validate=True)
    kwargs.update(overrides(device))
    with pytest.raises(error, match=match):
        composite(kwargs.pop("background"), kwargs.pop("foregrounds"), kwargs.pop("fg_index"), kwargs.pop("scale"),
                  kwargs.pop("center"), kwargs.pop("flip"), **kwargs)
