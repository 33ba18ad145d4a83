"""Lang-SAM: open-vocabulary detection with GroundingDINO, then segmentation with SAM prompted by the boxes;
the segmenter De-DA uses (Chen et al. 2024, §3 and its footnote 1).

- GroundingDINO (Liu et al., "Grounding DINO: Marrying DINO with Grounded Pre-Training for Open-Set Object
  Detection", 2023): the prompt is lowercased and ends with ``"."`` (``"bird."``); boxes whose best token
  probability exceeds ``box_threshold`` (0.3) are kept, ``text_threshold`` (0.25) picks their phrase
  (Lang-SAM's defaults, through ``GroundingDinoProcessor.post_process_grounded_object_detection``).
- SAM (Kirillov et al., "Segment Anything", ICCV 2023): every kept box prompts one mask
  (``multimask_output=False``); an image's mask is the union of its boxes' masks. ``found`` is whether at least
  one box was kept; an image without boxes gets an empty mask and SAM does not run on it.

Both models' image preprocessing runs in torch on the device, as their processors do it: GroundingDINO resizes
the shorter side to 800 (the longer one at most 1333, bilinear) with ImageNet mean/std; SAM resizes the longer
side to 1024 (bilinear), normalises and zero-pads to 1024 x 1024, and its low-resolution masks are upsampled to
the padded size, cropped, upsampled to the image size and thresholded at 0 (``SamImageProcessor.post_process_masks``).

Sources: ``"tiny"`` and ``"full-random"`` (GroundingDINO-T + SAM ViT-B architectures, random weights) build both
models; a real source names the detector and SAM as ``"<detector>+<sam>"`` (hub ids or folders), or only the
detector, SAM then coming from ``ModelRole.options["sam"]`` (default :data:`DEFAULT_SAM`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SamConfig,
    SamModel,
    SwinConfig,
)

from onlineaug.models import preprocess
from onlineaug.models.checkpoints import (
    BERT_TOKENIZER_FILES,
    Checkpoint,
    ModelNotFoundError,
    building,
    describe_source,
    locate,
    not_found_message,
    policy_dtype,
)
from onlineaug.models.segmenters.base import Segmenter, check_options
from onlineaug.models.segmenters.bert_vocab import build_bert_tokenizer, generated_bert_vocab
from onlineaug.models.spec import LoadPolicy, ModelRole, ModelSpec

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SAM = "facebook/sam-vit-base"
DEFAULT_LANG_SAM = f"{DEFAULT_DETECTOR}+{DEFAULT_SAM}"
OPTIONS = {"box_threshold": 0.3, "text_threshold": 0.25, "max_boxes": None, "batch_size": 8, "sam": DEFAULT_SAM}

_TINY_VOCAB = len(generated_bert_vocab())
TINY_DETECTOR_CONFIG = {
    # The shorter image side must stay >= 98 px: below it the coarsest feature level is 1 x 1 and GroupNorm fails.
    "backbone_config": {"model_type": "swin", "window_size": 7, "embed_dim": 8, "depths": [1, 1, 1, 1],
                        "num_heads": [1, 1, 1, 1], "image_size": 98, "out_indices": [2, 3, 4]},
    "text_config": {"model_type": "bert", "vocab_size": _TINY_VOCAB, "hidden_size": 8, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 32},
    "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 8, "decoder_ffn_dim": 8, "num_queries": 6,
    "num_feature_levels": 4, "encoder_n_points": 2, "decoder_n_points": 6, "max_text_len": 32,
}
TINY_DETECTOR_SIZE = {"shortest_edge": 128, "longest_edge": 512}  # >= 98 px up to a 4:1 aspect ratio
TINY_SAM_CONFIG = {
    "vision_config": {"image_size": 24, "patch_size": 2, "hidden_size": 36, "output_channels": 32,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_pos_feats": 16},
    "prompt_encoder_config": {"image_size": 24, "patch_size": 2, "hidden_size": 32, "mask_input_channels": 4},
    "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "iou_head_hidden_dim": 32},
}
TINY_SAM_SIZE = 24
# GroundingDINO-T (Swin-T backbone, BERT-base text tower, 900 queries) and SAM ViT-B are the two configs'
# defaults in transformers; the BERT vocabulary keeps bert-base-uncased's size.
FULL_DETECTOR_CONFIG = {"backbone_config": {"model_type": "swin", "out_indices": [2, 3, 4]},
                        "text_config": {"model_type": "bert", "vocab_size": 30522}}
FULL_DETECTOR_SIZE = {"shortest_edge": 800, "longest_edge": 1333}
FULL_SAM_CONFIG: dict = {}
FULL_SAM_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """One model's image preprocessing: resize rule, interpolation, mean, std (and SAM's square padding)."""

    size: dict  # {"shortest_edge", "longest_edge"} (GroundingDINO) or {"longest_edge"} (SAM)
    mean: tuple = preprocess.IMAGENET_MEAN
    std: tuple = preprocess.IMAGENET_STD
    resize_mode: str = "bilinear"
    pad: tuple[int, int] | None = None  # SAM: (height, width) the resized image is zero-padded to

    @classmethod
    def from_config(cls, config: dict | None, size: dict, pad: tuple[int, int] | None = None) -> "ImageSettings":
        config = config or {}
        padding = config.get("pad_size")
        return cls(size=dict(config.get("size") or size),
                   mean=tuple(config.get("image_mean", preprocess.IMAGENET_MEAN)),
                   std=tuple(config.get("image_std", preprocess.IMAGENET_STD)),
                   resize_mode=preprocess.resample_mode(config, "bilinear"),
                   pad=(padding["height"], padding["width"]) if isinstance(padding, dict) else pad)


def detector_input_size(height: int, width: int, shortest: int, longest: int | None) -> tuple[int, int]:
    """GroundingDINO's (DETR's) resize: shorter side to ``shortest``, shrunk so the longer stays <= ``longest``."""
    raw = None
    if longest is not None:
        small, large = float(min(height, width)), float(max(height, width))
        if large / small * shortest > longest:
            raw = longest * small / large
            shortest = int(round(raw))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    if width < height:
        return int((raw if raw is not None else shortest) * height / width), shortest
    return shortest, int((raw if raw is not None else shortest) * width / height)


def grounding_prompt(text: str) -> str:
    """GroundingDINO's prompt form: lowercased, ending with a dot (``"Bird"`` -> ``"bird."``)."""
    text = text.strip().lower()
    return text if text.endswith(".") else text + "."


