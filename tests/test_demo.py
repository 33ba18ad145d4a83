"""python -m onlineaug demo: the table's figures, preview.png (DiffuseMix Fig. 4 rows) and metrics.json; a second run
starts with a pool filled from the sample store the first one left."""

import json
import re

import pytest
from PIL import Image

from onlineaug.__main__ import main


@pytest.mark.slow
def test_demo_writes_the_preview_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    command = ["demo", "--steps", "4", "--batch-size", "8", "--image-size", "32", "--length", "64", "--warmup", "4",
               "--pool-size", "16", "--num-workers", "0", "--out", str(out), "--no-progress", "--cache-dir",
               str(tmp_path / "cache"), "--store-shard-size", "2"]
    assert main(command) == 0
    text = capsys.readouterr().out
    assert re.search(r"^\s+from the store\s+0 \(the store was empty; the store holds \d+ samples", text, re.MULTILINE)
    assert "overhead A_O = (T_aug-T_van)/T_van" in text and "generated share" in text and "misses" in text
    assert "onlineaug demo: recipe genmix," in text and "online genmix steps/s" in text  # the recipe that ran
    assert re.search(r"^\s+recipe\s+genmix \(Islam et al\., GenMix", text, re.MULTILINE)

    metrics = json.loads((out / "metrics.json").read_text())
    vanilla, augmented = metrics["vanilla"]["seconds"], metrics["augmented"]["seconds"]
    assert metrics["augmentation_overhead"] == pytest.approx((augmented - vanilla) / vanilla)
    stats = metrics["loader_stats"]
    assert stats["real"] + stats["generated"] == (4 + 5) * 8  # timed + untimed steps
    assert stats["generated"] >= 4 and stats["produced"] >= 4  # warmup filled the pool first
    assert metrics["recipe"]["name"] == "genmix" and metrics["settings"]["steps"] == 4
    assert metrics["notes"] and "contention" in metrics["notes"][0]  # CPU trainer and producer share cores

    preview = Image.open(out / "preview.png")
    samples = metrics["preview_samples"]
    assert samples >= 1
    assert preview.size == (90 + 128 * samples, 128 * 6)  # rows: original, generated, mask, hybrid, fractal, final

    stored = stats["store_samples"]
    assert stored >= 4  # the warmup's samples at least, in complete shards of 2
    assert main(command[:2] + ["1"] + command[3:]) == 0  # again, one timed step: the pool starts from the store
    text = capsys.readouterr().out
    loaded = json.loads((out / "metrics.json").read_text())["loader_stats"]["from_store"]
    assert loaded == min(stored, 16)  # a full pool (16 slots) when the store holds enough
    assert re.search(rf"^\s+from the store\s+{loaded} samples loaded into the pool before training; the store "
                     rf"holds \d+ samples", text, re.MULTILINE)
