"""onlineaug: diffusion-based data augmentation, online, for PyTorch training.

Wrap a map-style ``Dataset`` in :class:`OnlineGenAugLoader`; producer processes edit source images with a
diffusion pipeline into a shared-memory pool, and the trainer mixes pooled samples into each batch on its
own device (see ``docs/architecture.md``).
"""

__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """Make ``onlineaug.kernels`` importable from a source checkout (the repository on ``sys.path``).

    The kernels live in the top-level ``kernels/`` folder and are installed as ``onlineaug.kernels``
    (``package_dir`` in setup.py). When this package is imported from a checkout instead of an install
    (``PYTHONPATH=$PWD``), a finder maps that one name to the folder beside this package.
    """
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    folder = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (folder / "__init__.py").is_file():
        return  # an installed copy (onlineaug/kernels/ exists), or no checkout beside us

    class _SourceKernelsFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "onlineaug.kernels":
                return None  # submodules are found through the package's __path__
            return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    if not any(type(f).__name__ == "_SourceKernelsFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceKernelsFinder())


_map_source_kernels()

__all__ = ["OnlineGenAugLoader", "ProducerError", "__version__", "flat_stats"]


def __getattr__(name):
    # Lazy, so that `import onlineaug.datasets` in a DataLoader worker does not import diffusers.
    if name == "OnlineGenAugLoader":
        from onlineaug.loader import OnlineGenAugLoader

        return OnlineGenAugLoader
    if name == "flat_stats":
        from onlineaug.monitor import flat_stats

        return flat_stats
    if name == "ProducerError":
        from onlineaug.producer_processes import ProducerError

        return ProducerError
    raise AttributeError(f"module 'onlineaug' has no attribute {name!r}")
