"""DiffCoRe-Mix: contextual text-to-image generation, a per-class CLIP hard-cosine filter, and pixel-wise or
patch-wise mixing of each real image with a generated image of its class.

Islam and Akhtar. "Context-guided Responsible Data Augmentation with Diffusion Models." 2025
(official code: ``khawar-islam/DiffCoRe-Mix``, which generates offline and has no mixing code).

Producer (P§3, P§4)
    Text-to-image per class with CosXL (an SDXL pipeline with ``EDMEulerScheduler``, v-prediction), 50 steps,
    guidance 12, 512 px, and a negative prompt. Eq. 4 is classifier-free guidance with the negative prompt in
    place of the empty one, ``e = (1 + g) e(x_t, P_c) - g e(x_t, P_n)``: diffusers' ``negative_prompt`` with
    ``g = guidance_scale - 1``. Prompts are the official code's contextual templates
    ``"A {class_name}, a {dataset_type}, {context}"`` over its 16 contexts (``prompt_set="contextual"``), or the
    paper's ``"Generate heavy snow to the {class_name}, a {dataset_type} object"`` (``"heavy_snow"``).

    Negative prompt: the official list, minus every phrase that shares a word with the positive prompt or the
    class name (singular/plural forms match): the list holds ``sky``, ``landscape``, ``car``, ``road``, ...,
    which several contexts ask for ("a stormy sky") and some datasets are about (Stanford Cars).

Filter (Eq. 5)
    Once per loader (:meth:`DiffCoReMix.prepare`), the real images of each class are embedded with CLIP
    ViT-B/32 and ``tau_k`` is the mean cosine similarity over ``z`` random distinct pairs of them (all pairs
    when ``C(N_k, 2) <= z``). The paper writes Eq. 5 as a sum over ordered pairs divided by ``C(N_k, 2)``;
    the mean over unordered pairs is what it means ("the expected value of the similarity"). A generated image
    ``G`` made for the real source ``I`` is kept iff ``cos(CLIP(I), CLIP(G)) > tau_k`` (strictly); a reject is
    regenerated up to ``max_retries`` times and counted as ``clip_filter``. The official code compares against
    the class's first image with a fixed 0.6: ``threshold=0.6, reference="first"``.

Trainer side (Eqs. 6-8)
    A row replaced from the pool keeps its real image ``I`` and takes a pooled ``G`` of the same class
    (``serve_match="class"``). Per sample ``eta ~ Bernoulli(p_pixel)`` (``pi = 0.5``):

    * ``eta = 1``, pixel-wise (Eq. 6): ``M = lam * I + (1 - lam) * G``, ``lam ~ U(0, 1)``;
    * ``eta = 0``, patch-wise (Eq. 7): ``M = M_p * I + (1 - M_p) * G`` with ``M_p`` a box. The paper says only
      "a binary mask of varying size" and that I's patch goes on G "or vice versa": here the box has the
      image's aspect ratio, an area fraction ``a ~ U(0, 1)`` (rounded to whole pixels) and lies inside the
      image (a CutMix box clipped at the border would skew the area small); with probability 1/2 it pastes
      ``G`` into ``I``, else ``I`` into ``G``.

    ``I`` and ``G`` share the class, so the target is its one-hot label (smoothed by the loader's
    ``label_smoothing``). With probability ``p_raw`` (default 0) a replaced row serves the raw ``G`` instead
    (the paper's Table 7 "GenAug" arm).
"""

from __future__ import annotations

import logging
import re
from typing import Mapping, Sequence

import numpy as np
import torch

from onlineaug import ops
from onlineaug.checks import Checks
from onlineaug.images import ItemFormat, load_item
from onlineaug.models import ModelRole
from onlineaug.pool import Field
from onlineaug.recipes import register_recipe
from onlineaug.recipes.base import NON_FINITE, Batch, BatchContext, Jobs, ProducerContext, Produced, Recipe, SourceBatch
from onlineaug.recipes.generation import to_uint8
from onlineaug.seeding import numpy_generator

