"""eval/experiments/calibration.py and data/world/calibration_items.py: the items, the metrics, the --quick run.

Oracles: eval.metrics.expected_calibration_error (a loop over bins) against the vectorised ECE on every label draw;
the expected Brier and accuracy by enumerating the four letters weighted by the beliefs; the sharpening exponent
of q = base^gamma / Z, which is exactly (gamma, R^2 = 1) (centred log q = gamma centred log base); the items' law
as data/world/mcq.py states it (top belief in [0.3, 0.9], the rest at least 0.02 and below it, p^(1/2) for the
SFT text) and none of the world's towns; the training file filtered by hand (only the trained items' pairs); the
quick run's table recomputed from its saved probabilities; and invariants of the bootstrap (the base's paired
difference from itself is exactly zero; an interval contains the resampled statistic's own point on one item).
"""
import json
import random

import numpy as np
import pytest

from data.world import TOWNS, load_world
from data.world.calibration_items import CALIBRATION_TOWNS, MAX_ITEMS, calibration_items
from eval.experiments import calibration as exp
from eval.experiments.common import read_csv
from eval.metrics import expected_calibration_error

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

LETTERS = "ABCD"


def test_items_follow_the_worlds_law_on_new_towns():
    items = calibration_items(random.Random(3), 96)
    assert len({item.prompt for item in items}) == 96 and not set(CALIBRATION_TOWNS) & set(TOWNS)
    assert [item.id for item in items[:3]] == ["cal-00", "cal-01", "cal-02"]
    world_prompts = {item.prompt for item in load_world().mcq}
    for item in items:
        p = np.array(item.population)
        assert p.sum() == pytest.approx(1.0, abs=1e-12) and 0.3 <= p.max() <= 0.9
        assert (np.sort(p)[:-1] >= 0.02).all() and (np.sort(p)[:-1] < p.max()).all()
        np.testing.assert_allclose(item.reference, np.sqrt(p) / np.sqrt(p).sum(), rtol=1e-12)
        assert item.correct in LETTERS and item.prompt not in world_prompts
        assert any(town in item.question for town in CALIBRATION_TOWNS)
    assert calibration_items(random.Random(3), 96) == items  # a pure function of the rng
    with pytest.raises(ValueError, match="n_items"):
        calibration_items(random.Random(0), MAX_ITEMS + 1)


def test_vectorised_ece_equals_the_metric_on_every_draw():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.7, size=37)  # [37, 4]
    probs[0] = [0.6, 0.2, 0.1, 0.1]  # a confidence on a bin edge: bins are (lo, hi]
    beliefs = rng.dirichlet(np.ones(4), size=37)
    labels = exp.draw_labels(np.broadcast_to(beliefs, (50, 37, 4)), rng)  # [50, 37]
    correct = (labels == probs.argmax(1)).astype(float)
    mine = exp.ece_rows(np.broadcast_to(probs.max(1), labels.shape), correct)
    theirs = [expected_calibration_error(probs, row, n_bins=15) for row in labels]
    np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-15)


def test_expected_metrics_and_sharpening_against_closed_forms():
    rng = np.random.default_rng(1)
    beliefs, probs = rng.dirichlet(np.ones(4), size=40), rng.dirichlet(np.ones(4), size=40)
    eye = np.eye(4)
    brier = [sum(b[c] * ((q - eye[c]) ** 2).sum() for c in range(4)) for b, q in zip(beliefs, probs)]
    np.testing.assert_allclose(exp.expected_brier_each(probs, beliefs), brier, rtol=1e-12)
    hit = [sum(b[c] * (np.argmax(q) == c) for c in range(4)) for b, q in zip(beliefs, probs)]
    np.testing.assert_allclose(exp.expected_accuracy_each(probs, beliefs), hit, rtol=1e-12)
    sharper = probs ** 2.5 / (probs ** 2.5).sum(1, keepdims=True)
    gamma, r2 = exp.sharpening(sharper, probs)
    assert gamma == pytest.approx(2.5, rel=1e-12) and r2 == pytest.approx(1.0, abs=1e-12)
    habit = probs * np.array([1.0, 3.0, 1.0, 1.0])  # one letter raised by the same factor on every item
    assert exp.common_shift(habit / habit.sum(1, keepdims=True), probs) == pytest.approx(1.0, rel=1e-12)


def test_bootstrap_of_the_base_against_itself_is_zero_and_orders_its_bounds():
    rng = np.random.default_rng(2)
    beliefs, base = rng.dirichlet(np.ones(4), size=20), rng.dirichlet(np.ones(4), size=20)
    out = exp.bootstrap(base[None], base, beliefs, resamples=300)
    for metric in ("ece", "brier", "accuracy"):
        assert out[f"{metric}_diff_low"] == 0.0 == out[f"{metric}_diff_high"]
        assert out[f"{metric}_low"] <= out[f"{metric}_high"]
    one = exp.bootstrap(base[:1][None], base[:1], beliefs[:1], resamples=50)  # one item: every resample is it
    assert one["brier_low"] == pytest.approx(exp.expected_brier_each(base[:1], beliefs[:1])[0], rel=1e-12)
    assert one["brier_high"] == pytest.approx(one["brier_low"], rel=1e-12)


