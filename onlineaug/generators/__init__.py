"""Generators: diffusion pipelines that edit images in the producer processes.

``load_pipeline(spec, task)`` returns a ready-to-run diffusers pipeline for one of :data:`TASKS`:
InstructPix2Pix (Brooks, Holynski, Efros, "InstructPix2Pix: Learning to Follow Image Editing
Instructions", CVPR 2023), Stable Diffusion img2img or text2img. ``spec`` is ``"tiny"`` (tiny random
weights built in process, for tests), ``"full-random"`` (full-size random weights, for benchmarks), a
local diffusers folder, or a hub id read from the local HF cache.
"""
from .loading import GeneratorNotFoundError, describe, ensure_available, load_pipeline
from .tasks import TASKS
from .tiny import save_tiny_pipeline

__all__ = [
    "TASKS",
    "GeneratorNotFoundError",
    "describe",
    "ensure_available",
    "load_pipeline",
    "save_tiny_pipeline",
]