logger = logging.getLogger("onlineaug")

CLIP_FILTER = "clip_filter"  # the reject reason of a generated image at or below its class's threshold

# The official code's contexts (main.py; prompts.py at 533d92a), verbatim: each prompt is
# "A {label_name}, a {dataset_type}, " + one of these, drawn uniformly.
CONTEXTS = (
    "in the garden",
    "soaring through a stormy sky with dark clouds.",
    "gliding over calm water under a clear blue sky.",
    "framed against a vibrant sunset with orange and pink hues.",
    "flying through a misty morning with soft, diffused light.",
    "navigating between tall, towering mountain peaks.",
    "flying low over a dense forest canopy.",
    "speeding through a cloudless sky at high altitude.",
    "passing through a vast, open desert landscape.",
    "flying in the night sky, lit by a full moon.",
    "surrounded by lightning in a turbulent storm.",
    "casting a shadow over an expansive ocean.",
    "flying close to a city skyline during twilight.",
    "cruising above fields of golden crops under the afternoon sun.",
    "flying through swirling snowflakes in a winter landscape.",
    "cutting through thick clouds in an overcast sky.",
)

# prompt_set -> (template, contexts). "contextual": the official code; "heavy_snow": the paper's P§4 prompt.
PROMPT_SETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "contextual": ("A {class_name}, a {dataset_type}, {context}", CONTEXTS),
    "heavy_snow": ("Generate heavy snow to the {class_name}, a {dataset_type} object", ()),
}
TEMPLATE_FIELDS = ("class_name", "dataset_type", "context")

# The official code's negative prompt (model.py), used for every dataset.
NEGATIVE_PROMPT = (
    "train", "car", "newspaper", "sunlight", "people", "human", "tree", "cityscape", "road", "landscape", "bus",
    "building", "desk", "computer", "paper texture", "windows", "streets", "rails", "traffic", "sky",
    "road lines", "traffic lights",
)

# CosXL's scheduler, as the official code builds it (model.py).
COSXL_SCHEDULER = "edm_euler"
COSXL_SCHEDULER_CONFIG = {"sigma_min": 0.002, "sigma_max": 120.0, "sigma_data": 1.0,
                          "prediction_type": "v_prediction", "sigma_schedule": "exponential"}

REFERENCES = ("source", "first")

# Batch-time mix modes (``params["mode"]``).
MODE_REAL, MODE_PIXEL, MODE_PATCH, MODE_RAW = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------------ prompts
def clean_class_name(name: str) -> str:
    """The official code's label name: a folder name without its ``NNN.`` prefix, ``_`` as spaces
    (``"024.Red_faced_Cormorant"`` -> ``"Red faced Cormorant"``)."""
    return re.sub(r"^\d+\.", "", name).replace("_", " ").strip()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _same_word(a: str, b: str) -> bool:
    """Equal up to an English plural ending (``light``/``lights``, ``bus``/``buses``)."""
    return a == b or a + "s" == b or b + "s" == a or a + "es" == b or b + "es" == a


def negative_prompt_for(negatives: Sequence[str], positive: str, class_name: str) -> str:
    """The negative prompt for one positive prompt: the ``negatives`` phrases joined by ``", "``, without any
    phrase that shares a word (up to a plural ending) with ``positive`` or ``class_name``.

    A phrase is dropped whole ("road lines" goes when the prompt says "road"), so what is left never names what
    the prompt asks for, and no phrase is cut into a different one.
    """
    keep_out = _words(positive) | _words(class_name)
    kept = [phrase for phrase in negatives
            if not any(_same_word(word, other) for word in _words(phrase) for other in keep_out)]
    return ", ".join(kept)


