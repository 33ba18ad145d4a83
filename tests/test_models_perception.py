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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads cost more than they save (10x on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Natural-looking uint8 images: coarse random colours upsampled (processors clip per resize pass on
    pure noise, which no photo looks like)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 6, generator=g) * 255
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False).round().to(torch.uint8)


def one_grey_level(std) -> float:
    """The processors round to uint8 after resizing: ours may differ by one grey level, in normalised units."""
    return 1.0 / 255 / min(std) + 1e-5


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
    assert (got - expected).abs().max() <= one_grey_level(preprocess.OPENAI_CLIP_STD)


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
    with pytest.raises(ValueError, match="LoRA and textual inversion apply to the diffusion pipelines only"):
        ensure_available("filter", CLIP_ROLE, ModelSpec("tiny", lora=str(tmp_path / "lora.safetensors")))


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


# ------------------------------------------------------------------------------------------------ CLIPSeg

CLIPSEG_ROLE = ModelRole("clipseg", "CIDAS/clipseg-rd64-refined")


@pytest.fixture(scope="module")
def tiny_clipseg():
    return load_model(CLIPSEG_ROLE, ModelSpec("tiny"), device="cpu")


def test_clipseg_preprocess_matches_its_processor(tiny_clipseg):
    from transformers import ViTImageProcessor  # what CIDAS/clipseg-rd64-refined's processor config names

    images = smooth_images(2, 41, 29, seed=4)  # resized to the square input, aspect ratio not kept
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(preprocess.IMAGENET_MEAN),
                                  image_std=list(preprocess.IMAGENET_STD))
    expected = processor(images=list(images), return_tensors="pt")["pixel_values"]
    got = tiny_clipseg.preprocess(images)
    assert got.shape == expected.shape == (2, 3, 32, 32)
    assert (got - expected).abs().max() <= one_grey_level(preprocess.IMAGENET_STD)