class LangSamSegmenter(Segmenter):
    """GroundingDINO boxes -> SAM masks -> their union per image.

    Args:
        detector: ``GroundingDinoForObjectDetection``; processor: its ``GroundingDinoProcessor`` (tokenizer and
            ``post_process_grounded_object_detection``); sam: ``SamModel``; all on one device.
        detector_images, sam_images: each model's :class:`ImageSettings`.
        box_threshold, text_threshold: GroundingDINO's thresholds; max_boxes: keep at most this many boxes per
            image (the highest-scoring), None = all.
        batch_size: images per forward pass.
    """

    def __init__(self, detector: GroundingDinoForObjectDetection, processor: GroundingDinoProcessor,
                 sam: SamModel, *, detector_images: ImageSettings, sam_images: ImageSettings,
                 box_threshold: float = OPTIONS["box_threshold"], text_threshold: float = OPTIONS["text_threshold"],
                 max_boxes: int | None = None, batch_size: int = OPTIONS["batch_size"], source: str = ""):
        _check_settings(box_threshold, text_threshold, max_boxes, batch_size)
        self.detector = detector.eval().requires_grad_(False)
        self.sam = sam.eval().requires_grad_(False)
        self.processor = processor
        self.detector_images, self.sam_images = detector_images, sam_images
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        self.max_boxes, self.batch_size, self.source = max_boxes, batch_size, source
        parameter = next(detector.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.max_text_len = int(detector.config.max_text_len)
        self.calls = 0  # images segmented so far

    def __repr__(self) -> str:
        return (f"LangSamSegmenter({self.source or 'GroundingDINO+SAM'}, box_threshold={self.box_threshold}, "
                f"text_threshold={self.text_threshold}, {self.dtype}, {self.device})")

    # ------------------------------------------------------------------------------------------ detection
    def detector_inputs(self, images: torch.Tensor, texts: list[str]) -> dict:
        """What ``GroundingDinoProcessor(images=..., text=...)`` returns, computed in torch on the device."""
        settings = self.detector_images
        x = preprocess.check_images(images).to(self.device, non_blocking=True).float()
        size = detector_input_size(*x.shape[-2:], settings.size["shortest_edge"], settings.size.get("longest_edge"))
        x = preprocess.normalize(preprocess.resize(x, size, settings.resize_mode), settings.mean, settings.std)
        tokens = self.processor.tokenizer([grounding_prompt(t) for t in texts], padding=True, truncation=True,
                                          max_length=self.max_text_len, return_tensors="pt").to(self.device)
        pixel_mask = torch.ones((x.shape[0], *size), dtype=torch.int64, device=self.device)
        return {"pixel_values": x.to(self.dtype), "pixel_mask": pixel_mask, **tokens}

    @torch.inference_mode()
    def detect(self, images: torch.Tensor, texts: list[str]) -> list[dict]:
        """Per image: ``{"boxes": float32 (k, 4) (x0, y0, x1, y1) in pixels, "scores": (k,), "labels": [str]}``,
        the boxes above ``box_threshold`` (best first, at most ``max_boxes``), clipped to the image."""
        height, width = images.shape[-2:]
        results = []
        for i in range(0, images.shape[0], self.batch_size):
            inputs = self.detector_inputs(images[i:i + self.batch_size], texts[i:i + self.batch_size])
            outputs = self.detector(**inputs)
            outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
            found = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
                target_sizes=[(height, width)] * inputs["input_ids"].shape[0])
            for item in found:
                order = torch.argsort(item["scores"], descending=True)[:self.max_boxes]
                boxes = item["boxes"][order]
                boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                                     boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)
                labels = item["text_labels"] if "text_labels" in item else item["labels"]
                results.append({"boxes": boxes, "scores": item["scores"][order],
                                "labels": [labels[j] for j in order.tolist()]})
        return results

    # ------------------------------------------------------------------------------------------- SAM
    def sam_inputs(self, images: torch.Tensor, boxes: torch.Tensor) -> dict:
        """What ``SamProcessor(images, input_boxes=boxes)`` returns (``boxes`` float (n, k, 4) in pixels)."""
        settings = self.sam_images
        x = preprocess.check_images(images).to(self.device, non_blocking=True).float()
        height, width = x.shape[-2:]
        size = preprocess.longest_edge_size(height, width, settings.size["longest_edge"])
        x = preprocess.normalize(preprocess.resize(x, size, settings.resize_mode), settings.mean, settings.std)
        x = preprocess.pad_bottom_right(x, settings.pad or size)
        scale = torch.tensor([size[1] / width, size[0] / height] * 2, device=self.device)
        return {"pixel_values": x.to(self.dtype), "input_boxes": (boxes.to(self.device) * scale).to(self.dtype),
                "resized_size": size}

    @torch.inference_mode()
    def box_masks(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """bool (n, k, H, W): SAM's mask for each of ``boxes`` (float (n, k, 4), pixels), at the images' size."""
        inputs = self.sam_inputs(images, boxes)
        resized = inputs.pop("resized_size")
        low_res = self.sam(**inputs, multimask_output=False).pred_masks[:, :, 0].float()  # (n, k, h, w)
        padded = inputs["pixel_values"].shape[-2:]
        logits = F.interpolate(low_res, size=padded, mode="bilinear", align_corners=False)
        logits = logits[..., :resized[0], :resized[1]]
        logits = F.interpolate(logits, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        return logits > 0.0

    # ---------------------------------------------------------------------------------------- segment
    def _segment(self, images, texts, indices, crops):
        images = images.to(self.device, non_blocking=True)
        detections = self.detect(images, texts)
        masks = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=self.device)
        found = torch.tensor([len(d["boxes"]) > 0 for d in detections], dtype=torch.bool)
        rows = found.nonzero().flatten().tolist()
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            boxes = _padded_boxes([detections[r]["boxes"] for r in chunk])
            masks[chunk] = self.box_masks(images[chunk], boxes).any(dim=1)  # union (padding repeats a box)
        self.calls += images.shape[0]
        return masks, found.to(self.device)


def _padded_boxes(boxes: list[torch.Tensor]) -> torch.Tensor:
    """(n, max k, 4): SAM needs as many boxes per image; shorter lists repeat their best box."""
    count = max(len(b) for b in boxes)
    return torch.stack([torch.cat([b, b[:1].expand(count - len(b), 4)]) for b in boxes])


def _check_settings(box_threshold, text_threshold, max_boxes, batch_size) -> None:
    for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if max_boxes is not None and (isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes < 1):
        raise ValueError(f"max_boxes must be a positive int or None, got {max_boxes!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


# ------------------------------------------------------------------------------------------------ loading


def build_detector(source: str = "tiny", *, seed: int = 0, device="cpu",
                   dtype=torch.float32) -> GroundingDinoForObjectDetection:
    """A random-weight GroundingDINO: ``"tiny"`` or ``"full-random"`` (GroundingDINO-T), from ``seed``."""
    configs = {"tiny": TINY_DETECTOR_CONFIG, "full-random": FULL_DETECTOR_CONFIG}
    if source not in configs:
        raise ValueError(f"random GroundingDINO source must be 'tiny' or 'full-random', got {source!r}")
    config = dict(configs[source])
    backbone, text = dict(config.pop("backbone_config")), dict(config.pop("text_config"))
    backbone.pop("model_type"), text.pop("model_type")
    with building(seed, f"lang-sam/grounding-dino/{source}", torch.device(device), dtype):
        model = GroundingDinoForObjectDetection(GroundingDinoConfig(
            backbone_config=SwinConfig(**backbone), text_config=BertConfig(**text), **config))
    return model.eval().requires_grad_(False)


def build_sam(source: str = "tiny", *, seed: int = 0, device="cpu", dtype=torch.float32) -> SamModel:
    """A random-weight SAM: ``"tiny"`` or ``"full-random"`` (ViT-B), from ``seed``."""
    configs = {"tiny": TINY_SAM_CONFIG, "full-random": FULL_SAM_CONFIG}
    if source not in configs:
        raise ValueError(f"random SAM source must be 'tiny' or 'full-random', got {source!r}")
    with building(seed, f"lang-sam/sam/{source}", torch.device(device), dtype):
        model = SamModel(SamConfig(**configs[source]))
    return model.eval().requires_grad_(False)


def build_detector_processor(source: str = "tiny") -> GroundingDinoProcessor:
    """The processor of a random-weight detector: the generated BERT vocabulary, the image sizes of ``source``."""
    size = TINY_DETECTOR_SIZE if source == "tiny" else FULL_DETECTOR_SIZE
    return GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size=dict(size)),
                                  tokenizer=build_bert_tokenizer())


