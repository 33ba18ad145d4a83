"""DiffuseMix: label-preserving augmentation with an image-editing diffusion model.

Islam, Zaheer, Sharma, Tahir, Nandakumar, Karray. "DiffuseMix: Label-Preserving Data Augmentation with
Diffusion Models." CVPR 2024. Eq. 3-4:

    H = M * I_hat + (1 - M) * I        (hybrid of the edited image I_hat and the original I)
    A = (1 - lambda) H + lambda F      (blend with a random fractal F, lambda = 0.2)

As the official code does it: InstructPix2Pix with the EulerAncestral scheduler, guidance scale 4, image
guidance 1.5, a 256 px generation size, nine filter-like prompts used as the edit instruction, a top/bottom or
left/right split. Here the split has a 20 px linear ramp at 256 px (scaled to the training size)
and the label is preserved. The producer edits; the mask, the fractal and the blend are drawn at batch time,
so every reuse of a pooled edit is a different training image.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from onlineaug import ops
from onlineaug.checks import Checks
from onlineaug.models import ModelRole
from onlineaug.pool import Field
from onlineaug.recipes import register_recipe
from onlineaug.recipes.base import NON_FINITE, Batch, BatchContext, ProducerContext, Recipe, SourceBatch
from onlineaug.recipes.generation import keep_rows, to_uint8
from onlineaug.recipes.prompts import prompt_embeddings

PROMPTS = ("autumn", "snowy", "watercolor art", "sunset", "rainbow", "aurora", "mosaic", "ukiyo-e",
           "a sketch with crayon")


@register_recipe
class DiffuseMix(Recipe):
    name = "diffusemix"
    paper = "Islam et al., DiffuseMix: Label-Preserving Data Augmentation with Diffusion Models, CVPR 2024"
    main_role = "edit"
    uses_fractals = True
    real_fields = {"original": "image"}
    reject_reasons = (NON_FINITE,)

    default_prompts: Sequence[str] = PROMPTS
    default_template = "{prompt}"
    default_generation_size = 256
    default_flips: Sequence[bool] = (False,)

    def __init__(self, *, prompts: Sequence[str] | None = None, prompt_template: str | None = None,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, image_guidance_scale: float = 1.5,
                 generation_size: int | None = None, blend_width: float = 20.0, lam: float = 0.2,
                 splits: Sequence[str] = ("top_bottom", "left_right"), flips: Sequence[bool] | None = None):
        check = Checks.recipe(self.name)
        self.prompts = check.strings("prompts", self.default_prompts if prompts is None else prompts)
        self.prompt_template = check.template(
            "prompt_template", self.default_template if prompt_template is None else prompt_template, "prompt")
        self.num_inference_steps = check.integer("num_inference_steps", num_inference_steps, low=1)
        self.guidance_scale = check.real("guidance_scale", guidance_scale, low=0.0)
        self.image_guidance_scale = check.real("image_guidance_scale", image_guidance_scale, low=0.0)
        self.generation_size = check.generation_size(generation_size, self.default_generation_size)
        self.blend_width = check.real("blend_width", blend_width, low=0.0)
        self.lam = check.real("lam", lam, low=0.0, high=1.0)
        self.splits = check.sequence("splits", splits, lambda n, v: check.choice(n, v, sorted(ops.SPLITS)))
        self.flips = check.sequence("flips", self.default_flips if flips is None else flips, check.boolean)

    def prompt_text(self, prompt_id: int) -> str:
        return self.prompt_template.format(prompt=self.prompts[prompt_id])

    def prompt_arguments(self, pipe, prompt_ids: torch.Tensor) -> dict:
        """The pipeline's prompt arguments for rows drawing ``prompt_ids``: ``prompt_embeds`` and
        ``negative_prompt_embeds`` from the embeddings of the whole prompt set, encoded once per pipeline
        (:mod:`onlineaug.recipes.prompts`), or the prompt strings for pipelines that are not cached."""
        table = prompt_embeddings(pipe, [self.prompt_text(i) for i in range(len(self.prompts))] + [""])
        if table is None:
            return {"prompt": [self.prompt_text(i) for i in prompt_ids.tolist()]}
        rows = prompt_ids.to(table.device)
        return {"prompt_embeds": table[rows], "negative_prompt_embeds": table[-1:].expand(len(rows), -1, -1)}

    def blend_width_at(self, image_size: int) -> float:
        """The ramp width in pixels at the training size.

        ``blend_width`` is in pixels at the paper's generation size (``default_generation_size``), so the ramp
        keeps the same share of the image at any training size, whatever generation size is chosen for speed.
        """
        return self.blend_width * image_size / self.default_generation_size

    # ----------------------------------------------------------------------------------- producer side
    def model_roles(self) -> dict[str, ModelRole]:
        # DiffuseMix's official code runs InstructPix2Pix with the Euler ancestral scheduler
        return {"edit": ModelRole("instruct-pix2pix", "timbrooks/instruct-pix2pix", architecture="sd15",
                                  scheduler="euler_a")}

    def pool_fields(self, image_size: int) -> dict[str, Field]:
        image = Field((3, image_size, image_size), "uint8")
        return {"original": image, "generated": image, "label": Field((), "int64"),
                "index": Field((), "int64"), "prompt_id": Field((), "int64")}

    def produce(self, models, batch: SourceBatch, ctx: ProducerContext):
        count, device = batch.size, ctx.generator.device
        prompt_ids = torch.randint(len(self.prompts), (count,), generator=ctx.generator, device=device).cpu()
        seeds = torch.randint(2**62, (count,), generator=ctx.generator, device=device).tolist()
        per_sample = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        pipe = models["edit"]
        edited = pipe(
            **self.prompt_arguments(pipe, prompt_ids),
            image=batch.images.float().div(255),
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            image_guidance_scale=self.image_guidance_scale,
            generator=per_sample,
            output_type="pt",
        ).images
        generated, finite = to_uint8(edited, ctx.image_size)
        payload = {"original": batch.originals, "generated": generated.cpu(), "label": batch.labels,
                   "index": batch.indices, "prompt_id": prompt_ids}
        return keep_rows(payload, finite, NON_FINITE)

    # ------------------------------------------------------------------------------------ trainer side
    def sample_params(self, batch: Batch, ctx: BatchContext, generator: torch.Generator) -> dict[str, torch.Tensor]:
        params = ops.sample_concat_blend_params(
            batch.generated, splits=self.splits, flips=self.flips, blend_width=self.blend_width_at(ctx.image_size),
            lam=self.lam, num_fractals=ctx.fractals.shape[0], generator=generator)
        return vars(params)

    def apply(self, batch: Batch, params: Mapping[str, torch.Tensor], ctx: BatchContext):
        images = ops.concat_blend_normalize(
            batch.fields["original"], batch.fields["generated"], ctx.fractals, ops.ConcatBlendParams(**params),
            mean=ctx.mean, std=ctx.std, out_dtype=ctx.out_dtype, backend=ctx.backend)
        targets = ops.one_hot_targets(batch.fields["label"], ctx.num_classes, smoothing=ctx.label_smoothing)
        info = {"split": params["split"], "flip": params["flip"], "fractal_index": params["fractal_index"],
                "prompt_id": torch.where(batch.generated, batch.fields["prompt_id"], -1)}
        return images, targets, info