def test_clipseg_masks_threshold_the_models_upsampled_probabilities(tiny_clipseg):
    images = smooth_images(3, 40, 48, seed=5)
    texts = ["circle", "a striped square", "bird"]
    probs = tiny_clipseg.probabilities(images, texts)
    tokens = tiny_clipseg.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = tiny_clipseg.model(**tokens, pixel_values=tiny_clipseg.preprocess(images)).logits
    expected = F.interpolate(torch.sigmoid(logits)[:, None], size=(40, 48), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    masks, found = tiny_clipseg.segment(images, texts, torch.arange(3))
    assert torch.equal(masks, probs > 0.4)
    assert 0.0 < masks.float().mean() < 1.0  # random weights still give a mixed map: the threshold matters
    assert torch.equal(found, masks.flatten(1).any(1))
    # each image is segmented with its own prompt: a batch equals the images one by one
    alone = torch.cat([tiny_clipseg.probabilities(images[i:i + 1], texts[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(probs, alone, atol=3e-4, rtol=0)  # padding to the longest prompt: float noise (~1e-4)
    other = tiny_clipseg.probabilities(images[:1], ["a completely different prompt"])
    assert not torch.allclose(other, probs[:1], atol=1e-3)


def test_clipseg_threshold_option_bounds_what_is_found():
    images = smooth_images(2, 32, 32, seed=6)
    everything = load_model(ModelRole("clipseg", "x", options={"threshold": 0.0}), ModelSpec("tiny"), device="cpu")
    nothing = load_model(ModelRole("clipseg", "x", options={"threshold": 1.0}), ModelSpec("tiny"), device="cpu")
    masks, found = everything.segment(images, ["a", "b"], torch.arange(2))
    assert masks.all() and found.all()
    masks, found = nothing.segment(images, ["a", "b"], torch.arange(2))
    assert not masks.any() and not found.any()
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\], got 1.5"):
        ensure_available("segmenter", ModelRole("clipseg", "x", options={"threshold": 1.5}), ModelSpec("tiny"))
    with pytest.raises(ValueError, match=r"no options \['box_threshold'\]; valid options: \['batch_size', 'threshold'\]"):
        ensure_available("segmenter", ModelRole("clipseg", "x", options={"box_threshold": 0.3}), ModelSpec("tiny"))


def test_clipseg_loads_a_saved_folder_and_says_how_to_get_missing_weights(tmp_path, monkeypatch, tiny_clipseg):
    from transformers import ViTImageProcessor

    folder = tmp_path / "clipseg"
    tiny_clipseg.model.save_pretrained(folder)
    tiny_clipseg.tokenizer.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(preprocess.IMAGENET_MEAN),
                      image_std=list(preprocess.IMAGENET_STD)).save_pretrained(folder)
    loaded = load_model(CLIPSEG_ROLE, ModelSpec(str(folder)), device="cpu")
    assert loaded.input_size == (32, 32) and loaded.threshold == 0.4
    images = smooth_images(2, 30, 36, seed=7)
    torch.testing.assert_close(loaded.probabilities(images, ["a", "b"]), tiny_clipseg.probabilities(images, ["a", "b"]))
    assert describe_model(CLIPSEG_ROLE, ModelSpec(str(folder))) == f"CLIPSeg segmenter from local folder {folder}"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("ONLINEAUG_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(ModelNotFoundError, match=r"CLIPSeg segmenter weights not found(.|\n)*huggingface-cli download "
                                                 r"CIDAS/clipseg-rd64-refined(.|\n)*HF_HOME"):
        ensure_available("segmenter", CLIPSEG_ROLE, ModelSpec("CIDAS/clipseg-rd64-refined"))


# ----------------------------------------------------------------------------------------------- Lang-SAM

LANG_SAM_ROLE = ModelRole("lang-sam", "IDEA-Research/grounding-dino-tiny+facebook/sam-vit-base")


@pytest.fixture(scope="module")
def tiny_lang_sam():
    return load_model(LANG_SAM_ROLE, ModelSpec("tiny"), device="cpu")


def test_lang_sam_preprocessing_matches_the_processors(tiny_lang_sam):
    from transformers import SamImageProcessor, SamProcessor

    images = smooth_images(2, 40, 54, seed=8)
    ours = tiny_lang_sam.detector_inputs(images, ["Bird", "a cat."])
    theirs = tiny_lang_sam.processor(images=list(images), text=["bird.", "a cat."], padding=True, return_tensors="pt")
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape == (2, 3, 128, 172)
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max() <= one_grey_level(preprocess.IMAGENET_STD)
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    sam_processor = SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 24},
                                                                   pad_size={"height": 24, "width": 24}))
    boxes = torch.tensor([[[3.0, 4.0, 30.0, 20.0], [10.0, 10.0, 50.0, 39.0]]] * 2)
    theirs = sam_processor(images=list(images), input_boxes=boxes.tolist(), return_tensors="pt")
    ours = tiny_lang_sam.sam_inputs(images, boxes)
    assert ours["resized_size"] == tuple(theirs["reshaped_input_sizes"][0].tolist()) == (18, 24)
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max() <= one_grey_level(preprocess.IMAGENET_STD)
    torch.testing.assert_close(ours["input_boxes"], theirs["input_boxes"].float())


def test_lang_sam_masks_are_the_union_of_sam_run_per_box(tiny_lang_sam):
    from transformers import SamImageProcessor

    images, texts = smooth_images(3, 40, 54, seed=9), ["bird", "cat", "dog"]
    detections = tiny_lang_sam.detect(images, texts)
    masks, found = tiny_lang_sam.segment(images, texts, torch.arange(3))
    assert found.tolist() == [len(d["boxes"]) > 0 for d in detections] == [True] * 3
    post = SamImageProcessor(size={"longest_edge": 24}, pad_size={"height": 24, "width": 24})
    nontrivial = 0
    for row, detection in enumerate(detections):
        assert len(detection["boxes"]) >= 2 and (detection["scores"] > 0.3).all()
        assert torch.equal(detection["scores"], detection["scores"].sort(descending=True).values)
        union = torch.zeros(40, 54, dtype=torch.bool)
        for box in detection["boxes"]:  # SAM once per box, through transformers' own post-processing
            inputs = tiny_lang_sam.sam_inputs(images[row:row + 1], box.view(1, 1, 4))
            with torch.no_grad():
                low_res = tiny_lang_sam.sam(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                                            multimask_output=False).pred_masks
            mask = post.post_process_masks(low_res, [(40, 54)], [inputs["resized_size"]])[0][0, 0]
            nontrivial += bool(mask.any()) and not torch.equal(mask, union | mask)
            union |= mask
        assert torch.equal(masks[row], union)
    assert nontrivial > 0  # some box added pixels to what earlier boxes covered: the union is not one mask


