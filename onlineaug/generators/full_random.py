"""Full-size Stable Diffusion 1.5 and SDXL base 1.0 architectures with RANDOM weights (no download).

For benchmarks: the FLOPs, memory traffic and speed of the real generators, without the weights.
The configs below are those of the released checkpoints (``unet/config.json``, ``vae/config.json``,
``text_encoder/config.json`` and for SDXL ``text_encoder_2/config.json`` of Stable Diffusion 1.5 and
``stabilityai/stable-diffusion-xl-base-1.0``); InstructPix2Pix (Brooks, Holynski, Efros, CVPR 2023)
changes only the UNet's ``in_channels`` from 4 to 8, the inpainting models to 9. Outputs are noise:
never use this for augmentation quality.

Parameter counts: SD 1.5 UNet 859,520,964 (+4x320x3x3 weights of the first convolution for
InstructPix2Pix, +5x320x3x3 for inpainting), VAE 83,653,863, CLIP ViT-L/14 text encoder 123,060,480.
SDXL: UNet 2,567,463,684, the same VAE size, CLIP ViT-L/14 text encoder 123,060,480 and OpenCLIP
ViT-bigG/14 text encoder with projection 694,659,840.

Models are constructed directly on the target device in the target dtype (``torch.device`` context
and a temporary default dtype), so building on a GPU takes about a second; ``device="meta"`` builds
the structure with no memory at all (used by the tests to count parameters).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .seeding import check_seed, seeded
from .tasks import UNET_IN_CHANNELS, base_scheduler, check_architecture, check_task, pipeline_class
from .tiny import pipeline_options
from .tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, build_tokenizer

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SD15_VAE_CONFIG = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the entries that differ from diffusers' defaults)
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG) penultimate states
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 size/crop numbers x 256 + the 1280-d pooled text
}

SDXL_VAE_CONFIG = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# openai/clip-vit-large-patch14 text tower, as shipped in SD 1.5's text_encoder/config.json. The
# embedding keeps the real 49,408 rows although the generated tokenizer uses only its first 514 ids.
# eos_token_id == 2 is the legacy value: transformers then pools at the largest id (argmax), which is
# <|endoftext|> both in the real vocabulary and in the generated one.
CLIP_VIT_L14_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
assert VOCAB_SIZE <= CLIP_VIT_L14_TEXT_CONFIG["vocab_size"]  # module invariant, not user input

# laion/CLIP-ViT-bigG-14 text tower, as shipped in SDXL base 1.0's text_encoder_2/config.json
# (CLIPTextModelWithProjection: its 1280-d pooled, projected output conditions the UNet's added embedding).
OPENCLIP_VIT_BIGG14_TEXT_CONFIG = {
    **CLIP_VIT_L14_TEXT_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}


def unet_config(task: str, architecture: str = "sd15") -> dict:
    base = SDXL_UNET_CONFIG if check_architecture(architecture) == "sdxl" else SD15_UNET_CONFIG
    return {**base, "in_channels": UNET_IN_CHANNELS[check_task(task)]}


@contextlib.contextmanager
def _allocate_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New tensors go to ``device`` in ``dtype`` (process-global default dtype, restored on exit)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def _stream(name: str, architecture: str) -> str:
    return f"full-random/{name}" if architecture == "sd15" else f"full-random/{architecture}/{name}"


def build_full_random_unet(task: str, device="cpu", dtype=torch.float32, seed: int = 0, architecture: str = "sd15"):
    device = torch.device(device)
    config = unet_config(task, architecture)
    with _allocate_on(device, dtype), seeded(seed, _stream("unet", architecture), device):
        return UNet2DConditionModel(**config).eval().requires_grad_(False)


def build_full_random_vae(device="cpu", dtype=torch.float32, seed: int = 0, architecture: str = "sd15"):
    device = torch.device(device)
    config = SDXL_VAE_CONFIG if check_architecture(architecture) == "sdxl" else SD15_VAE_CONFIG
    with _allocate_on(device, dtype), seeded(seed, _stream("vae", architecture), device):
        return AutoencoderKL(**config).eval().requires_grad_(False)


def build_full_random_text_encoder(device="cpu", dtype=torch.float32, seed: int = 0):
    device = torch.device(device)
    with _allocate_on(device, dtype), seeded(seed, "full-random/text_encoder", device):
        model = CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT_CONFIG))
    return model.eval().requires_grad_(False)


def build_full_random_text_encoder_2(device="cpu", dtype=torch.float32, seed: int = 0):
    """SDXL's second text encoder (OpenCLIP ViT-bigG/14 text tower with its projection)."""
    device = torch.device(device)
    with _allocate_on(device, dtype), seeded(seed, "full-random/sdxl/text_encoder_2", device):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_VIT_BIGG14_TEXT_CONFIG))
    return model.eval().requires_grad_(False)


def build_full_random_pipeline(
    task: str = "instruct-pix2pix", device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
    architecture: str = "sd15",
) -> DiffusionPipeline:
    """The full-size pipeline for ``task`` and ``architecture`` with random weights, on ``device`` in ``dtype``.

    Weights depend on ``(seed, device type, dtype)``: initialisers draw differently on CPU and GPU.
    ``device="meta"`` builds the structure without memory (parameter counts, shape checks).
    """
    check_task(task)
    check_architecture(architecture)
    check_seed(seed)
    components = dict(
        vae=build_full_random_vae(device, dtype, seed, architecture),
        text_encoder=build_full_random_text_encoder(device, dtype, seed),
        tokenizer=build_tokenizer(),
        unet=build_full_random_unet(task, device, dtype, seed, architecture),
        scheduler=base_scheduler(task, architecture),
    )
    if architecture == "sdxl":
        components.update(text_encoder_2=build_full_random_text_encoder_2(device, dtype, seed),
                          tokenizer_2=build_tokenizer())
    return pipeline_class(task, architecture)(**components, **pipeline_options(architecture))
