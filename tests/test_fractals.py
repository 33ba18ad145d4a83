import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from onlineaug.fractals import FractalBank, _render_ifs, _sample_ifs


def _generator(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


def _background_colour(image: torch.Tensor) -> torch.Tensor:
    """The most frequent colour of a (3, H, W) uint8 image."""
    colours, counts = image.flatten(1).T.unique(dim=0, return_counts=True)
    return colours[counts.argmax()]


def test_procedural_is_deterministic_by_seed(device):
    a = FractalBank.procedural(12, 48, seed=5, device=device)
    b = FractalBank.procedural(12, 48, seed=5, device=device)
    c = FractalBank.procedural(12, 48, seed=6, device=device)
    assert torch.equal(a.images, b.images)
    assert all(not torch.equal(a.images[i], c.images[i]) for i in range(12))


@pytest.mark.parametrize("count, size", [(1, 8), (7, 33), (16, 64)])
def test_procedural_shape_dtype_device(device, count, size):
    bank = FractalBank.procedural(count, size, device=device)
    assert len(bank) == count and bank.size == size
    assert bank.images.shape == (count, 3, size, size) and bank.images.dtype == torch.uint8
    assert bank.images.device.type == device.type and bank.device == bank.images.device


def test_procedural_fractals_are_not_trivial(device):
    bank = FractalBank.procedural(32, 64, seed=1, device=device)
    images = bank.images.cpu()
    for i, image in enumerate(images):
        lit = (image != _background_colour(image)[:, None, None]).any(dim=0).float().mean().item()
        assert 0.05 <= lit <= 0.85, f"fractal {i} lights {lit:.3f} of its pixels"
        assert image.flatten(1).T.unique(dim=0).shape[0] >= 20, f"fractal {i} has too few colours"
        # Dark background, bright fractal (as the PixMix fractals).
        assert _background_colour(image).max() <= 0.2 * 255 + 1
        assert image.amax() >= 200
    # The fractals differ from each other.
    assert images.flatten(1).unique(dim=0).shape[0] == 32


def test_sampled_maps_are_contractions_picked_in_proportion_to_det(device):
    g = _generator(device, 3)
    maps, thresholds, ok = _sample_ifs(256, g)
    assert ok.all()
    linear = maps[..., :2].double()  # (B, 4, 2, 2)
    assert (torch.linalg.matrix_norm(linear, ord=2) < 1).all()
    assert ((maps >= -1) & (maps <= 1)).all()
    num_maps = (thresholds < 1.5).sum(dim=1) + 1
    assert set(num_maps.tolist()) == {2, 3, 4}
    # Map k is picked when u ~ U(0, 1) exceeds exactly k thresholds, so with the thresholds capped at 1,
    # P(k) = threshold[k] - threshold[k - 1], which must be |det A_k| / sum |det A_j| (up to the 1e-3 floor)
    # for the used maps and 0 for the others.
    det = torch.linalg.det(linear).abs().float() + 1e-3
    used = torch.arange(4, device=device) < num_maps[:, None]
    expected = torch.where(used, det, 0) / torch.where(used, det, 0).sum(dim=1, keepdim=True)
    capped = thresholds.clamp_max(1.0)
    probs = torch.diff(capped, dim=1, prepend=torch.zeros_like(capped[:, :1]))
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)


def test_chaos_game_draws_the_sierpinski_triangle(device):
    # Three maps p -> p / 2 + t with t the corners (0, 0), (1/2, 0), (1/4, 1/2): the attractor is the
    # Sierpinski triangle with corners (0, 0), (1, 0), (1/2, 1), whose middle triangle
    # (1/4, 1/2), (3/4, 1/2), (1/2, 0) is empty.
    maps = torch.zeros(1, 4, 2, 3, device=device)
    maps[0, :, 0, 0] = maps[0, :, 1, 1] = 0.5
    maps[0, :3, :, 2] = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.25, 0.5]], device=device)
    thresholds = torch.tensor([[1 / 3, 2 / 3, 2.0, 2.0]], device=device)
    density, ok = _render_ifs((maps, thresholds, torch.ones(1, dtype=torch.bool, device=device)), 64,
                              _generator(device, 0))
    density = density[0].cpu()
    assert ok.item()
    assert density.min() == 0 and density.max() == 1
    # The frame is the attractor's bounding square [0, 1]^2 with a 10% margin: pixel = (p + 0.05) * 64 / 1.1.
    def pixel(x, y):
        return int((y + 0.05) * 64 / 1.1), int((x + 0.05) * 64 / 1.1)
    r, c = pixel(0.5, 0.3)
    assert density[r - 3:r + 4, c - 4:c + 5].max() == 0  # inside the middle hole
    for corner in [(0.02, 0.02), (0.98, 0.02), (0.5, 0.97)]:
        r, c = pixel(*corner)
        assert density[r - 1:r + 2, c - 1:c + 2].max() > 0
    # Nothing lies outside the big triangle (one pixel of slack for the frame estimate).
    rows, cols = torch.nonzero(density > 0, as_tuple=True)
    x, y = (cols.float() + 0.5) * 1.1 / 64 - 0.05, (rows.float() + 0.5) * 1.1 / 64 - 0.05
    slack = 1.5 * 1.1 / 64
    assert (y <= 2 * x + 2 * slack).all() and (y <= 2 * (1 - x) + 2 * slack).all()


