"""The GPU planning model of ``python -m onlineaug plan`` against hand-computed cases, and its command line."""

import json
import math

import pytest

from onlineaug.__main__ import main
from onlineaug.plan import plan, plan_table


def test_hand_computed_case():
    # 2000 img/s trainer, 25 img/s producer, half the batch generated, 8 serves each:
    # demand 0.5 x 2000 = 1000 serves/s, needed 1000 / 8 = 125 fresh/s, 125 / 25 = 5 generator GPUs.
    result = plan(2000, 25, p_aug=0.5, max_reuse=8)
    assert result["demand_images_per_s"] == 1000
    assert result["needed_fresh_images_per_s"] == 125
    assert result["generator_gpus_exact"] == 5
    assert result["generator_gpus"] == 5
    assert result["fresh_images_per_s"] == 125
    assert result["average_reuse"] == 8
    assert result["generated_share"] == 0.5 and result["miss_share"] == 0
    assert result["gpu_hour_overhead"] == 5 and result["total_gpu_hours_per_trainer_gpu_hour"] == 6
    assert result["ratio"] == "5:1" and result["sufficient"]


def test_ceil_rounds_up_and_lowers_the_reuse():
    result = plan(2000, 24, p_aug=0.5, max_reuse=8)  # 125 / 24 = 5.21 generator GPUs
    assert result["generator_gpus_exact"] == pytest.approx(125 / 24)
    assert result["generator_gpus"] == 6
    assert result["fresh_images_per_s"] == 144
    assert result["average_reuse"] == pytest.approx(1000 / 144)  # more fresh samples than needed: fewer serves each
    assert result["generated_share"] == 0.5


def test_ceil_ignores_float_noise():
    # 0.1 x 3 / 1 / 0.1 is 3.0000000000000004 in floating point: still 3 GPUs, not 4.
    assert 0.1 * 3 / 0.1 > 3
    assert plan(3, 0.1, p_aug=0.1, max_reuse=1)["generator_gpus"] == 3


def test_several_trainer_gpus():
    result = plan(2000, 25, p_aug=0.5, max_reuse=8, trainer_gpus=4)
    assert result["needed_fresh_images_per_s"] == 500
    assert result["generator_gpus"] == 20
    assert result["generator_per_trainer_gpu"] == 5 and result["gpu_hour_overhead"] == 5
    assert result["ratio"] == "20:4"


def test_too_few_generator_gpus_given():
    result = plan(2000, 25, p_aug=0.5, max_reuse=8, generator_gpus=2)
    assert result["generator_gpus_given"] and result["generator_gpus"] == 2
    assert result["fresh_images_per_s"] == 50
    # 50 fresh/s x 8 serves = 400 of the 2000 samples/s: 20% generated, the other 30% wanted are misses
    assert result["generated_share"] == pytest.approx(0.2)
    assert result["miss_share"] == pytest.approx(0.3)
    assert result["average_reuse"] == 8
    assert not result["sufficient"]
    assert result["gpu_hour_overhead"] == 2


def test_more_generator_gpus_than_needed():
    result = plan(2000, 25, p_aug=0.5, max_reuse=8, generator_gpus=10)
    assert result["fresh_images_per_s"] == 250
    assert result["average_reuse"] == 4  # 1000 serves/s over 250 fresh/s
    assert result["generated_share"] == 0.5 and result["sufficient"]


def test_no_augmentation_needs_no_generator():
    result = plan(2000, 25, p_aug=0.0, max_reuse=8)
    assert result["generator_gpus"] == 0 and result["fresh_images_per_s"] == 0
    assert result["average_reuse"] == 0 and result["generated_share"] == 0 and result["gpu_hour_overhead"] == 0


def test_zero_generator_gpus_serves_nothing_generated():
    result = plan(2000, 25, p_aug=0.5, max_reuse=8, generator_gpus=0)
    assert result["average_reuse"] is None
    assert result["generated_share"] == 0 and result["miss_share"] == 0.5


@pytest.mark.parametrize("kwargs, error", [
    ({"producer_images_per_s": 0}, ValueError),
    ({"producer_images_per_s": -3.0}, ValueError),
    ({"trainer_images_per_s": float("nan")}, ValueError),
    ({"trainer_images_per_s": "fast"}, TypeError),
    ({"p_aug": 1.5}, ValueError),
    ({"p_aug": -0.1}, ValueError),
    ({"max_reuse": 0}, ValueError),
    ({"max_reuse": 2.5}, ValueError),
    ({"trainer_gpus": 0}, ValueError),
    ({"generator_gpus": -1}, ValueError),
])
def test_bad_input_is_rejected(kwargs, error):
    args = {"trainer_images_per_s": 2000, "producer_images_per_s": 25, "p_aug": 0.5, "max_reuse": 8, **kwargs}
    rates = (args.pop("trainer_images_per_s"), args.pop("producer_images_per_s"))
    with pytest.raises(error):
        plan(*rates, **args)


def test_table_invariants():
    rows = plan_table(2600, 9.5, trainer_gpus=2, p_augs=(0.25, 0.5, 1.0), max_reuses=(1, 4, 8, 16))
    assert len(rows) == 12
    for row in rows:
        assert row["generator_gpus"] == math.ceil(row["generator_gpus_exact"] - 1e-9)
        assert row["fresh_images_per_s"] >= row["needed_fresh_images_per_s"]
        assert row["generated_share"] == pytest.approx(row["p_aug"])
        assert row["average_reuse"] <= row["max_reuse"]
    # doubling the reuse halves the fresh samples needed
    by_key = {(r["p_aug"], r["max_reuse"]): r for r in rows}
    assert by_key[(0.5, 8)]["needed_fresh_images_per_s"] == pytest.approx(
        by_key[(0.5, 4)]["needed_fresh_images_per_s"] / 2)


def test_cli_prints_the_plan_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    main(["plan", "--trainer-images-per-s", "2000", "--producer-images-per-s", "25", "--out", str(out)])
    text = capsys.readouterr().out
    assert "G = 5 (ceil)" in text
    assert "max_reuse" in text and "GPU-h overhead" in text  # the table over other targets
    data = json.loads(out.read_text())
    for key in ("device", "versions", "settings", "date", "plan", "table"):
        assert key in data
    assert data["plan"]["generator_gpus"] == 5
    assert data["settings"]["p_aug"] == 0.5 and "measured" not in data


def test_cli_generator_gpus_override(tmp_path, capsys):
    main(["plan", "--trainer-images-per-s", "2000", "--producer-images-per-s", "25", "--generator-gpus", "2",
          "--out", str(tmp_path / "plan.json")])
    text = capsys.readouterr().out
    assert "G = 2 (given)" in text and "20.0%" in text


def test_cli_without_rates_says_what_to_pass(tmp_path):
    with pytest.raises(SystemExit, match="--measure"):
        main(["plan", "--out", str(tmp_path / "plan.json")])


def test_cli_bad_rate_is_a_clean_error(tmp_path):
    with pytest.raises(SystemExit, match="producer_images_per_s"):
        main(["plan", "--trainer-images-per-s", "2000", "--producer-images-per-s", "0",
              "--out", str(tmp_path / "plan.json")])
