"""The GPU planning model of ``python -m onlineaug plan`` against hand-computed cases, and its command line."""

import json
import math

import pytest

from onlineaug.__main__ import main
from onlineaug.plan import alternatives, plan, plan_table


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


# ------------------------------------------------------------------------ what the GPUs at hand sustain
def test_what_given_gpus_sustain_solves_the_same_equation():
    # G x R_gen = p_aug x R_train x T / max_reuse, solved for max_reuse (p_aug kept) and for p_aug (max_reuse kept)
    r_train, r_gen, p_aug, max_reuse, gpus = 2500, 3, 0.5, 8, 4
    result = plan(r_train, r_gen, p_aug=p_aug, max_reuse=max_reuse, generator_gpus=gpus)
    assert not result["sufficient"]
    assert result["max_reuse_to_keep_p_aug"] == math.ceil(p_aug * r_train / (gpus * r_gen)) == 105
    assert result["p_aug_at_max_reuse"] == pytest.approx(gpus * r_gen * max_reuse / r_train) == 0.0384
    # each answer is sustained by the same 4 GPUs, and the next tighter setting is not
    assert plan(r_train, r_gen, p_aug=p_aug, max_reuse=105, generator_gpus=gpus)["sufficient"]
    assert not plan(r_train, r_gen, p_aug=p_aug, max_reuse=104, generator_gpus=gpus)["sufficient"]
    assert plan(r_train, r_gen, p_aug=result["p_aug_at_max_reuse"], max_reuse=max_reuse,
                generator_gpus=gpus)["sufficient"]
    assert not plan(r_train, r_gen, p_aug=0.04, max_reuse=max_reuse, generator_gpus=gpus)["sufficient"]


def test_sustain_figures_at_the_edges():
    enough = plan(2000, 25, p_aug=0.5, max_reuse=8, generator_gpus=10)  # 250 fresh/s for 1000 serves/s
    assert enough["max_reuse_to_keep_p_aug"] == 4 and enough["p_aug_at_max_reuse"] == 0.5
    assert plan(2000, 25, p_aug=0.5, max_reuse=8, generator_gpus=0)["max_reuse_to_keep_p_aug"] is None
    assert plan(2000, 25, p_aug=0.0, max_reuse=8, generator_gpus=2)["max_reuse_to_keep_p_aug"] == 1


def test_an_impractical_plan_lists_what_fewer_gpus_sustain():
    result = plan(2500, 3, p_aug=0.5, max_reuse=8)  # the README's numbers: 52.1 -> 53 generator GPUs
    assert result["generator_gpus"] == 53 and result["gpu_hour_overhead"] == 53
    fewer = alternatives(result)
    assert [r["generator_gpus"] for r in fewer] == [1, 2, 4, 8]  # k x T, and floor(1.0 x T) = 1
    for row in fewer:
        fresh = row["generator_gpus"] * 3
        assert row["max_reuse_to_keep_p_aug"] == math.ceil(0.5 * 2500 / fresh)
        assert row["p_aug_at_max_reuse"] == pytest.approx(fresh * 8 / 2500)
    # two trainers and a 3x overhead budget: candidates 2, 4, 6 (floor(3 x 2)), 8, 16
    two = alternatives(plan(2500, 3, p_aug=0.5, max_reuse=8, trainer_gpus=2), max_gpu_overhead=3)
    assert [r["generator_gpus"] for r in two] == [2, 4, 6, 8, 16]


def test_a_practical_or_given_plan_lists_no_alternatives():
    assert alternatives(plan(100, 25, p_aug=0.5, max_reuse=8)) == []  # 0.25 -> 1 GPU: 100% overhead
    assert alternatives(plan(2500, 3, p_aug=0.5, max_reuse=8), max_gpu_overhead=60) == []
    assert alternatives(plan(2500, 3, p_aug=0.5, max_reuse=8, generator_gpus=4)) == []


def test_cli_with_the_readme_numbers_says_what_4_gpus_sustain(tmp_path, capsys):
    main(["plan", "--trainer-images-per-s", "2500", "--producer-images-per-s", "3", "--p-aug", "0.5",
          "--max-reuse", "8", "--generator-gpus", "4", "--out", str(tmp_path / "plan.json")])
    text = capsys.readouterr().out
    assert "do not sustain p_aug = 0.5 at max_reuse = 8" in text
    assert f"max_reuse = {math.ceil(0.5 * 2500 / (4 * 3))} " in text  # 105
    assert f"p_aug = {4 * 3 * 8 / 2500:.3g} " in text  # 0.0384
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["plan"]["max_reuse_to_keep_p_aug"] == 105 and data["fewer_generator_gpus"] == []


