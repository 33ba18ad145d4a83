"""``python -m onlineaug demo``: vanilla vs online generative augmentation, side by side.

Trains a small CNN on :class:`~onlineaug.datasets.SyntheticShapes` for a fixed number of steps twice: with a
plain ``DataLoader`` (vanilla) and with :class:`~onlineaug.OnlineGenAugLoader` running ``--recipe`` (GenMix on
the tiny generator by default; any registered recipe). Prints steps/s, the augmentation overhead A_O = (T_aug - T_van) / T_van (GuidedMixup's definition,
used by the DiffuseMix/DiffCoRe-Mix papers), the generated share, misses and pool stats; writes
``preview.png`` (the recipe's own rows where it has them, e.g. De-DA's original, mask, CIP, CDP, edited CDP,
composite; for recipes that pool only an edit, such as Diff-Mix: source, edit, source -> target class and strength;
otherwise DiffuseMix Figure 4: original, generated, mask, hybrid, fractal, final) and ``metrics.json`` into
``--out`` (default ``runs/demo`` under the current directory).

The online run keeps what its producers generate in the sample store under ``--cache-dir`` (default
``runs/cache``): a second run with the same settings starts with a pool filled from the store (the table's "from
the store" row says how many), then keeps generating. ``--no-cache`` runs without a store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onlineaug import ops
from onlineaug.datasets import SyntheticShapes
from onlineaug.images import UInt8ImageDataset, load_item
from onlineaug.loader import IMAGENET_MEAN, IMAGENET_STD, OnlineGenAugLoader
from onlineaug.recipes import available_recipes, get_recipe
from onlineaug.seeding import torch_generator


def small_cnn(num_classes: int) -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                             nn.MaxPool2d(2))

    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, num_classes))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _batches(loader, steps: int):
    """``steps`` batches, cycling epochs (calling ``set_epoch`` where the loader has it)."""
    done, epoch = 0, 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return
        epoch += 1


def train(loader, steps: int, *, num_classes: int, device: torch.device, seed: int, desc: str,
          prepare=None, progress: bool = True, untimed_steps: int = 5) -> dict:
    """Train a fresh small CNN for ``untimed_steps + steps`` steps; time the last ``steps``.

    The untimed steps absorb one-off start-up (DataLoader workers, first allocations) in both runs.
    """
    torch.manual_seed(seed)
    model = small_cnn(num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    from tqdm.auto import tqdm

    bar = tqdm(total=untimed_steps + steps, desc=desc, unit="step", disable=not progress)
    losses = []
    start = time.perf_counter()
    for step, batch in enumerate(_batches(loader, untimed_steps + steps)):
        if step == untimed_steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        images, targets = prepare(batch) if prepare else batch
        loss = soft_cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
        bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    return {"seconds": seconds, "steps_per_s": steps / seconds, "final_loss": float(np.mean(losses[-10:]))}


def _tile(image: torch.Tensor, size: int) -> np.ndarray:
    """float (3,H,W) in [0,1] or (H,W) -> uint8 (size,size,3)."""
    if image.ndim == 2:
        image = image[None].expand(3, -1, -1)
    image = F.interpolate(image[None].float(), size=(size, size), mode="nearest")[0]
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _write_canvas(rows: dict[str, list[np.ndarray]], path: Path, tile: int, captions: list[str] = (),
                  tile_captions: dict[str, list[str]] | None = None) -> None:
    """Named rows of tiles, with a caption under each column (if any) and on each tile (``tile_captions``)."""
    from PIL import Image, ImageDraw

    label_width, caption_height = 90, 28 if captions else 0
    columns = max(len(tiles) for tiles in rows.values())
    canvas = Image.new("RGB", (label_width + tile * columns, tile * len(rows) + caption_height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, tiles) in enumerate(rows.items()):
        draw.text((6, r * tile + tile // 2 - 6), name, fill="black")
        for c, array in enumerate(tiles):
            canvas.paste(Image.fromarray(array), (label_width + c * tile, r * tile))
            if tile_captions is not None:
                x, y = label_width + c * tile + 3, (r + 1) * tile - 14
                draw.rectangle((x - 2, y - 1, x + 6 * len(tile_captions[name][c]) + 2, y + 11), fill="black")
                draw.text((x, y), tile_captions[name][c], fill="white")
    for c, caption in enumerate(captions):
        draw.multiline_text((label_width + c * tile + 4, tile * len(rows) + 2), caption, fill="black", spacing=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def write_edit_preview(loader: OnlineGenAugLoader, samples: list[dict], path: Path, *, tile: int = 128) -> int:
    """Recipes whose payload is an edited ``image`` of the dataset item ``index`` (Diff-Mix, DA-Fusion): rows
    source (read from the dataset; blank for text-to-image) and edit, captioned with the source/target class and
    the strength where the payload has them."""
    from onlineaug.images import load_image, resize_uint8

    size = loader.image_size

    def name(label: int) -> str:
        return loader.class_names[label] if loader.class_names else str(label)

    rows, captions = {"source": [], "edit": []}, []
    for sample in samples:
        index = int(sample["index"])
        source = torch.ones(3, size, size)
        if index >= 0:
            image, _ = load_image(loader.dataset, index, loader.num_classes)
            source = resize_uint8(image, size).float() / 255
        rows["source"].append(_tile(source, tile))
        rows["edit"].append(_tile(torch.from_numpy(sample["image"]).float() / 255, tile))
        if "source_label" in sample and "target_label" in sample:
            caption = f"{name(int(sample['source_label']))} -> {name(int(sample['target_label']))}"
        else:
            caption = name(int(sample["label"]))
        if "strength" in sample:
            caption += f"\ns = {float(sample['strength']):.2f}"
        captions.append(caption)
    _write_canvas(rows, path, tile, captions)
    return len(samples)



def _diffusemix_rows(loader: OnlineGenAugLoader, samples: list[dict], generator: torch.Generator) -> dict:
    """DiffuseMix Figure 4: rows original, generated, mask, hybrid, fractal, final."""
    recipe, ctx, size = loader.recipe, loader.context, loader.image_size
    fractal_index = torch.randint(ctx.fractals.shape[0], (len(samples),), generator=generator)
    rows = {name: [] for name in ("original", "generated", "mask", "hybrid", "fractal", "final")}
    for i, sample in enumerate(samples):
        original = torch.from_numpy(sample["original"]).float() / 255
        generated = torch.from_numpy(sample["generated"]).float() / 255
        split = recipe.splits[i % len(recipe.splits)]
        flip = recipe.flips[(i // len(recipe.splits)) % len(recipe.flips)]
        mask = ops.smooth_mask(size, size, split=split, flip=flip, blend_width=recipe.blend_width_at(size))
        fractal = ctx.fractals[fractal_index[i]].cpu().float() / 255
        hybrid = ops.concat_blend(original[None], generated[None], mask, fractal[None], 0.0)[0]
        final = ops.concat_blend(original[None], generated[None], mask, fractal[None], recipe.lam)[0]
        for name, image in zip(rows, (original, generated, mask, hybrid, fractal, final)):
            rows[name].append(image)
    return rows


def write_preview(loader: OnlineGenAugLoader, path: Path, *, count: int = 4, tile: int = 128) -> int:
    """A figure of pooled samples: the recipe's ``preview_rows`` (De-DA: original, mask, CIP, CDP, edited CDP,
    composite); for recipes that pool only an edit (Diff-Mix, DA-Fusion) :func:`write_edit_preview`; else DiffuseMix
    Figure 4 (original, generated, mask, hybrid, fractal, final)."""
    samples = loader.pool.peek(count) if loader.pool is not None else []
    if not samples:
        return 0
    recipe, size = loader.recipe, loader.image_size
    if hasattr(recipe, "preview"):  # e.g. DiffCoRe-Mix: real, generated (S vs tau), mix mode, result; captioned
        from onlineaug.images import ItemFormat

        view = ItemFormat(resize="center_crop")
        real = torch.stack([load_item(loader.dataset, int(s["index"]), size, loader.num_classes, view)[0]
                            for s in samples])
        captioned = recipe.preview(samples, real, loader.context,
                                   torch_generator(loader.seed, "preview", device=loader.context.mean.device))
        _write_canvas({name: [_tile(image, tile) for image, _ in row] for name, row in captioned.items()}, path, tile,
                      tile_captions={name: [text for _, text in row] for name, row in captioned.items()})
        return len(samples)
    generator = torch_generator(loader.seed, "preview", device=loader.device)
    rows = loader.recipe.preview_rows(samples, loader.dataset, loader.context, generator)
    if rows is None:
        if "original" not in samples[0]:
            return write_edit_preview(loader, samples, path, tile=tile)
        rows = _diffusemix_rows(loader, samples, torch_generator(loader.seed, "preview"))
    _write_canvas({name: [_tile(image, tile) for image in images] for name, images in rows.items()}, path, tile)
    return len(samples)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run_demo(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    tiny = args.generator == "tiny"
    options = get_recipe(args.recipe).option_names()
    generative = get_recipe(args.recipe).generative
    recipe_options = dict(args.recipe_option or [])
    if "num_inference_steps" in options and "num_inference_steps" not in recipe_options and (
            args.num_inference_steps or tiny):
        recipe_options["num_inference_steps"] = args.num_inference_steps or 4
    if args.recipe == "deda":  # SyntheticShapes knows its exact masks; tiny random segmenters would find noise
        recipe_options.setdefault("segmenter", "dataset")
    # None: the recipe's size, or the training size with the tiny generator (the loader's default)
    generation_size = args.generation_size if "generation_size" in options else None
    dataset = SyntheticShapes(num_classes=args.num_classes, size=args.image_size, length=args.length, seed=args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress

    # Vanilla: a plain DataLoader of the same uint8 images, normalised on the device.
    vanilla_loader = torch.utils.data.DataLoader(
        UInt8ImageDataset(dataset, args.image_size, args.num_classes), batch_size=args.batch_size, shuffle=True,
        num_workers=args.num_workers, drop_last=True, persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed), pin_memory=device.type == "cuda")
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    std = torch.tensor(IMAGENET_STD, device=device)

    def prepare_vanilla(batch):
        images, labels, _ = batch
        images = ops.normalize(images.to(device, non_blocking=True), mean, std)
        return images, ops.one_hot_targets(labels.to(device), args.num_classes)

    vanilla = train(vanilla_loader, args.steps, num_classes=args.num_classes, device=device, seed=args.seed,
                    desc="vanilla", prepare=prepare_vanilla, progress=progress)

    loader = OnlineGenAugLoader(
        dataset, recipe=args.recipe, num_classes=args.num_classes, batch_size=args.batch_size,
        image_size=args.image_size, generator=args.generator if generative else "tiny", device=args.device,
        generator_devices=(args.generator_device or ["cpu"]) if generative else ["cpu"], p_aug=args.p_aug,
        pool_size=args.pool_size, max_reuse=args.max_reuse, num_workers=args.num_workers, seed=args.seed,
        drop_last=True, generation_size=generation_size, warmup=args.warmup if generative else 0,
        recipe_options=recipe_options, generator_batch_size=args.generator_batch_size if generative else 4,
        compile_unet=args.compile if generative else False, progress=progress,
        cache_dir=None if args.no_cache else args.cache_dir, store_shard_size=args.store_shard_size)
    with loader:
        warmup_start = time.perf_counter()
        loader.wait_for_pool(args.warmup)
        warmup_seconds = time.perf_counter() - warmup_start
        augmented = train(loader, args.steps, num_classes=args.num_classes, device=device, seed=args.seed,
                          desc=f"online {args.recipe}", progress=progress)
        stats = loader.stats()
        previewed = write_preview(loader, out_dir / "preview.png")
        recipe_settings = loader.recipe.describe()

    overhead = (augmented["seconds"] - vanilla["seconds"]) / vanilla["seconds"]
    notes = []
    generator_devices = args.generator_device or ["cpu"]
    if generative and device.type == "cpu" and any(torch.device(d).type == "cpu" for d in generator_devices):
        notes.append(f"the producer runs on the same {os.cpu_count()} CPU cores as the trainer, so A_O here is "
                     f"mostly their contention; with generators on other devices (--generator-device cuda:1) "
                     f"it measures what the trainer pays (benchmarks/overhead.py)")
    metrics = {
        "settings": {k: v for k, v in vars(args).items()},
        "recipe": recipe_settings,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                        "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "vanilla": vanilla,
        "augmented": augmented,
        "augmentation_overhead": overhead,
        "warmup_seconds": warmup_seconds,
        "loader_stats": stats,
        "preview_samples": previewed,
        "notes": notes,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    served = stats["real"] + stats["generated"]
    print()
    producer = (f"generator {args.generator} on {', '.join(generator_devices)}" if generative
                else "no generator (batch-time only)")
    print(f"onlineaug demo: recipe {args.recipe}, {args.steps} timed steps (after 5 untimed), batch {args.batch_size}, "
          f"{args.image_size}px SyntheticShapes, trainer {args.device}, {producer}")
    print(_table([
        ("recipe", f"{args.recipe} ({recipe_settings['paper']})"),
        ("vanilla steps/s", f"{vanilla['steps_per_s']:.2f}  ({vanilla['seconds']:.1f} s)"),
        (f"online {args.recipe} steps/s", f"{augmented['steps_per_s']:.2f}  ({augmented['seconds']:.1f} s)"),
        ("overhead A_O = (T_aug-T_van)/T_van", f"{overhead * 100:+.1f}%"),
        ("generated share", f"{stats['generated_share'] * 100:.1f}%  ({stats['generated']} of {served}, "
                            f"p_aug={args.p_aug})"),
        ("fresh / reused serves", f"{stats['fresh']} / {stats['reused']}  (max_reuse={args.max_reuse})"),
        ("misses (nothing ready)", f"{stats['misses']}"),
        ("pool ready / size", f"{stats['pool_ready']} / {stats['pool_size']}"),
        ("produced", f"{stats['produced']}  ({stats['gen_images_per_s']:.2f} img/s, "
                     f"{stats['producer_restarts']} restarts)"),
        ("warmup", f"{warmup_seconds:.1f} s for {args.warmup if generative else 0} samples"),
        ("from the store", _store_row(loader, stats, generative)),
        ("final loss vanilla / online", f"{vanilla['final_loss']:.3f} / {augmented['final_loss']:.3f}"),
    ]))
    for note in notes:
        print(f"note: {note}")
    written = [out_dir / "preview.png"] if previewed else []
    print(f"wrote {' and '.join(str(path) for path in [*written, out_dir / 'metrics.json'])}")
    return metrics


def _store_row(loader: OnlineGenAugLoader, stats: dict, generative: bool) -> str:
    """The table's line on the sample store: what the pool started with, and what the store holds now."""
    if not generative:
        return "no store (the recipe generates nothing)"
    if loader.store_dir is None:
        return "no store (--no-cache)"
    held = (f"the store holds {stats['store_samples']} samples, {stats['store_bytes'] / 1e6:.1f} MB, in "
            f"{os.path.relpath(loader.store_dir)}")
    if stats["from_store"] == 0:
        return f"0 (the store was empty; {held}: the next run starts from them)"
    return f"{stats['from_store']} samples loaded into the pool before training; {held}"