def split_source(spec: ModelSpec, options: dict) -> tuple[str, str]:
    """(detector source, SAM source) of a real-weight ``lang-sam`` spec."""
    if "+" in spec.source:
        detector, _, sam = spec.source.partition("+")
        if not detector or not sam or "+" in sam:
            raise ValueError(f"a 'lang-sam' source is '<GroundingDINO>+<SAM>' (hub ids or folders), got "
                             f"{spec.source!r}")
        return detector, sam
    return spec.source, options["sam"]


def _options(role: ModelRole) -> dict:
    options = check_options("lang-sam", role.options, OPTIONS)
    _check_settings(options["box_threshold"], options["text_threshold"], options["max_boxes"], options["batch_size"])
    if not isinstance(options["sam"], str) or not options["sam"]:
        raise ValueError(f"option 'sam' must be a SAM hub id or folder, got {options['sam']!r}")
    return options


def _random_source(spec: ModelSpec) -> str | None:
    random = spec.random_weights
    if random is not None and random[1] is not None:
        raise ValueError(f"source {spec.source!r} names a diffusion architecture; a 'lang-sam' segmenter takes "
                         f"'tiny' or 'full-random'")
    return random[0] if random else None


def _locate_pair(spec: ModelSpec, options: dict) -> tuple[Checkpoint, Checkpoint]:
    detector, sam = split_source(spec, options)
    return (locate(detector, what="GroundingDINO detector (lang-sam)", default_repo=DEFAULT_DETECTOR,
                   tokenizer_files=BERT_TOKENIZER_FILES),
            locate(sam, what="SAM (lang-sam)", default_repo=DEFAULT_SAM))