# --------------------------------------------------------------------------------------------- thresholds
def sample_pairs(count: int, z: int, rng: np.random.Generator) -> np.ndarray:
    """int64 (m, 2) distinct unordered pairs ``(i, j)``, ``i < j``, of ``range(count)``: all ``C(count, 2)`` of
    them (in order) when that is at most ``z``, else ``z`` drawn uniformly without replacement."""
    total = count * (count - 1) // 2
    ranks = np.arange(total, dtype=np.int64) if total <= z else np.sort(rng.choice(total, size=z, replace=False))
    # pair rank r in row-major order over i < j: row i starts at offset(i) = i * count - i * (i + 1) / 2
    rows = np.arange(count, dtype=np.int64)
    offsets = rows * count - rows * (rows + 1) // 2
    i = np.searchsorted(offsets, ranks, side="right") - 1
    j = ranks - offsets[i] + i + 1
    return np.stack([i, j], axis=1).astype(np.int64)


def pairs_rng(sources) -> np.random.Generator:
    """The stream that picks Eq. 5's pairs: a function of the source set only, so whichever producer prepares
    (first to take the lock) picks the same pairs."""
    return numpy_generator(int(sources.fingerprint()[:15], 16), "diffcoremix/tau-pairs")


def class_thresholds(embedder, dataset, sources, *, num_classes: int, image_size: int, z: int,
                     batch_size: int = 32, item_format=None) -> dict:
    """Eq. 5 for every class of ``sources``: ``tau_k`` = the mean cosine similarity of the CLIP embeddings over
    :func:`sample_pairs` of the class's real images (each loaded at the training size with
    :func:`onlineaug.images.load_item`, in the deterministic view of the loader's ``item_format``: a
    random crop would make the thresholds depend on the draw).

    Returns ``{"tau": float32 (K,), "pairs": {k: int64 (m, 2) dataset indices}, "default_tau": float}``:
    ``tau[k]`` is NaN for a class with fewer than two images (or none in ``sources``); such a class is filtered
    at ``default_tau``, the mean over the classes that have a threshold.
    """
    rng = pairs_rng(sources)
    pairs: dict[int, np.ndarray] = {}
    for label, positions in sorted(sources.by_class.items()):
        members = np.sort(sources.indices[positions])
        if len(members) >= 2:
            pairs[label] = members[sample_pairs(len(members), z, rng)]
    if not pairs:
        raise ValueError("DiffCoRe-Mix's per-class threshold (Eq. 5) needs two real images of a class, but no "
                         "class has two among the sampler's indices; pass threshold=0.6 (the official code's "
                         "fixed threshold) or sample more images per class")
    needed = np.unique(np.concatenate([p.ravel() for p in pairs.values()]))
    view = (item_format or ItemFormat()).deterministic()
    rows = {int(index): row for row, index in enumerate(needed.tolist())}
    chunks = []
    for start in range(0, len(needed), batch_size):
        images = torch.stack([load_item(dataset, int(i), image_size, num_classes, view)[0]
                              for i in needed[start:start + batch_size]])
        chunks.append(embedder.embed_images(images).float().cpu())
    embeddings = torch.cat(chunks).double()
    tau = torch.full((num_classes,), float("nan"), dtype=torch.float32)
    for label, pair in pairs.items():
        left = embeddings[[rows[int(i)] for i in pair[:, 0]]]
        right = embeddings[[rows[int(j)] for j in pair[:, 1]]]
        tau[label] = (left * right).sum(1).mean().float()
    default = float(tau[list(pairs)].mean())
    missing = [int(k) for k in sources.classes if int(k) not in pairs]
    if missing:
        logger.warning("onlineaug: DiffCoRe-Mix: classes %s have one real image each: no pair for Eq. 5; they are "
                       "filtered at the mean threshold of the others, %.4f", missing[:10], default)
    return {"tau": tau, "pairs": pairs, "default_tau": default}


