"""Recipes, registered by name: one paper per file.

Adding a recipe: write ``onlineaug/recipes/<paper>.py`` with a :class:`Recipe` subclass decorated with
:func:`register_recipe`, and import it below. The loader, pool and producers need no change.
"""

from __future__ import annotations

from onlineaug.recipes.base import Batch, BatchContext, Jobs, ProducerContext, Produced, Recipe, SourceBatch

_REGISTRY: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    if not (isinstance(cls, type) and issubclass(cls, Recipe)):
        raise TypeError(f"register_recipe expects a Recipe subclass, got {cls!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a recipe named {cls.name!r} is already registered ({_REGISTRY[cls.name].__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def available_recipes() -> list[str]:
    return sorted(_REGISTRY)


def get_recipe(recipe: str | Recipe, **options) -> Recipe:
    """A recipe instance from a registered name (with its options) or an instance passed through."""
    if isinstance(recipe, Recipe):
        if options:
            raise ValueError("recipe options can only be given with a recipe name, not with a Recipe instance")
        return recipe
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a name or a Recipe instance, got {type(recipe).__name__}")
    if recipe not in _REGISTRY:
        raise ValueError(f"unknown recipe {recipe!r}; available recipes: {', '.join(available_recipes())}")
    cls = _REGISTRY[recipe]
    valid = cls.option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"recipe {recipe!r} has no option(s) {unknown}; its options are: "
                         f"{', '.join(valid) if valid else '(none)'}")
    return cls(**options)


# The built-in recipes register themselves on import.
from onlineaug.recipes import (  # noqa: E402,F401
    cutmix, dafusion, deda, diffcoremix, diffmix, diffusemix, genmix, mixup, vanilla)

__all__ = ["Batch", "BatchContext", "Jobs", "ProducerContext", "Produced", "Recipe", "SourceBatch",
           "available_recipes", "get_recipe", "register_recipe"]
