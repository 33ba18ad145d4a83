"""concat_blend_normalize: kernel vs reference, the reference vs the DiffuseMix formula, bad input."""
import pytest
import torch

from kernel_testing import FLOAT_DTYPES, SHAPES, assert_close, count_kernel_launches, generator, mean_std, rand_uint8

from onlineaug.kernels import (
    SPLIT_LEFT_RIGHT,
    SPLIT_NONE,
    SPLIT_TOP_BOTTOM,
    concat_blend_normalize,
    concat_blend_normalize_reference,
    smooth_mask_reference,
)


def sample_inputs(shape, device, seed=0, num_fractals=3):
    """Images and per-sample parameters, drawn with an explicit generator on ``device``."""
    g = generator(device, seed)
    b, c, h, w = shape
    params = dict(
        split=torch.randint(0, 3, (b,), generator=g, device=device),
        flip=torch.rand(b, generator=g, device=device) < 0.5,
        # some hard seams (0), some ramps, some ramps wider than the image
        blend_width=torch.where(torch.rand(b, generator=g, device=device) < 0.3, 0.0,
                                torch.rand(b, generator=g, device=device) * 1.5 * max(h, w)),
        lam=torch.where(torch.rand(b, generator=g, device=device) < 0.3, 0.0,
                        torch.rand(b, generator=g, device=device)),
        fractal_index=torch.randint(0, num_fractals, (b,), generator=g, device=device),
    )
    if b >= 3:  # every split code at least once
        params["split"][:3] = torch.tensor([SPLIT_NONE, SPLIT_TOP_BOTTOM, SPLIT_LEFT_RIGHT], device=device)
    mean, std = mean_std(device)
    images = (rand_uint8(shape, g), rand_uint8(shape, g), rand_uint8((num_fractals, c, h, w), g))
    return images, dict(params, mean=mean, std=std)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
def test_kernel_matches_reference(device, shape, out_dtype):
    (orig, gen, frac), params = sample_inputs(shape, device)
    out = concat_blend_normalize(orig, gen, frac, **params, out_dtype=out_dtype, backend="triton")
    ref = concat_blend_normalize_reference(orig, gen, frac, **params, out_dtype=out_dtype)
    assert out.shape == shape and out.dtype == out_dtype and out.device == orig.device
    assert_close(out, ref)


def test_auto_runs_the_kernel_on_cuda_and_the_reference_elsewhere(device, monkeypatch):
    launches = count_kernel_launches(monkeypatch)
    (orig, gen, frac), params = sample_inputs((3, 3, 17, 16), device, seed=1)
    reference = concat_blend_normalize_reference(orig, gen, frac, **params)
    auto = concat_blend_normalize(orig, gen, frac, **params)
    if device.type == "cuda":
        assert launches == ["_concat_blend_kernel"]
        assert_close(auto, reference)
    else:  # no kernel launched: the reference itself
        assert launches == [] and torch.equal(auto, reference)
    kernel = concat_blend_normalize(orig, gen, frac, **params, backend="triton")  # Triton's interpreter on CPU
    assert launches[-1] == "_concat_blend_kernel"
    assert_close(kernel, reference)


# ---- the formula, evaluated by hand for one sample ----------------------------------------------

