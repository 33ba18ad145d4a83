"""``none``: vanilla training on the same batch path (normalisation and one-hot targets only).

The reference point of every overhead figure (A_O = (T_aug - T_van) / T_van).
"""

from __future__ import annotations

from onlineaug import ops
from onlineaug.recipes import register_recipe
from onlineaug.recipes.base import Batch, BatchContext, Recipe


@register_recipe
class NoAugmentation(Recipe):
    name = "none"
    paper = "(vanilla training: normalisation and one-hot targets only)"

    def sample_params(self, batch, ctx, generator):
        return {}

    def apply(self, batch: Batch, params, ctx: BatchContext):
        images = ops.normalize(batch.fields["image"], ctx.mean, ctx.std, ctx.out_dtype)
        return images, ops.one_hot_targets(batch.fields["label"], ctx.num_classes, smoothing=ctx.label_smoothing)
