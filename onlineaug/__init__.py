"""onlineaug: diffusion-based data augmentation, online, for PyTorch training.

Wrap a map-style ``Dataset`` in :class:`OnlineGenAugLoader`; producer processes edit source images with a
diffusion pipeline into a shared-memory pool, and the trainer mixes pooled samples into each batch on its
own device (see ``docs/architecture.md``).
"""

__version__ = "0.1.0"

__all__ = ["OnlineGenAugLoader", "ProducerError", "__version__"]


def __getattr__(name):
    # Lazy, so that `import onlineaug.datasets` in a DataLoader worker does not import diffusers.
    if name == "OnlineGenAugLoader":
        from onlineaug.loader import OnlineGenAugLoader

        return OnlineGenAugLoader
    if name == "ProducerError":
        from onlineaug.producer import ProducerError

        return ProducerError
    raise AttributeError(f"module 'onlineaug' has no attribute {name!r}")