def direct_mask(h, w, split, flip, bw):
    """m[y][x] by the docstring formula, one pixel at a time in plain Python."""
    m = [[0.0] * w for _ in range(h)]
    if split == SPLIT_NONE:
        return m
    for y in range(h):
        for x in range(w):
            i, length = (y, h) if split == SPLIT_TOP_BOTTOM else (x, w)
            u = i + 0.5 - length / 2
            v = min(max(u / bw + 0.5, 0.0), 1.0) if bw > 0 else (1.0 if u >= 0 else 0.0)
            m[y][x] = 1.0 - v if flip else v
    return m


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "split, flip, bw",
    [
        (SPLIT_TOP_BOTTOM, False, 0.0),  # original over the first half of the rows, generated below
        (SPLIT_LEFT_RIGHT, False, 0.0),  # first half of the columns / second half
        (SPLIT_TOP_BOTTOM, False, 3.0),  # ramp
        (SPLIT_LEFT_RIGHT, True, 2.5),  # flipped ramp
        (SPLIT_TOP_BOTTOM, True, 0.0),  # flipped hard seam
        (SPLIT_NONE, True, 4.0),  # no split: flip and width ignored
    ],
)
@pytest.mark.parametrize("lam", [0.0, 0.25])
def test_one_sample_matches_formula(device, backend, split, flip, bw, lam):
    h, w = 6, 9
    g = generator(device, 3)
    orig, gen, frac = rand_uint8((1, 3, h, w), g), rand_uint8((1, 3, h, w), g), rand_uint8((2, 3, h, w), g)
    mean, std = mean_std(device)
    out = concat_blend_normalize(
        orig, gen, frac, split=torch.tensor([split], device=device), flip=torch.tensor([flip], device=device),
        blend_width=torch.tensor([bw], device=device), lam=torch.tensor([lam], device=device),
        fractal_index=torch.tensor([1], device=device), mean=mean, std=std, backend=backend)
    m = direct_mask(h, w, split, flip, bw)
    o, gg, f = orig[0].cpu().tolist(), gen[0].cpu().tolist(), frac[1].cpu().tolist()
    expected = torch.empty(1, 3, h, w)
    for c in range(3):
        for y in range(h):
            for x in range(w):
                hybrid = m[y][x] * gg[c][y][x] / 255 + (1 - m[y][x]) * o[c][y][x] / 255
                v = (1 - lam) * hybrid + lam * f[c][y][x] / 255
                expected[0, c, y, x] = (v - mean[c].item()) / std[c].item()
    assert_close(out.cpu(), expected)


