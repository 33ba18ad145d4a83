"""CLIP image and text embeddings (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021), the filter of DiffCoRe-Mix (paper Eq. 5: ``S(I, G) = cos(CLIP(I), CLIP(G))``).

:class:`ClipEmbedder` wraps a transformers ``CLIPModel``. Images are preprocessed in torch on the model's device
exactly as ``CLIPImageProcessor`` does (resize the shorter side to the model's image size with bicubic
antialiasing, center crop, CLIP mean/std), so a producer never round-trips its GPU images through PIL.

Sources: ``"tiny"`` (a tiny random CLIP built in process, for tests), ``"full-random"`` (the ViT-B/32
architecture with random weights, for benchmarks), or a hub id / local folder
(default :data:`DEFAULT_CLIP`, the ViT-B/32 the DiffCoRe-Mix code uses), never downloaded.
"""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from onlineaug.generators.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, build_tokenizer
from onlineaug.models import preprocess
from onlineaug.models.checkpoints import (
    CLIP_TOKENIZER_FILES,
    Checkpoint,
    ModelNotFoundError,
    building,
    describe_source,
    locate,
    not_found_message,
    policy_dtype,
)
from onlineaug.models.spec import LoadPolicy, ModelRole, ModelSpec

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
OPTIONS = {"batch_size": 64}  # ModelRole.options a "clip" role accepts, with their defaults

TINY_CLIP_CONFIG = {
    "text_config": {"vocab_size": VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "max_position_embeddings": MODEL_MAX_LENGTH,
                    "bos_token_id": VOCAB_SIZE - 2, "eos_token_id": VOCAB_SIZE - 1, "pad_token_id": VOCAB_SIZE - 1},
    "vision_config": {"image_size": 32, "patch_size": 4, "hidden_size": 32, "intermediate_size": 37,
                      "num_hidden_layers": 2, "num_attention_heads": 4},
    "projection_dim": 64,
}
# The generated tokenizer's start/end tokens are its two last ids (VOCAB_SIZE - 2, VOCAB_SIZE - 1).
# openai/clip-vit-base-patch32: ViT-B/32 image tower (224 px), 12-layer 512-wide text tower, 512-d embeddings.
VIT_B32_CONFIG = {
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "max_position_embeddings": MODEL_MAX_LENGTH,
                    "bos_token_id": VOCAB_SIZE - 2, "eos_token_id": VOCAB_SIZE - 1, "pad_token_id": VOCAB_SIZE - 1},
    "vision_config": {"image_size": 224, "patch_size": 32, "hidden_size": 768, "intermediate_size": 3072,
                      "num_hidden_layers": 12, "num_attention_heads": 12},
    "projection_dim": 512,
}