def _recipe_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` options (every help names its default: ``onlineaug.__main__`` appends the ones left out)."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--recipe", default="genmix", choices=available_recipes(),
                        help="the augmentation recipe of the online run")
    parser.add_argument("--generator", default="tiny",
                        help='the recipe\'s main model: "tiny" (random weights built in process), a hub id in the '
                             "local Hugging Face cache, or a local diffusers folder")
    parser.add_argument("--device", default="cpu", help="the trainer's device (cpu, cuda, cuda:0, ...)")
    parser.add_argument("--generator-device", action="append", metavar="DEVICE",
                        help="a producer's device; repeat for one producer per device (default: one on cpu)")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per run (after 5 untimed)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--image-size", type=int, default=64, help="training image size (px)")
    parser.add_argument("--generation-size", type=int, default=None,
                        help="the size the generator works at (default: the image size with the tiny generator, the "
                             "recipe's otherwise)")
    parser.add_argument("--num-inference-steps", type=int, default=None,
                        help="denoising steps per generation (default: 4 with the tiny generator, the recipe's "
                             "otherwise)")
    parser.add_argument("--recipe-option", action="append", type=_recipe_option, metavar="KEY=VALUE",
                        help="a recipe option (VALUE read as JSON, else as a string), e.g. p_mix=0.25; repeatable "
                             "(default: none)")
    parser.add_argument("--num-classes", type=int, default=10, help="SyntheticShapes classes")
    parser.add_argument("--length", type=int, default=2000, help="SyntheticShapes images")
    parser.add_argument("--p-aug", type=float, default=0.5,
                        help="per-sample probability of a generated sample (of mixing, for cutmix/mixup)")
    parser.add_argument("--pool-size", type=int, default=64, help="shared-memory pool slots")
    parser.add_argument("--max-reuse", type=int, default=8, help="serves per generated sample")
    parser.add_argument("--warmup", type=int, default=16,
                        help="generated samples in the pool before the first online batch")
    parser.add_argument("--generator-batch-size", type=int, default=4, help="source images per generator call")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA producers)")
    parser.add_argument("--seed", type=int, default=0, help="seeds data order, mixing and generation")
    parser.add_argument("--out", default="runs/demo", metavar="DIR",
                        help="folder for preview.png and metrics.json, relative to the current directory")
    parser.add_argument("--cache-dir", default="runs/cache", metavar="DIR",
                        help="the sample store's folder, relative to the current directory: a second run with the "
                             "same settings starts with a pool filled from it")
    parser.add_argument("--store-shard-size", type=int, default=8,
                        help="samples per store shard (a shard is kept once complete)")
    parser.add_argument("--no-cache", action="store_true", help="no sample store (nothing kept across runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
