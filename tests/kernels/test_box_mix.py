"""box_mix / sample_boxes: exact equality with the reference, kept_fraction by pixel count, bad input."""
import math

import pytest
import torch

from kernel_testing import SHAPES, assert_close, count_kernel_launches, generator, rand_uint8

from onlineaug.kernels import box_mix, box_mix_reference, sample_boxes

DTYPES = [torch.uint8, torch.float32, torch.float16, torch.bfloat16]


def sample_inputs(shape, dtype, device, seed=0):
    g = generator(device, seed)
    b, _, h, w = shape
    images = rand_uint8(shape, g).to(dtype)
    if dtype.is_floating_point:
        images = images / 255
    partner = torch.randperm(b, generator=g, device=device)
    lam = torch.rand(b, generator=g, device=device)
    boxes = sample_boxes(b, h, w, lam, generator=g)  # often past the borders
    return images, partner, boxes


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference_exactly(device, shape, dtype):
    images, partner, boxes = sample_inputs(shape, dtype, device)
    before = images.clone()
    mixed, kept = box_mix(images, partner, boxes, backend="triton")
    ref_mixed, ref_kept = box_mix_reference(images, partner, boxes)
    assert mixed.dtype == dtype and mixed.shape == images.shape
    assert torch.equal(mixed, ref_mixed)  # only copies pixels: exact
    assert_close(kept, ref_kept)
    assert torch.equal(images, before)  # not in place


def test_auto_runs_the_kernel_on_cuda_and_the_reference_elsewhere(device, monkeypatch):
    launches = count_kernel_launches(monkeypatch)
    images, partner, boxes = sample_inputs((7, 3, 64, 33), torch.float32, device, seed=1)
    ref_mixed, ref_kept = box_mix_reference(images, partner, boxes)
    mixed, kept = box_mix(images, partner, boxes)
    assert launches == (["_box_mix_kernel"] if device.type == "cuda" else [])  # elsewhere: the reference itself
    assert torch.equal(mixed, ref_mixed)  # only copies pixels: exact on either path
    assert_close(kept, ref_kept)
    mixed, kept = box_mix(images, partner, boxes, backend="triton")  # Triton's interpreter on CPU
    assert launches[-1] == "_box_mix_kernel"
    assert torch.equal(mixed, ref_mixed)
    assert_close(kept, ref_kept)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kept_fraction_is_the_pixel_count(device, backend):
    """With every pixel of every image distinct, kept_fraction = #pixels still equal to images[b] / HW."""
    b, c, h, w = 6, 2, 13, 11
    images = torch.arange(b * c * h * w, dtype=torch.float32, device=device).view(b, c, h, w)
    partner = torch.tensor([1, 0, 3, 2, 5, 4], device=device)
    boxes = torch.tensor([
        [2, 3, 7, 9],  # inside
        [-4, -5, 3, 2],  # past the top-left corner
        [10, 8, 20, 30],  # past the bottom-right corner
        [-1, -1, 100, 100],  # covers everything
        [5, 5, 5, 9],  # empty (y0 == y1)
        [8, 6, 3, 2],  # empty (inverted)
    ], device=device)
    mixed, kept = box_mix(images, partner, boxes, backend=backend)
    own = (mixed == images).all(dim=1).sum(dim=(1, 2)).to(torch.float32) / (h * w)
    from_partner = (mixed == images[partner]).all(dim=1).sum(dim=(1, 2)).to(torch.float32) / (h * w)
    assert_close(kept, own)
    assert_close(1 - kept, from_partner)
    expected = [1 - 5 * 6 / (h * w), 1 - 3 * 2 / (h * w), 1 - 3 * 3 / (h * w), 0.0, 1.0, 1.0]
    assert_close(kept.cpu(), torch.tensor(expected))


def test_box_pixels_come_from_partner(device):
    c, h, w = 3, 5, 6
    images = torch.stack([torch.zeros(c, h, w), torch.ones(c, h, w)]).to(device)
    mixed, _ = box_mix(images, torch.tensor([1, 1], device=device), torch.tensor([[1, 2, 3, 5], [0, 0, 5, 6]],
                                                                                 device=device), backend="triton")
    expected = torch.zeros(c, h, w)
    expected[:, 1:3, 2:5] = 1
    assert torch.equal(mixed[0].cpu(), expected)
    assert torch.equal(mixed[1].cpu(), torch.ones(c, h, w))


def test_unchecked_bad_partner_poisons_kept_fraction(device):
    images, partner, boxes = sample_inputs((3, 3, 17, 16), torch.float32, device)
    _, kept = box_mix(images, torch.tensor([0, 5, 1], device=device), boxes, backend="triton", validate=False)
    assert torch.isnan(kept[1]) and torch.isfinite(kept[[0, 2]]).all()


# ---- sample_boxes -------------------------------------------------------------------------------