class ClipEmbedder:
    """L2-normalised CLIP embeddings of uint8 images and of texts, batched, in inference mode.

    Args:
        model: a ``CLIPModel`` (moved to its device and dtype already).
        tokenizer: its tokenizer (``CLIPTokenizer``).
        image_size: the shorter side images are resized to; crop_size: the centred crop (both (h, w) or int).
        mean, std: per-channel normalisation; resize_mode: torch interpolation mode (CLIP: bicubic).
        batch_size: images or texts per forward pass.
        source: what the weights are, for ``repr`` and logs.

    Attributes:
        dim: the embedding size D; device: where the model runs; dtype: its parameters' dtype.
    """

    def __init__(self, model: CLIPModel, tokenizer, *, image_size: int, crop_size: tuple[int, int],
                 mean=preprocess.OPENAI_CLIP_MEAN, std=preprocess.OPENAI_CLIP_STD, resize_mode: str = "bicubic",
                 batch_size: int = 64, source: str = ""):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model.eval().requires_grad_(False)
        # The towers as attributes too: the producer's heartbeat hooks every module it finds here.
        self.vision_model, self.text_model = model.vision_model, model.text_model
        self.tokenizer = tokenizer
        self.image_size, self.crop_size = int(image_size), (int(crop_size[0]), int(crop_size[1]))
        self.mean, self.std, self.resize_mode = tuple(mean), tuple(std), resize_mode
        self.batch_size = batch_size
        self.source = source
        self.dim = int(model.config.projection_dim)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.max_length = min(int(getattr(tokenizer, "model_max_length", MODEL_MAX_LENGTH) or MODEL_MAX_LENGTH),
                              int(model.config.text_config.max_position_embeddings))

    def __repr__(self) -> str:
        return (f"ClipEmbedder({self.source or 'CLIPModel'}, dim={self.dim}, image {self.crop_size[0]}x"
                f"{self.crop_size[1]}, {self.dtype}, {self.device})")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, H, W) -> the model's ``pixel_values`` (n, 3, crop_h, crop_w) on its device and dtype."""
        x = preprocess.check_images(images).to(self.device, non_blocking=True).float()
        height, width = x.shape[-2:]
        x = preprocess.resize(x, preprocess.shortest_edge_size(height, width, self.image_size), self.resize_mode)
        x = preprocess.center_crop(x, self.crop_size)
        return preprocess.normalize(x, self.mean, self.std).to(self.dtype)

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """float32 (n, D) unit-norm image embeddings of uint8 (n, 3, H, W) images on any device."""
        images = preprocess.check_images(images)
        out = [self._project_images(self.preprocess(images[i:i + self.batch_size]))
               for i in range(0, images.shape[0], self.batch_size)]
        return _unit(torch.cat(out) if out else torch.empty(0, self.dim, device=self.device))

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """float32 (n, D) unit-norm text embeddings (texts longer than CLIP's 77 tokens are truncated)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a list of str, got {texts!r:.80}")
        texts = list(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            out.append(self.model.text_projection(hidden.pooler_output))
        return _unit(torch.cat(out) if out else torch.empty(0, self.dim, device=self.device))

    def _project_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


def _unit(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1)


# ------------------------------------------------------------------------------------------------ loading


def _options(role: ModelRole) -> dict:
    unknown = sorted(set(role.options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"a 'clip' role has no options {unknown}; valid options: {sorted(OPTIONS)}")
    return {**OPTIONS, **role.options}


def _locate(source: str, role_name: str) -> Checkpoint:
    return locate(source, what=f"CLIP (role {role_name!r})", default_repo=DEFAULT_CLIP,
                  tokenizer_files=CLIP_TOKENIZER_FILES)


def _random_source(spec: ModelSpec) -> str | None:
    random = spec.random_weights
    if random is not None and random[1] is not None:
        raise ValueError(f"source {spec.source!r} names a diffusion architecture; a 'clip' role takes 'tiny' or "
                         f"'full-random'")
    return random[0] if random else None


def build_clip_model(source: str = "tiny", *, seed: int = 0, device="cpu", dtype=torch.float32) -> CLIPModel:
    """A random-weight ``CLIPModel``: ``"tiny"`` or ``"full-random"`` (ViT-B/32), reproducible from ``seed``."""
    configs = {"tiny": TINY_CLIP_CONFIG, "full-random": VIT_B32_CONFIG}
    if source not in configs:
        raise ValueError(f"random CLIP source must be 'tiny' or 'full-random', got {source!r}")
    with building(seed, f"clip/{source}", torch.device(device), dtype):
        model = CLIPModel(CLIPConfig(**configs[source]))
    return model.eval().requires_grad_(False)


def load_clip(role: ModelRole, spec: ModelSpec, *, device: torch.device, policy: LoadPolicy = LoadPolicy(),
              seed: int = 0, role_name: str = "filter") -> ClipEmbedder:
    """The :class:`ClipEmbedder` for ``spec`` on ``device`` (dtype per ``policy``: fp16 on CUDA by default)."""
    options = _options(role)
    device = torch.device(device)
    dtype = policy_dtype(policy, device)
    random = _random_source(spec)
    if random is not None:
        model = build_clip_model(random, seed=seed, device=device, dtype=dtype)
        tokenizer = build_tokenizer()
        size = model.config.vision_config.image_size
        return ClipEmbedder(model, tokenizer, image_size=size, crop_size=(size, size),
                            batch_size=options["batch_size"], source=f"{random} random CLIP")
    checkpoint = _locate(spec.source, role_name)
    try:
        model = CLIPModel.from_pretrained(checkpoint.location, dtype=dtype, **checkpoint.from_pretrained_kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(checkpoint.location, **checkpoint.from_pretrained_kwargs)
    except OSError as err:  # transformers / huggingface_hub report missing files as OSError
        raise ModelNotFoundError(not_found_message(f"CLIP (role {role_name!r})", spec.source, DEFAULT_CLIP,
                                                   checkpoint.location, str(err))) from err
    model.to(device)
    config = checkpoint.read_json("preprocessor_config.json") or {}
    size = _edge(config.get("size"), model.config.vision_config.image_size)
    crop = config.get("crop_size", size)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
    return ClipEmbedder(model, tokenizer, image_size=size, crop_size=crop,
                        mean=config.get("image_mean", preprocess.OPENAI_CLIP_MEAN),
                        std=config.get("image_std", preprocess.OPENAI_CLIP_STD),
                        resize_mode=preprocess.resample_mode(config, "bicubic"),
                        batch_size=options["batch_size"], source=spec.source)


def _edge(size, default: int) -> int:
    """The shorter-side size of a processor config's ``size`` (an int, ``{"shortest_edge"}`` or (h, w))."""
    if size is None:
        return int(default)
    if isinstance(size, dict):
        return int(size.get("shortest_edge") or min(size["height"], size["width"]))
    return int(size)


def ensure_clip_available(role_name: str, role: ModelRole, spec: ModelSpec) -> None:
    """Raise now what :func:`load_clip` would raise for missing weights or bad options."""
    _options(role)
    if _random_source(spec) is None:
        _locate(spec.source, role_name)


def describe_clip(spec: ModelSpec) -> str:
    random = spec.random_weights
    if random is not None:
        what = "tiny" if random[0] == "tiny" else "full-size ViT-B/32"
        return f"{what} random-weight CLIP (in-process)"
    return describe_source(spec.source, "CLIP")
