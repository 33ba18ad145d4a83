"""The recipe interface: what one paper's method generates, and how it mixes at batch time.

A recipe is the only paper-specific piece of the data path. The loader, the pool and the producers only
know this interface, so a new method is a new file in ``onlineaug/recipes/`` and one registry line:

Producer side (in a producer process, on a generator device)
    ``generator_task``      which diffusers pipeline to load ("instruct-pix2pix", "img2img", "text2img"), or
                            None for batch-time-only recipes (CutMix, Mixup), which start no producer.
    ``pool_fields(S)``      the payload of one generated sample, as fixed-size :class:`~onlineaug.pool.Field` s
                            (sizes the shared-memory slots).
    ``prepare(...)``        once per producer before producing (e.g. DiffCoRe-Mix's per-class CLIP
                            similarity thresholds).
    ``produce(...)``        a batch of source samples -> a batch of payloads.

Trainer side (in the training process, on the trainer's device)
    ``real_fields``         which batch fields a real sample fills: field name -> "image" or "label".
    ``sample_params(...)``  draw this batch's per-sample parameters with an explicit ``torch.Generator``.
    ``apply(...)``          fields + parameters -> ``(images, soft targets)``.

A batch holds, for every sample, the fields of ``real_fields`` and of ``pool_fields``. For a real sample the
pool-only fields hold stale data; for a sample replaced from the pool every pool field is copied in (a field
named in both is overwritten). ``batch.generated`` says which is which; ``apply`` must use it.

Payload designs for the recipes that come next (they fit without loader changes):

* Diff-Mix (Wang et al. 2024): img2img edit of a class-i image toward class j. Pool fields: ``image``,
  ``label`` (source), ``target_label``, ``strength``; target ``(1 - s**gamma) y_src + s**gamma y_tgt``.
* DiffCoRe-Mix: text2img per class with negative prompts, a per-class CLIP similarity threshold computed in
  ``prepare``; pool fields ``original`` (a real image of the class, drawn by the producer), ``generated``,
  ``label``; mixed at batch time with :func:`onlineaug.ops.box_mix` / :func:`onlineaug.ops.pixel_mix`.
* De-DA: pool fields ``foreground`` (RGBA, 4xSxS), ``background`` (3xSxS, inpainted), ``label``; composed at
  batch time onto another class's background with :func:`onlineaug.ops.composite`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, Mapping

import torch

from onlineaug.pool import Field


@dataclasses.dataclass
class SourceBatch:
    """Source samples handed to :meth:`Recipe.produce` (on the producer's device)."""

    images: torch.Tensor  # uint8 (n, 3, G, G) at the recipe's generation size, on the producer's device
    originals: torch.Tensor  # uint8 (n, 3, S, S): the same images at the training size (as real samples are)
    labels: torch.Tensor  # int64 (n,)
    indices: torch.Tensor  # int64 (n,) dataset indices


@dataclasses.dataclass
class Batch:
    """One training batch before mixing (on the trainer's device)."""

    fields: dict[str, torch.Tensor]  # name -> (B, ...)
    generated: torch.Tensor  # bool (B,): True where the sample came from the pool

    @property
    def size(self) -> int:
        return int(self.generated.shape[0])


@dataclasses.dataclass(frozen=True)
class BatchContext:
    """What ``apply`` needs beyond the batch: fixed for a loader's lifetime."""

    num_classes: int
    image_size: int
    mean: torch.Tensor  # float32 (3,) on the trainer's device, in [0, 1] pixel units
    std: torch.Tensor
    label_smoothing: float
    out_dtype: torch.dtype
    p_aug: float
    fractals: torch.Tensor | None  # uint8 (F, 3, S, S) on the trainer's device, for recipes that blend fractals
    backend: str = "auto"


class Recipe(abc.ABC):
    """Base class of every recipe. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    paper: ClassVar[str]
    generator_task: ClassVar[str | None] = None
    uses_fractals: ClassVar[bool] = False
    real_fields: ClassVar[Mapping[str, str]] = {"image": "image", "label": "label"}

    generation_size: int | None = None

    # ----------------------------------------------------------------------------------- producer side
    def pool_fields(self, image_size: int) -> dict[str, Field]:
        """Payload of one generated sample. Batch-time-only recipes have none."""
        return {}

    def prepare(self, pipeline, dataset, *, device: torch.device, generator: torch.Generator) -> None:
        """Called once in each producer after the pipeline is loaded. Default: nothing to prepare."""

    def produce(self, pipeline, sources: SourceBatch, *, image_size: int,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Generate payloads for a batch of sources: field name -> (n, ...) tensor."""
        raise NotImplementedError(f"recipe {self.name!r} has no generator")

    # ------------------------------------------------------------------------------------ trainer side
    @abc.abstractmethod
    def sample_params(self, batch: Batch, ctx: BatchContext, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample parameters for ``apply``, drawn on the trainer's device."""

    @abc.abstractmethod
    def apply(self, batch: Batch, params: Mapping[str, torch.Tensor], ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(images, targets)``: normalised images (B,3,S,S) in ``ctx.out_dtype``, soft targets (B,K)."""

    def describe(self) -> dict:
        """The recipe's settings, for logs and metrics files."""
        settings = {key: value for key, value in vars(self).items() if not key.startswith("_")}
        return {"name": self.name, "paper": self.paper, **settings}
