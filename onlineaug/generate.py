"""Offline generation with the same recipes: ``python -m onlineaug generate`` fills a sample store.

What the papers do offline (generate a folder of augmented images once, then train on it) becomes: fill the
store that an :class:`~onlineaug.OnlineGenAugLoader` with the same settings and ``cache_dir`` reads, with
``store_policy="read"`` (pure offline training) or ``"readwrite"`` (warm start, then keep generating)::

    python -m onlineaug generate --recipe genmix --dataset /data/train --out /cache --num-samples 50000 \\
        --devices cuda:0 --image-size 224
    loader = OnlineGenAugLoader(ImageFolder("/data/train"), "genmix", num_classes=..., image_size=224,
                                cache_dir="/cache", store_policy="read")

It runs one :class:`~onlineaug.producer.Producer` per device (the class producer processes run) writing the same
shards (:mod:`onlineaug.store`) with a progress bar and a rate, and resumes: the samples already in the store's
complete shards count towards ``--num-samples``, and a resumed run seeds its producers by the store's size, so
it adds new samples rather than copies of earlier ones. Several devices run as threads of this process (the
denoiser's CUDA kernels release the GIL); ``cpu`` generates in this process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import threading
import time


from onlineaug.sources import SourceSet, sampler_sources


def fill_store(loader, num_samples: int, *, devices=("cpu",), progress: bool = True) -> dict:
    """Generate with ``loader``'s recipe, models and dataset into its store until it holds ``num_samples``.

    ``loader`` is an unstarted :class:`~onlineaug.OnlineGenAugLoader` with a ``cache_dir`` (its settings make
    the store's key; its sampler limits the source indices). Returns ``{"before", "after", "seconds",
    "samples_per_s", "store"}``.
    """
    from onlineaug.producer import Producer
    from onlineaug.store import SampleStore, ShardWriter

    if loader.store_dir is None:
        raise ValueError("fill_store needs a loader with cache_dir= and a generating recipe")
    store = SampleStore.open(loader.store_dir, loader._store_manifest, create=True)
    before = store.num_samples()
    started = time.monotonic()
    if before < num_samples:
        indices, weights = sampler_sources(loader.sampler, len(loader.dataset))
        labels = loader._labels[indices] if loader._labels is not None else None
        sources = SourceSet(indices, weights, labels)
        settings = loader._producer_settings(sources, tempfile.mkdtemp(prefix="onlineaug-generate-"))
        settings.store_dir, settings.store_shard_size = loader.store_dir, loader.store_shard_size
        settings.store_run = len(store.shards())
        lock = threading.Lock()
        claimed = [before]  # samples stored or handed to a writer
        errors: list[BaseException] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_samples, initial=before, desc=f"generate {loader.recipe.name}", unit="img",
                       dynamic_ncols=True)

        def run(rank: int, device: str) -> None:
            writer = None
            try:
                producer = Producer(settings, rank=rank, device=device, sources=sources)
                writer = ShardWriter(store.path, settings.pool_fields, settings.store_shard_size)
                while not errors and claimed[0] < num_samples:
                    rows = producer.step()
                    with lock:
                        take = min(len(rows["index"]) if rows else 0, num_samples - claimed[0])
                        claimed[0] += take
                        if bar is not None:
                            bar.update(take)
                    writer.append({name: values[:take] for name, values in rows.items()})
                writer.seal()  # the last, shorter shard: the store holds what was asked for
            except BaseException as error:  # noqa: BLE001 - re-raised on the calling thread
                errors.append(error)
                if writer is not None:
                    writer.discard()

        threads = [threading.Thread(target=run, args=(rank, str(device)), name=f"onlineaug-generate-{rank}")
                   for rank, device in enumerate(devices)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        finally:
            if bar is not None:
                bar.close()
        if errors:
            raise errors[0]
    after = store.num_samples()
    seconds = time.monotonic() - started
    return {"before": before, "after": after, "seconds": seconds,
            "samples_per_s": (after - before) / seconds if seconds > 0 else 0.0, "store": store.path}


# ---------------------------------------------------------------------------------------------- command line
def load_dataset(spec: str):
    """``--dataset``: an ``ImageFolder`` path, or ``module:attr`` (a dataset, or a callable returning one)."""
    if os.path.isdir(spec):
        from torchvision.datasets import ImageFolder

        return ImageFolder(spec)
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise SystemExit(f"--dataset {spec!r} is neither a folder (an ImageFolder: one subfolder per class) nor "
                         f"module:attr (e.g. mypackage.data:train_set or onlineaug.datasets:SyntheticShapes)")
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise SystemExit(f"--dataset {spec!r}: {error}") from error
    return value() if callable(value) and not hasattr(value, "__getitem__") else value


def _option(text: str) -> tuple[str, object]:
    key, equals, value = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"--option takes key=value (a JSON value), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    from onlineaug.images import RESIZE_MODES
    from onlineaug.recipes import available_recipes

    parser.add_argument("--recipe", required=True, choices=available_recipes(),
                        help="a recipe that generates (batch-time recipes such as cutmix have nothing to store)")
    parser.add_argument("--dataset", required=True, help="an ImageFolder path, or module:attr (a dataset or a "
                                                         "callable returning one)")
    parser.add_argument("--out", required=True, help="the cache_dir the training loader will be given")
    parser.add_argument("--num-samples", type=int, required=True, help="samples the store should hold")
    parser.add_argument("--devices", nargs="+", default=["cpu"], help="generator devices, e.g. cuda:0 cuda:1")
    parser.add_argument("--num-classes", type=int, default=None, help="default: len(dataset.classes)")
    parser.add_argument("--image-size", type=int, default=224, help="the training loader's image_size")
    parser.add_argument("--resize", default="random_resized_crop", choices=list(RESIZE_MODES),
                        help="the training loader's resize")
    parser.add_argument("--generator", default="tiny", help="the recipe's main model (as the loader's generator=)")
    parser.add_argument("--generation-size", type=int, default=None,
                        help="generation size (default: the training size for the tiny generator, else the recipe's)")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe option (recipe_options), repeatable; values are JSON")
    parser.add_argument("--batch-size", type=int, default=4, help="source images per pipeline call")
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the producers' draws")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_generate(args) -> dict:
    from onlineaug.loader import OnlineGenAugLoader

    dataset = load_dataset(args.dataset)
    num_classes = args.num_classes
    if num_classes is None:
        classes = getattr(dataset, "classes", None)
        if classes is None:
            raise SystemExit("--num-classes is needed: the dataset has no .classes")
        num_classes = len(classes)
    loader = OnlineGenAugLoader(
        dataset, args.recipe, num_classes=num_classes, image_size=args.image_size, resize=args.resize,
        generator=args.generator, generation_size=args.generation_size, recipe_options=dict(args.option),
        generator_devices=list(args.devices), generator_batch_size=args.batch_size, pool_size=max(
            args.batch_size * len(args.devices), 1), cache_dir=args.out, store_shard_size=args.shard_size,
        seed=args.seed, num_workers=0, progress=not args.no_progress)
    try:
        report = fill_store(loader, args.num_samples, devices=loader.generator_devices,
                            progress=not args.no_progress)
    finally:
        loader.close()
    print(f"store {report['store']}: {report['after']} samples ({report['after'] - report['before']} new, "
          f"{report['samples_per_s']:.2f} samples/s)")
    print(f"train from it with OnlineGenAugLoader(..., cache_dir={args.out!r}, store_policy='read') and the same "
          f"recipe, recipe_options, generator, image_size and resize")
    return report
