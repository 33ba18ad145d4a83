"""One trainer rank of the ``torchrun --nproc_per_node=2`` runs in ``tests/test_distributed.py`` (gloo, CPU).

``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py OUT_DIR`` writes
what this rank saw to ``OUT_DIR/rank<R>.json``; the test compares the ranks. One launch runs both parts (torchrun
and the imports cost more than the parts):

* ``batch``: a batch-time recipe (CutMix: no producers): shards, epoch length, reshuffling, reduced stats, the
  user's sampler kept, warnings from local rank 0 only, a rank's bad ``generator_devices`` stopping every rank;
* ``generated``: the tiny generator (16 px, 1 step) on CPU producers: every generated sample's source index lies
  in the rank's shard of that epoch; one warmup progress bar per node.
"""

import contextlib
import io
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

from onlineaug import OnlineGenAugLoader
from onlineaug.datasets import SyntheticShapes

SIZE = 16
LENGTH = 24
COMMON = dict(num_classes=4, image_size=SIZE, num_workers=0, return_info=True)


def epoch_records(loader, epochs):
    """Per epoch: this rank's shard (what its sampler yields) and the (index, generated) of every served row."""
    records = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        shard = [int(i) for i in loader.sampler]
        rows = []
        for _, _, info in loader:
            rows += zip(info["index"].tolist(), info["generated"].tolist())
        records.append({"epoch": epoch, "shard": shard, "rows": rows})
    return records


def batch_part(data) -> dict:
    out = {}
    loader = OnlineGenAugLoader(data, recipe="cutmix", batch_size=4, seed=3, **COMMON)
    out["sampler"] = type(loader.sampler).__name__
    out["len"] = len(loader)
    out["epochs"] = epoch_records(loader, [0, 1])
    batches = iter(loader)  # rank r takes r + 1 more batches, so that the ranks' counters differ
    for _ in range(dist.get_rank() + 1):
        next(batches)
    out["stats"] = loader.stats()
    out["reduced"] = loader.stats(reduce=True)

    mine = torch.utils.data.SubsetRandomSampler(range(dist.get_rank() * 5, dist.get_rank() * 5 + 5))
    kept = OnlineGenAugLoader(data, recipe="cutmix", batch_size=4, sampler=mine, **COMMON)
    out["user_sampler_kept"] = kept.sampler is mine
    out["user_sampler_rows"] = sorted(i for _, _, info in kept for i in info["index"].tolist())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OnlineGenAugLoader(data, recipe="cutmix", batch_size=64, drop_last=True, **COMMON)
    out["warnings"] = [str(w.message) for w in caught]

    try:  # local rank 1 has no entry: it fails, and rank 0 must fail too instead of waiting for it
        OnlineGenAugLoader(data, recipe="genmix", batch_size=4, generator_devices={0: ["cpu"]}, progress=False,
                           **COMMON)
        out["device_error"] = None
    except ValueError as error:
        out["device_error"] = str(error)
    return out


def generated_part(data) -> dict:
    out = {}
    loader = OnlineGenAugLoader(  # max_reuse 8: samples pooled in epoch 0 are still servable in epoch 1
        data, recipe="genmix", batch_size=4, seed=5, p_aug=1.0, pool_size=8, max_reuse=8, warmup=2,
        generator="tiny", generation_size=SIZE, generator_devices=["cpu"], generator_batch_size=2,
        recipe_options={"num_inference_steps": 1}, progress=True, **COMMON)
    with loader:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            loader.wait_for_pool(2)
        out["warmup_stderr"] = errors.getvalue()
        out["epochs"] = epoch_records(loader, [0, 1])
    out["stats"] = loader.stats()  # after close(): the producers' counters no longer move
    out["reduced"] = loader.stats(reduce=True)
    return out


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    data = SyntheticShapes(num_classes=4, size=SIZE, length=LENGTH, seed=0)
    out = {"rank": dist.get_rank(), "local_rank": int(os.environ["LOCAL_RANK"]), "batch": batch_part(data),
           "generated": generated_part(data)}
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as file:
        json.dump(out, file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
