"""Generators: diffusion pipelines that edit or make images in the producer processes.

``load_pipeline(spec, task)`` returns a ready-to-run diffusers pipeline for one of :data:`TASKS`:
InstructPix2Pix (Brooks, Holynski, Efros, "InstructPix2Pix: Learning to Follow Image Editing
Instructions", CVPR 2023), img2img, text2img or inpainting, for Stable Diffusion 1.x or SDXL. ``spec`` is
``"tiny"`` (tiny random weights built in process, for tests), ``"full-random"`` (full-size random weights, for
benchmarks), a local diffusers folder, or a hub id read from the local HF cache. Recipes reach the same code
by role through :func:`onlineaug.models.load_model`.
"""
from .loading import GeneratorNotFoundError, describe, ensure_available, load_pipeline
from .tasks import ARCHITECTURES, TASKS
from .tiny import save_tiny_pipeline

__all__ = [
    "ARCHITECTURES",
    "TASKS",
    "GeneratorNotFoundError",
    "describe",
    "ensure_available",
    "load_pipeline",
    "save_tiny_pipeline",
]
