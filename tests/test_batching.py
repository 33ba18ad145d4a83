"""Batch assembly: pooled rows copied through the ring of host buffers to the device, never overwritten in flight.

On CPU the ring is not used (copies are synchronous); ``pytest --device cuda`` runs the same test with
non-blocking copies on a side stream, where refilling a ring buffer before its copy finished would corrupt an
earlier batch.
"""

import numpy as np
import torch

from onlineaug.batching import BatchAssembler
from onlineaug.pool import SamplePool
from onlineaug.recipes import get_recipe

SIZE, BATCH, SLOTS = 64, 16, 32


def test_pooled_rows_reach_the_device_intact_while_the_ring_buffers_are_reused(device):
    recipe = get_recipe("diffusemix", generation_size=SIZE)
    fields = recipe.pool_fields(SIZE)
    pool = SamplePool.create(fields, num_slots=SLOTS, num_producers=1, max_reuse=1)
    assembler = BatchAssembler(recipe, pool, device=device, image_size=SIZE, batch_size=BATCH, p_aug=1.0,
                               ring_size=2)
    coins = np.random.default_rng(0)
    try:
        ready = []
        for k in range(8):  # batch k serves samples whose prompt_id is k * 1000 + slot
            for slot in range(SLOTS):
                value = k * 1000 + slot
                image = np.full((3, SIZE, SIZE), value % 251, np.uint8)
                pool.write(slot, {"original": image, "generated": image, "label": np.int64(slot % 10),
                                  "index": np.int64(slot), "prompt_id": np.int64(value)})
            real = torch.zeros(BATCH, 3, SIZE, SIZE, dtype=torch.uint8)
            ready.append(assembler.assemble(real, torch.zeros(BATCH, dtype=torch.int64), torch.arange(BATCH), coins))
        for k, item in enumerate(ready):  # read only now: 4 ring reuses after the first batches were copied
            batch = item.wait()
            assert batch.generated.all()
            prompt_id = batch.fields["prompt_id"].cpu()
            assert (prompt_id // 1000 == k).all(), f"batch {k} holds rows of another batch: {prompt_id.tolist()}"
            expected = (prompt_id % 251).to(torch.uint8)[:, None, None, None].expand(-1, 3, SIZE, SIZE)
            assert torch.equal(batch.fields["generated"].cpu(), expected)
            assert torch.equal(batch.fields["index"].cpu(), prompt_id % 1000)
    finally:
        pool.close()
