"""Diff-Mix, Diff-Aug and Diff-Gen: class-conditioned SDEdit edits with strength-weighted soft labels.

Wang, Chen, Li, Wu, Zhang, Xu, Liu. "Enhance Image Classification via Inter-Class Image Mixup with Diffusion
Model." CVPR 2024 (``shared/papers/diffmix.txt``; official code github.com/Zhicaiwww/Diff-Mix, "DM" below).

Producer side (Sec. 3.4). A reference image of class ``j`` (the *source*) is translated by Stable Diffusion
img2img (SDEdit) at strength ``s`` with the prompt "a photo of a [V^i] [metaclass]" of class ``i`` (the
*target*): ``[V^i]`` is the class's learned textual-inversion token when a fine-tuned file is given, its class
name otherwise (the paper's Real-* variants). As the paper's Table 7 and DM's ``augmentation/diff_mix.py``:
SD 1.5, DPM-Solver++ with 25 steps (``int(25 * s)`` of them run), guidance 7.5, 512 px. The three variants:

* **Diff-Mix** (``diffmix``): source and target classes drawn independently and uniformly (they may be equal,
  DM ``scripts/sample_mp.py``), the reference uniformly among the source class's images,
  ``s`` uniformly from {0.5, 0.7, 0.9} (Sec. 3.4, Sec. 4.2);
* **Diff-Aug** (``diffaug``): the same with target = source (intra-class edits);
* **Diff-Gen** (``diffgen``): text-to-image of the target class (``s = 1``, no reference image).

``strength`` is one float per pipeline call, so :meth:`produce` makes one call per distinct strength in a
batch; with a compiled UNet each call is padded to a power-of-two batch bucket, so the compiled shapes stay
a small fixed set (:func:`strength_calls`).

Trainer side: a pooled sample keeps ``(source class, target class, s)`` and its label is built at batch
time, as DM does (``dataset/base.py``, ``get_syn_item``), so ``gamma`` can change without regenerating::

    y = soft_scaler * ((1 - s**gamma) * e_source + s**gamma * e_target)

The target (prompt) class gets ``s**gamma``: Table 6's caption (gamma = 0.5, s = 0.7 gives 0.16 y_i + 0.84 y_j,
"higher confidence over target class") and DM's code agree on it. Eq. 3, ``(1 - s^gamma) y^i + s^gamma y^j``
with ``i`` the prompt class and ``j`` the reference's, read literally gives the reverse; we follow the caption
and the code. ``gamma = 0.5`` (Sec. 4.2). ``soft_scaler`` defaults to 1.0 (rows sum to 1); 0.9 reproduces DM,
whose synthetic rows then sum to 0.9 (0.91 after its 0.1 label smoothing), while real rows stay one-hot.
Diff-Aug (source = target) and Diff-Gen (``s = 1``) labels are ``soft_scaler * e_target``: one-hot by
default. The loader's ``label_smoothing`` applies on top: ``(1 - eps) * y + eps / K``. Real samples are
replaced with probability ``p_aug`` (the paper's ``p``: 0.1 all-shot, Sec. 4.1) by any pooled sample
(DM ``dataset/base.py``, ``__getitem__``), or with Diff-Aug's ``match`` by one of the row's image or class.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from onlineaug import ops
from onlineaug.checks import Checks
from onlineaug.models import ModelRole
from onlineaug.pool import Field
from onlineaug.recipes import register_recipe
from onlineaug.recipes.base import (NON_FINITE, Batch, BatchContext, Jobs, ProducerContext, Produced, Recipe,
                                    SourceBatch)
from onlineaug.recipes.generation import keep_rows, to_uint8

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MATCHES = (None, "class", "index")
CLIP_FILTER = "clip_filter"  # the reject reason of an edit below its target class's running percentile
CLIP_MODEL = "openai/clip-vit-base-patch32"


class RunningPercentile:
    """Per class, the ``quantile`` of the last ``window`` scores: Diff-Mix's "drop the lowest 10%" (Sec. 7.1), online.

    The paper filters a finished synthetic set once; online there is no finished set, so each producer keeps the
    recent scores of each target class and rejects an edit scoring below their ``quantile``. Until a class has
    ``warmup`` scores nothing of it is rejected.
    """

    def __init__(self, quantile: float = 0.1, window: int = 512, warmup: int = 20):
        self.quantile, self.window, self.warmup = quantile, window, warmup
        self.history: dict[int, list[float]] = {}

    def threshold(self, label: int) -> float:
        scores = self.history.get(int(label), [])
        return float(np.quantile(scores, self.quantile)) if len(scores) >= self.warmup else float("-inf")

    def keep(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Which rows to keep (thresholds from the scores seen before this batch), then record the batch's scores."""
        thresholds = torch.tensor([self.threshold(c) for c in labels.tolist()], dtype=torch.float64)
        keep = scores.double().cpu() >= thresholds
        for label, score in zip(labels.tolist(), scores.tolist()):
            kept = self.history.setdefault(int(label), [])
            kept.append(float(score))
            del kept[:-self.window]
        return keep


