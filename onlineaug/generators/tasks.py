"""Tasks (the diffusion model kinds), architectures, and the diffusers pipeline class that serves each pair.

Tasks:

- ``instruct-pix2pix``: InstructPix2Pix (Brooks, Holynski, Efros, "InstructPix2Pix: Learning to Follow Image
  Editing Instructions", CVPR 2023): the UNet's first convolution takes 8 channels (the noisy latent and the
  latent of the image to edit), guided by text and image.
- ``img2img``: SDEdit (Meng et al., ICLR 2022) on a text-to-image UNet: noise the image's latent to strength s,
  denoise it under the prompt (4 input channels).
- ``text2img``: plain text-to-image (4 input channels).
- ``inpaint``: the inpainting UNet (9 input channels: 4 noisy latent + 1 mask + 4 masked-image latent).

Architectures: ``sd15`` (Stable Diffusion 1.x: one CLIP ViT-L/14 text encoder) and ``sdxl`` (Podell et al.,
"SDXL", 2023: two text encoders, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, and size/crop micro-conditioning).
"""
from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    StableDiffusionXLPipeline,
)

from onlineaug.models.spec import ARCHITECTURES, DIFFUSION_KINDS

TASKS = DIFFUSION_KINDS  # ("instruct-pix2pix", "img2img", "text2img", "inpaint")

PIPELINE_CLASSES: dict[tuple[str, str], type[DiffusionPipeline]] = {
    ("instruct-pix2pix", "sd15"): StableDiffusionInstructPix2PixPipeline,
    ("img2img", "sd15"): StableDiffusionImg2ImgPipeline,
    ("text2img", "sd15"): StableDiffusionPipeline,
    ("inpaint", "sd15"): StableDiffusionInpaintPipeline,
    ("instruct-pix2pix", "sdxl"): StableDiffusionXLInstructPix2PixPipeline,
    ("img2img", "sdxl"): StableDiffusionXLImg2ImgPipeline,
    ("text2img", "sdxl"): StableDiffusionXLPipeline,
    ("inpaint", "sdxl"): StableDiffusionXLInpaintPipeline,
}

# Input channels of the UNet's first convolution, per task (the same for both architectures).
UNET_IN_CHANNELS = {"instruct-pix2pix": 8, "img2img": 4, "text2img": 4, "inpaint": 9}

# The components each architecture's pipelines need (model_index.json must name them, with files on disk).
# safety_checker, feature_extractor and image_encoder are optional and never loaded.
REQUIRED_COMPONENTS = {
    "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}

# Human-readable names, for describe().
TASK_TITLES = {"instruct-pix2pix": "InstructPix2Pix", "img2img": "img2img", "text2img": "text2img",
               "inpaint": "inpainting"}
ARCHITECTURE_TITLES = {"sd15": "SD 1.x", "sdxl": "SDXL"}

# Hub ids suggested in error messages when the user gave something that is not a hub id.
DEFAULT_HUB_IDS = {
    ("instruct-pix2pix", "sd15"): "timbrooks/instruct-pix2pix",
    ("img2img", "sd15"): "stable-diffusion-v1-5/stable-diffusion-v1-5",
    ("text2img", "sd15"): "stable-diffusion-v1-5/stable-diffusion-v1-5",
    ("inpaint", "sd15"): "stable-diffusion-v1-5/stable-diffusion-inpainting",
    ("instruct-pix2pix", "sdxl"): "diffusers/sdxl-instructpix2pix-768",
    ("img2img", "sdxl"): "stabilityai/stable-diffusion-xl-base-1.0",
    ("text2img", "sdxl"): "stabilityai/stable-diffusion-xl-base-1.0",
    ("inpaint", "sdxl"): "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
}


# The noise schedule both architectures were trained with (scheduler/scheduler_config.json of SD 1.5 and SDXL
# base 1.0). ``timestep_spacing`` is written out: the released files of SD 1.5 and InstructPix2Pix omit it, so
# diffusers uses each class's default ("leading" for PNDM, "linspace" for Euler); written explicitly, a
# random-weight pipeline behaves the same before and after save_pretrained.
SD_SCHEDULER_CONFIG = {
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
SD15_SCHEDULER_CONFIG = SD_SCHEDULER_CONFIG  # the name earlier callers import


def base_scheduler(task: str, architecture: str = "sd15"):
    """The scheduler a random-weight pipeline is built with: the one the released checkpoint ships.

    PNDM for SD 1.5, DDIM for its inpainting model, Euler ancestral for timbrooks/instruct-pix2pix, Euler for
    SDXL (base, inpainting and InstructPix2Pix).
    """
    check_task(task)
    check_architecture(architecture)
    if architecture == "sdxl":
        return EulerDiscreteScheduler.from_config(
            {**SD_SCHEDULER_CONFIG, "timestep_spacing": "leading", "interpolation_type": "linear",
             "use_karras_sigmas": False})
    if task == "instruct-pix2pix":
        return EulerAncestralDiscreteScheduler.from_config({**SD_SCHEDULER_CONFIG, "timestep_spacing": "linspace"})
    if task == "inpaint":
        return DDIMScheduler.from_config({**SD_SCHEDULER_CONFIG, "timestep_spacing": "leading"})
    return PNDMScheduler.from_config({**SD_SCHEDULER_CONFIG, "timestep_spacing": "leading"})


def pipeline_class(task: str, architecture: str) -> type[DiffusionPipeline]:
    return PIPELINE_CLASSES[check_task(task), check_architecture(architecture)]


def architecture_of(class_name: str, components) -> str | None:
    """The architecture a model_index.json describes (its ``_class_name`` and component names), or None.

    A ``StableDiffusion*`` pipeline with a UNet (not SD 3's transformer) is SDXL when its class says so or it
    has a ``text_encoder_2``, else SD 1.x/2.x (the same classes serve both).
    """
    if not class_name.startswith("StableDiffusion") or class_name.startswith("StableDiffusion3") \
            or "unet" not in components:
        return None
    return "sdxl" if class_name.startswith("StableDiffusionXL") or "text_encoder_2" in components else "sd15"


def check_task(task: str) -> str:
    """Return ``task`` if it is one of :data:`TASKS`, else raise ``ValueError`` naming the valid ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(repr(t) for t in TASKS)}")
    return task


def check_architecture(architecture: str) -> str:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of "
                         f"{', '.join(repr(a) for a in ARCHITECTURES)}")
    return architecture