def test_procedural_rejects_bad_arguments():
    with pytest.raises(ValueError, match="count must be >= 1"):
        FractalBank.procedural(0)
    with pytest.raises(TypeError, match="count must be an int"):
        FractalBank.procedural(2.5)
    with pytest.raises(ValueError, match="size must be >= 8"):
        FractalBank.procedural(4, 4)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        FractalBank.procedural(4, 16, seed=-1)
    with pytest.raises(ValueError, match="is not a device; use .cpu., .cuda. or .cuda:N."):
        FractalBank.procedural(4, 16, device="not-a-device")


def _write(path, array, **save_kwargs):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, **save_kwargs)


def test_from_folder_loads_crops_and_resizes(tmp_path, device):
    red, blue, green = (200, 10, 10), (10, 10, 200), (10, 180, 20)
    wide = np.zeros((30, 60, 3), np.uint8)
    wide[:] = blue
    wide[:, 15:45] = red  # the centre square is red, the sides that cropping removes are blue
    _write(tmp_path / "a_wide.png", wide)
    tall = np.zeros((50, 20, 3), np.uint8)
    tall[:] = blue
    tall[15:35] = green
    _write(tmp_path / "b_tall.PNG", tall)
    _write(tmp_path / "c_grey.bmp", np.full((16, 16), 77))  # greyscale: converted to RGB
    ramp = np.repeat(np.linspace(0, 255, 40)[None, :, None], 3, axis=2).repeat(40, axis=0)  # dark to bright
    _write(tmp_path / "d_ramp.jpg", ramp, quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "nested.png", wide)  # only the folder itself is read

    bank = FractalBank.from_folder(tmp_path, 12, device=device)
    assert bank.images.shape == (4, 3, 12, 12) and bank.images.dtype == torch.uint8
    assert bank.images.device.type == device.type
    images = bank.images.cpu()
    assert torch.equal(images[0], torch.tensor(red, dtype=torch.uint8)[:, None, None].expand(3, 12, 12))
    assert torch.equal(images[1], torch.tensor(green, dtype=torch.uint8)[:, None, None].expand(3, 12, 12))
    assert (images[2] == 77).all()
    columns = images[3].float().mean(dim=(0, 1))  # lossy JPEG: compare column means
    assert (columns.diff() > 0).all() and columns[0] < 20 and columns[-1] > 235
    assert len(FractalBank.from_folder(str(tmp_path), 8)) == 4  # str paths too


def test_from_folder_names_a_corrupt_file(tmp_path):
    _write(tmp_path / "good.png", np.zeros((8, 8, 3)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        FractalBank.from_folder(tmp_path, 8)


def test_from_folder_names_a_truncated_file(tmp_path):
    _write(tmp_path / "whole.png", np.random.default_rng(1).integers(0, 256, (64, 64, 3)))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        FractalBank.from_folder(tmp_path, 8)


def test_from_folder_missing_empty_or_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="fractal folder .*missing.* does not exist"):
        FractalBank.from_folder(tmp_path / "missing", 16)
    with pytest.raises(ValueError, match="no images"):
        FractalBank.from_folder(tmp_path, 16)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        FractalBank.from_folder(tmp_path, 16)
    with pytest.raises(NotADirectoryError, match="not a directory"):
        FractalBank.from_folder(tmp_path / "readme.txt", 16)
    with pytest.raises(ValueError, match="size must be >= 8"):
        FractalBank.from_folder(tmp_path, 0)


def test_to_resized_and_pickle(device):
    bank = FractalBank.procedural(4, 32, seed=2)
    moved = bank.to(device)
    assert moved.device.type == device.type and torch.equal(moved.images.cpu(), bank.images)
    assert bank.to("cpu") is bank
    assert torch.equal(bank.resized(32).images, bank.images)  # same size: identity
    small, large = bank.resized(16), bank.resized(48)
    assert small.images.shape == (4, 3, 16, 16) and large.images.shape == (4, 3, 48, 48)
    assert small.images.dtype == torch.uint8 and bank.size == 32  # a new bank; the old one is unchanged
    # Resizing keeps the mean colour (up to rounding and the border).
    torch.testing.assert_close(small.images.float().mean(dim=(2, 3)), bank.images.float().mean(dim=(2, 3)), atol=2.0, rtol=0)
    constant = FractalBank(torch.full((2, 3, 20, 20), 123, dtype=torch.uint8))
    assert (constant.resized(9).images == 123).all() and (constant.resized(31).images == 123).all()
    clone = pickle.loads(pickle.dumps(bank))
    assert torch.equal(clone.images, bank.images)


@pytest.mark.parametrize(
    "images, error",
    [
        (np.zeros((1, 3, 8, 8), np.uint8), TypeError),
        (torch.zeros(1, 3, 8, 8), ValueError),  # float
        (torch.zeros(3, 8, 8, dtype=torch.uint8), ValueError),  # no batch dimension
        (torch.zeros(1, 4, 8, 8, dtype=torch.uint8), ValueError),  # RGBA
        (torch.zeros(1, 3, 8, 9, dtype=torch.uint8), ValueError),  # not square
        (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), ValueError),  # empty
    ],
)
def test_constructor_validates_images(images, error):
    with pytest.raises(error):
        FractalBank(images)