def test_lang_sam_box_threshold_above_every_score_finds_nothing(tiny_lang_sam):
    images = smooth_images(2, 40, 40, seed=10)
    strict = load_model(ModelRole("lang-sam", "x", options={"box_threshold": 1.0}), ModelSpec("tiny"), device="cpu")
    masks, found = strict.segment(images, ["bird", "bird"], torch.arange(2))
    assert not found.any() and not masks.any() and masks.shape == (2, 40, 40)
    capped = load_model(ModelRole("lang-sam", "x", options={"max_boxes": 1}), ModelSpec("tiny"), device="cpu")
    full, top = tiny_lang_sam.detect(images, ["bird"] * 2), capped.detect(images, ["bird"] * 2)
    for a, b in zip(full, top):
        assert len(b["boxes"]) == 1 and torch.equal(b["boxes"][0], a["boxes"][0])
        assert (a["boxes"][:, 0::2] <= 40).all() and (a["boxes"] >= 0).all()
    with pytest.raises(ValueError, match=r"max_boxes must be a positive int or None, got 0"):
        ensure_available("segmenter", ModelRole("lang-sam", "x", options={"max_boxes": 0}), ModelSpec("tiny"))


@pytest.mark.slow  # saves and loads two models twice: ~3 s alone, more on a busy machine
def test_lang_sam_loads_saved_folders(tmp_path, tiny_lang_sam):
    from transformers import SamImageProcessor, SamProcessor

    detector, sam = tmp_path / "grounding-dino", tmp_path / "sam"
    tiny_lang_sam.detector.save_pretrained(detector)
    tiny_lang_sam.processor.save_pretrained(detector)
    tiny_lang_sam.sam.save_pretrained(sam)
    SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 24}, pad_size={"height": 24, "width": 24})
                 ).save_pretrained(sam)
    images, texts = smooth_images(2, 40, 54, seed=11), ["bird", "cat"]
    expected = tiny_lang_sam.segment(images, texts, torch.arange(2))
    for role, source in ((LANG_SAM_ROLE, f"{detector}+{sam}"),
                         (ModelRole("lang-sam", "x", options={"sam": str(sam)}), str(detector))):
        ensure_available("segmenter", role, ModelSpec(source))
        loaded = load_model(role, ModelSpec(source), device="cpu")
        assert loaded.sam_images.pad == (24, 24) and loaded.detector_images.size["shortest_edge"] == 128
        got = loaded.segment(images, texts, torch.arange(2))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    line = describe_model(LANG_SAM_ROLE, ModelSpec(f"{detector}+{sam}"))
    assert line == f"Lang-SAM: GroundingDINO from local folder {detector} + SAM from local folder {sam}"


def test_lang_sam_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("ONLINEAUG_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(ModelNotFoundError, match=r"GroundingDINO detector \(lang-sam\) weights not found(.|\n)*"
                                                 r"huggingface-cli download IDEA-Research/grounding-dino-tiny"):
        ensure_available("segmenter", LANG_SAM_ROLE, ModelSpec(LANG_SAM_ROLE.default))
    detector = tmp_path / "detector"
    from onlineaug.models.segmenters.lang_sam import build_detector, build_detector_processor
    build_detector("tiny").save_pretrained(detector)
    build_detector_processor("tiny").save_pretrained(detector)
    with pytest.raises(ModelNotFoundError, match=r"SAM \(lang-sam\) weights not found(.|\n)*huggingface-cli download "
                                                 r"facebook/sam-vit-base(.|\n)*HF_HOME"):
        ensure_available("segmenter", LANG_SAM_ROLE, ModelSpec(str(detector)))
    with pytest.raises(ValueError, match=r"'<GroundingDINO>\+<SAM>'"):
        ensure_available("segmenter", LANG_SAM_ROLE, ModelSpec("a+b+c"))


def test_perception_random_architectures_have_the_real_sizes():
    from onlineaug.models.segmenters.clipseg import build_clipseg_model
    from onlineaug.models.segmenters.lang_sam import build_detector, build_sam, grounding_prompt

    def count(model):
        return sum(p.numel() for p in model.parameters()) / 1e6

    assert 170 < count(build_detector("full-random", device="meta")) < 175  # GroundingDINO-T: 172M
    assert 93 < count(build_sam("full-random", device="meta")) < 95  # SAM ViT-B: 94M
    assert 149 < count(build_clipseg_model("full-random", device="meta")) < 152  # CLIPSeg rd64: 151M
    assert grounding_prompt("  Bird ") == "bird." and grounding_prompt("a car.") == "a car."
    assert describe_model(LANG_SAM_ROLE, ModelSpec("tiny")) == "tiny random-weight Lang-SAM segmenter (in-process)"
