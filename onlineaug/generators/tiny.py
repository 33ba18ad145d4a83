"""Tiny random-weight Stable Diffusion pipelines, built in process (no files, no download).

Same diffusers classes and data path as the real generators, sized so a 64x64, 4-step edit of a batch
takes a fraction of a second on a CPU. For ``instruct-pix2pix`` the UNet takes 8 input channels, as in
InstructPix2Pix (Brooks, Holynski, Efros, CVPR 2023); the components follow the dummy components of
diffusers' own pipeline tests (``get_dummy_components``), with a 4-level VAE so that the latent
geometry matches the real one (``vae_scale_factor == 8``, 4 latent channels).

Image sizes: as with the real pipelines, height and width should be multiples of 8 (the VAE factor;
the pipeline rounds other sizes down), e.g. 64 or 256. Weights depend only on ``seed`` (see
:mod:`.seeding`): identical in any process.
"""
from __future__ import annotations

import os

from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ._progress import quiet_progress_bars
from .seeding import check_seed, seeded
from .tasks import PIPELINE_CLASSES, UNET_IN_CHANNELS, base_scheduler, check_task
from .tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, build_tokenizer

TINY_HIDDEN = 32  # text-encoder width == UNet cross-attention width


def tiny_unet_config(task: str) -> dict:
    return {
        "sample_size": 8,
        "in_channels": UNET_IN_CHANNELS[task],
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": TINY_HIDDEN,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }


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


def build_tiny_pipeline(task: str = "instruct-pix2pix", seed: int = 0) -> DiffusionPipeline:
    """Build the tiny pipeline for ``task`` on the CPU in float32, in eval mode.

    Always built on the CPU so the weights are the same whatever device the caller moves it to.
    """
    check_task(task)
    check_seed(seed)
    with seeded(seed, "unet"):
        unet = UNet2DConditionModel(**tiny_unet_config(task))
    with seeded(seed, "vae"):
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    with seeded(seed, "text_encoder"):
        text_encoder = CLIPTextModel(tiny_text_config())
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return PIPELINE_CLASSES[task](
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        unet=unet,
        scheduler=base_scheduler(task),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(path: str | os.PathLike, task: str = "instruct-pix2pix", seed: int = 0) -> str:
    """Build the tiny pipeline and ``save_pretrained`` it to ``path``; return the path as a string.

    The folder is a regular diffusers pipeline (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/), so ``load_pipeline(path, task)`` exercises the real ``from_pretrained``
    path offline.
    """
    path = os.fspath(path)
    pipe = build_tiny_pipeline(task, seed=seed)
    with quiet_progress_bars():
        pipe.save_pretrained(path)
    return path
