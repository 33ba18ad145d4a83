"""pixel_mix: kernel vs reference, the Mixup formula, uint8 rounding, bad input."""
import pytest
import torch

from kernel_testing import SHAPES, assert_close, count_kernel_launches, generator, rand_uint8

from onlineaug.kernels import pixel_mix, pixel_mix_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]


def sample_inputs(shape, dtype, device, seed=0):
    g = generator(device, seed)
    images = rand_uint8(shape, g).to(dtype)
    if dtype.is_floating_point:
        images = images / 255
    partner = torch.randperm(shape[0], generator=g, device=device)
    lam = torch.rand(shape[0], generator=g, device=device)
    lam[0] = 1.0  # the kernel skips reading the partner there
    return images, partner, lam


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference(device, shape, dtype):
    images, partner, lam = sample_inputs(shape, dtype, device)
    before = images.clone()
    out = pixel_mix(images, partner, lam, backend="triton")
    assert out.dtype == dtype and out.shape == images.shape
    assert_close(out, pixel_mix_reference(images, partner, lam))
    assert torch.equal(images, before)


def test_auto_runs_the_kernel_on_cuda_and_the_reference_elsewhere(device, monkeypatch):
    launches = count_kernel_launches(monkeypatch)
    images, partner, lam = sample_inputs((7, 3, 64, 33), torch.float32, device, seed=1)
    reference = pixel_mix_reference(images, partner, lam)
    auto = pixel_mix(images, partner, lam)
    if device.type == "cuda":
        assert launches == ["_pixel_mix_kernel"]
        assert_close(auto, reference)
    else:  # no kernel launched: the reference itself
        assert launches == [] and torch.equal(auto, reference)
    kernel = pixel_mix(images, partner, lam, backend="triton")  # Triton's interpreter on CPU
    assert launches[-1] == "_pixel_mix_kernel"
    assert_close(kernel, reference)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_formula(device, backend):
    g = generator(device, 2)
    images = torch.rand(4, 2, 5, 3, generator=g, device=device)
    partner = torch.tensor([1, 2, 3, 0], device=device)
    lam = torch.tensor([1.0, 0.0, 0.25, 0.5], device=device)
    out = pixel_mix(images, partner, lam, backend=backend)
    assert torch.equal(out[0], images[0])  # lam = 1: itself
    assert torch.equal(out[1], images[2])  # lam = 0: the partner
    assert_close(out[2], 0.25 * images[2] + 0.75 * images[3])
    assert_close(out[3], 0.5 * images[3] + 0.5 * images[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_uint8_rounds_half_up_and_clamps(device, backend):
    images = torch.tensor([0, 1, 255, 200], dtype=torch.uint8, device=device).view(4, 1, 1, 1)
    partner = torch.tensor([1, 0, 3, 2], device=device)
    lam = torch.tensor([0.5, 0.5, 1.5, 0.75], device=device)
    out = pixel_mix(images, partner, lam, backend=backend).flatten().cpu().tolist()
    # 0.5 -> 1 (half up), 0.5 -> 1, 1.5*255 - 0.5*200 = 282.5 -> 255 (clamped), 0.75*200 + 0.25*255 = 213.75 -> 214
    assert out == [1, 1, 255, 214]


def test_unchecked_bad_partner_poisons_float_output(device):
    images, _, lam = sample_inputs((3, 3, 17, 16), torch.float32, device)
    lam[:] = 0.5
    out = pixel_mix(images, torch.tensor([0, 7, 1], device=device), lam, backend="triton", validate=False)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda i, p, l: (i[0], p, l), ValueError, r"images has shape \(3, 17, 16\), expected \(B, C, H, W\)"),
        (lambda i, p, l: (i.to(torch.int32), p, l), TypeError, r"images has dtype torch.int32, expected"),
        (lambda i, p, l: (i, p, l.to(torch.float64)), TypeError, r"lam has dtype torch.float64, expected torch.float32"),
        (lambda i, p, l: (i, p, l[:2]), ValueError, r"lam has shape \(2,\), expected \(B,\) = \(3,\)"),
        (lambda i, p, l: (i, torch.tensor([0, 1, 3], device=p.device), l), ValueError,
         r"partner\[2\] = 3 is out of range; expected 0 <= partner < 3"),
        (lambda i, p, l: (i, p, torch.tensor([0.5, float("nan"), 0.5], device=l.device)), ValueError,
         r"lam has non-finite values"),
        (lambda i, p, l: (i[:, :, ::2], p, l), ValueError, r"images .* is not contiguous"),
        (lambda i, p, l: (i, p, l.to("meta")), ValueError, r"lam is on meta but images is on"),
    ],
)
def test_bad_input(device, make, error, match):
    images, partner, lam = sample_inputs((3, 3, 17, 16), torch.float32, device)
    with pytest.raises(error, match=match):
        pixel_mix(*make(images, partner, lam), validate=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_gives_the_same_bits_and_reuses_only_float32_images_on_the_torch_path(device, dtype):
    images, partner, lam = sample_inputs((6, 3, 9, 7), dtype, device, seed=3)
    partner = torch.tensor([5, 0, 1, 2, 3, 4], device=device)  # every row is someone's partner
    before = images.clone()
    expected = (lam.view(-1, 1, 1, 1) * before.float() + (1 - lam.view(-1, 1, 1, 1)) * before[partner].float())
    if dtype == torch.uint8:
        expected = torch.floor(expected + 0.5).clamp(0, 255)
    expected = expected.to(dtype)
    out = pixel_mix(images, partner, lam, backend="torch", inplace=True)
    assert torch.equal(out, expected)  # partners gathered before any row was overwritten
    if dtype == torch.float32:
        assert out.data_ptr() == images.data_ptr()  # the caller's batch holds the result
    else:
        assert out.data_ptr() != images.data_ptr() and torch.equal(images, before)  # a float32 copy was mixed
    kernel = pixel_mix(before.clone(), partner, lam, backend="triton", inplace=True)  # ignored: a new tensor
    assert_close(kernel, expected)


def test_inplace_keeps_autograd():
    images = torch.rand(4, 3, 5, 5, requires_grad=True)
    lam = torch.tensor([1.0, 0.0, 0.25, 0.5])
    out = pixel_mix(images, torch.tensor([1, 2, 3, 0]), lam, backend="torch", inplace=True)
    out.sum().backward()
    # d/dx_b of sum(lam_b x_b + (1 - lam_b) x_{p(b)}): lam_b plus (1 - lam_a) for the a with p(a) = b
    weight = lam + (1 - lam[[3, 0, 1, 2]])
    assert torch.allclose(images.grad, weight.view(-1, 1, 1, 1).expand_as(images))