def test_sample_boxes_area_and_centre(device):
    g = generator(device, 5)
    h, w = 64, 48
    lam = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0], device=device)
    boxes = sample_boxes(5, h, w, lam, generator=g)
    assert boxes.dtype == torch.int64 and boxes.shape == (5, 4) and boxes.device == g.device
    for (y0, x0, y1, x1), l in zip(boxes.cpu().tolist(), lam.cpu().tolist()):
        cut_h, cut_w = math.floor(h * math.sqrt(1 - l)), math.floor(w * math.sqrt(1 - l))
        assert (y1 - y0, x1 - x0) == (cut_h, cut_w)
        assert 0 <= y0 + cut_h // 2 < h and 0 <= x0 + cut_w // 2 < w  # centre is a pixel of the image
    # lam = 1: an empty box
    assert boxes[4, 2] == boxes[4, 0] and boxes[4, 3] == boxes[4, 1]


def test_sample_boxes_is_reproducible(device):
    a = sample_boxes(8, 32, 32, 0.5, generator=generator(device, 7))
    b = sample_boxes(8, 32, 32, 0.5, generator=generator(device, 7))
    c = sample_boxes(8, 32, 32, 0.5, generator=generator(device, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_boxes_bad_input(device):
    g = generator(device)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample_boxes(4, 8, 8, 0.5, generator=None)
    with pytest.raises(ValueError, match=r"lam=1.5 must be a float in \[0, 1\]"):
        sample_boxes(4, 8, 8, 1.5, generator=g)
    with pytest.raises(ValueError, match=r"lam has shape \(3,\), expected \(batch_size,\) = \(4,\)"):
        sample_boxes(4, 8, 8, torch.full((3,), 0.5, device=device), generator=g)
    with pytest.raises(ValueError, match="height must be a positive int"):
        sample_boxes(4, 0, 8, 0.5, generator=g)


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda i, p, b: (i[0], p, b), ValueError, r"images has shape \(3, 17, 16\), expected \(B, C, H, W\)"),
        (lambda i, p, b: (i.to(torch.float64), p, b), TypeError, r"images has dtype torch.float64, expected"),
        (lambda i, p, b: (i, p.to(torch.int32), b), TypeError, r"partner has dtype torch.int32, expected torch.int64"),
        (lambda i, p, b: (i, p[:2], b), ValueError, r"partner has shape \(2,\), expected \(B,\) = \(3,\)"),
        (lambda i, p, b: (i, p, b[:, :3]), ValueError, r"boxes has shape \(3, 3\), expected \(B, 4\) = \(3, 4\)"),
        (lambda i, p, b: (i, torch.tensor([0, 3, 1], device=p.device), b), ValueError,
         r"partner\[1\] = 3 is out of range; expected 0 <= partner < 3"),
        (lambda i, p, b: (i, torch.tensor([0, -1, 1], device=p.device), b), ValueError, r"partner\[1\] = -1"),
        (lambda i, p, b: (i.transpose(2, 3), p, b), ValueError, r"images .* is not contiguous"),
        (lambda i, p, b: (i, p, b.t().contiguous().t()), ValueError, r"boxes .* is not contiguous"),
        (lambda i, p, b: (i, p.to("meta"), b), ValueError, r"partner is on meta but images is on"),
    ],
)
def test_bad_input(device, make, error, match):
    images, partner, boxes = sample_inputs((3, 3, 17, 16), torch.float32, device)
    with pytest.raises(error, match=match):
        box_mix(*make(images, partner, boxes), validate=True)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_reference_is_the_clipped_box_paste_bit_for_bit(dtype):
    # every byte value on both sides of the paste (the uint8 path is wrap-around arithmetic: 0 <- 255, 255 <- 0)
    values = torch.arange(256, dtype=torch.int64).reshape(4, 1, 8, 8).expand(4, 3, 8, 8)
    images = torch.cat([values, 255 - values]).to(dtype).contiguous()  # 8 samples
    if dtype.is_floating_point:
        images = images / 7 - 11  # inexact values: a + (b - a) would not give b back
    partner = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    boxes = torch.tensor([[-3, -3, 20, 20], [2, 3, 5, 7], [6, -2, 12, 3], [0, 0, 0, 0], [4, 4, 4, 9],
                          [-5, 5, 2, 15], [7, 7, 8, 8], [1, 0, 8, 8]])
    mixed, kept = box_mix_reference(images, partner, boxes)
    for b in range(8):
        y0, x0, y1, x1 = (int(v) for v in boxes[b])
        y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, 8), min(x1, 8)
        expected = images[b].clone()
        if y1 > y0 and x1 > x0:
            expected[:, y0:y1, x0:x1] = images[partner[b], :, y0:y1, x0:x1]
        assert torch.equal(mixed[b], expected), b
        assert kept[b].item() == 1 - max(y1 - y0, 0) * max(x1 - x0, 0) / 64
    assert mixed.dtype == dtype and mixed.is_contiguous()