def load_lang_sam(role: ModelRole, spec: ModelSpec, *, device: torch.device, policy: LoadPolicy = LoadPolicy(),
                  seed: int = 0) -> LangSamSegmenter:
    options = _options(role)
    settings = {k: options[k] for k in ("box_threshold", "text_threshold", "max_boxes", "batch_size")}
    device = torch.device(device)
    dtype = policy_dtype(policy, device)
    random = _random_source(spec)
    if random is not None:
        detector_size = TINY_DETECTOR_SIZE if random == "tiny" else FULL_DETECTOR_SIZE
        sam_size = TINY_SAM_SIZE if random == "tiny" else FULL_SAM_SIZE
        return LangSamSegmenter(
            build_detector(random, seed=seed, device=device, dtype=dtype), build_detector_processor(random),
            build_sam(random, seed=seed, device=device, dtype=dtype),
            detector_images=ImageSettings(size=dict(detector_size)),
            sam_images=ImageSettings(size={"longest_edge": sam_size}, pad=(sam_size, sam_size)),
            source=f"{random} random GroundingDINO + SAM", **settings)
    detector_checkpoint, sam_checkpoint = _locate_pair(spec, options)
    detector_source, sam_source = split_source(spec, options)
    try:
        detector = GroundingDinoForObjectDetection.from_pretrained(
            detector_checkpoint.location, dtype=dtype, **detector_checkpoint.from_pretrained_kwargs).to(device)
        processor = GroundingDinoProcessor.from_pretrained(detector_checkpoint.location,
                                                           **detector_checkpoint.from_pretrained_kwargs)
    except OSError as err:
        raise ModelNotFoundError(not_found_message("GroundingDINO detector (lang-sam)", detector_source,
                                                   DEFAULT_DETECTOR, detector_checkpoint.location, str(err))) from err
    try:
        sam = SamModel.from_pretrained(sam_checkpoint.location, dtype=dtype,
                                       **sam_checkpoint.from_pretrained_kwargs).to(device)
    except OSError as err:
        raise ModelNotFoundError(not_found_message("SAM (lang-sam)", sam_source, DEFAULT_SAM,
                                                   sam_checkpoint.location, str(err))) from err
    return LangSamSegmenter(
        detector, processor, sam,
        detector_images=ImageSettings.from_config(detector_checkpoint.image_processor_config(),
                                                  dict(FULL_DETECTOR_SIZE)),
        sam_images=ImageSettings.from_config(sam_checkpoint.image_processor_config(),
                                             {"longest_edge": FULL_SAM_SIZE}, pad=(FULL_SAM_SIZE, FULL_SAM_SIZE)),
        source=f"{detector_source} + {sam_source}", **settings)


def ensure_lang_sam_available(role: ModelRole, spec: ModelSpec) -> None:
    options = _options(role)
    if _random_source(spec) is None:
        _locate_pair(spec, options)


def describe_lang_sam(role: ModelRole, spec: ModelSpec) -> str:
    random = spec.random_weights
    if random is not None:
        what = "tiny" if random[0] == "tiny" else "full-size GroundingDINO-T + SAM ViT-B"
        return f"{what} random-weight Lang-SAM segmenter (in-process)"
    detector, sam = split_source(spec, {**OPTIONS, **role.options})
    return (f"Lang-SAM: {describe_source(detector, 'GroundingDINO')} + {describe_source(sam, 'SAM')}")