def clip_scores(embedder: Any, images: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
    """Softmax over "a photo with a {subject} on it" vs "a photo without a {subject} on it": the first's share."""
    texts = [t for subject in subjects for t in (f"a photo with a {subject} on it", f"a photo without a {subject} on it")]
    text = embedder.embed_texts(texts).view(len(subjects), 2, -1)
    image = embedder.embed_images(images)
    logits = embedder.model.logit_scale.exp().float() * torch.einsum("nd,nkd->nk", image.float(), text.float())
    return logits.softmax(dim=1)[:, 0].cpu()


# ------------------------------------------------------------------------------------------------ labels
def strength_weights(strength: torch.Tensor, *, gamma: float, soft_scaler: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_source, w_target) = soft_scaler * (1 - s**gamma), soft_scaler * s**gamma`` per sample."""
    target = strength.float().clamp(0, 1).pow(gamma)
    return soft_scaler * (1 - target), soft_scaler * target


def diffmix_targets(source: torch.Tensor, target: torch.Tensor, strength: torch.Tensor, generated: torch.Tensor,
                    num_classes: int, *, gamma: float, soft_scaler: float, smoothing: float = 0.0) -> torch.Tensor:
    """Soft targets (B, K): generated rows ``soft_scaler * ((1 - s**gamma) e_source + s**gamma e_target)``, real
    rows ``e_source`` (the pool-only fields of a real row are stale, so only ``source`` is read there), then label
    smoothing ``(1 - smoothing) * y + smoothing / K``."""
    w_source, w_target = strength_weights(strength, gamma=gamma, soft_scaler=soft_scaler)
    w_source = torch.where(generated, w_source, torch.ones_like(w_source))
    w_target = torch.where(generated, w_target, torch.zeros_like(w_target))
    target = torch.where(generated, target, source)
    return ops.soft_labels(torch.stack([source, target], 1), torch.stack([w_source, w_target], 1), num_classes,
                           smoothing=smoothing)


# -------------------------------------------------------------------------------------------- producing
def class_token(pipe: Any, class_name: str) -> str:
    """The word a prompt uses for a class: its textual-inversion placeholder when the pipeline has one
    (``pipe.class_tokens``: class name -> token, set by the model loader from a TI file), else the class name."""
    tokens = getattr(pipe, "class_tokens", None) or {}
    if not tokens:
        return class_name
    if class_name not in tokens:
        known = ", ".join(sorted(tokens)[:8]) + (" ..." if len(tokens) > 8 else "")
        raise ValueError(f"the textual-inversion file has no token for class {class_name!r} (it maps {len(tokens)} "
                         f"classes: {known}); give a file trained on these class names, or map the names through "
                         f"its name2placeholder table")
    return tokens[class_name]


def is_compiled(pipe: Any) -> bool:
    """Whether the pipeline's UNet is wrapped by ``torch.compile`` (an ``OptimizedModule``)."""
    dynamo = sys.modules.get("torch._dynamo")  # not imported: nothing was compiled (and no import cost here)
    return dynamo is not None and isinstance(getattr(pipe, "unet", None), dynamo.eval_frame.OptimizedModule)


def strength_calls(strengths: torch.Tensor, *, pad: bool) -> list[tuple[float, torch.Tensor, int]]:
    """One pipeline call per distinct strength: ``(strength, rows, call batch size)``, strengths ascending.

    With ``pad`` (a compiled UNet: every new batch shape recompiles) a call's batch is padded up to the next
    power of two, capped at the batch's size, so a producer only ever compiles ``log2(n) + 2`` batch shapes;
    without it, a call runs exactly its rows.
    """
    values = strengths.detach().cpu().double()
    total = int(values.numel())
    calls = []
    for value in torch.unique(values).tolist():
        rows = (values == value).nonzero().flatten()
        size = len(rows)
        if pad:
            size = min(1 << (size - 1).bit_length(), total)
        calls.append((float(value), rows, size))
    return calls


def row_generators(count: int, generator: torch.Generator) -> list[torch.Generator]:
    """One seeded generator per row (drawn from the producer's stream): a row's noise does not depend on which
    rows share its pipeline call."""
    device = generator.device
    seeds = torch.randint(2**62, (count,), generator=generator, device=device).tolist()
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def edit_by_strength(pipe: Any, images: torch.Tensor, prompts: Sequence[str], strengths: torch.Tensor,
                     generators: Sequence[torch.Generator], *, pad: bool | None = None, **call) -> torch.Tensor:
    """SDEdit every row at its own strength: float (n, 3, G, G) in [0, 1].

    ``images``: uint8 (n, 3, G, G) references; ``call``: the img2img pipeline's other arguments
    (``num_inference_steps``, ``guidance_scale``). One call per distinct strength (:func:`strength_calls`),
    padded to a batch bucket when ``pad`` (default: when the UNet is compiled); padded rows repeat the group's
    last row with generators of their own (a shared one would shift the real row's noise) and are dropped.
    """
    pad = is_compiled(pipe) if pad is None else pad
    out: torch.Tensor | None = None
    for strength, rows, size in strength_calls(strengths, pad=pad):
        picked = rows.tolist() + [int(rows[-1])] * (size - len(rows))
        noise = [generators[i] for i in rows.tolist()]
        noise += [torch.Generator(device=noise[0].device).manual_seed(k) for k in range(size - len(rows))]
        edited = pipe(prompt=[prompts[i] for i in picked], image=images[picked].float().div(255),
                      strength=strength, generator=noise, output_type="pt", **call).images
        if out is None:
            out = edited.new_zeros((len(prompts), *edited.shape[1:]))
        out[rows.to(out.device)] = edited[:len(rows)].to(out.dtype)
    return out


def check_steps_cover_strengths(check: Checks, steps: int, strengths: Sequence[float]) -> None:
    """img2img runs ``int(steps * s)`` denoising steps: at least one for every strength."""
    weakest = min(strengths)
    if min(int(steps * weakest), steps) < 1:
        needed = next(k for k in itertools.count(steps + 1) if int(k * weakest) >= 1)  # as diffusers rounds
        check._fail(ValueError, "num_inference_steps", steps,
                    f"an int with int(num_inference_steps * s) >= 1 for every strength s (strength {weakest} would "
                    f"run 0 denoising steps): use num_inference_steps >= {needed}")


def checked_strengths(check: Checks, strengths) -> tuple[float, ...]:
    """A non-empty list of distinct strengths in (0, 1]."""
    values = check.sequence("strengths", strengths, lambda n, v: check.real(n, v, low=0.0, high=1.0, low_open=True))
    if len(set(values)) != len(values):
        check._fail(ValueError, "strengths", strengths, "distinct values (each strength is drawn uniformly; list it "
                                                        "once)")
    return values


def choose(values: Sequence, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` draws, uniform over ``values``."""
    return np.asarray(values)[rng.integers(len(values), size=count)]


# ---------------------------------------------------------------------------------------------- recipes
@register_recipe
class DiffMix(Recipe):
    """Diff-Mix: inter-class img2img edits (source and target classes independent and uniform)."""

    name = "diffmix"
    paper = "Wang et al., Enhance Image Classification via Inter-Class Image Mixup with Diffusion Model, CVPR 2024"
    main_role = "edit"
    needs_class_names = True
    needs_labels = True
    reject_reasons = (NON_FINITE,)
    real_fields = {"image": "image"}
    pipeline_kind = "img2img"
    default_generation_size = 512
    filter: str | None = None  # Diff-Aug and Diff-Gen have no filter option

    def __init__(self, *, strengths: Sequence[float] = (0.5, 0.7, 0.9), gamma: float = 0.5,
                 soft_scaler: float = 1.0, metaclass: str = "", num_inference_steps: int = 25,
                 guidance_scale: float = 7.5, generation_size: int | None = None, textual_inversion: str | None = None,
                 lora: str | None = None, filter: str | None = None, filter_quantile: float = 0.1,
                 max_retries: int = 3):
        check = Checks.recipe(self.name)
        self.strengths = checked_strengths(check, strengths)
        self._configure(check, gamma=gamma, soft_scaler=soft_scaler, metaclass=metaclass,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generation_size=generation_size, textual_inversion=textual_inversion, lora=lora)
        # the optional CLIP filter (Sec. 7.1; off by default, as the official training path never uses it)
        self.filter = check.choice("filter", filter, [None, "clip"])
        self.filter_quantile = check.real("filter_quantile", filter_quantile, low=0.0, high=1.0, high_open=True)
        self.max_retries = check.integer("max_retries", max_retries, low=0) if self.filter else 0
        self.reject_reasons = (NON_FINITE, CLIP_FILTER) if self.filter else (NON_FINITE,)
        self._percentile = RunningPercentile(self.filter_quantile) if self.filter else None

    def _configure(self, check: Checks, *, gamma, soft_scaler, metaclass, num_inference_steps, guidance_scale,
                   generation_size, textual_inversion, lora):
        self.gamma = check.real("gamma", gamma, low=0.0, low_open=True)
        self.soft_scaler = check.real("soft_scaler", soft_scaler, low=0.0, high=1.0, low_open=True)
        self.metaclass = check.text("metaclass", metaclass, allow_empty=True).strip()
        self.num_inference_steps = check.integer("num_inference_steps", num_inference_steps, low=1)
        check_steps_cover_strengths(check, self.num_inference_steps, self.strengths)
        self.guidance_scale = check.real("guidance_scale", guidance_scale, low=0.0)
        self.generation_size = check.generation_size(generation_size, self.default_generation_size)
        self.textual_inversion = check.path("textual_inversion", textual_inversion)
        self.lora = check.path("lora", lora)

    def prompt_text(self, token: str) -> str:
        """"a photo of a {token} {metaclass}" (Sec. 3.4); without a metaclass, "a photo of a {token}"."""
        return f"a photo of a {token} {self.metaclass}" if self.metaclass else f"a photo of a {token}"

    # ----------------------------------------------------------------------------------- producer side
    def model_roles(self) -> dict[str, ModelRole]:
        roles = {"edit": ModelRole(self.pipeline_kind, SD15, architecture="sd15", scheduler="dpm++",
                                   textual_inversion=self.textual_inversion, lora=self.lora)}
        if self.filter == "clip":
            roles["filter"] = ModelRole("clip", CLIP_MODEL)
        return roles

    def pool_fields(self, image_size: int) -> dict[str, Field]:
        scalar = Field((), "int64")
        return {"image": Field((3, image_size, image_size), "uint8"), "label": scalar, "index": scalar,
                "source_label": scalar, "target_label": scalar, "strength": Field((), "float32")}

    def draw_classes(self, ctx: ProducerContext, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(source, target)`` classes: independent, each uniform over the classes the sampler yields."""
        return ctx.sources.draw_classes(count, ctx.rng), ctx.sources.draw_classes(count, ctx.rng)

    def plan_jobs(self, ctx: ProducerContext, count: int) -> Jobs:
        source, target = self.draw_classes(ctx, count)
        indices = ctx.sources.draw_of_classes(source, ctx.rng)  # a reference image of each source class
        strength = choose(self.strengths, count, ctx.rng)
        # float64 as the pipeline takes it: a float32 0.7 would run int(10 * 0.6999999) = 6 of 10 steps, not 7
        return Jobs(indices, {"target_label": target.astype(np.int64), "strength": strength.astype(np.float64)})

    def prompts(self, pipe: Any, classes: torch.Tensor, ctx: ProducerContext) -> list[str]:
        return [self.prompt_text(class_token(pipe, ctx.class_name(c))) for c in classes.tolist()]

    def generate(self, pipe: Any, batch: SourceBatch, ctx: ProducerContext, target: torch.Tensor,
                 strength: torch.Tensor) -> torch.Tensor:
        return edit_by_strength(pipe, batch.images, self.prompts(pipe, target, ctx), strength,
                                row_generators(batch.size, ctx.generator),
                                num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale)

    def produce(self, models: Mapping[str, Any], batch: SourceBatch, ctx: ProducerContext):
        target = batch.values["target_label"].to(torch.int64).cpu()
        strength = batch.values["strength"].to(torch.float64).cpu()
        pixels = self.generate(models["edit"], batch, ctx, target, strength)
        images, finite = to_uint8(pixels, ctx.image_size)
        source = batch.labels if self.pipeline_kind != "text2img" else target  # no reference: the prompted class
        payload = {"image": images.cpu(), "label": target, "index": batch.indices, "source_label": source,
                   "target_label": target, "strength": strength.float()}
        produced = keep_rows(payload, finite, NON_FINITE)
        if self.filter != "clip" or not len(produced.rows):
            return produced
        subjects = [self.metaclass or ctx.class_name(c) for c in produced.payload["target_label"].tolist()]
        scores = clip_scores(models["filter"], produced.payload["image"].to(ctx.device), subjects)
        keep = self._percentile.keep(scores, produced.payload["target_label"])
        return Produced({k: v[keep] for k, v in produced.payload.items()}, rows=produced.rows[keep],
                        rejected={**produced.rejected, CLIP_FILTER: produced.rows[~keep]})

    # ------------------------------------------------------------------------------------ trainer side
    def sample_params(self, batch: Batch, ctx: BatchContext, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}  # nothing is random at batch time: the label is a function of the pooled (source, target, s)

    def apply(self, batch: Batch, params: Mapping[str, torch.Tensor], ctx: BatchContext):
        fields, generated = batch.fields, batch.generated
        images = ops.normalize(fields["image"], ctx.mean, ctx.std, ctx.out_dtype)
        source = torch.where(generated, fields["source_label"], fields["label"])
        target = torch.where(generated, fields["target_label"], fields["label"])
        strength = torch.where(generated, fields["strength"], torch.zeros_like(fields["strength"]))
        targets = diffmix_targets(source, target, strength, generated, ctx.num_classes, gamma=self.gamma,
                                  soft_scaler=self.soft_scaler, smoothing=ctx.label_smoothing)
        # real rows: strength 0 and source = target = their label
        return images, targets, {"strength": strength, "source_label": source, "target_label": target}


@register_recipe
class DiffAug(DiffMix):
    """Diff-Aug: intra-class img2img edits (target = source), one-hot labels (``soft_scaler * e_source``).

    ``match`` chooses what a replaced real row gets: None (any pooled sample, as DM), ``"class"`` (an edit of
    an image of its class) or ``"index"`` (an edit of its own image, as DA-Fusion).
    """

    name = "diffaug"

    def __init__(self, *, strengths: Sequence[float] = (0.5, 0.7, 0.9), match: str | None = None,
                 soft_scaler: float = 1.0, metaclass: str = "", num_inference_steps: int = 25,
                 guidance_scale: float = 7.5, generation_size: int | None = None, textual_inversion: str | None = None,
                 lora: str | None = None):
        check = Checks.recipe(self.name)
        self.strengths = checked_strengths(check, strengths)
        self.serve_match = check.choice("match", match, MATCHES)
        self._configure(check, gamma=1.0, soft_scaler=soft_scaler, metaclass=metaclass,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generation_size=generation_size, textual_inversion=textual_inversion, lora=lora)

    def draw_classes(self, ctx: ProducerContext, count: int) -> tuple[np.ndarray, np.ndarray]:
        source = ctx.sources.draw_classes(count, ctx.rng)
        return source, source


@register_recipe
class DiffGen(DiffMix):
    """Diff-Gen: text-to-image of a class drawn uniformly (``s = 1``), one-hot label of the prompted class."""

    name = "diffgen"
    pipeline_kind = "text2img"

    def __init__(self, *, soft_scaler: float = 1.0, metaclass: str = "", num_inference_steps: int = 25,
                 guidance_scale: float = 7.5, generation_size: int | None = None, textual_inversion: str | None = None,
                 lora: str | None = None):
        check = Checks.recipe(self.name)
        self.strengths = (1.0,)
        self._configure(check, gamma=1.0, soft_scaler=soft_scaler, metaclass=metaclass,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generation_size=generation_size, textual_inversion=textual_inversion, lora=lora)

    def plan_jobs(self, ctx: ProducerContext, count: int) -> Jobs:
        target = ctx.sources.draw_classes(count, ctx.rng)
        return Jobs(np.full(count, -1, dtype=np.int64),  # no reference image
                    {"target_label": target.astype(np.int64), "strength": np.ones(count, dtype=np.float64)})

    def generate(self, pipe: Any, batch: SourceBatch, ctx: ProducerContext, target: torch.Tensor,
                 strength: torch.Tensor) -> torch.Tensor:
        size = self.generation_size
        return pipe(prompt=self.prompts(pipe, target, ctx), height=size, width=size,
                    num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    generator=row_generators(batch.size, ctx.generator), output_type="pt").images
