"""Task names and the diffusers pipeline class that serves each one.

``instruct-pix2pix`` is InstructPix2Pix (Brooks, Holynski, Efros, "InstructPix2Pix: Learning to Follow
Image Editing Instructions", CVPR 2023): a Stable Diffusion 1.5 UNet whose first convolution takes 8
channels (the noisy latent and the latent of the image to edit), guided by text and image.
``img2img`` and ``text2img`` are the plain Stable Diffusion 1.5 pipelines (UNet with 4 input channels).
"""
from __future__ import annotations

from diffusers import (
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
)

TASKS = ("instruct-pix2pix", "img2img", "text2img")

PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "instruct-pix2pix": StableDiffusionInstructPix2PixPipeline,
    "img2img": StableDiffusionImg2ImgPipeline,
    "text2img": StableDiffusionPipeline,
}

# Input channels of the UNet's first convolution: InstructPix2Pix concatenates the image latent.
UNET_IN_CHANNELS = {"instruct-pix2pix": 8, "img2img": 4, "text2img": 4}

# Human-readable names, for describe().
TASK_TITLES = {"instruct-pix2pix": "InstructPix2Pix", "img2img": "SD img2img", "text2img": "SD text2img"}

# Hub ids suggested in error messages when the user gave something that is not a hub id.
DEFAULT_HUB_IDS = {
    "instruct-pix2pix": "timbrooks/instruct-pix2pix",
    "img2img": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "text2img": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}


# The scheduler each released checkpoint ships (scheduler/scheduler_config.json): PNDM for SD 1.5,
# Euler ancestral for timbrooks/instruct-pix2pix. ``timestep_spacing`` is written out: those files
# omit it, so diffusers uses each class's default ("leading" for PNDM, "linspace" for Euler); written
# explicitly, a random-weight pipeline behaves the same before and after save_pretrained.
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "trained_betas": None,
}


def base_scheduler(task: str):
    """The scheduler a random-weight pipeline for ``task`` is built with (as the real checkpoint's)."""
    if check_task(task) == "instruct-pix2pix":
        config = {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "linspace"}
        return EulerAncestralDiscreteScheduler.from_config(config)
    return PNDMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "timestep_spacing": "leading"})


def check_task(task: str) -> str:
    """Return ``task`` if it is one of :data:`TASKS`, else raise ``ValueError`` naming the valid ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(repr(t) for t in TASKS)}")
    return task
