"""Mixup, per sample, on the batch path (a batch-time-only baseline: it starts no producer).

Zhang, Cisse, Dauphin, Lopez-Paz. "mixup: Beyond Empirical Risk Minimization." ICLR 2018. Each sample draws its
own ``lambda ~ Beta(alpha, alpha)`` and is mixed with probability ``p_aug``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from onlineaug import ops
from onlineaug.checks import Checks
from onlineaug.recipes import register_recipe
from onlineaug.recipes.base import Batch, BatchContext, Recipe
from onlineaug.recipes.cutmix import sample_active


@register_recipe
class Mixup(Recipe):
    name = "mixup"
    paper = "Zhang et al., mixup, ICLR 2018"

    def __init__(self, *, alpha: float = 1.0):
        self.alpha = Checks.recipe(self.name).real("alpha", alpha, low=0.0, low_open=True)  # lambda ~ Beta(a, a)

    def sample_params(self, batch, ctx, generator):
        return vars(ops.sample_pixel_mix_params(sample_active(batch, ctx, generator), alpha=self.alpha, generator=generator))

    def apply(self, batch: Batch, params: Mapping[str, torch.Tensor], ctx: BatchContext):
        images = ops.normalize(batch.fields["image"], ctx.mean, ctx.std, ctx.out_dtype)
        mixed = ops.pixel_mix(images, ops.PixelMixParams(**params), backend=ctx.backend, inplace=True)  # ours
        labels, lam = batch.fields["label"], params["lam"]
        targets = ops.soft_labels(torch.stack([labels, labels[params["partner"]]], 1),
                                  torch.stack([lam, 1 - lam], 1), ctx.num_classes, smoothing=ctx.label_smoothing)
        return mixed, targets, {"partner": params["partner"], "lam": lam}
