"""De-DA: decoupled data augmentation, segmenting each image into the object and its background.

Chen, Yan, Li, Huang, Xie, Wang. "Decoupled Data Augmentation for Improving Image Classification." arXiv
2411.02592, 2024. An image is split into its class-dependent part (CDP, the object) and its class-independent
part (CIP, the background). The CDP is edited conservatively (SDEdit with strength s = 0.4, eqs. 1-3); the CIP
is swapped for one of another class; the two are recombined at random online, sometimes with a second CDP of
another class, the label weighted by visible area "following CutMix" (§3).

Producer (per visit of a dataset index; segmentation and CIP are computed once per index and cached):

1. **Segment** the object: Lang-SAM (GroundingDINO boxes from a text prompt, then SAM, union of the masks), or
   CLIPSeg, or the dataset's own masks. Nothing found: no slot, counted as ``seg_misses``.
2. **CIP**: dilate the mask by ``max(2, 0.02 S)`` px and fill the hole with the push-pull pyramid
   (:mod:`onlineaug.fill`; the paper's "alpha pyramid image blending"), or with SD inpainting.
3. **CDP**: the RGBA object (straight alpha = the mask) in the square around its box, resized to a square
   (``kernels.kornia_ops.prepare_foregrounds``); ``fg_box`` is that square in the frame, ``/ G``.
4. **Edit** the CDP ``num_edits = K = 3`` times (K jobs of the same index): RGB img2img over a grey matte,
   strength 0.4, guidance 7.0, 25 steps, 512 px, prompt ``"a photo of a {token}"``; the token is the class's
   textual-inversion token (``class_tokens``, else the edit pipeline's ``class_tokens`` map read from its
   ``textual_inversion`` file), else the class name. The edit keeps the real CDP's alpha.

Trainer (one ``kernels.composite`` launch per batch): layer 1 is the row's edited CDP with probability
``p_syn``, else its real CDP; the background is the CIP of a pooled row of another class (falling back to any
other pooled row, then its own); with probability ``p_mix`` a CDP of another class is drawn over it. Each
layer's size is its ``fg_box`` side times ``U(scale_range)`` clamped to ``scale_bounds``, its centre uniform
so that it stays inside, mirrored with probability ``flip_p``. The label is
``y = (v1 e_c1 + v2 e_c2) / (v1 + v2)`` from the visible areas ``v`` the kernel returns (``e_c1`` alone with
one CDP or when both are hidden; the background's class gets no weight), then label smoothing.

Where the paper is silent (see the report in ``shared/specs/deda.md``): the fill, the dilation, the scale and
position distributions, the flip, the grey matte (the paper edits with LayerDiffuse, not in diffusers), and
the CIP class (the text says both "inter-class" and "intra-class"; Fig. 3 and the CM(1+K) count say another
class: ``cip_class`` chooses).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from onlineaug import kernels
from onlineaug.checks import Checks
from onlineaug.fill import default_dilation, dilate, fill_holes
from onlineaug.models import ModelRole
from onlineaug.pool import Field
from onlineaug.recipes import register_recipe
from onlineaug.recipes.base import NON_FINITE, Batch, BatchContext, Jobs, ProducerContext, Produced, Recipe, SourceBatch
from onlineaug.recipes.generation import to_uint8

SEG_MISSES = "seg_misses"  # the reject reason of an image where the segmenter found no object
SEGMENTERS = {"lang-sam": "lang-sam", "clipseg": "clipseg", "dataset": "dataset-masks"}  # option -> model kind
# Lang-SAM's own models (lang_sam/models/gdino.py: grounding-dino-base; SAM ViT-H as in the SAM paper De-DA cites)
SEGMENTER_DEFAULTS = {"lang-sam": "IDEA-Research/grounding-dino-base+facebook/sam-vit-huge",
                      "clipseg": "CIDAS/clipseg-rd64-refined", "dataset": "dataset"}
INPAINTERS = ("pyramid", "sd")
CIP_CLASSES = ("other", "same", "any")
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_INPAINT = "stable-diffusion-v1-5/stable-diffusion-inpainting"


# --------------------------------------------------------------------------------- the per-index cache
@dataclasses.dataclass
class Decoupled:
    """What De-DA keeps per dataset index: its segmentation and its CIP (both deterministic per image).

    ``box = (top, left, side)`` is the square around the mask's bounding box at the generation size ``G``
    (centred on the box, so it may cross the frame); ``alpha`` is the mask inside that square (False outside
    the frame). A miss (no object found) has ``found = False`` and nothing else.
    """

    found: bool
    box: tuple[int, int, int] = (0, 0, 0)
    alpha: torch.Tensor | None = None  # bool (side, side)
    background: torch.Tensor | None = None  # uint8 (3, S, S): the filled CIP
    area: float = 0.0  # mask pixels / G^2

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.alpha, self.background) if t is not None) + 64

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class IndexCache:
    """Decoupled results by dataset index: an LRU in memory bounded in bytes, over an optional folder.

    ``computed`` counts the entries put (each one a segmentation and a CIP computed); ``loaded`` those read back
    from the folder. The memory part always keeps the newest entry, even over ``max_bytes``. Files are written atomically (a temporary file, then ``os.replace``), so producers sharing
    the folder never read a partial one.
    """

    def __init__(self, max_bytes: int, folder: str | None = None):
        self.max_bytes, self.folder = int(max_bytes), folder
        self._entries: collections.OrderedDict[int, Decoupled] = collections.OrderedDict()
        self.bytes = 0
        self.computed = 0
        self.loaded = 0
        if folder is not None:
            os.makedirs(folder, exist_ok=True)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, index: int) -> bool:
        return int(index) in self._entries

    def _path(self, index: int) -> str:
        return os.path.join(self.folder, f"{int(index)}.pt")

    def get(self, index: int) -> Decoupled | None:
        index = int(index)
        entry = self._entries.get(index)
        if entry is not None:
            self._entries.move_to_end(index)
            return entry
        if self.folder is not None and os.path.exists(self._path(index)):
            entry = Decoupled(**torch.load(self._path(index), map_location="cpu", weights_only=True))
            entry.box = tuple(entry.box)
            self.loaded += 1
            self._remember(index, entry)
            return entry
        return None

    def put(self, index: int, entry: Decoupled) -> None:
        index = int(index)
        self.computed += 1
        self._remember(index, entry)
        if self.folder is not None:
            temporary = f"{self._path(index)}.{os.getpid()}.tmp"
            torch.save(entry.as_dict(), temporary)
            os.replace(temporary, self._path(index))

    def _remember(self, index: int, entry: Decoupled) -> None:
        if index in self._entries:
            self.bytes -= self._entries.pop(index).nbytes
        self._entries[index] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.nbytes


# ------------------------------------------------------------------------------ CDP and CIP geometry
def square_box(mask: torch.Tensor) -> tuple[int, int, int]:
    """``(top, left, side)`` of the square around the True pixels of a bool (H, W) mask, centred on their box.

    ``side = max(box height, box width)``; the shorter extent is centred (rounded towards the top/left).
    """
    rows = mask.any(dim=1).nonzero().flatten()
    cols = mask.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        raise ValueError("square_box: the mask is empty")
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(r1 - r0, c1 - c0)
    return r0 - (side - (r1 - r0)) // 2, c0 - (side - (c1 - c0)) // 2, side


def crop_square(image: torch.Tensor, box: tuple[int, int, int]) -> torch.Tensor:
    """The ``(C, side, side)`` square ``box = (top, left, side)`` of a (C, H, W) image, zeros outside the frame."""
    top, left, side = box
    h, w = image.shape[-2:]
    out = image.new_zeros((image.shape[0], side, side))
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, h), min(left + side, w)
    out[:, y0 - top:y1 - top, x0 - left:x1 - left] = image[:, y0:y1, x0:x1]
    return out


def bleed_colour(rgba: torch.Tensor) -> torch.Tensor:
    """RGBA uint8 (n, 4, H, W) with the colour of its fully transparent texels filled from the opaque ones.

    ``kernels.composite`` samples straight alpha bilinearly, so the colour of transparent texels shows in the
    antialiased rim; black (what resampling leaves) would draw a dark fringe. The push-pull fill continues the
    object's own edge colour instead. Alpha and the colour of visible texels are unchanged.
    """
    transparent = rgba[:, 3] == 0
    return torch.cat([fill_holes(rgba[:, :3].contiguous(), transparent), rgba[:, 3:]], dim=1)


def cdp_rgba(image: torch.Tensor, entry: Decoupled, size: int) -> torch.Tensor:
    """The CDP of ``image`` (uint8 (3, G, G)) as straight-alpha RGBA uint8 (4, size, size).

    The square ``entry.box`` with alpha = the mask, resized to ``size`` (antialiased, premultiplied:
    ``prepare_foregrounds``); transparent texels take the edge colour (:func:`bleed_colour`).
    """
    alpha = entry.alpha.to(image.device, torch.uint8) * 255
    square = torch.cat([crop_square(image, entry.box), alpha[None]], dim=0)
    return bleed_colour(kernels.prepare_foregrounds(square[None].contiguous(), (size, size)))[0]


def over_matte(rgba: torch.Tensor, grey: float) -> torch.Tensor:
    """Float (n, 3, H, W) in [0, 1]: the RGBA uint8 CDPs over a uniform grey ``a * rgb + (1 - a) * grey``."""
    x = rgba.float() / 255
    a = x[:, 3:]
    return a * x[:, :3] + (1 - a) * grey


def mask_coverage(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Bool (n, size, size): the pixels at ``size`` that any True pixel of the (n, H, W) mask touches."""
    if mask.shape[-1] == size and mask.shape[-2] == size:
        return mask.clone()
    covered = F.interpolate(mask[:, None].float(), size=(size, size), mode="area") if size < mask.shape[-1] else \
        F.interpolate(mask[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return covered[:, 0] > 0


# ------------------------------------------------------------------------------------------ the recipe
@register_recipe
class DeDA(Recipe):
    name = "deda"
    paper = "Chen et al., Decoupled Data Augmentation for Improving Image Classification, arXiv 2411.02592, 2024"
    main_role = "edit"
    needs_class_names = True
    reject_reasons = (SEG_MISSES, NON_FINITE)
    real_fields = {"image": "image"}
    default_generation_size = 512

    def __init__(self, *, segmenter: str = "lang-sam", segment_text: str | None = None,
                 box_threshold: float = 0.3, text_threshold: float = 0.25, clipseg_threshold: float = 0.4,
                 inpaint: str = "pyramid", dilation: float | None = None, num_edits: int = 3, strength: float = 0.4,
                 guidance_scale: float = 7.0, num_inference_steps: int = 25, generation_size: int | None = None,
                 prompt_template: str = "a photo of a {token}", class_tokens: Sequence[str] | None = None,
                 textual_inversion: str | None = None, matte: float = 0.5, inpaint_prompt: str = "",
                 cache_mb: float = 1024.0, p_syn: float = 0.25, p_mix: float = 0.5, cip_class: str = "other",
                 scale_range: Sequence[float] = (0.5, 1.0), scale_bounds: Sequence[float] = (0.05, 1.0),
                 flip_p: float = 0.5):
        check = Checks.recipe(self.name)
        self.segmenter = check.choice("segmenter", segmenter, list(SEGMENTERS))
        self.segment_text = None if segment_text is None else check.text("segment_text", segment_text)
        self.box_threshold = check.probability("box_threshold", box_threshold)
        self.text_threshold = check.probability("text_threshold", text_threshold)
        self.clipseg_threshold = check.probability("clipseg_threshold", clipseg_threshold)
        self.inpaint = check.choice("inpaint", inpaint, list(INPAINTERS))
        self.dilation = None if dilation is None else check.real("dilation", dilation, low=0.0)
        self.num_edits = check.integer("num_edits", num_edits, low=1)
        self.strength = check.real("strength", strength, low=0.0, high=1.0, low_open=True)
        self.guidance_scale = check.real("guidance_scale", guidance_scale, low=0.0)
        self.num_inference_steps = check.integer("num_inference_steps", num_inference_steps, low=1)
        self.generation_size = check.generation_size(generation_size, self.default_generation_size)
        self.prompt_template = check.template("prompt_template", prompt_template, "token")
        self.class_tokens = None if class_tokens is None else check.strings("class_tokens", class_tokens)
        self.textual_inversion = check.path("textual_inversion", textual_inversion)
        self.matte = check.probability("matte", matte)
        self.inpaint_prompt = check.text("inpaint_prompt", inpaint_prompt, allow_empty=True)
        self.cache_mb = check.real("cache_mb", cache_mb, low=0.0)
        self.p_syn = check.probability("p_syn", p_syn)
        self.p_mix = check.probability("p_mix", p_mix)
        self.cip_class = check.choice("cip_class", cip_class, list(CIP_CLASSES))
        self.scale_range = self._interval(check, "scale_range", scale_range)
        self.scale_bounds = self._interval(check, "scale_bounds", scale_bounds)
        self.flip_p = check.probability("flip_p", flip_p)
        # class names are needed for the edit prompts (unless every class has a token) and for text segmenters
        self.needs_class_names = self.class_tokens is None or (self.segment_text is None and segmenter != "dataset")
        self._cache: tuple[ProducerContext, IndexCache] | None = None

    @staticmethod
    def _interval(check: Checks, name: str, value) -> tuple[float, float]:
        pair = check.sequence(name, value, lambda n, v: check.real(n, v, low=0.0, low_open=True))
        if len(pair) != 2 or pair[0] > pair[1]:
            check._fail(ValueError, name, value, "a pair (low, high) with 0 < low <= high")
        return pair

    def __getstate__(self):
        state = dict(vars(self))
        state["_cache"] = None  # per producer process: never pickled along with the recipe
        return state

    def describe(self) -> dict:
        return {**super().describe(), "segmenter_kind": SEGMENTERS[self.segmenter]}

    def prompt_text(self, label: int, ctx: ProducerContext, learned: Mapping[str, str] | None = None) -> str:
        """The edit prompt of class ``label``: ``class_tokens[label]``, else ``learned[class name]`` (the edit
        pipeline's textual-inversion tokens by class name), else the class name, in ``prompt_template``."""
        if self.class_tokens is not None:
            if len(self.class_tokens) != ctx.num_classes:
                raise ValueError(f"recipe {self.name!r}: class_tokens has {len(self.class_tokens)} tokens but there "
                                 f"are {ctx.num_classes} classes; give one textual-inversion token per class")
            token = self.class_tokens[int(label)]
        else:
            name = ctx.class_name(label)
            token = (learned or {}).get(name, name)
        return self.prompt_template.format(token=token)

    def segment_prompt(self, label: int, ctx: ProducerContext) -> str:
        """What the text-prompted segmenter looks for: ``segment_text`` (the domain word) or the class name."""
        if self.segmenter == "dataset":
            return ""
        return self.segment_text if self.segment_text is not None else ctx.class_name(label)

    def dilation_at(self, size: int) -> float:
        """The dilation radius of the CIP's hole in pixels at the training size ``size``."""
        return default_dilation(size) if self.dilation is None else self.dilation

    # ----------------------------------------------------------------------------------- producer side
    def model_roles(self) -> dict[str, ModelRole]:
        kind = SEGMENTERS[self.segmenter]
        options = {"lang-sam": {"box_threshold": self.box_threshold, "text_threshold": self.text_threshold},
                   "clipseg": {"threshold": self.clipseg_threshold}, "dataset": {}}[self.segmenter]
        roles = {"edit": ModelRole("img2img", SD15, architecture="sd15", textual_inversion=self.textual_inversion),
                 "segmenter": ModelRole(kind, SEGMENTER_DEFAULTS[self.segmenter], options=options)}
        if self.inpaint == "sd":
            roles["inpaint"] = ModelRole("inpaint", SD15_INPAINT, architecture="sd15")
        return roles

    def pool_fields(self, image_size: int) -> dict[str, Field]:
        rgba = Field((4, image_size, image_size), "uint8")
        return {"fg_real": rgba, "fg_syn": rgba, "background": Field((3, image_size, image_size), "uint8"),
                "label": Field((), "int64"), "index": Field((), "int64"), "fg_box": Field((4,), "float32"),
                "fg_area": Field((), "float32")}

    def index_cache_key(self) -> dict:
        """What the per-index cache depends on: the segmentation and CIP settings and their models."""
        roles = ("segmenter", "inpaint") if self.inpaint == "sd" else ("segmenter",)
        return {"roles": roles, "segmenter": self.segmenter, "segment_text": self.segment_text,
                "box_threshold": self.box_threshold, "text_threshold": self.text_threshold,
                "clipseg_threshold": self.clipseg_threshold, "inpaint": self.inpaint,
                "dilation": self.dilation, "generation_size": self.generation_size,
                "inpaint_prompt": self.inpaint_prompt if self.inpaint == "sd" else None,
                "num_inference_steps": self.num_inference_steps if self.inpaint == "sd" else None}

    def plan_jobs(self, ctx: ProducerContext, count: int) -> Jobs:
        """Each drawn index ``num_edits`` times in a row: K edits of one CDP per visit (K slots)."""
        distinct = -(-count // self.num_edits)
        return Jobs(np.repeat(ctx.sources.draw(distinct, ctx.rng), self.num_edits)[:count])

    def index_cache(self, ctx: ProducerContext) -> IndexCache:
        """This producer's per-index cache (created on first use; on disk under ``ctx.cache_dir`` if set)."""
        if self._cache is None or self._cache[0] is not ctx:
            self._cache = (ctx, IndexCache(int(self.cache_mb * 2**20), ctx.cache_dir))
        return self._cache[1]

    def produce(self, models, batch: SourceBatch, ctx: ProducerContext):
        entries = self.decouple(models, batch, ctx)
        found = torch.tensor([entry.found for entry in entries], dtype=torch.bool)
        rows = found.nonzero().flatten()
        rejected = {SEG_MISSES: (~found).nonzero().flatten()} if not found.all() else {}
        if rows.numel() == 0:
            return Produced(payload=self._empty_payload(ctx.image_size), rows=rows, rejected=rejected)
        kept = [entries[r] for r in rows.tolist()]
        size, generation = ctx.image_size, batch.images.shape[-1]
        images = batch.images[rows]
        fg_real = torch.stack([cdp_rgba(images[i], entry, size) for i, entry in enumerate(kept)]).cpu()
        to_edit = torch.stack([cdp_rgba(images[i], entry, generation) for i, entry in enumerate(kept)])
        labels = batch.labels[rows]
        fg_syn, finite = self.edit(models["edit"], to_edit, fg_real, labels, ctx)
        boxes = torch.tensor([[e.box[0], e.box[1], e.box[0] + e.box[2], e.box[1] + e.box[2]] for e in kept],
                             dtype=torch.float32) / generation
        payload = {"fg_real": fg_real, "fg_syn": fg_syn, "background": torch.stack([e.background for e in kept]),
                   "label": labels, "index": batch.indices[rows], "fg_box": boxes,
                   "fg_area": torch.tensor([e.area for e in kept], dtype=torch.float32)}
        if not finite.all():
            rejected[NON_FINITE] = rows[~finite]
            payload = {name: value[finite] for name, value in payload.items()}
            rows = rows[finite]
        return Produced(payload=payload, rows=rows, rejected=rejected)

    def _empty_payload(self, size: int) -> dict[str, torch.Tensor]:
        return {name: torch.zeros((0, *f.shape), dtype=getattr(torch, f.dtype))
                for name, f in self.pool_fields(size).items()}

    def decouple(self, models, batch: SourceBatch, ctx: ProducerContext) -> list[Decoupled]:
        """The cached segmentation and CIP of each row's index, computing (once) those not cached yet."""
        cache = self.index_cache(ctx)
        indices = batch.indices.tolist()
        entries: dict[int, Decoupled] = {}  # this batch's, whatever the cache keeps
        first_row: dict[int, int] = {}
        for row, index in enumerate(indices):
            if index < 0 or index in entries or index in first_row:
                continue
            entry = cache.get(index)
            if entry is None:
                first_row[index] = row
            else:
                entries[index] = entry
        if first_row:
            rows = torch.tensor(list(first_row.values()), dtype=torch.int64)
            for index, entry in zip(first_row, self._compute(models, batch, rows, ctx)):
                cache.put(index, entry)
                entries[index] = entry
        return [entries.get(index, Decoupled(False)) for index in indices]

    def _compute(self, models, batch: SourceBatch, rows: torch.Tensor, ctx: ProducerContext) -> list[Decoupled]:
        """Segment the images of ``rows`` and fill their CIPs."""
        images = batch.images[rows]
        n, _, generation, _ = images.shape
        texts = [self.segment_prompt(label, ctx) for label in batch.labels[rows].tolist()]
        crops = batch.crops[rows] if batch.crops is not None else None
        masks, found = models["segmenter"].segment(images, texts, batch.indices[rows], crops)
        if tuple(masks.shape) != (n, generation, generation) or masks.dtype != torch.bool:
            raise ValueError(f"recipe {self.name!r}: the segmenter returned masks {masks.dtype} "
                             f"{tuple(masks.shape)} for images {tuple(images.shape)}; expected bool "
                             f"({n}, {generation}, {generation})")
        masks = masks.to(images.device)
        found = found.to(masks.device).bool() & masks.flatten(1).any(1)
        entries = [Decoupled(False) for _ in range(n)]
        hits = found.nonzero().flatten()
        if hits.numel():
            backgrounds = self.fill_background(models, images[hits], batch.originals[rows][hits].to(images.device),
                                               masks[hits], ctx)
            for i, background in zip(hits.tolist(), backgrounds):
                box = square_box(masks[i])
                entries[i] = Decoupled(True, box, crop_square(masks[i][None], box)[0].cpu(), background,
                                       float(masks[i].float().mean()))
        return entries

    def fill_background(self, models, images: torch.Tensor, originals: torch.Tensor, masks: torch.Tensor,
                        ctx: ProducerContext) -> torch.Tensor:
        """The CIPs, uint8 (n, 3, S, S) on the CPU: the dilated object removed and filled.

        ``inpaint="pyramid"``: the push-pull fill of the training-size image (exact outside the hole);
        ``"sd"``: Stable Diffusion inpainting at the generation size, resized, pasted into the hole only.
        """
        size = originals.shape[-1]
        hole = dilate(mask_coverage(masks, size), self.dilation_at(size))
        if self.inpaint == "pyramid":
            return fill_holes(originals, hole).cpu()
        generation = images.shape[-1]
        hole_g = dilate(masks, self.dilation_at(size) * generation / size)
        seeds = torch.randint(2**62, (len(images),), generator=ctx.generator, device=ctx.generator.device).tolist()
        painted = models["inpaint"](
            prompt=[self.inpaint_prompt] * len(images), image=images.float().div(255),
            mask_image=hole_g[:, None].float(), height=generation, width=generation,
            num_inference_steps=self.num_inference_steps,
            generator=[torch.Generator(device=ctx.generator.device).manual_seed(s) for s in seeds],
            output_type="pt").images
        painted, _ = to_uint8(painted, size)
        return torch.where(hole[:, None], painted.to(originals.device), originals).cpu()

    def edit(self, pipeline, to_edit: torch.Tensor, fg_real: torch.Tensor, labels: torch.Tensor,
             ctx: ProducerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """SDEdit each CDP over the grey matte; returns ``(fg_syn uint8 (n, 4, S, S), finite (n,))``.

        The edited colour is resized to the training size and takes the real CDP's alpha: the edit changes the
        object's appearance, never its silhouette (the paper's LayerDiffuse pipeline edits RGBA directly).
        """
        self._check_tokens(pipeline, ctx)
        device = ctx.generator.device
        seeds = torch.randint(2**62, (len(to_edit),), generator=ctx.generator, device=device).tolist()
        learned = getattr(pipeline, "class_tokens", None)
        edited = pipeline(
            prompt=[self.prompt_text(label, ctx, learned) for label in labels.tolist()],
            image=over_matte(to_edit, self.matte), strength=self.strength, guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps,
            generator=[torch.Generator(device=device).manual_seed(s) for s in seeds], output_type="pt").images
        colour, finite = to_uint8(edited, ctx.image_size)
        return bleed_colour(torch.cat([colour.cpu(), fg_real[:, 3:]], dim=1)), finite

    def _check_tokens(self, pipeline, ctx: ProducerContext) -> None:
        tokenizer = getattr(pipeline, "tokenizer", None)
        if self.class_tokens is None or tokenizer is None:
            return
        unknown = [t for t in self.class_tokens if t not in tokenizer.get_vocab()]
        if unknown:
            raise ValueError(f"recipe {self.name!r}: the edit model's tokenizer does not know the class tokens "
                             f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}; load their textual inversion "
                             f"(textual_inversion=... or models={{'edit': {{'textual_inversion': ...}}}}) or drop "
                             f"class_tokens to prompt with the class names")

    # ------------------------------------------------------------------------------------ trainer side
    def sample_params(self, batch: Batch, ctx: BatchContext, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per row: the background row, the second CDP's row, real/edited CDPs, sizes, centres and flips.

        Rows are drawn among the pooled rows of the batch (only they hold CDPs and CIPs) by the argmax of
        ``tier + U(0, 1)``: uniform within the best tier available (another class, then any other pooled row,
        then the row itself), with no host synchronisation.
        """
        device, count = batch.generated.device, batch.size
        generated = batch.generated.to(device)
        labels = batch.fields["label"]
        rows = torch.arange(count, device=device)
        pooled = generated[None, :].expand(count, count)
        other = labels[None, :] != labels[:, None]
        itself = rows[None, :] == rows[:, None]
        preferred = {"other": pooled & other, "same": pooled & ~other & ~itself, "any": pooled}[self.cip_class]
        tier = torch.where(preferred, 3.0, torch.where(pooled & ~itself, 2.0, torch.where(itself, 1.0, -1.0)))
        u = torch.rand((2, count, count), generator=generator, device=device)
        background_row = torch.where(generated, (tier + u[0]).argmax(1), rows)

        candidates = pooled & other
        second_row = torch.where(candidates, u[1], -1.0).argmax(1)
        coins = torch.rand((count, 6), generator=generator, device=device)
        has_second = generated & candidates.any(1) & (coins[:, 0] < self.p_mix)
        second_row = torch.where(has_second, second_row, -1)
        synthetic = (coins[:, 1:3] < self.p_syn) & torch.stack([generated, has_second], dim=1)
        flip = (coins[:, 3:5] < self.flip_p) & torch.stack([generated, has_second], dim=1)

        box = batch.fields["fg_box"]
        side = box[:, 2] - box[:, 0]
        sides = torch.stack([side, side[second_row.clamp(min=0)]], dim=1)
        low, high = self.scale_range
        scale = sides * (low + (high - low) * torch.rand((count, 2), generator=generator, device=device))
        scale = scale.clamp(*self.scale_bounds)
        size = float(ctx.image_size)
        extent = scale * size
        center = extent[..., None] / 2 + torch.rand((count, 2, 2), generator=generator, device=device) * \
            (size - extent)[..., None]
        scale = torch.where(torch.stack([generated, has_second], 1), scale, torch.ones_like(scale))
        return {"background_row": background_row, "second_row": second_row, "synthetic": synthetic,
                "scale": scale.contiguous(), "center": center.contiguous(), "flip": flip}

    def apply(self, batch: Batch, params: Mapping[str, torch.Tensor], ctx: BatchContext):
        fields, generated = batch.fields, batch.generated
        count = batch.size
        rows = torch.arange(count, device=generated.device)
        background = torch.where(generated[:, None, None, None], fields["background"][params["background_row"]],
                                 fields["image"]).contiguous()
        bank = torch.cat([fields["fg_real"], fields["fg_syn"]]).contiguous()  # [real CDPs; edited CDPs]
        second = params["second_row"]
        synthetic = params["synthetic"].long()
        fg_index = torch.stack([torch.where(generated, rows + count * synthetic[:, 0], -1),
                                torch.where(second >= 0, second.clamp(min=0) + count * synthetic[:, 1], -1)], dim=1)
        images, visible = kernels.composite(
            background, bank, fg_index, params["scale"], params["center"], params["flip"], mean=ctx.mean,
            std=ctx.std, out_dtype=ctx.out_dtype, backend=ctx.backend)
        labels = fields["label"]
        second_label = torch.where(second >= 0, labels[second.clamp(min=0)], -1)
        targets = kernels.soft_labels(torch.stack([labels, torch.where(second >= 0, second_label, labels)], 1),
                                      area_weights(visible, second >= 0), ctx.num_classes,
                                      smoothing=ctx.label_smoothing)
        info = {"label": labels, "second_label": second_label, "visible": visible,
                "background_label": torch.where(generated, labels[params["background_row"]], -1),
                "synthetic": params["synthetic"][:, 0]}
        return images, targets, info

    def preview_rows(self, samples: list[dict], dataset, ctx: BatchContext,
                     generator: torch.Generator) -> dict[str, list[torch.Tensor]]:
        """original, mask (the CDP's alpha back in its frame), CIP, CDP and edited CDP (over the grey matte), and
        a composite of the samples with each other (this recipe's own ``sample_params`` and ``apply``)."""
        from onlineaug.images import ItemFormat, load_item

        device, size = ctx.mean.device, ctx.image_size
        view = ItemFormat(resize="center_crop")  # a deterministic view of the source (the producer's crop is not kept)
        fields = {name: torch.stack([torch.as_tensor(np.asarray(s[name])) for s in samples]).to(device)
                  for name in self.pool_fields(size)}
        fields["image"] = torch.stack([load_item(dataset, int(s["index"]), size, ctx.num_classes, view)[0]
                                       for s in samples]).to(device)
        batch = Batch(fields=fields, generated=torch.ones(len(samples), dtype=torch.bool, device=device))
        plain = dataclasses.replace(ctx, mean=torch.zeros_like(ctx.mean), std=torch.ones_like(ctx.std),
                                    out_dtype=torch.float32, label_smoothing=0.0)
        composed, _, _ = self.apply(batch, self.sample_params(batch, plain, generator), plain)
        box = fields["fg_box"]
        side = box[:, 2] - box[:, 0]
        center = torch.stack([(box[:, :2] + box[:, 2:]) / 2 * size, torch.zeros_like(box[:, :2])], dim=1)
        alpha = torch.cat([torch.full_like(fields["fg_real"][:, :3], 255), fields["fg_real"][:, 3:]], dim=1)
        none = torch.full_like(side, -1, dtype=torch.int64)
        mask, _ = kernels.composite_reference(
            torch.zeros_like(fields["image"]), alpha.contiguous(), torch.stack([torch.arange(len(samples), device=device),
                                                                                none], 1),
            torch.stack([side, torch.ones_like(side)], 1), center, torch.zeros_like(box[:, :2], dtype=torch.bool))
        rows = {"original": fields["image"].float() / 255, "mask": mask[:, 0],
                "CIP": fields["background"].float() / 255, "CDP": over_matte(fields["fg_real"], self.matte),
                "edited CDP": over_matte(fields["fg_syn"], self.matte), "composite": composed}
        return {name: list(images.cpu()) for name, images in rows.items()}


def area_weights(visible: torch.Tensor, has_second: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Label weights (B, 2) of the two CDPs: ``(v1, v2) / (v1 + v2)``; ``(1, 0)`` with one CDP or both hidden."""
    total = visible.sum(1, keepdim=True)
    mixed = has_second[:, None] & (total >= eps)
    one = torch.zeros_like(visible)
    one[:, 0] = 1.0  # (no host-to-device copy: this runs on the trainer's stream every batch)
    return torch.where(mixed, visible / total.clamp(min=eps), one)
