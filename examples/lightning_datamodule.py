"""PyTorch Lightning: a ``LightningDataModule`` whose ``train_dataloader`` returns an ``OnlineGenAugLoader``.

    python examples/lightning_datamodule.py                  # 10 steps on CPU, online GenMix on the tiny generator
    python examples/lightning_datamodule.py --accelerator gpu --devices 1 --generator-device cuda:1 \\
        --generator timbrooks/instruct-pix2pix --image-size 224 --max-steps 1000

What Lightning does and does not do with the loader (it is an iterable, not a ``torch.utils.data.DataLoader``):

* **Device placement**: the loader already returns ``(images, targets)`` on its ``device``, mixed there.
  Lightning still passes each batch through ``transfer_batch_to_device``; for tensors already on the module's
  device that is a no-op. So build the loader on ``self.trainer.strategy.root_device`` (as below): under DDP each
  rank's loader then mixes on that rank's GPU.
* **Sampler injection**: Lightning replaces the sampler of a ``DataLoader`` with a ``DistributedSampler`` under
  DDP (``use_distributed_sampler=True``); it leaves any other iterable alone, so it does not touch this loader.
  Pass ``sampler=DistributedSampler(...)`` yourself for distributed training (as below); the loader folds the
  rank into its seeds (``rank=``, default the ``torch.distributed`` rank) so ranks generate different samples.
* **Epochs**: at each epoch Lightning calls ``set_epoch`` on ``loader.sampler`` when it has one (a
  ``DistributedSampler``), not on the loader; the loader starts the next epoch on each new pass by itself, so
  both count epochs alike. ``len(loader)`` gives Lightning its batches per epoch.
* **Workers and shutdown**: Lightning's worker-count and ``worker_init_fn`` checks apply to ``DataLoader`` s
  only; the loader runs its own DataLoader workers and producer processes. ``teardown`` closes it (stops the
  producers, frees the shared memory).
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from onlineaug import OnlineGenAugLoader
from onlineaug.datasets import SyntheticShapes


class OnlineAugDataModule(pl.LightningDataModule):
    """SyntheticShapes (or any map-style dataset) served through an ``OnlineGenAugLoader``."""

    def __init__(self, *, num_classes: int = 10, image_size: int = 32, batch_size: int = 16, length: int = 512,
                 recipe: str = "genmix", generator: str = "tiny", generator_devices=("cpu",), warmup: int = 8,
                 **loader_options):
        super().__init__()
        self.num_classes, self.image_size, self.batch_size, self.length = num_classes, image_size, batch_size, length
        self.recipe, self.generator, self.generator_devices, self.warmup = recipe, generator, generator_devices, warmup
        self.loader_options = loader_options
        self.loader: OnlineGenAugLoader | None = None

    def setup(self, stage: str) -> None:
        self.train_set = SyntheticShapes(num_classes=self.num_classes, size=self.image_size, length=self.length,
                                         seed=0)

    def train_dataloader(self) -> OnlineGenAugLoader:
        sampler = None
        if self.trainer.world_size > 1:  # Lightning injects no sampler into a non-DataLoader: bring your own
            sampler = torch.utils.data.DistributedSampler(self.train_set, num_replicas=self.trainer.world_size,
                                                          rank=self.trainer.global_rank, shuffle=True)
        self.loader = OnlineGenAugLoader(
            self.train_set, recipe=self.recipe, num_classes=self.num_classes, batch_size=self.batch_size,
            image_size=self.image_size, generator=self.generator, generator_devices=list(self.generator_devices),
            device=self.trainer.strategy.root_device,  # mix where the module trains
            sampler=sampler, rank=self.trainer.global_rank, warmup=self.warmup, drop_last=True,
            **self.loader_options)
        return self.loader

    def teardown(self, stage: str) -> None:
        if self.loader is not None:
            self.loader.close()


class SmallClassifier(pl.LightningModule):
    """A small CNN trained on the soft targets (plain cross-entropy accepts class probabilities)."""

    def __init__(self, num_classes: int = 10, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(32, num_classes))
        self.seen: list[dict] = []  # what each training step received (for the test and the summary)

    def training_step(self, batch, batch_index):
        images, targets = batch
        loss = F.cross_entropy(self.net(images), targets)  # targets: (B, K) soft labels, rows sum to 1
        self.seen.append({"device": str(images.device), "shape": tuple(images.shape), "loss": float(loss.detach()),
                          "target_sums": targets.sum(1).detach().cpu()})
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=10, help="training steps")
    parser.add_argument("--recipe", default="genmix", help="an onlineaug recipe")
    parser.add_argument("--generator", default="tiny", help='"tiny", a cached hub id or a local folder')
    parser.add_argument("--generator-device", action="append", default=None, help="a producer's device (repeat)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning's accelerator")
    parser.add_argument("--devices", default="1", help="Lightning's devices")
    parser.add_argument("--image-size", type=int, default=32, help="training size (px)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size")
    parser.add_argument("--warmup", type=int, default=8, help="generated samples in the pool before step 1")
    parser.add_argument("--num-inference-steps", type=int, default=4,
                        help="denoising steps (the tiny generator's random weights make noise at any count)")
    return parser


def main(argv=None, **trainer_options) -> dict:
    args = build_parser().parse_args(argv)
    pl.seed_everything(0, verbose=False)
    options = {"num_workers": 0, "progress": False}
    if args.recipe in ("genmix", "diffusemix"):
        options["recipe_options"] = {"num_inference_steps": args.num_inference_steps}
    data = OnlineAugDataModule(recipe=args.recipe, generator=args.generator, image_size=args.image_size,
                               batch_size=args.batch_size, generator_devices=args.generator_device or ["cpu"],
                               warmup=args.warmup, **options)
    model = SmallClassifier(num_classes=data.num_classes)
    trainer = pl.Trainer(max_steps=args.max_steps, accelerator=args.accelerator, devices=args.devices, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_options)
    trainer.fit(model, datamodule=data)
    stats = data.loader.stats()
    print(f"trained {trainer.global_step} steps; losses {[round(s['loss'], 3) for s in model.seen]}")
    print(f"generated {stats['generated']} of {stats['real'] + stats['generated']} samples "
          f"({stats['misses']} misses); producers made {stats['produced']}")
    return {"global_step": trainer.global_step, "seen": model.seen, "stats": stats,
            "loader_closed": data.loader.pool is None}


if __name__ == "__main__":
    main()
