"""The perception models of ``onlineaug.models``: the CLIP embedder and the segmenters.

Everything runs on tiny random-weight models the code builds itself (and saves into tmp_path to exercise the
real ``from_pretrained`` loading); nothing is downloaded.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from onlineaug.datasets import SyntheticShapes
from onlineaug.models import LoadPolicy, ModelRole, ModelSpec, describe_model, ensure_available, load_model
from onlineaug.models import preprocess
from onlineaug.models.checkpoints import ModelNotFoundError
from onlineaug.models.clip import DEFAULT_CLIP, ClipEmbedder, build_clip_model
from onlineaug.models.segmenters import DatasetMasks

CLIP_ROLE = ModelRole("clip", DEFAULT_CLIP)
DATASET_ROLE = ModelRole("dataset-masks", "dataset")


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Natural-looking uint8 images: coarse random colours upsampled (processors clip per resize pass on
    pure noise, which no photo looks like)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 6, generator=g) * 255
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False).round().to(torch.uint8)


@pytest.fixture(scope="module")
def tiny_clip() -> ClipEmbedder:
    return load_model(CLIP_ROLE, ModelSpec("tiny"), device="cpu")


# ------------------------------------------------------------------------------------------------- CLIP


def test_clip_preprocess_matches_clip_image_processor(tiny_clip):
    from transformers import CLIPImageProcessor

    images = smooth_images(3, 37, 53)  # non-square: shorter side resized to 32, then a centred 32x32 crop
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = processor(images=list(images), return_tensors="pt")["pixel_values"]
    got = tiny_clip.preprocess(images)
    assert got.shape == expected.shape == (3, 3, 32, 32)
    # the processor rounds to uint8 after resizing: at most one grey level apart, in normalised units
    assert (got - expected).abs().max() <= 1.0 / 255 / min(preprocess.OPENAI_CLIP_STD) + 1e-5


def test_clip_embeddings_are_the_models_normalised_features(tiny_clip):
    images = smooth_images(4, 32, 32, seed=1)
    texts = ["a photo of a circle", "a square", "", "a much longer caption about a striped triangle"]
    image_features = tiny_clip.embed_images(images)
    text_features = tiny_clip.embed_texts(texts)
    model = tiny_clip.model
    with torch.no_grad():
        expected_image = model.get_image_features(pixel_values=tiny_clip.preprocess(images)).pooler_output
        tokens = tiny_clip.tokenizer(texts, padding=True, return_tensors="pt")
        expected_text = model.get_text_features(**tokens).pooler_output
    for got, expected in ((image_features, expected_image), (text_features, expected_text)):
        assert got.dtype == torch.float32 and got.shape == (4, tiny_clip.dim) == (4, 64)
        torch.testing.assert_close(got.norm(dim=1), torch.ones(4))
        torch.testing.assert_close(got, expected / expected.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert tiny_clip.device == torch.device("cpu")


def test_clip_batching_does_not_change_embeddings(tiny_clip):
    images = smooth_images(5, 40, 48, seed=2)
    small = ClipEmbedder(tiny_clip.model, tiny_clip.tokenizer, image_size=32, crop_size=(32, 32), batch_size=2)
    torch.testing.assert_close(small.embed_images(images), tiny_clip.embed_images(images), atol=1e-5, rtol=1e-5)
    texts = [f"class {i}" for i in range(5)]
    torch.testing.assert_close(small.embed_texts(texts), tiny_clip.embed_texts(texts), atol=1e-5, rtol=1e-5)
    assert tiny_clip.embed_images(images[:0]).shape == (0, 64)
    assert tiny_clip.embed_texts([]).shape == (0, 64)


def test_clip_rejects_bad_inputs(tiny_clip):
    with pytest.raises(ValueError, match=r"uint8 \(n, 3, H, W\)"):
        tiny_clip.embed_images(torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="list of str"):
        tiny_clip.embed_texts("a cat")
    with pytest.raises(ValueError, match=r"no options \['threshold'\]; valid options: \['batch_size'\]"):
        load_model(ModelRole("clip", DEFAULT_CLIP, options={"threshold": 0.6}), ModelSpec("tiny"), device="cpu")


def _save_tiny_clip(folder, seed: int = 0) -> ClipEmbedder:
    from transformers import CLIPImageProcessor

    embedder = load_model(CLIP_ROLE, ModelSpec("tiny"), device="cpu", seed=seed)
    embedder.model.save_pretrained(folder)
    embedder.tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return embedder


def test_clip_loads_a_saved_folder_and_a_cached_hub_id(tmp_path, monkeypatch):
    folder = tmp_path / "clip"
    built = _save_tiny_clip(folder, seed=3)
    images, texts = smooth_images(2, 50, 36, seed=3), ["a circle", "a square"]
    ensure_available("filter", CLIP_ROLE, ModelSpec(str(folder)))
    loaded = load_model(CLIP_ROLE, ModelSpec(str(folder)), device="cpu")
    assert (loaded.image_size, loaded.crop_size, loaded.resize_mode) == (32, (32, 32), "bicubic")
    torch.testing.assert_close(loaded.embed_images(images), built.embed_images(images))
    torch.testing.assert_close(loaded.embed_texts(texts), built.embed_texts(texts))

    # the same files as a hub id in a Hugging Face cache (the layout `huggingface-cli download` writes)
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny-clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in os.listdir(folder):
        os.symlink(folder / name, snapshot / name)
    (cache / "models--org--tiny-clip" / "refs").mkdir()
    (cache / "models--org--tiny-clip" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert "hub id org/tiny-clip" in describe_model(CLIP_ROLE, ModelSpec("org/tiny-clip"))
    assert describe_model(CLIP_ROLE, ModelSpec("org/tiny-clip")).endswith(", cached)")
    from_cache = load_model(CLIP_ROLE, ModelSpec("org/tiny-clip"), device="cpu")
    torch.testing.assert_close(from_cache.embed_images(images), built.embed_images(images))


def test_clip_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("ONLINEAUG_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(ModelNotFoundError, match=r"huggingface-cli download openai/clip-vit-base-patch32(.|\n)*HF_HOME"):
        ensure_available("filter", CLIP_ROLE, ModelSpec(DEFAULT_CLIP))
    partial = tmp_path / "partial"
    partial.mkdir()
    build_clip_model("tiny").config.save_pretrained(partial)  # config.json only: a partial download
    with pytest.raises(ModelNotFoundError, match=r"lacks weights \(one of model.safetensors.*tokenizer files"):
        ensure_available("filter", CLIP_ROLE, ModelSpec(str(partial)))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(CLIP_ROLE, ModelSpec(str(tmp_path / "nowhere")), device="cpu")
    with pytest.raises(ValueError, match="'tiny' or 'full-random'"):
        ensure_available("filter", CLIP_ROLE, ModelSpec("tiny-sdxl"))


def test_clip_random_weights_are_reproducible_and_full_random_is_vit_b32():
    a, b = build_clip_model("tiny", seed=5), build_clip_model("tiny", seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(build_clip_model("tiny", seed=6).visual_projection.weight, a.visual_projection.weight)
    full = build_clip_model("full-random", device="meta")
    vision = full.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, full.config.projection_dim) == (224, 32, 768, 512)
    assert 140e6 < sum(p.numel() for p in full.parameters()) < 160e6  # ViT-B/32 CLIP: 151M parameters
    assert describe_model(CLIP_ROLE, ModelSpec("full-random")) == "full-size ViT-B/32 random-weight CLIP (in-process)"
    assert describe_model(CLIP_ROLE, ModelSpec("tiny")) == "tiny random-weight CLIP (in-process)"


def test_clip_dtype_follows_the_load_policy():
    embedder = load_model(CLIP_ROLE, ModelSpec("tiny"), device="cpu", policy=LoadPolicy(dtype="bf16"))
    assert embedder.dtype == torch.bfloat16
    features = embedder.embed_images(smooth_images(2, 32, 32))
    assert features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2))


# ------------------------------------------------------------------------------------------- dataset masks


def test_dataset_masks_equal_the_datasets_masks_exactly():
    dataset = SyntheticShapes(num_classes=4, size=32, length=12, seed=1, return_mask=True)
    indices = torch.tensor([7, 0, 11, 3])
    images = torch.stack([dataset[i][0] for i in indices.tolist()])
    segmenter = load_model(DATASET_ROLE, ModelSpec("dataset"), device="cpu", dataset=dataset)
    masks, found = segmenter.segment(images, ["shape"] * 4, indices)
    expected = torch.stack([dataset[i][2] for i in indices.tolist()])
    assert masks.dtype == torch.bool and torch.equal(masks, expected)
    assert found.tolist() == [True] * 4
    assert segmenter.calls == 4


def test_dataset_masks_follow_crops_and_resizes():
    dataset = SyntheticShapes(num_classes=3, size=32, length=6, seed=2)  # masks via foreground_mask only
    segmenter = DatasetMasks(dataset)
    full = torch.stack([dataset.foreground_mask(i) for i in range(2)])
    # a crop at its own size is an exact slice of the item's mask
    crops = torch.tensor([[3, 5, 20, 24], [10, 0, 20, 24]])
    masks, _ = segmenter.segment(torch.zeros(2, 3, 20, 24, dtype=torch.uint8), ["x", "y"], torch.arange(2), crops)
    assert torch.equal(masks[0], full[0, 3:23, 5:29]) and torch.equal(masks[1], full[1, 10:30, 0:24])
    # twice the size: nearest-neighbour repeats every pixel 2x2
    masks, _ = segmenter.segment(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), ["x", "y"], torch.arange(2))
    assert torch.equal(masks, full.repeat_interleave(2, 1).repeat_interleave(2, 2))
    with pytest.raises(ValueError, match="falls outside its 32x32 mask"):
        segmenter.segment(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["x"], torch.arange(1),
                          torch.tensor([[30, 0, 8, 8]]))


class _ItemMasks(torch.utils.data.Dataset):
    """Items carrying their masks, as a tuple or a dict, in the dtypes datasets use."""

    def __init__(self, as_dict: bool):
        self.as_dict = as_dict
        self.masks = [torch.zeros(8, 8, dtype=torch.uint8), torch.zeros(1, 8, 8), torch.zeros(8, 8, dtype=torch.bool)]
        self.masks[0][2:5, 1:3] = 255
        self.masks[1][0, 4:, 4:] = 0.9
        # item 2: an empty mask (nothing to find)

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        image = torch.zeros(3, 8, 8, dtype=torch.uint8)
        return {"image": image, "label": 0, "mask": self.masks[i]} if self.as_dict else (image, 0, self.masks[i])


@pytest.mark.parametrize("as_dict", [False, True])
def test_dataset_masks_read_masks_carried_by_items(as_dict):
    dataset = _ItemMasks(as_dict)
    ensure_available("segmenter", DATASET_ROLE, ModelSpec("dataset"), dataset=dataset)
    segmenter = load_model(DATASET_ROLE, ModelSpec("dataset"), device="cpu", dataset=dataset)
    masks, found = segmenter.segment(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), ["a"] * 3, torch.arange(3))
    expected = torch.zeros(3, 8, 8, dtype=torch.bool)
    expected[0, 2:5, 1:3] = True
    expected[1, 4:, 4:] = True
    assert torch.equal(masks, expected)
    assert found.tolist() == [True, True, False]


def test_dataset_without_masks_is_a_clear_error_before_loading():
    plain = [(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)]
    for call in (lambda: ensure_available("segmenter", DATASET_ROLE, ModelSpec("dataset"), dataset=plain),
                 lambda: load_model(DATASET_ROLE, ModelSpec("dataset"), device="cpu", dataset=plain)):
        with pytest.raises(ValueError, match=r"no foreground_mask method and its item 0 is a tuple of 2 "
                                             r"\(Tensor, int\); expected a dataset.foreground_mask\(index\)"):
            call()
    with pytest.raises(ValueError, match="needs the dataset"):
        ensure_available("segmenter", DATASET_ROLE, ModelSpec("dataset"))
    with pytest.raises(ValueError, match="its source must be 'dataset', got 'tiny'"):
        ensure_available("segmenter", DATASET_ROLE, ModelSpec("tiny"), dataset=plain)
    assert describe_model(DATASET_ROLE, ModelSpec("dataset")) == "the dataset's own masks (dataset-masks)"


def test_segmenter_inputs_are_checked():
    segmenter = DatasetMasks(SyntheticShapes(size=16, length=4))
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="got 1 texts for 2 images"):
        segmenter.segment(images, ["a"], torch.arange(2))
    with pytest.raises(ValueError, match=r"indices must be an int64 tensor of shape \(2,\)"):
        segmenter.segment(images, ["a", "b"], torch.arange(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"crops must be an int64 tensor of shape \(2, 4\)"):
        segmenter.segment(images, ["a", "b"], torch.arange(2), torch.zeros(2, 3, dtype=torch.int64))
    masks, found = segmenter.segment(images[:0], [], torch.arange(0))
    assert masks.shape == (0, 16, 16) and found.shape == (0,)
