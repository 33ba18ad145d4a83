"""Tiny random-weight Stable Diffusion 1.x and SDXL pipelines, built in process (no files, no download).

Same diffusers classes and data path as the real generators, sized so a 64x64, 4-step edit of a batch
takes a fraction of a second on a CPU. The UNet's input channels follow the task (8 for InstructPix2Pix,
Brooks, Holynski, Efros, CVPR 2023; 9 for inpainting; 4 otherwise); the components follow the dummy
components of diffusers' own pipeline tests (``get_dummy_components``), with a 4-level VAE so that the
latent geometry matches the real one (``vae_scale_factor == 8``, 4 latent channels).

SDXL (Podell et al., 2023) as in diffusers' SDXL pipeline tests: two text encoders (``CLIPTextModel`` and
``CLIPTextModelWithProjection``) whose penultimate hidden states are concatenated into the UNet's
cross-attention (32 + 32 = 64 wide), and the ``"text_time"`` added embedding: the pooled, projected text
embedding (32) concatenated with the six size/crop conditioning numbers, each embedded in 8 sinusoidal
features (6 x 8 + 32 = 80 inputs). Its VAE has ``force_upcast=True`` as SDXL's does.

Image sizes: as with the real pipelines, height and width should be multiples of 8 (the VAE factor;
the pipeline rounds other sizes down), e.g. 64 or 256. Weights depend only on ``seed`` (see
:mod:`.seeding`): identical in any process.
"""
from __future__ import annotations

import os

from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ._progress import quiet_progress_bars
from .seeding import check_seed, seeded
from .tasks import UNET_IN_CHANNELS, base_scheduler, check_architecture, check_task, pipeline_class
from .tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, build_tokenizer

TINY_HIDDEN = 32  # text-encoder width == SD 1.x UNet cross-attention width
TINY_TIME_EMBED = 8  # SDXL addition_time_embed_dim
SDXL_TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)


def tiny_unet_config(task: str, architecture: str = "sd15") -> dict:
    config = {
        "sample_size": 8,
        "in_channels": UNET_IN_CHANNELS[check_task(task)],
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": TINY_HIDDEN,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }
    if check_architecture(architecture) == "sdxl":
        config.update({
            "cross_attention_dim": 2 * TINY_HIDDEN,  # both encoders' hidden states, concatenated
            "attention_head_dim": (2, 4),  # heads per level (diffusers' legacy name)
            "use_linear_projection": True,
            "transformer_layers_per_block": (1, 2),
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": TINY_TIME_EMBED,
            "projection_class_embeddings_input_dim": SDXL_TIME_IDS * TINY_TIME_EMBED + TINY_HIDDEN,
        })
    return config


TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
# SDXL's VAE: the same architecture with its own latent scale, decoded in fp32 when the pipeline runs in fp16
# (force_upcast: the SDXL VAE overflows in fp16).
TINY_SDXL_VAE_CONFIG = {**TINY_VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}


def tiny_vae_config(architecture: str = "sd15") -> dict:
    return TINY_SDXL_VAE_CONFIG if check_architecture(architecture) == "sdxl" else TINY_VAE_CONFIG


def tiny_text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TINY_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=TINY_HIDDEN,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=VOCAB_SIZE - 2,  # the generated tokenizer's <|startoftext|>
        eos_token_id=VOCAB_SIZE - 1,  # and <|endoftext|>, which is also its pad token
        pad_token_id=VOCAB_SIZE - 1,
    )


def build_tiny_pipeline(task: str = "instruct-pix2pix", seed: int = 0, architecture: str = "sd15") -> DiffusionPipeline:
    """Build the tiny pipeline for ``task`` and ``architecture`` on the CPU in float32, in eval mode.

    Always built on the CPU so the weights are the same whatever device the caller moves it to.
    """
    check_task(task)
    check_architecture(architecture)
    check_seed(seed)
    with seeded(seed, "unet" if architecture == "sd15" else f"{architecture}/unet"):
        unet = UNet2DConditionModel(**tiny_unet_config(task, architecture))
    with seeded(seed, "vae" if architecture == "sd15" else f"{architecture}/vae"):
        vae = AutoencoderKL(**tiny_vae_config(architecture))
    with seeded(seed, "text_encoder"):
        text_encoder = CLIPTextModel(tiny_text_config())
    components = dict(vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(), unet=unet,
                      scheduler=base_scheduler(task, architecture))
    if architecture == "sdxl":
        with seeded(seed, "sdxl/text_encoder_2"):
            components["text_encoder_2"] = CLIPTextModelWithProjection(tiny_text_config())
        components["tokenizer_2"] = build_tokenizer()
    for module in components.values():
        if hasattr(module, "requires_grad_"):
            module.eval().requires_grad_(False)
    return pipeline_class(task, architecture)(**components, **pipeline_options(architecture))


def pipeline_options(architecture: str) -> dict:
    """The constructor arguments besides the components that every pipeline of ``architecture`` is built with.

    SD 1.x: no safety checker (augmentation, not publication). SDXL: no invisible watermark (it would alter the
    training images; diffusers adds one when the ``invisible-watermark`` package happens to be installed).
    """
    if check_architecture(architecture) == "sdxl":
        return {"add_watermarker": False}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def save_tiny_pipeline(path: str | os.PathLike, task: str = "instruct-pix2pix", seed: int = 0,
                       architecture: str = "sd15") -> str:
    """Build the tiny pipeline and ``save_pretrained`` it to ``path``; return the path as a string.

    The folder is a regular diffusers pipeline (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/, and for SDXL text_encoder_2/, tokenizer_2/), so loading it exercises the real
    ``from_pretrained`` path offline.
    """
    path = os.fspath(path)
    pipe = build_tiny_pipeline(task, seed=seed, architecture=architecture)
    with quiet_progress_bars():
        pipe.save_pretrained(path)
    return path
