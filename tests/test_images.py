"""Reading dataset items: PIL modes scaled by their range, torchvision's layouts, dict rows, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from onlineaug.images import ItemFormat, image_to_uint8, load_image, load_label


def to_uint8(value: int, full_scale: int) -> int:
    """round(value x 255 / full_scale), rounding half up: the expected 8-bit value of a ``full_scale`` sample."""
    return (int(value) * 255 + full_scale // 2) // full_scale


# ---- 16-bit and float PIL modes: scaled by the mode's range, never clipped to 255 or truncated to 0 -----------
@pytest.mark.parametrize("value", [8192, 32768])
def test_sixteen_bit_pngs_are_scaled_by_the_16_bit_range(tmp_path, value):
    pixels = np.full((6, 5), value, np.uint16)
    pixels[0, 0] = 65535
    path = tmp_path / f"gray16_{value}.png"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I;16")  # what Pillow decodes a 16-bit grayscale PNG as
        out = image_to_uint8(image, 0)
    assert out.dtype == torch.uint8 and out.shape == (3, 6, 5)
    assert to_uint8(value, 65535) == {8192: 32, 32768: 128}[value]
    assert (out[:, 1:] == to_uint8(value, 65535)).all()  # 8192 -> 32, 32768 -> 128 (were clipped to 255)
    assert (out[:, 0, 0] == 255).all()  # full scale stays full scale


def test_big_endian_16_bit_and_16_bit_data_in_mode_i_are_scaled_alike():
    values = np.array([[0, 8192, 32768, 65535]], np.uint16)
    expected = torch.tensor([to_uint8(v, 65535) for v in values[0]], dtype=torch.uint8)
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    mode_i = Image.fromarray(values.astype(np.int32))  # older Pillow opens 16-bit PNGs as mode "I"
    assert (big_endian.mode, mode_i.mode) == ("I;16B", "I")
    for image in (big_endian, mode_i):
        out = image_to_uint8(image, 0)
        assert torch.equal(out[0, 0], expected) and torch.equal(out[1], out[0]) and torch.equal(out[2], out[0])


def test_a_float_pil_image_in_0_1_is_scaled_by_255_not_truncated_to_black():
    values = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    image = Image.fromarray(values)
    assert image.mode == "F"
    out = image_to_uint8(image, 0)
    assert out[0, 0].tolist() == [0, 64, 128, 255] and torch.equal(out[2], out[0])  # round(255 v)


@pytest.mark.parametrize("image, message", [
    (Image.fromarray(np.full((4, 4), 2.0, np.float32)), r"a PIL image of mode 'F' \(32-bit float\) must hold values "
                                                        r"in \[0, 1\], got \[2, 2\]"),
    (Image.fromarray(np.full((4, 4), 70000, np.int32)), r"a PIL image of mode 'I' \(32-bit integers\) holds values in "
                                                        r"\[70000, 70000\], outside the 16-bit range.*to 'L'"),
    (Image.fromarray(np.full((4, 4), -1, np.int32)), r"a PIL image of mode 'I' .* holds values in \[-1, -1\]"),
    (Image.new("La", (4, 4)), r"a PIL image of mode 'La' could not be converted to RGB"),
])
def test_pil_images_that_cannot_be_scaled_are_rejected_naming_the_mode(image, message):
    with pytest.raises(ValueError, match=rf"dataset item 3: {message}"):
        image_to_uint8(image, 3)


def test_eight_bit_modes_convert_as_pillow_does():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert torch.equal(image_to_uint8(Image.fromarray(rgb), 0), torch.from_numpy(rgb).permute(2, 0, 1))
    gray = Image.fromarray(rgb[..., 0])
    assert torch.equal(image_to_uint8(gray, 0), torch.from_numpy(rgb[..., 0])[None].expand(3, -1, -1))
    rgba = Image.fromarray(np.dstack([rgb, np.full((4, 5), 9, np.uint8)]))
    assert torch.equal(image_to_uint8(rgba, 0), torch.from_numpy(rgb).permute(2, 0, 1))  # alpha dropped


def test_arrays_and_tensors_of_16_bit_and_float_values():
    sixteen = np.full((5, 6), 32768, np.uint16)
    assert (image_to_uint8(sixteen, 0) == 128).all()
    assert (image_to_uint8(torch.from_numpy(sixteen.astype(np.int32)).to(torch.uint16), 0) == 128).all()
    assert (image_to_uint8(np.full((5, 6, 3), 0.25, np.float64), 0) == 64).all()
    with pytest.raises(TypeError, match=r"NumPy images must be uint8, uint16 or float in \[0, 1\], got an array of "
                                        r"shape \(5, 6\) and dtype int32"):
        image_to_uint8(np.zeros((5, 6), np.int32), 0)
    with pytest.raises(TypeError, match=r"image tensors must be uint8, uint16 or float in \[0, 1\], got torch.int64"):
        image_to_uint8(torch.zeros(3, 5, 6, dtype=torch.int64), 0)


# ---- layouts: tensors (C, H, W), arrays and PIL (H, W, C), as in torchvision; the ambiguous ones raise ------------
def test_tensors_are_read_as_chw_and_arrays_as_hwc():
    chw = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    assert torch.equal(image_to_uint8(chw, 0), chw)
    hwc = chw.permute(1, 2, 0).numpy()
    assert torch.equal(image_to_uint8(hwc, 0), chw)
    assert torch.equal(image_to_uint8(hwc[..., :1], 0), chw[:1].expand(3, -1, -1))  # (H, W, 1)
    assert torch.equal(image_to_uint8(chw[0], 0), chw[:1].expand(3, -1, -1))  # (H, W) tensor
    assert torch.equal(image_to_uint8(hwc[..., 0], 0), chw[:1].expand(3, -1, -1))  # (H, W) array
    narrow = torch.randint(0, 256, (3, 4), dtype=torch.uint8)  # (H, W) has one layout, even 3 x 4
    assert torch.equal(image_to_uint8(narrow, 0), narrow[None].expand(3, -1, -1))
    assert torch.equal(image_to_uint8(narrow.numpy(), 0), narrow[None].expand(3, -1, -1))


@pytest.mark.parametrize("height", [1, 3, 4])
def test_a_uint8_hwc_tensor_whose_height_is_a_channel_count_is_an_error_not_read_as_chw(height):
    hwc = torch.zeros(height, 32, 3, dtype=torch.uint8)  # was read as a (C=height, H=32, W=3) image
    with pytest.raises(ValueError, match=rf"a tensor of shape \({height}, 32, 3\).* could be \(C, H, W\) or "
                                         r"\(H, W, C\).*cannot be told apart.*return image.permute\(2, 0, 1\)"):
        image_to_uint8(hwc, 0)
    assert image_to_uint8(hwc.permute(2, 0, 1), 0).shape == (3, height, 32)  # the fix the message gives works


def test_a_numpy_3_h_4_array_is_an_error_not_read_as_hwc():
    array = np.zeros((3, 32, 4), np.uint8)  # was read as an (H=3, W=32, C=4) image
    with pytest.raises(ValueError, match=r"an array of shape \(3, 32, 4\).* could be \(C, H, W\) or \(H, W, C\).*"
                                         r"cannot be told apart.*return array.transpose\(1, 2, 0\)"):
        image_to_uint8(array, 0)
    assert image_to_uint8(array.transpose(1, 2, 0), 0).shape == (3, 32, 4)


@pytest.mark.parametrize("image, message", [
    (torch.zeros(32, 32, 3, dtype=torch.uint8), r"tensor of shape \(32, 32, 3\).* is laid out \(H, W, C\), but image "
                                                r"tensors are \(C, H, W\) as in torchvision; return image.permute"),
    (np.zeros((3, 32, 32), np.uint8), r"array of shape \(3, 32, 32\).* is laid out \(C, H, W\), but NumPy images are "
                                      r"\(H, W, C\).*array.transpose\(1, 2, 0\)"),
])
def test_the_other_layout_is_an_error_that_says_how_to_convert(image, message):
    with pytest.raises(ValueError, match=message):
        image_to_uint8(image, 0)


@pytest.mark.parametrize("image, error, message", [
    (torch.zeros(5, 8, 8, dtype=torch.uint8), TypeError, r"expected an image tensor of shape \(C, H, W\) with C in "
                                                         r"\(1, 3, 4\), got a tensor of shape \(5, 8, 8\)"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError, r"expected an image tensor of shape \(C, H, W\)"),
    (np.zeros((8, 8, 5), np.uint8), TypeError, r"NumPy images must be \(H, W\) or \(H, W, C\)"),
    ("a path", TypeError, r"expected an image \(PIL.Image, a \(C, H, W\) tensor or an \(H, W, C\) array\), got a str"),
])
def test_what_is_not_an_image(image, error, message):
    with pytest.raises(error, match=message):
        image_to_uint8(image, 0)


# ---- dict rows (Hugging Face datasets) -----------------------------------------------------------------------
class Rows:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def test_dict_rows_are_read_by_their_keys():
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    rows = Rows([{"image": Image.fromarray(pixels), "label": np.int64(2), "text": "ignored"}])
    image, label = load_image(rows, 0, num_classes=3)
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1)) and label == 2
    renamed = Rows([{"img": torch.from_numpy(pixels).permute(2, 0, 1), "fine_label": 1}])
    fmt = ItemFormat(image_key="img", label_key="fine_label")
    assert load_image(renamed, 0, 3, fmt)[1] == 1 and load_label(renamed, 0, 3, fmt) == 1


def test_a_dict_row_without_the_keys_lists_its_keys_and_the_arguments():
    rows = Rows([{"img": np.zeros((8, 8, 3), np.uint8), "fine_label": 1}])
    with pytest.raises(ValueError, match=r"dataset item 0 is a dict without the key\(s\) \['image', 'label'\] \(its "
                                         r"keys: \['fine_label', 'img'\]\); pass image_key= and label_key="):
        load_image(rows, 0, 3)
    with pytest.raises(TypeError, match=r"expected an \(image, label\) pair or a dict with keys 'image' and 'label'"):
        load_image(Rows([np.zeros((8, 8, 3), np.uint8)]), 0, 3)