def test_world_items_split_in_half_and_only_the_trained_half_has_pairs(tmp_path):
    """Oracle: the world's own pair file filtered by hand to the first 24 items, C(4, 2) = 6 soft pairs each."""
    world = load_world()
    items, trained, sft, pairs = exp.make_items(tmp_path, "world", 24)
    assert items == list(world.mcq) and trained == list(world.mcq[:24]) and sft is None
    ids = {item.id for item in trained}
    source = world.files["mcq_pairs_soft"].read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines()] == [
        json.loads(line) for line in source if json.loads(line)["id"] in ids]
    assert len(ids) * 6 == len(pairs.read_text(encoding="utf-8").splitlines())


# ---- the --quick run -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_calibration")
    assert exp.main(["--quick", "--out", str(out)]) == 0
    _, table = read_csv(out / "calibration.csv")
    _, probs = read_csv(out / "probabilities.csv")
    return {"out": out, "table": {(r["policy"], r["split"]): r for r in table}, "probs": probs,
            "run": json.loads((out / "run.json").read_text(encoding="utf-8"))}


def arrays(rows):
    probs = np.array([[float(r[f"p_{x}"]) for x in LETTERS] for r in rows])
    beliefs = np.array([[float(r[f"belief_{x}"]) for x in LETTERS] for r in rows])
    return probs, beliefs


def test_quick_run_tables_and_provenance(quick_run):
    quick = exp.QUICK
    policies = ["p (raters)", "base", "DPO", "SPL a/b=10"]
    assert set(quick_run["table"]) == {(p, s) for p in policies for s in ("held-out", "trained")}
    assert int(quick_run["table"]["DPO", "held-out"]["items"]) == quick["held_out"]
    n_items = int(quick["items"])
    assert "--anchor 0.1 --prompts-per-batch 15" in quick_run["run"]["policy_recipe"]
    assert "--model" in quick_run["run"]["policy_recipe"] and "--loss sft" in quick_run["run"]["base_recipe"]
    items = calibration_items(random.Random("0:calibration-items"), n_items)
    trained_ids = {item.id for item in items[:n_items - quick["held_out"]]}
    lines = (quick_run["out"] / "data" / "calibration_pairs_soft.jsonl").read_text(encoding="utf-8").splitlines()
    assert {json.loads(line)["id"] for line in lines} == trained_ids and len(lines) == 6 * len(trained_ids)
    for row in quick_run["probs"]:
        assert (row["item"] in trained_ids) == (row["trained"] == "True")


def test_quick_run_metrics_recomputed_from_probabilities(quick_run):
    rows = quick_run["probs"]
    base = arrays([r for r in rows if r["policy"] == "base"])[0]
    for (policy, split), row in quick_run["table"].items():
        if policy == "p (raters)":
            assert float(row["overconfidence"]) == pytest.approx(0.0, abs=1e-12)  # mean max p = mean p[argmax p]
            continue
        mine = [r for r in rows if r["policy"] == policy and (r["trained"] == "True") == (split == "trained")]
        probs, beliefs = arrays(mine)
        in_split = np.array([(r["trained"] == "True") == (split == "trained") for r in rows if r["policy"] == "base"])
        assert float(row["brier"]) == pytest.approx(exp.expected_brier_each(probs, beliefs).mean(), rel=1e-9)
        assert float(row["accuracy"]) == pytest.approx(exp.expected_accuracy_each(probs, beliefs).mean(), rel=1e-9)
        assert float(row["confidence_shift"]) == pytest.approx(probs.max(1).mean() - base[in_split].max(1).mean(),
                                                               rel=1e-9, abs=1e-12)
        assert float(row["sharpening"]) == pytest.approx(exp.sharpening(probs, base[in_split])[0], rel=1e-9)
        assert float(row["common_shift"]) == pytest.approx(exp.common_shift(probs, base[in_split]), rel=1e-9, abs=1e-12)
        assert float(row["ece_low"]) <= float(row["ece_high"])
        if policy == "base":
            assert float(row["sharpening"]) == pytest.approx(1.0) and float(row["ece_diff_low"]) == 0.0
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_bad_arguments_fail_at_start(capsys):
    for argv, message in ((["--ratios", "0.5"], "alpha/beta must be >= 1"),
                          (["--held-out", "96", "--items", "96"], "--held-out must be in 1..95"),
                          (["--items", "200"], "--items must be world or a number in 2..128"),
                          (["--items", "many"], "--items must be world or a number in 2..128"),
                          (["--lr", "0.1"], "--lr: the policies take the main job's"),
                          (["--label-draws", "0"], "must be > 0")):
        with pytest.raises(SystemExit) as error:
            exp.main(argv)
        assert error.value.code == 2
        assert message in capsys.readouterr().err
