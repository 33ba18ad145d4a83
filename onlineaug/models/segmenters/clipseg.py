"""CLIPSeg (Lüddecke and Ecker, "Image Segmentation Using Text and Image Prompts", CVPR 2022): a CLIP backbone
with a light transformer decoder that turns a text prompt into a per-pixel logit map.

The mask of an image is ``sigmoid(logits) > threshold``, the probabilities upsampled (bilinear) to the image's
size first. The paper fixes no threshold for zero-shot use; the default, 0.4, is what common CLIPSeg tools use
(e.g. ComfyUI_essentials' ``ApplyCLIPSeg``), and ``ModelRole.options["threshold"]`` changes it. Images are
preprocessed in torch as CLIPSeg's processor (``ViTImageProcessor``) does: resize to its square size
(bilinear), ImageNet mean/std.

Sources: ``"tiny"`` (tiny random weights), ``"full-random"`` (the ``CIDAS/clipseg-rd64-refined`` architecture:
ViT-B/16, reduce_dim 64, the refined transposed convolution, 352 px input), or a hub id / folder (default
:data:`DEFAULT_CLIPSEG`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPTokenizer

from onlineaug.generators.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, build_tokenizer
from onlineaug.models import preprocess
from onlineaug.models.checkpoints import (
    CLIP_TOKENIZER_FILES,
    ModelNotFoundError,
    building,
    describe_source,
    locate,
    not_found_message,
    policy_dtype,
)
from onlineaug.models.segmenters.base import Segmenter, check_options
from onlineaug.models.spec import LoadPolicy, ModelRole, ModelSpec

DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
OPTIONS = {"threshold": 0.4, "batch_size": 32}
_TEXT_IDS = {"bos_token_id": VOCAB_SIZE - 2, "eos_token_id": VOCAB_SIZE - 1, "pad_token_id": VOCAB_SIZE - 1}

TINY_CLIPSEG_CONFIG = {
    "text_config": {"vocab_size": VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "max_position_embeddings": MODEL_MAX_LENGTH, **_TEXT_IDS},
    "vision_config": {"image_size": 32, "patch_size": 4, "hidden_size": 32, "intermediate_size": 37,
                      "num_hidden_layers": 2, "num_attention_heads": 4},
    "projection_dim": 64, "reduce_dim": 32, "extract_layers": (1,), "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 37,
}
TINY_INPUT_SIZE = 32
# CIDAS/clipseg-rd64-refined: CLIP ViT-B/16 (224 px positions, interpolated to the processor's 352 px input).
RD64_REFINED_CONFIG = {
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "max_position_embeddings": MODEL_MAX_LENGTH, **_TEXT_IDS},
    "vision_config": {"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
                      "num_hidden_layers": 12, "num_attention_heads": 12},
    "projection_dim": 512, "reduce_dim": 64, "extract_layers": (3, 6, 9), "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 2048, "use_complex_transposed_convolution": True,
}
RD64_INPUT_SIZE = 352


class ClipSegSegmenter(Segmenter):
    """Masks from CLIPSeg's text-conditioned logits; ``found`` is whether the mask has any pixel.

    Args:
        model: a ``CLIPSegForImageSegmentation`` on its device and dtype; tokenizer: its CLIP tokenizer.
        input_size: the (h, w) images are resized to; mean, std, resize_mode: the processor's normalisation.
        threshold: a pixel belongs to the object when its probability exceeds it.
        batch_size: images per forward pass.
    """

    def __init__(self, model: CLIPSegForImageSegmentation, tokenizer, *, input_size: tuple[int, int],
                 mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD, resize_mode: str = "bilinear",
                 threshold: float = OPTIONS["threshold"], batch_size: int = OPTIONS["batch_size"],
                 source: str = ""):
        _check_fraction("threshold", threshold)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean, self.std, self.resize_mode = tuple(mean), tuple(std), resize_mode
        self.threshold, self.batch_size, self.source = float(threshold), batch_size, source
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.max_length = min(int(getattr(tokenizer, "model_max_length", MODEL_MAX_LENGTH) or MODEL_MAX_LENGTH),
                              int(model.config.text_config.max_position_embeddings))
        self.calls = 0  # images segmented so far

    def __repr__(self) -> str:
        return (f"ClipSegSegmenter({self.source or 'CLIPSeg'}, input {self.input_size[0]}x{self.input_size[1]}, "
                f"threshold={self.threshold}, {self.dtype}, {self.device})")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, H, W) -> ``pixel_values`` (n, 3, *input_size) on the model's device and dtype."""
        x = preprocess.check_images(images).to(self.device, non_blocking=True).float()
        x = preprocess.resize(x, self.input_size, self.resize_mode)
        return preprocess.normalize(x, self.mean, self.std).to(self.dtype)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """float32 (n, H, W): each pixel's probability of showing ``texts[i]``, at the images' own size."""
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            chunk = images[i:i + self.batch_size]
            tokens = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            logits = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                pixel_values=self.preprocess(chunk)).logits
            probs = torch.sigmoid(logits.float().reshape(chunk.shape[0], 1, *logits.shape[-2:]))
            out.append(F.interpolate(probs, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False,
                                     antialias=probs.shape[-1] > images.shape[-1])[:, 0])
        return torch.cat(out)

    def _segment(self, images, texts, indices, crops):
        masks = self.probabilities(images, texts) > self.threshold
        self.calls += images.shape[0]
        return masks, masks.flatten(1).any(1)


