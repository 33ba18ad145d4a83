"""GenMix: generalizable prompt-guided generative augmentation (the journal extension of DiffuseMix).

Islam, Zaheer, Sharma, Tahir, Nandakumar, Karray. "GenMix: Effective Data Augmentation with Generative
Diffusion Model Image Editing." (extension of DiffuseMix, CVPR 2024). Differences from DiffuseMix, per the
paper: a 512 px generation size; each prompt wrapped in the template 'A transformed version of image into
{prompt}'; a smooth mask M = [M_0 M_b M_1] with a 20 px blending width b; four masks: top/bottom and
left/right, each with the input and generated halves flipped or not (Table 12); and a domain-adaptation
prompt set. Fractal blend with lambda = 0.20 (Eq. 4).
"""

from __future__ import annotations

from typing import Sequence

from onlineaug.checks import Checks
from onlineaug.recipes import register_recipe
from onlineaug.recipes.diffusemix import PROMPTS, DiffuseMix

PROMPT_SETS = {
    "general": PROMPTS,
    "domain_adaptation": ("graffiti", "retro comic", "chalk drawing", "watercolor painting", "digital art",
                          "cartoon style"),
}


@register_recipe
class GenMix(DiffuseMix):
    name = "genmix"
    paper = "Islam et al., GenMix: Effective Data Augmentation with Generative Diffusion Model Image Editing"
    default_template = "A transformed version of image into {prompt}"
    default_generation_size = 512
    default_flips: Sequence[bool] = (False, True)

    def __init__(self, *, prompt_set: str = "general", prompts: Sequence[str] | None = None,
                 prompt_template: str | None = None, num_inference_steps: int = 100, guidance_scale: float = 4.0,
                 image_guidance_scale: float = 1.5, generation_size: int | None = None, blend_width: float = 20.0,
                 lam: float = 0.2, splits: Sequence[str] = ("top_bottom", "left_right"),
                 flips: Sequence[bool] | None = None):
        self.prompt_set = Checks.recipe(self.name).choice("prompt_set", prompt_set, sorted(PROMPT_SETS))
        super().__init__(prompts=PROMPT_SETS[prompt_set] if prompts is None else prompts,
                         prompt_template=prompt_template, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
                         generation_size=generation_size, blend_width=blend_width, lam=lam, splits=splits,
                         flips=flips)
