"""The recipe interface: what one paper's method generates, and how it mixes at batch time.

A recipe is the only paper-specific piece of the data path. The loader, the pool and the producers only know
this interface, so a new method is a new file in ``onlineaug/recipes/`` and one registry line.

Producer side (in a producer process, on a generator device; the same code would run in a Ray actor)
    ``model_roles()``       the models it needs by role (``"edit"``, ``"filter"``, ``"segmenter"``, ...): a
                            :class:`~onlineaug.models.ModelRole` each; ``main_role`` is the one ``generator=``
                            names. No roles: a batch-time-only recipe (CutMix, Mixup) that starts no producer.
    ``pool_fields(S)``      the payload of one generated sample, as fixed-size :class:`~onlineaug.pool.Field` s
                            (sizes the shared-memory slots). Always holds ``index`` (the source's dataset index,
                            -1 for none) and ``label`` (the class the sample is served as), both int64.
    ``prepare(models, ctx)``  once per loader, before producing: state computed from the data (DiffCoRe-Mix's
                            per-class CLIP thresholds). Its result is shared by every producer, kept across
                            restarts and cached on disk under ``prepare_key()``.
    ``index_cache_key()``   for results computed lazily per dataset index while producing (De-DA's segmentation):
                            the settings they depend on. With a loader ``cache_dir``, ``ctx.cache_dir`` is then a
                            folder for them, keyed by this, the dataset and the models of ``key["roles"]``.
    ``plan_jobs(ctx, n)``   which sources the next ``n`` generations start from (default: ``n`` indices drawn
                            from what the trainer's sampler can yield), plus per-job values (target class,
                            strength, ...).
    ``produce(models, batch, ctx)``  a batch of jobs -> payloads. It may keep fewer rows than it was given
                            (:class:`Produced`: rejected rows, by reason, are regenerated up to ``max_retries``).

Trainer side (in the training process, on the trainer's device)
    ``real_fields``         which batch fields a real sample fills: field name -> "image", "label" or "index"
                            (``label`` and ``index`` are always filled; another name keeps the real sample's
                            value in a row replaced from the pool, e.g. DiffCoRe-Mix's ``real_index``).
    ``serve_match``         None: a replaced row takes any pooled sample; ``"class"``: one of the row's class;
                            ``"index"``: an edit of the row's own image.
    ``sample_params(...)``  draw this batch's per-sample parameters with an explicit ``torch.Generator``.
    ``apply(...)``          fields + parameters -> ``(images, soft targets)`` or ``(images, targets, info)``.

A batch holds, for every sample, the fields of ``real_fields``, ``label``, ``index`` and the ``pool_fields``.
For a real sample the pool-only fields hold stale data; for a sample replaced from the pool every pool field is
copied in (a field named in both is overwritten). ``batch.generated`` says which is which; ``apply`` must use it.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np
import torch

from onlineaug.pool import Field

if TYPE_CHECKING:  # pragma: no cover
    from onlineaug.models import ModelRole
    from onlineaug.sources import SourceSet


# ------------------------------------------------------------------------------------------ producer side
NON_FINITE = "non_finite"  # the reject reason of an output holding NaN or inf (never written as a black image)
DROPPED = "dropped"  # rows ``produce`` neither kept nor rejected


@dataclasses.dataclass
class Jobs:
    """What the next generations start from: one row per job."""

    indices: np.ndarray  # int64 (n,): dataset index of each job's source image (-1: no source image)
    values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per-job values, (n, ...) each

    def __post_init__(self):
        self.indices = np.asarray(self.indices, dtype=np.int64)
        for name, value in self.values.items():
            if len(value) != len(self.indices):
                raise ValueError(f"job value {name!r} has {len(value)} rows for {len(self.indices)} jobs")

    def __len__(self) -> int:
        return len(self.indices)

    def take(self, rows) -> "Jobs":
        rows = np.asarray(rows, dtype=np.int64)
        return Jobs(self.indices[rows], {k: np.asarray(v)[rows] for k, v in self.values.items()})

    @staticmethod
    def concat(parts: "list[Jobs]") -> "Jobs":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Jobs(np.zeros(0, dtype=np.int64))
        names = set(parts[0].values)
        if any(set(p.values) != names for p in parts):
            raise ValueError("jobs to concatenate carry different values")
        return Jobs(np.concatenate([p.indices for p in parts]),
                    {k: np.concatenate([np.asarray(p.values[k]) for p in parts]) for k in names})


@dataclasses.dataclass
class SourceBatch:
    """A batch of jobs handed to :meth:`Recipe.produce`, with their source images loaded.

    Rows without a source image (``indices == -1``) hold zeros in ``images``/``originals`` and label -1.
    """

    images: torch.Tensor  # uint8 (n, 3, G, G) at the recipe's generation size, on the producer's device
    originals: torch.Tensor  # uint8 (n, 3, S, S): the same images at the training size (as real samples are)
    labels: torch.Tensor  # int64 (n,): the source images' classes
    indices: torch.Tensor  # int64 (n,): dataset indices
    values: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # the jobs' values, (n, ...)
    attempts: torch.Tensor | None = None  # int64 (n,): 0 for a new job, k for its k-th regeneration
    # int64 (n, 4): (top, left, height, width) of the box of its item each image was cut from (the loader's
    # resize geometry, the same for images and originals); (0, 0, 0, 0) for rows without a source image
    crops: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])


@dataclasses.dataclass
class Produced:
    """What :meth:`Recipe.produce` returns when it does not keep every row.

    ``payload`` holds ``m <= n`` rows; ``rows[i]`` is the job row payload row ``i`` came from (default: the first
    ``m`` rows). ``rejected`` maps a reason to the job rows rejected for it: those jobs are regenerated (up to
    the recipe's ``max_retries``) and counted per reason. Job rows neither kept nor rejected are counted as
    ``dropped``.
    """

    payload: dict[str, torch.Tensor]
    rows: torch.Tensor | None = None
    rejected: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ProducerContext:
    """What a producer knows beyond its models, handed to ``prepare``, ``plan_jobs`` and ``produce``."""

    device: torch.device
    rank: int  # this producer's rank among the loader's producers
    trainer_rank: int  # the trainer's distributed rank
    num_classes: int
    class_names: list[str] | None
    image_size: int  # the training size S
    sources: "SourceSet"  # the indices the trainer's sampler can yield (and their classes, weights)
    generator: torch.Generator  # seeded, on ``device``: for the models
    rng: np.random.Generator  # seeded, on the host: for planning
    dataset: Any = None  # the user's dataset (for recipes that read masks or other item fields)
    state: Any = None  # what ``prepare`` returned (None before / without preparation)
    item_format: Any = None  # the loader's :class:`~onlineaug.images.ItemFormat` (dict keys, crop geometry)
    cache_dir: str | None = None  # a folder for per-index results (see ``Recipe.index_cache_key``), or None

    def class_name(self, label: int) -> str:
        if self.class_names is None:
            raise ValueError("this recipe builds prompts from class names, but the loader has none: pass "
                             "class_names=[...] or use a dataset with a .classes attribute")
        return self.class_names[int(label)]


# ------------------------------------------------------------------------------------------- trainer side
@dataclasses.dataclass
class Batch:
    """One training batch before mixing (on the trainer's device)."""

    fields: dict[str, torch.Tensor]  # name -> (B, ...)
    generated: torch.Tensor  # bool (B,): True where the sample came from the pool

    @property
    def size(self) -> int:
        return int(self.generated.shape[0])


@dataclasses.dataclass(frozen=True)
class BatchContext:
    """What ``apply`` needs beyond the batch: fixed for a loader's lifetime."""

    num_classes: int
    image_size: int
    mean: torch.Tensor  # float32 (3,) on the trainer's device, in [0, 1] pixel units
    std: torch.Tensor
    label_smoothing: float
    out_dtype: torch.dtype
    p_aug: float
    fractals: torch.Tensor | None  # uint8 (F, 3, S, S) on the trainer's device, for recipes that blend fractals
    backend: str = "auto"


# ----------------------------------------------------------------------------------------------- recipes
SERVE_MATCHES = (None, "class", "index")


class Recipe(abc.ABC):
    """Base class of every recipe. Subclasses set the class attributes and implement the methods.

    Options are the keyword arguments of ``__init__``: :func:`onlineaug.recipes.get_recipe` rejects unknown ones
    with the recipe's name and the valid keys, and each recipe validates its values (see
    :mod:`onlineaug.recipes.options`).
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    main_role: ClassVar[str | None] = None
    uses_fractals: ClassVar[bool] = False
    needs_class_names: ClassVar[bool] = False  # prompts are built from class names: fail early without them
    needs_labels: ClassVar[bool] = False  # producers draw sources by class (ctx.sources has labels)
    real_fields: ClassVar[Mapping[str, str]] = {"image": "image"}
    reject_reasons: ClassVar[tuple[str, ...]] = ()  # the reasons ``produce`` may reject a row for
    serve_match: str | None = None
    max_retries: int = 0  # regenerations of a rejected job
    generation_size: int | None = None

    @classmethod
    def option_names(cls) -> list[str]:
        """The keyword arguments of ``__init__``: this recipe's options."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in parameters if p.name != "self" and p.kind is p.KEYWORD_ONLY]

    # ----------------------------------------------------------------------------------- producer side
    @property
    def generative(self) -> bool:
        return bool(self.model_roles())

    def model_roles(self) -> dict[str, "ModelRole"]:
        """The models the producers run, by role. Batch-time-only recipes have none."""
        return {}

    def pool_fields(self, image_size: int) -> dict[str, Field]:
        """Payload of one generated sample (with ``index`` and ``label``). Batch-time-only recipes have none."""
        return {}

    def prepare_key(self) -> dict | None:
        """The settings that change what ``prepare`` computes (part of its cache key), or None: no preparation."""
        return None

    def index_cache_key(self) -> dict | None:
        """The settings that change what this recipe caches per dataset index, or None: no per-index disk cache.

        An optional ``"roles"`` entry (a tuple of role names) limits the models the key depends on to those
        (default: every role), so that changing another model keeps the cache.
        """
        return None

    def prepare(self, models: Mapping[str, Any], ctx: ProducerContext):
        """State computed once per loader from the data, before producing (picklable; tensors on the CPU)."""
        return None

    def plan_jobs(self, ctx: ProducerContext, count: int) -> Jobs:
        """The next ``count`` jobs. Default: source indices drawn from what the sampler yields."""
        return Jobs(ctx.sources.draw(count, ctx.rng))

    def produce(self, models: Mapping[str, Any], batch: SourceBatch, ctx: ProducerContext) -> Produced | dict:
        """Generate payloads for a batch of jobs: field name -> (n, ...) tensor, or a :class:`Produced`."""
        raise NotImplementedError(f"recipe {self.name!r} has no generator")

    # ------------------------------------------------------------------------------------ trainer side
    @abc.abstractmethod
    def sample_params(self, batch: Batch, ctx: BatchContext, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample parameters for ``apply``, drawn on the trainer's device."""

    @abc.abstractmethod
    def apply(self, batch: Batch, params: Mapping[str, torch.Tensor], ctx: BatchContext):
        """``(images, targets)`` or ``(images, targets, info)``: normalised images (B,3,S,S) in ``ctx.out_dtype``,
        soft targets (B,K), and per-sample (B,) tensors worth logging."""

    def preview_rows(self, samples: list[dict], dataset, ctx: BatchContext,
                     generator: torch.Generator) -> dict[str, list[torch.Tensor]] | None:
        """The rows of the demo's ``preview.png`` for some pooled ``samples`` (field -> host array each): row name
        -> one float image (3, S, S) or (S, S) in [0, 1] per sample. None: the demo's DiffuseMix figure."""
        return None

    def describe(self) -> dict:
        """The recipe's settings, for logs and metrics files."""
        settings = {key: value for key, value in vars(self).items() if not key.startswith("_")}
        return {"name": self.name, "paper": self.paper, **settings}