def test_cli_calls_an_impractical_ratio_impractical(tmp_path, capsys):
    main(["plan", "--trainer-images-per-s", "2500", "--producer-images-per-s", "3", "--out", str(tmp_path / "p.json")])
    text = capsys.readouterr().out
    assert "impractical: 53 generator GPUs for 1 trainer GPU(s) is a 5300% GPU-hour overhead" in text
    assert "max_reuse to keep p_aug" in text
    data = json.loads((tmp_path / "p.json").read_text())
    assert [r["max_reuse_to_keep_p_aug"] for r in data["fewer_generator_gpus"]] == [417, 209, 105, 53]
    main(["plan", "--trainer-images-per-s", "100", "--producer-images-per-s", "25", "--out", ""])
    assert "impractical" not in capsys.readouterr().out


def test_cli_rejects_a_bad_overhead_budget():
    with pytest.raises(SystemExit, match="max_gpu_overhead"):
        main(["plan", "--trainer-images-per-s", "2500", "--producer-images-per-s", "3", "--max-gpu-overhead", "0",
              "--out", ""])


def test_layout_fits_the_generators_on_the_trainer_nodes_or_asks_for_a_ray_pool():
    from onlineaug.plan import format_layout, layout

    fits = plan(2000, 25, p_aug=0.5, max_reuse=8, trainer_gpus=2, generator_gpus=6)  # 2 + 6 = one 8-GPU node
    where = layout(fits, gpus_per_node=8)
    assert where == {"trainer_nodes": 1, "gpus_per_node": 8, "trainer_ranks_per_node": 2,
                     "free_gpus_on_trainer_nodes": 6, "generator_gpus": 6, "producers": "local", "extra_nodes": 0,
                     "fresh_images_per_s_per_rank": 75.0}  # 6 x 25 / 2
    assert 'torchrun --nproc_per_node=2 with generator_devices="auto"' in format_layout(where)
    needs = plan(2000, 25, p_aug=0.5, max_reuse=8, trainer_gpus=4)  # G = 500 / 25 = 20, 4 free on the node
    where = layout(needs, gpus_per_node=8)
    assert (where["producers"], where["extra_nodes"], where["fresh_images_per_s_per_rank"]) == ("ray", 2, 125.0)
    assert "a Ray pool of 20 actors (producers=\"ray\", ray_actors=20), 2 more node(s)" in format_layout(where)
    two_nodes = layout(plan(2000, 25, p_aug=0.5, max_reuse=8, trainer_gpus=4, generator_gpus=12), gpus_per_node=8,
                       trainer_nodes=2)  # 2 ranks per node, 6 free per node
    assert (two_nodes["producers"], two_nodes["free_gpus_on_trainer_nodes"]) == ("local", 12)
    assert "torchrun --nnodes=2 --nproc_per_node=2" in format_layout(two_nodes)
    full = layout(plan(2000, 25, p_aug=0.5, max_reuse=8, trainer_gpus=8, generator_gpus=1), gpus_per_node=8)
    assert (full["producers"], full["extra_nodes"]) == ("ray", 1)  # no free GPU on the trainer node
    with pytest.raises(ValueError, match=r"8 trainer GPUs do not fit on 1 node\(s\) of 4 GPUs"):
        layout(plan(2000, 25, p_aug=0.5, max_reuse=8, trainer_gpus=8), gpus_per_node=4)


def test_cli_prints_the_layout(tmp_path, capsys):
    main(["plan", "--trainer-images-per-s", "2000", "--producer-images-per-s", "25", "--trainer-gpus", "4",
          "--out", str(tmp_path / "plan.json")])
    text = capsys.readouterr().out
    assert "layout: 20 generator GPU(s); trainer node(s): 1 x 8 GPUs, 4 trainer rank(s) each, 4 GPU(s) free" in text
    assert "expected fresh rate per rank: 125 images/s" in text
    assert json.loads((tmp_path / "plan.json").read_text())["layout"]["producers"] == "ray"