# ------------------------------------------------------------------------------------------------- recipe
@register_recipe
class DiffCoReMix(Recipe):
    """DiffCoRe-Mix (see the module docstring). Options (``recipe_options``):

    Args:
        prompt_set: ``"contextual"`` (the official code's template and 16 contexts) or ``"heavy_snow"`` (P§4).
        prompt_template: overrides the set's template; fields ``{class_name}`` (required), ``{dataset_type}``,
            ``{context}``. contexts: overrides the set's contexts (only with a ``{context}`` field).
        dataset_type: the ``{dataset_type}`` text; the official code passes its ``--dataset`` string ("cub200").
        negative_prompt: phrases (a list, or one comma-separated string); default the official list. Phrases
            sharing a word with the positive prompt or the class name are dropped per prompt.
        num_inference_steps, guidance_scale, generation_size: 50, 12 and 512 px, as the official code.
        scheduler: a name of :data:`onlineaug.models.diffusion.SCHEDULERS`; ``"edm_euler"`` comes with CosXL's
            settings. None keeps the scheduler stored with the weights (an SD 1.x checkpoint).
        threshold: None: Eq. 5's per-class ``tau_k``; a number: that fixed threshold (the code's 0.6).
        reference: ``"source"``: compare G with its own real source (the paper); ``"first"``: with the class's
            first image (lowest dataset index the sampler yields; the code's ``image_filenames[0]``).
        z: pairs per class for Eq. 5. max_retries: regenerations of a rejected job.
        p_pixel: ``pi`` of Eq. 8 (pixel-wise vs patch-wise). p_raw: share of replaced rows served as raw ``G``.
        embed_batch_size: images per CLIP call while preparing.

    Replaced rows take a pooled image of their own class, so the pool should hold a few samples of every class
    (``pool_size`` several times ``num_classes``); with none ready the row stays real and a miss is counted.
    """

    name = "diffcoremix"
    paper = "Islam and Akhtar, Context-guided Responsible Data Augmentation with Diffusion Models, 2025"
    main_role = "generate"
    needs_class_names = True
    needs_labels = True
    real_fields = {"image": "image", "real_index": "index"}  # a replaced row keeps its real image (and index)
    reject_reasons = (CLIP_FILTER, NON_FINITE)
    serve_match = "class"

    default_generation_size = 512

    def __init__(self, *, prompt_set: str = "contextual", prompt_template: str | None = None,
                 contexts: Sequence[str] | None = None, dataset_type: str = "photo",
                 negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 12.0, generation_size: int | None = None,
                 scheduler: str | None = COSXL_SCHEDULER, threshold: float | None = None, reference: str = "source",
                 z: int = 64, max_retries: int = 3, p_pixel: float = 0.5, p_raw: float = 0.0,
                 embed_batch_size: int = 32):
        check = Checks.recipe(self.name)
        self.prompt_set = check.choice("prompt_set", prompt_set, sorted(PROMPT_SETS))
        default_template, default_contexts = PROMPT_SETS[prompt_set]
        self.prompt_template = self._checked_template(
            check, default_template if prompt_template is None else prompt_template)
        if "{context}" in self.prompt_template:
            if contexts is None and not default_contexts:
                check._fail(ValueError, "contexts", contexts, "a list of contexts: prompt_template has a '{context}' "
                            f"field and prompt_set={prompt_set!r} has none")
            self.contexts = check.strings("contexts", default_contexts if contexts is None else contexts)
        elif contexts is not None:
            check._fail(ValueError, "contexts", contexts, "None: the prompt template has no '{context}' field "
                        f"({self.prompt_template!r})")
        else:
            self.contexts = ()
        self.dataset_type = check.text("dataset_type", dataset_type)
        if negative_prompt is None:
            negative_prompt = NEGATIVE_PROMPT
        elif isinstance(negative_prompt, str):  # a diffusers-style negative prompt: comma-separated phrases
            negative_prompt = [p.strip() for p in negative_prompt.split(",") if p.strip()]
        self.negative_prompt = check.strings("negative_prompt", negative_prompt, min_length=0)
        self.num_inference_steps = check.integer("num_inference_steps", num_inference_steps, low=1)
        self.guidance_scale = check.real("guidance_scale", guidance_scale, low=0.0)
        self.generation_size = check.generation_size(generation_size, self.default_generation_size)
        self.scheduler = None if scheduler is None else check.text("scheduler", scheduler)
        self.threshold = None if threshold is None else check.real("threshold", threshold, low=-1.0, high=1.0)
        self.reference = check.choice("reference", reference, list(REFERENCES))
        self.z = check.integer("z", z, low=1)
        self.max_retries = check.integer("max_retries", max_retries, low=0)
        self.p_pixel = check.probability("p_pixel", p_pixel)
        self.p_raw = check.probability("p_raw", p_raw)
        self.embed_batch_size = check.integer("embed_batch_size", embed_batch_size, low=1)

    @staticmethod
    def _checked_template(check: Checks, template) -> str:
        template = check.text("prompt_template", template)
        if "{class_name}" not in template:
            check._fail(ValueError, "prompt_template", template, "a template containing '{class_name}'")
        try:
            template.format(**{name: "x" for name in TEMPLATE_FIELDS})
        except (KeyError, IndexError, ValueError) as error:
            check._fail(ValueError, "prompt_template", template,
                        f"a template with only the fields {list(TEMPLATE_FIELDS)} ({error})")
        return template

    # ------------------------------------------------------------------------------------------ prompts
    @property
    def num_prompts(self) -> int:
        return max(1, len(self.contexts))

    def prompt_text(self, class_name: str, prompt_id: int) -> str:
        """The positive prompt of prompt ``prompt_id`` (a context index) for a class."""
        context = self.contexts[prompt_id] if self.contexts else ""
        return self.prompt_template.format(class_name=clean_class_name(class_name), dataset_type=self.dataset_type,
                                           context=context)

    def negative_text(self, class_name: str, positive: str) -> str:
        return negative_prompt_for(self.negative_prompt, positive, clean_class_name(class_name))

    # ----------------------------------------------------------------------------------- producer side
    def model_roles(self) -> dict[str, ModelRole]:
        config = COSXL_SCHEDULER_CONFIG if self.scheduler == COSXL_SCHEDULER else {}
        return {
            # CosXL (P§4): an SDXL checkpoint, converted to a diffusers folder (from_single_file + save_pretrained)
            "generate": ModelRole("text2img", "stabilityai/cosxl", architecture="sdxl", scheduler=self.scheduler,
                                  scheduler_config=config),
            "filter": ModelRole("clip", "openai/clip-vit-base-patch32"),  # the official code's ViT-B/32
        }

    def pool_fields(self, image_size: int) -> dict[str, Field]:
        scalar = Field((), "int64")
        return {"generated": Field((3, image_size, image_size), "uint8"), "label": scalar, "index": scalar,
                "similarity": Field((), "float32"), "tau": Field((), "float32"), "prompt_id": scalar,
                "retries": scalar}

    def prepare_key(self) -> dict | None:
        if self.threshold is not None:
            return None  # a fixed threshold: nothing to compute from the data
        return {"z": self.z, "eq5": "mean cosine over distinct pairs, v1"}

    def prepare(self, models, ctx: ProducerContext):
        if self.threshold is not None:
            return None
        return class_thresholds(models["filter"], ctx.dataset, ctx.sources, num_classes=ctx.num_classes,
                                image_size=ctx.image_size, z=self.z, batch_size=self.embed_batch_size,
                                item_format=ctx.item_format)

    def plan_jobs(self, ctx: ProducerContext, count: int) -> Jobs:
        """Classes in proportion to their share of the sampler's weight (the trainer asks for class ``k`` that
        often; the paper generates ``a * N_k`` per class), a real source of each, and a context each."""
        sources = ctx.sources
        classes = sources.classes
        if sources.probabilities is None:
            shares = np.array([len(sources.by_class[int(k)]) for k in classes], dtype=np.float64)
        else:
            shares = np.array([sources.probabilities[sources.by_class[int(k)]].sum() for k in classes])
        chosen = classes[ctx.rng.choice(len(classes), size=count, p=shares / shares.sum())]
        if self.reference == "first":  # the official code: every image of a class is compared with its first one
            first = {int(k): int(sources.indices[sources.by_class[int(k)]].min()) for k in np.unique(chosen)}
            indices = np.array([first[int(k)] for k in chosen], dtype=np.int64)
        else:
            indices = sources.draw_of_classes(chosen, ctx.rng)
        prompt_ids = ctx.rng.integers(self.num_prompts, size=count).astype(np.int64)
        return Jobs(indices, {"prompt_id": prompt_ids})

    def thresholds_for(self, labels: torch.Tensor, state) -> torch.Tensor:
        """float32 (n,): the threshold each row is filtered at (``threshold``, or Eq. 5's ``tau_k``)."""
        if self.threshold is not None:
            return torch.full(labels.shape, self.threshold, dtype=torch.float32)
        if state is None:
            raise RuntimeError("DiffCoRe-Mix filters with per-class thresholds computed in prepare(); call "
                               "recipe.prepare(models, ctx) and set ctx.state to its result (the loader does this)")
        tau = state["tau"][labels.cpu()]
        return torch.where(torch.isnan(tau), torch.full_like(tau, state["default_tau"]), tau)

    def produce(self, models, batch: SourceBatch, ctx: ProducerContext):
        count, device = batch.size, ctx.generator.device
        labels = batch.labels
        prompt_ids = batch.values["prompt_id"].to(torch.int64)
        names = [ctx.class_name(k) for k in labels.tolist()]
        prompts = [self.prompt_text(name, i) for name, i in zip(names, prompt_ids.tolist())]
        negatives = [self.negative_text(name, prompt) for name, prompt in zip(names, prompts)]
        seeds = torch.randint(2**62, (count,), generator=ctx.generator, device=device).tolist()
        per_sample = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        pixels = models["generate"](
            prompt=prompts, negative_prompt=negatives, num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale, height=self.generation_size, width=self.generation_size,
            generator=per_sample, output_type="pt",
        ).images
        generated, finite = to_uint8(pixels, ctx.image_size)  # on the generator's device
        # S(I, G) (P§3): cosine of the CLIP image embeddings of the real source and the generated image, both at
        # the training size (as tau_k's real images were embedded and as the trainer mixes them)
        embedder = models["filter"]
        similarity = (embedder.embed_images(generated) * embedder.embed_images(batch.originals)).sum(1).float().cpu()
        generated = generated.cpu()
        tau = self.thresholds_for(labels, ctx.state)
        accepted = finite & (similarity > tau)  # R(G) = 1 iff S > tau (hard cosine)
        rows = accepted.nonzero().flatten()
        payload = {"generated": generated, "label": labels, "index": batch.indices, "similarity": similarity,
                   "tau": tau, "prompt_id": prompt_ids,
                   "retries": batch.attempts if batch.attempts is not None else torch.zeros(count, dtype=torch.int64)}
        rejected = {}
        if (~finite).any():
            rejected[NON_FINITE] = (~finite).nonzero().flatten()
        if (finite & ~accepted).any():
            rejected[CLIP_FILTER] = (finite & ~accepted).nonzero().flatten()
        return Produced(payload={name: value[rows] for name, value in payload.items()}, rows=rows, rejected=rejected)

    # ------------------------------------------------------------------------------------ trainer side
    def sample_params(self, batch: Batch, ctx: BatchContext, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per sample: the mode (real / pixel-wise / patch-wise / raw generated), ``lam ~ U(0, 1)``, a box of
        area fraction ``U(0, 1)`` inside the image, and which image goes in the box."""
        size, device = batch.size, generator.device
        height, width = batch.fields["image"].shape[-2:]
        generated = batch.generated.to(device)
        raw = torch.rand(size, generator=generator, device=device) < self.p_raw
        pixel = torch.rand(size, generator=generator, device=device) < self.p_pixel  # eta ~ Bernoulli(pi)
        mode = torch.full((size,), MODE_PATCH, dtype=torch.int64, device=device)
        mode = torch.where(pixel, MODE_PIXEL, mode)
        mode = torch.where(raw, MODE_RAW, mode)
        mode = torch.where(generated, mode, MODE_REAL)
        lam = torch.rand(size, generator=generator, device=device)
        area = torch.rand(size, generator=generator, device=device)
        boxes = sample_inner_boxes(area, height, width, generator)
        boxes = torch.where((mode == MODE_PATCH)[:, None], boxes, torch.zeros_like(boxes))
        real_in_box = torch.rand(size, generator=generator, device=device) < 0.5
        return {"mode": mode, "lam": lam, "area": area, "boxes": boxes,
                "real_in_box": real_in_box & (mode == MODE_PATCH)}

    def apply(self, batch: Batch, params: Mapping[str, torch.Tensor], ctx: BatchContext):
        real, generated = batch.fields["image"], batch.fields["generated"]
        size = real.shape[0]
        mode, lam, boxes, real_in_box = params["mode"], params["lam"], params["boxes"], params["real_in_box"]
        pixel, patch = mode == MODE_PIXEL, mode == MODE_PATCH
        # Each row: a base image and the image it mixes with, stacked as rows b and B + b of one batch so that
        # the fused kernels mix them as partners. G is the base where I goes into G's box, and for raw rows.
        on_generated = (real_in_box & patch) | (mode == MODE_RAW)
        base = torch.where(on_generated[:, None, None, None], generated, real)
        other = torch.where(on_generated[:, None, None, None], real, generated)
        rows = torch.arange(size, device=real.device)
        partner = torch.cat([rows + size, rows + size])  # row b mixes with B + b; row B + b with itself
        stacked = torch.cat([base, other])
        boxed, kept = ops.box_mix(stacked, ops.BoxMixParams(partner, torch.cat([boxes, torch.zeros_like(boxes)])),
                                  backend=ctx.backend)  # Eq. 7: M_p * I + (1 - M_p) * G (or with I and G swapped)
        normalized = ops.normalize(boxed, ctx.mean, ctx.std, ctx.out_dtype)
        weight = torch.cat([torch.where(pixel, lam, torch.ones_like(lam)), torch.ones_like(lam)])
        images = ops.pixel_mix(normalized, ops.PixelMixParams(partner, weight), backend=ctx.backend,
                               inplace=True)[:size]  # Eq. 6 (normalized is ours: no second buffer)
        kept = kept[:size]
        real_share = torch.where(pixel, lam, torch.where(patch, torch.where(real_in_box, 1 - kept, kept),
                                                         torch.where(mode == MODE_RAW, 0.0, 1.0)))
        targets = ops.one_hot_targets(batch.fields["label"], ctx.num_classes, smoothing=ctx.label_smoothing)
        nan = torch.full_like(lam, float("nan"))
        g = batch.generated
        info = {"mode": mode, "eta": torch.where(pixel, 1, torch.where(patch, 0, -1)),
                "lam": torch.where(pixel, lam, nan), "box": torch.where(patch[:, None], boxes, -1),
                "real_in_box": real_in_box, "real_share": real_share, "real_index": batch.fields["real_index"],
                "similarity": torch.where(g, batch.fields["similarity"], nan),
                "tau": torch.where(g, batch.fields["tau"], nan),
                "prompt_id": torch.where(g, batch.fields["prompt_id"], -1)}
        return images, targets, info

    def preview(self, samples: Sequence[Mapping[str, np.ndarray]], real: torch.Tensor, ctx: BatchContext,
                generator: torch.Generator) -> dict[str, list[tuple[torch.Tensor, str]]]:
        """Rows of the demo's preview for pooled ``samples`` (``pool.peek``) and ``real`` (uint8 (n, 3, S, S)):
        the real image, the generated one with its similarity and tau_k, where the real image is in the mix
        (white: all of it, gray: ``lam``), and the mixed result, each as ``(float (3, S, S) or (S, S) in [0, 1],
        caption)``. The modes alternate pixel-wise / patch-wise so that both show."""
        device = ctx.mean.device
        count = len(samples)
        stacked = {name: torch.from_numpy(np.stack([s[name] for s in samples])).to(device)
                   for name in self.pool_fields(ctx.image_size)}
        batch = Batch(fields={**stacked, "image": real.to(device), "real_index": stacked["index"]},
                      generated=torch.ones(count, dtype=torch.bool, device=device))
        params = self.sample_params(batch, ctx, generator)
        height, width = real.shape[-2:]
        pixel = torch.arange(count, device=device) % 2 == 0
        params["mode"] = torch.where(pixel, torch.full_like(params["mode"], MODE_PIXEL), MODE_PATCH)
        boxes = sample_inner_boxes(params["area"], height, width, generator)
        params["boxes"] = torch.where(pixel[:, None], torch.zeros_like(boxes), boxes)
        params["real_in_box"] = params["real_in_box"] & ~pixel
        images, _, info = self.apply(batch, params, ctx)
        result = (images.float() * ctx.std.view(1, -1, 1, 1) + ctx.mean.view(1, -1, 1, 1)).clamp(0, 1).cpu()
        rows = {"real": [], "generated": [], "real in mix": [], "result": []}
        for i in range(count):
            similarity, tau = float(stacked["similarity"][i]), float(stacked["tau"][i])
            if pixel[i]:
                where = torch.full((height, width), float(info["lam"][i]))
                how = f"pixel lam={float(info['lam'][i]):.2f}"
            else:
                y0, x0, y1, x1 = info["box"][i].tolist()
                inside = torch.zeros(height, width)
                inside[y0:y1, x0:x1] = 1
                where = inside if bool(info["real_in_box"][i]) else 1 - inside
                how = f"patch, {'I in G' if bool(info['real_in_box'][i]) else 'G in I'}"
            rows["real"].append((real[i].float() / 255, f"class {int(stacked['label'][i])}"))
            rows["generated"].append((torch.from_numpy(samples[i]["generated"]).float() / 255,
                                      f"S={similarity:.3f} > tau={tau:.3f}"))
            rows["real in mix"].append((where, how))
            rows["result"].append((result[i], f"real share {float(info['real_share'][i]):.2f}"))
        return rows


def sample_inner_boxes(area: torch.Tensor, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """int64 (B, 4) boxes ``(y0, x0, y1, x1)`` (half-open) of the image's aspect ratio with area fraction
    ``area`` (float (B,) in [0, 1]; sides ``round(sqrt(area) * H)`` x ``round(sqrt(area) * W)``), at a uniform
    position inside the image. Drawn with ``generator`` on its device."""
    device = generator.device
    side = torch.sqrt(area.to(torch.float32).clamp(0, 1))
    cut_h = torch.floor(side * height + 0.5).to(torch.int64)
    cut_w = torch.floor(side * width + 0.5).to(torch.int64)
    y0 = torch.floor(torch.rand(area.shape, generator=generator, device=device) * (height - cut_h + 1)).to(torch.int64)
    x0 = torch.floor(torch.rand(area.shape, generator=generator, device=device) * (width - cut_w + 1)).to(torch.int64)
    y0, x0 = torch.minimum(y0, height - cut_h), torch.minimum(x0, width - cut_w)  # rand < 1, but be exact
    return torch.stack([y0, x0, y0 + cut_h, x0 + cut_w], dim=1)


__all__ = ["CLIP_FILTER", "CONTEXTS", "COSXL_SCHEDULER_CONFIG", "NEGATIVE_PROMPT", "PROMPT_SETS", "DiffCoReMix",
           "class_thresholds", "clean_class_name", "negative_prompt_for", "sample_inner_boxes", "sample_pairs"]
