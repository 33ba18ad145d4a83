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
from onlineaug.images import resize_uint8
from onlineaug.pool import Field
from onlineaug.recipes import register_recipe
from onlineaug.recipes.base import Batch, BatchContext, Recipe, SourceBatch

PROMPTS = ("autumn", "snowy", "watercolor art", "sunset", "rainbow", "aurora", "mosaic", "ukiyo-e",
           "a sketch with crayon")


@register_recipe
class DiffuseMix(Recipe):
    name = "diffusemix"
    paper = "Islam et al., DiffuseMix: Label-Preserving Data Augmentation with Diffusion Models, CVPR 2024"
    generator_task = "instruct-pix2pix"
    uses_fractals = True
    real_fields = {"original": "image", "label": "label"}

    default_prompts: Sequence[str] = PROMPTS
    default_template = "{prompt}"
    default_generation_size = 256
    default_flips: Sequence[bool] = (False,)

    def __init__(self, *, prompts: Sequence[str] | None = None, prompt_template: str | None = None,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, image_guidance_scale: float = 1.5,
                 generation_size: int | None = None, blend_width: float = 20.0, lam: float = 0.2,
                 splits: Sequence[str] = ("top_bottom", "left_right"), flips: Sequence[bool] | None = None):
        self.prompts = tuple(prompts if prompts is not None else self.default_prompts)
        self.prompt_template = prompt_template if prompt_template is not None else self.default_template
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.image_guidance_scale = float(image_guidance_scale)
        self.generation_size = int(generation_size or self.default_generation_size)
        self.blend_width = float(blend_width)
        self.lam = float(lam)
        self.splits = tuple(splits)
        self.flips = tuple(flips if flips is not None else self.default_flips)
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{prompt}}', got {self.prompt_template!r}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if self.generation_size < 8 or self.generation_size % 8:
            raise ValueError(f"generation_size must be a positive multiple of 8 (the VAE's downsampling), "
                             f"got {self.generation_size}")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"lam (the fractal weight) must be in [0, 1], got {lam}")
        if self.blend_width < 0:
            raise ValueError(f"blend_width must be >= 0 pixels, got {blend_width}")
        for split in self.splits:
            if split not in ops.SPLITS:
                raise ValueError(f"splits must be among {sorted(ops.SPLITS)}, got {split!r}")
        if not self.splits or not self.flips:
            raise ValueError("splits and flips must each allow at least one value")

    def prompt_text(self, prompt_id: int) -> str:
        return self.prompt_template.format(prompt=self.prompts[prompt_id])

    def blend_width_at(self, image_size: int) -> float:
        """The ramp width in pixels at the training size.

        ``blend_width`` is in pixels at the paper's generation size (``default_generation_size``), so the ramp
        keeps the same share of the image at any training size, whatever generation size is chosen for speed.
        """
        return self.blend_width * image_size / self.default_generation_size

    # ----------------------------------------------------------------------------------- producer side
    def pool_fields(self, image_size: int) -> dict[str, Field]:
        image = Field((3, image_size, image_size), "uint8")
        return {"original": image, "generated": image, "label": Field((), "int64"),
                "index": Field((), "int64"), "prompt_id": Field((), "int64")}

    def produce(self, pipeline, sources: SourceBatch, *, image_size: int,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        count, device = sources.images.shape[0], generator.device
        prompt_ids = torch.randint(len(self.prompts), (count,), generator=generator, device=device).cpu()
        seeds = torch.randint(2**62, (count,), generator=generator, device=device).tolist()
        per_sample = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        edited = pipeline(
            prompt=[self.prompt_text(i) for i in prompt_ids.tolist()],
            image=sources.images.float().div(255),
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            image_guidance_scale=self.image_guidance_scale,
            generator=per_sample,
            output_type="pt",
        ).images
        edited = edited.float().clamp(0, 1).mul(255).round().to(torch.uint8)
        return {
            "original": sources.originals,
            "generated": resize_uint8(edited, image_size),
            "label": sources.labels,
            "index": sources.indices,
            "prompt_id": prompt_ids,
        }

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
        return images, targets
