"""DA-Fusion: label-preserving img2img edits of each training image, served in place of that image.

Trabucco, Doherty, Gurinas, Salakhutdinov. "Effective Data Augmentation With Diffusion Models." ICLR 2024
(official code github.com/brandontrabucco/da-fusion, "DF" below; the Diff-Mix paper's Da-fusion baseline).

Producer side: an image drawn from what the sampler yields is edited by Stable Diffusion img2img (SD 1.4 in
the paper, with the scheduler stored with the weights) at a strength drawn per image uniformly from
{0.25, 0.5, 0.75, 1.0} (DF ``scripts/stacking/*.sh``), 50 steps, guidance 7.5, 512 px, prompt
"a photo of a {token}": the class's textual-inversion token when a fine-tuned file is given (DF trains one
per class and merges them, ``aggregate_embeddings.py``), its class name otherwise. One pipeline call per
distinct strength in a batch (:func:`onlineaug.recipes.diffmix.strength_calls`).

Trainer side: the label is the source image's class (hard, then the loader's smoothing). DF replaces a real
image, with probability ``p_aug`` (0.5 in DF), only by one of **its own** edits
(``semantic_aug/few_shot_dataset.py``): ``match="index"`` here, a miss when none of that image is ready;
``match="class"`` takes an edit of any image of the row's class instead.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from onlineaug import ops
from onlineaug.checks import Checks
from onlineaug.models import ModelRole
from onlineaug.pool import Field
from onlineaug.recipes import register_recipe
from onlineaug.recipes.base import NON_FINITE, Batch, BatchContext, Jobs, ProducerContext, Recipe, SourceBatch
from onlineaug.recipes.diffmix import (
    check_steps_cover_strengths,
    checked_strengths,
    choose,
    class_token,
    edit_by_strength,
    row_generators,
)
from onlineaug.recipes.generation import keep_rows, to_uint8

SD14 = "CompVis/stable-diffusion-v1-4"


@register_recipe
class DAFusion(Recipe):
    name = "dafusion"
    paper = "Trabucco et al., Effective Data Augmentation With Diffusion Models, ICLR 2024"
    main_role = "edit"
    needs_class_names = True
    reject_reasons = (NON_FINITE,)
    real_fields = {"image": "image"}
    default_generation_size = 512

    def __init__(self, *, strengths: Sequence[float] = (0.25, 0.5, 0.75, 1.0), match: str = "index",
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, generation_size: int | None = None,
                 textual_inversion: str | None = None, lora: str | None = None):
        check = Checks.recipe(self.name)
        self.strengths = checked_strengths(check, strengths)
        self.serve_match = check.choice("match", match, ("index", "class"))
        self.num_inference_steps = check.integer("num_inference_steps", num_inference_steps, low=1)
        check_steps_cover_strengths(check, self.num_inference_steps, self.strengths)
        self.guidance_scale = check.real("guidance_scale", guidance_scale, low=0.0)
        self.generation_size = check.generation_size(generation_size, self.default_generation_size)
        self.textual_inversion = check.path("textual_inversion", textual_inversion)
        self.lora = check.path("lora", lora)

    @staticmethod
    def prompt_text(token: str) -> str:
        return f"a photo of a {token}"

    # ----------------------------------------------------------------------------------- producer side
    def model_roles(self) -> dict[str, ModelRole]:
        return {"edit": ModelRole("img2img", SD14, architecture="sd15", textual_inversion=self.textual_inversion,
                                  lora=self.lora)}

    def pool_fields(self, image_size: int) -> dict[str, Field]:
        return {"image": Field((3, image_size, image_size), "uint8"), "label": Field((), "int64"),
                "index": Field((), "int64"), "strength": Field((), "float32")}

    def plan_jobs(self, ctx: ProducerContext, count: int) -> Jobs:
        indices = ctx.sources.draw(count, ctx.rng)  # images by the sampler's weights, as real samples are drawn
        return Jobs(indices, {"strength": choose(self.strengths, count, ctx.rng).astype("float64")})

    def produce(self, models: Mapping[str, Any], batch: SourceBatch, ctx: ProducerContext):
        pipe = models["edit"]
        strength = batch.values["strength"].to(torch.float64).cpu()
        prompts = [self.prompt_text(class_token(pipe, ctx.class_name(c))) for c in batch.labels.tolist()]
        pixels = edit_by_strength(pipe, batch.images, prompts, strength, row_generators(batch.size, ctx.generator),
                                  num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale)
        images, finite = to_uint8(pixels, ctx.image_size)
        payload = {"image": images.cpu(), "label": batch.labels, "index": batch.indices, "strength": strength.float()}
        return keep_rows(payload, finite, NON_FINITE)

    # ------------------------------------------------------------------------------------ trainer side
    def sample_params(self, batch: Batch, ctx: BatchContext, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, batch: Batch, params: Mapping[str, torch.Tensor], ctx: BatchContext):
        fields, generated = batch.fields, batch.generated
        images = ops.normalize(fields["image"], ctx.mean, ctx.std, ctx.out_dtype)
        targets = ops.one_hot_targets(fields["label"], ctx.num_classes, smoothing=ctx.label_smoothing)
        strength = torch.where(generated, fields["strength"], torch.zeros_like(fields["strength"]))
        return images, targets, {"strength": strength}