def _check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def build_clipseg_model(source: str = "tiny", *, seed: int = 0, device="cpu",
                        dtype=torch.float32) -> CLIPSegForImageSegmentation:
    """A random-weight CLIPSeg: ``"tiny"`` or ``"full-random"`` (rd64-refined), reproducible from ``seed``."""
    configs = {"tiny": TINY_CLIPSEG_CONFIG, "full-random": RD64_REFINED_CONFIG}
    if source not in configs:
        raise ValueError(f"random CLIPSeg source must be 'tiny' or 'full-random', got {source!r}")
    with building(seed, f"clipseg/{source}", torch.device(device), dtype):
        model = CLIPSegForImageSegmentation(CLIPSegConfig(**configs[source]))
    return model.eval().requires_grad_(False)


def _locate(source: str):
    return locate(source, what="CLIPSeg segmenter", default_repo=DEFAULT_CLIPSEG, tokenizer_files=CLIP_TOKENIZER_FILES)


def _random_source(spec: ModelSpec) -> str | None:
    random = spec.random_weights
    if random is not None and random[1] is not None:
        raise ValueError(f"source {spec.source!r} names a diffusion architecture; a 'clipseg' segmenter takes "
                         f"'tiny' or 'full-random'")
    return random[0] if random else None


def _options(role: ModelRole) -> dict:
    options = check_options("clipseg", role.options, OPTIONS)
    _check_fraction("threshold", options["threshold"])
    return options


def load_clipseg(role: ModelRole, spec: ModelSpec, *, device: torch.device, policy: LoadPolicy = LoadPolicy(),
                 seed: int = 0) -> ClipSegSegmenter:
    options = _options(role)
    device = torch.device(device)
    dtype = policy_dtype(policy, device)
    random = _random_source(spec)
    if random is not None:
        model = build_clipseg_model(random, seed=seed, device=device, dtype=dtype)
        size = TINY_INPUT_SIZE if random == "tiny" else RD64_INPUT_SIZE
        return ClipSegSegmenter(model, build_tokenizer(), input_size=(size, size), source=f"{random} random CLIPSeg",
                                **options)
    checkpoint = _locate(spec.source)
    try:
        model = CLIPSegForImageSegmentation.from_pretrained(checkpoint.location, dtype=dtype,
                                                            **checkpoint.from_pretrained_kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(checkpoint.location, **checkpoint.from_pretrained_kwargs)
    except OSError as err:
        raise ModelNotFoundError(not_found_message("CLIPSeg segmenter", spec.source, DEFAULT_CLIPSEG,
                                                   checkpoint.location, str(err))) from err
    model.to(device)
    config = checkpoint.image_processor_config() or {}
    size = config.get("size", RD64_INPUT_SIZE)
    size = (size["height"], size["width"]) if isinstance(size, dict) else (int(size), int(size))
    return ClipSegSegmenter(model, tokenizer, input_size=size,
                            mean=config.get("image_mean", preprocess.IMAGENET_MEAN),
                            std=config.get("image_std", preprocess.IMAGENET_STD),
                            resize_mode=preprocess.resample_mode(config, "bilinear"), source=spec.source, **options)


def ensure_clipseg_available(role: ModelRole, spec: ModelSpec) -> None:
    _options(role)
    if _random_source(spec) is None:
        _locate(spec.source)


def describe_clipseg(spec: ModelSpec) -> str:
    random = spec.random_weights
    if random is not None:
        what = "tiny" if random[0] == "tiny" else "full-size rd64-refined"
        return f"{what} random-weight CLIPSeg segmenter (in-process)"
    return describe_source(spec.source, "CLIPSeg segmenter")
