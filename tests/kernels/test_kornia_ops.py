"""prepare_foregrounds: kornia resize (keeping aspect) into a transparent-padded bank."""
import pytest
import torch

pytest.importorskip("kornia")

from onlineaug.kernels.kornia_ops import prepare_foregrounds  # noqa: E402


def test_fits_keeps_aspect_and_pads_transparent():
    fg = torch.zeros(2, 4, 10, 20, dtype=torch.uint8)
    fg[:, :3] = 200
    fg[:, 3] = 255  # fully opaque 10 x 20 cut-outs
    bank = prepare_foregrounds(fg, (16, 16))
    assert bank.shape == (2, 4, 16, 16) and bank.dtype == torch.uint8
    # 10 x 20 scaled by 0.8 -> 8 x 16, centred: rows 4..11 opaque, the rest transparent
    assert (bank[:, 3, 4:12] == 255).all()
    assert (bank[:, 3, :4] == 0).all() and (bank[:, 3, 12:] == 0).all()
    assert (bank[:, :3, 4:12] == 200).all()  # premultiplied resampling: no darkened edges


def test_rotation_and_bad_input():
    fg = torch.full((1, 4, 8, 8), 255, dtype=torch.uint8)
    rotated = prepare_foregrounds(fg, (8, 8), angle=torch.tensor([45.0]))
    assert rotated[0, 3, 0, 0] < 255 and rotated[0, 3, 4, 4] == 255  # corners cut, centre kept
    with pytest.raises(ValueError, match=r"foregrounds must be uint8 \(N, 4, h, w\) RGBA"):
        prepare_foregrounds(fg[:, :3], (8, 8))
    with pytest.raises(ValueError, match=r"size must be \(Hf, Wf\)"):
        prepare_foregrounds(fg, (8, 0))
