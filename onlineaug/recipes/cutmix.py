"""CutMix, per sample, on the batch path (a batch-time-only baseline: it starts no producer).

Yun, Han, Oh, Chun, Choe, Yoo. "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
Features." ICCV 2019. Unlike ``torchvision.transforms.v2.CutMix`` (one lambda per batch), each sample draws its
own ``lambda ~ Beta(alpha, alpha)`` and is mixed with probability ``p_aug``; the target weights are the exact
kept pixel area after the box is clipped at the border.
"""

from __future__ import annotations

from typing import Mapping

import torch

from onlineaug import ops
from onlineaug.checks import Checks
from onlineaug.recipes import register_recipe
from onlineaug.recipes.base import Batch, BatchContext, Recipe


def sample_active(batch: Batch, ctx: BatchContext, generator: torch.Generator) -> torch.Tensor:
    """Which samples are mixed: each with probability ``ctx.p_aug``, drawn on the generator's device."""
    return torch.rand(batch.size, generator=generator, device=generator.device) < ctx.p_aug


@register_recipe
class CutMix(Recipe):
    name = "cutmix"
    paper = "Yun et al., CutMix, ICCV 2019"

    def __init__(self, *, alpha: float = 1.0):
        self.alpha = Checks.recipe(self.name).real("alpha", alpha, low=0.0, low_open=True)  # lambda ~ Beta(a, a)

    def sample_params(self, batch, ctx, generator):
        height, width = batch.fields["image"].shape[-2:]
        params = ops.sample_box_mix_params(sample_active(batch, ctx, generator), height, width, alpha=self.alpha,
                                           generator=generator)
        return vars(params)

    def apply(self, batch: Batch, params: Mapping[str, torch.Tensor], ctx: BatchContext):
        mixed, kept = ops.box_mix(batch.fields["image"], ops.BoxMixParams(**params), backend=ctx.backend)
        labels = batch.fields["label"]
        targets = ops.soft_labels(torch.stack([labels, labels[params["partner"]]], 1),
                                  torch.stack([kept, 1 - kept], 1), ctx.num_classes, smoothing=ctx.label_smoothing)
        info = {"partner": params["partner"], "kept": kept}
        return ops.normalize(mixed, ctx.mean, ctx.std, ctx.out_dtype), targets, info