def test_hard_seam_halves(device):
    """bw = 0: the first half comes from original, the second from generated (flip swaps them)."""
    h, w = 4, 6
    orig = torch.zeros(2, 3, h, w, dtype=torch.uint8, device=device)
    gen = torch.full((2, 3, h, w), 255, dtype=torch.uint8, device=device)
    frac = torch.zeros(1, 3, h, w, dtype=torch.uint8, device=device)
    zeros, ones = torch.zeros(3, device=device), torch.ones(3, device=device)
    out = concat_blend_normalize(
        orig, gen, frac, split=torch.tensor([SPLIT_TOP_BOTTOM, SPLIT_LEFT_RIGHT], device=device),
        flip=torch.tensor([False, True], device=device), blend_width=torch.zeros(2, device=device),
        lam=torch.zeros(2, device=device), fractal_index=torch.zeros(2, dtype=torch.int64, device=device),
        mean=zeros, std=ones, backend="triton").cpu()
    expected = torch.zeros(2, 3, h, w)
    expected[0, :, h // 2:] = 1  # top/bottom: generated below the seam
    expected[1, :, :, : w // 2] = 1  # left/right flipped: generated on the left
    assert_close(out, expected)


def test_smooth_mask_values():
    # L = 4: u = -1.5, -0.5, 0.5, 1.5; bw = 2 gives u / 2 + 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamp
    m = smooth_mask_reference(4, 3, SPLIT_TOP_BOTTOM, False, 2.0)
    assert m.shape == (1, 1, 4, 3) and m.dtype == torch.float32
    assert m[0, 0, :, 0].tolist() == [0.0, 0.25, 0.75, 1.0]
    assert (m == m[:, :, :, :1]).all()  # constant along W
    m = smooth_mask_reference(3, 5, "left_right", True, 0.0)  # hard seam at u >= 0: x >= 2.5 - 0.5
    assert m[0, 0, 0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert (smooth_mask_reference(3, 5, SPLIT_NONE, True, 1.0) == 0).all()
    batch = smooth_mask_reference(4, 4, torch.tensor([0, 1, 2]), torch.tensor([False, False, True]),
                                  torch.tensor([0.0, 2.0, 2.0]))
    assert batch.shape == (3, 1, 4, 4)
    assert batch[2, 0, 0].tolist() == [1.0, 0.75, 0.25, 0.0]


# ---- unchecked bad values on the Triton path ----------------------------------------------------

def test_unchecked_bad_fractal_index_poisons_only_that_sample(device):
    (orig, gen, frac), params = sample_inputs((3, 3, 17, 16), device)
    params["fractal_index"] = torch.tensor([0, 3, 1], device=device)  # 3 fractals: index 3 is out of range
    out = concat_blend_normalize(orig, gen, frac, **params, backend="triton", validate=False)
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


# ---- bad input ----------------------------------------------------------------------------------

def call(device, **overrides):
    (orig, gen, frac), params = sample_inputs((2, 3, 9, 8), device)
    kwargs = dict(original=orig, generated=gen, fractals=frac, **params)
    kwargs.update(overrides)
    orig, gen, frac = kwargs.pop("original"), kwargs.pop("generated"), kwargs.pop("fractals")
    return concat_blend_normalize(orig, gen, frac, **kwargs)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (lambda d: dict(generated=torch.zeros(2, 3, 9, 7, dtype=torch.uint8, device=d)), ValueError,
         r"generated has shape \(2, 3, 9, 7\), expected \(B, 3, H, W\) = \(2, 3, 9, 8\)"),
        (lambda d: dict(original=torch.zeros(2, 4, 9, 8, dtype=torch.uint8, device=d)), ValueError,
         r"original has shape \(2, 4, 9, 8\)"),
        (lambda d: dict(fractals=torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=d)), ValueError,
         r"fractals has shape \(1, 3, 8, 8\), expected \(F, 3, H, W\)"),
        (lambda d: dict(fractals=torch.zeros(0, 3, 9, 8, dtype=torch.uint8, device=d)), ValueError,
         r"fractals is empty"),
        (lambda d: dict(original=torch.zeros(2, 3, 9, 8, device=d)), TypeError,
         r"original has dtype torch.float32, expected torch.uint8"),
        (lambda d: dict(split=torch.zeros(2, dtype=torch.int32, device=d)), TypeError,
         r"split has dtype torch.int32, expected torch.int64"),
        (lambda d: dict(flip=torch.zeros(2, dtype=torch.uint8, device=d)), TypeError, r"flip has dtype"),
        (lambda d: dict(lam=torch.zeros(3, device=d)), ValueError, r"lam has shape \(3,\), expected \(B,\) = \(2,\)"),
        (lambda d: dict(split=torch.tensor([0, 3], device=d)), ValueError,
         r"split\[1\] = 3 is out of range; expected 0 <= split < 3"),
        (lambda d: dict(fractal_index=torch.tensor([0, 3], device=d)), ValueError,
         r"fractal_index\[1\] = 3 is out of range; expected 0 <= fractal_index < 3"),
        (lambda d: dict(fractal_index=torch.tensor([-1, 0], device=d)), ValueError,
         r"fractal_index\[0\] = -1 is out of range"),
        (lambda d: dict(lam=torch.tensor([0.5, 1.5], device=d)), ValueError, r"lam\[1\] = 1.5 is outside \[0.0, 1.0\]"),
        (lambda d: dict(std=torch.tensor([0.2, 0.0, 0.2], device=d)), ValueError, r"std=.* must be finite and non-zero"),
        (lambda d: dict(mean=torch.zeros(4, device=d)), ValueError, r"mean has shape \(4,\), expected \(3,\)"),
        (lambda d: dict(out_dtype=torch.float64), TypeError, r"out_dtype=torch.float64 is not supported"),
        (lambda d: dict(backend="cuda"), ValueError, r"backend='cuda' is not one of"),
        (lambda d: dict(original=torch.zeros(2, 9, 8, 3, dtype=torch.uint8, device=d).permute(0, 3, 1, 2)),
         ValueError, r"original .* is not contiguous; pass original.contiguous\(\)"),
        (lambda d: dict(lam=torch.zeros(4, device=d)[::2]), ValueError, r"lam .* is not contiguous"),
        (lambda d: dict(generated=torch.zeros(2, 3, 9, 8, dtype=torch.uint8, device="meta")), ValueError,
         r"generated is on meta but original is on"),
    ],
)
def test_bad_input(device, overrides, error, match):
    with pytest.raises(error, match=match):
        call(device, validate=True, **overrides(device))
