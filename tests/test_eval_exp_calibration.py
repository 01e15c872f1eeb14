"""eval/experiments/calibration.py: experiment 4 (ECE, Brier, accuracy on the world's multiple choice) in --quick mode.

Oracles: the table's ECE, Brier and accuracy recomputed from the saved letter probabilities both with
eval.metrics and with an ECE written here a second way (bin index ceil(15 conf), then per-bin sums); the
expected metrics by enumerating the four possible letters of every item, weighted by the raters' beliefs;
the expected ECE of one-hot predictions, which is exactly 1 - E[acc] (every confidence is 1, one bin);
and invariants: the raters' beliefs scored against themselves have overconfidence exactly 0 (mean max p =
mean p[argmax p]); letter probabilities are distributions, equal to a full forward pass by hand (Appendix D's
normalisation); DPO (the closed form p^10-like) ends more confident
than SPL at alpha/beta = 10 after the same steps from the same reference; the training file holds exactly the
pairs of the trained split's items (none of the held-out ones).
"""
import importlib.util
import json

import numpy as np
import pytest

from data.world import load_world
from eval.experiments import calibration as exp
from eval.experiments.common import read_csv
from eval.metrics import accuracy, brier_score, expected_calibration_error

TABLE_COLUMNS = ["policy", "alpha", "beta", "alpha_over_beta", "split", "items", "ece", "brier", "accuracy", "expected_ece",
                 "expected_brier", "expected_accuracy", "mean_confidence", "overconfidence", "tv_vs_closed_form"]
LETTERS = "ABCD"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_calibration")
    assert exp.main(["--quick", "--out", str(out)]) == 0
    table_columns, table = read_csv(out / "calibration.csv")
    prob_columns, prob_rows = read_csv(out / "probabilities.csv")
    by_policy = {}
    for row in prob_rows:
        by_policy.setdefault(row["policy"], []).append(row)
    return {"out": out, "table_columns": table_columns, "table": {(r["policy"], r["split"]): r for r in table},
            "order": [(r["policy"], r["split"]) for r in table], "prob_columns": prob_columns, "probs": by_policy}


def arrays(rows):
    probs = np.array([[float(r[f"p_{letter}"]) for letter in LETTERS] for r in rows])  # (N, 4)
    beliefs = np.array([[float(r[f"belief_{letter}"]) for letter in LETTERS] for r in rows])  # (N, 4)
    labels = np.array([int(r["label"]) for r in rows])  # (N,)
    return probs, beliefs, labels


def ece_by_bin_index(probs, labels, n_bins=15):
    """ECE with bin b = ceil(n_bins * conf) (bins (lo, hi]), accumulated as per-bin sums."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    bins = np.ceil(confidence * n_bins).astype(int)
    total = 0.0
    for b in np.unique(bins):
        members = bins == b
        total += abs(correct[members].sum() - confidence[members].sum())
    return total / len(labels)


def test_outputs_and_table_structure(quick_run):
    assert quick_run["table_columns"] == TABLE_COLUMNS
    policies = ["population", "reference", "DPO", "SPL"]
    assert quick_run["order"] == [(p, "trained") for p in policies] + [(p, "held-out") for p in policies]
    table = quick_run["table"]
    assert [float(table[p, "trained"]["alpha_over_beta"]) for p in ("DPO", "SPL")] == pytest.approx([1.0, 10.0])
    assert {int(row["items"]) for key, row in table.items() if key[1] == "trained"} == {48 - exp.HELD_OUT}
    assert {int(row["items"]) for key, row in table.items() if key[1] == "held-out"} == {exp.HELD_OUT}
    assert quick_run["prob_columns"] == ["policy", "alpha", "beta", "item", "split", "label",
                                         *[f"p_{x}" for x in LETTERS], *[f"belief_{x}" for x in LETTERS]]
    world = load_world()
    splits = ["trained"] * (48 - exp.HELD_OUT) + ["held-out"] * exp.HELD_OUT  # the last items are held out
    for policy, rows in quick_run["probs"].items():
        assert [r["item"] for r in rows] == [item.id for item in world.mcq]  # every item of both splits
        assert [r["split"] for r in rows] == splits
        probs, beliefs, labels = arrays(rows)
        np.testing.assert_array_equal(labels, [LETTERS.index(item.correct) for item in world.mcq])
        np.testing.assert_allclose(beliefs, [item.population for item in world.mcq], rtol=0, atol=1e-15)
        assert (probs > 0).all()
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(*arrays(quick_run["probs"]["population"])[:2])  # the oracle row scores p itself
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (quick_run["out"] / "calibration.png").exists() == has_matplotlib  # the plot is optional


def split_rows(quick_run):
    """((policy, split), that split's probability rows) for every row of the table."""
    for (policy, split), row in quick_run["table"].items():
        yield row, [r for r in quick_run["probs"][policy] if r["split"] == split]


def test_training_file_holds_only_the_trained_items_pairs(quick_run):
    """Oracle: the world's pair file filtered here by hand; each trained item has its C(4, 2) = 6 pairs."""
    world = load_world()
    trained = {item.id for item in world.mcq[:48 - exp.HELD_OUT]}
    source = world.files["mcq_pairs_soft"].read_text(encoding="utf-8").splitlines()
    written = list(quick_run["out"].glob("mcq_pairs_soft_*items.jsonl"))
    assert len(written) == 1
    lines = written[0].read_text(encoding="utf-8").splitlines()
    assert lines == [line for line in source if json.loads(line)["id"] in trained]
    assert len(lines) == 6 * len(trained)


def test_metrics_recomputed_from_saved_probabilities(quick_run):
    for row, rows in split_rows(quick_run):
        probs, beliefs, labels = arrays(rows)
        assert len(rows) == int(row["items"])
        ece = float(row["ece"])
        assert 0.0 <= ece <= 1.0 and 0.0 <= float(row["brier"]) <= 2.0 and 0.0 <= float(row["accuracy"]) <= 1.0
        assert ece == pytest.approx(expected_calibration_error(probs, labels, n_bins=15), rel=1e-9, abs=1e-12)
        assert ece == pytest.approx(ece_by_bin_index(probs, labels), rel=1e-9, abs=1e-12)
        assert float(row["brier"]) == pytest.approx(brier_score(probs, labels), rel=1e-9)
        assert float(row["accuracy"]) == pytest.approx(accuracy(probs, labels), rel=1e-12)
        # expectations over y ~ p by enumerating the four letters
        brier_each = [[((q - np.eye(4)[c]) ** 2).sum() for c in range(4)] for q in probs]  # (N, 4)
        assert float(row["expected_brier"]) == pytest.approx(float((beliefs * brier_each).sum(1).mean()), rel=1e-9)
        hit = np.array([[float(np.argmax(q) == c) for c in range(4)] for q in probs])  # (N, 4)
        expected_acc = float((beliefs * hit).sum(1).mean())
        assert float(row["expected_accuracy"]) == pytest.approx(expected_acc, rel=1e-9)
        assert float(row["overconfidence"]) == pytest.approx(probs.max(1).mean() - expected_acc, rel=1e-9, abs=1e-12)
        assert 0.0 <= float(row["expected_ece"]) <= 1.0


def test_letter_probabilities_equal_a_full_forward_by_hand(quick_run):
    """Appendix D: softmax over the whole vocabulary at the token after the chat prompt, the four letters' entries
    renormalised; for the reference model and for the quick run's DPO adapter, on the first six items."""
    import torch

    from eval.experiments.policies import load_policy

    world = load_world()
    for policy, run_dir in (("reference", None), ("DPO", quick_run["out"] / "runs" / "alpha0.1_beta0.1")):
        model, tokenizer = load_policy(run_dir)
        letter_ids = [tokenizer.encode(letter)[0] for letter in LETTERS]
        saved = arrays(quick_run["probs"][policy])[0]
        for index, item in enumerate(world.mcq[:6]):
            ids = torch.tensor([tokenizer.encode_prompt([{"role": "user", "content": item.prompt}])])
            with torch.no_grad():
                probs = model(ids)[0, -1].double().softmax(-1)[letter_ids]  # (4,)
            np.testing.assert_allclose(saved[index], (probs / probs.sum()).numpy(), rtol=1e-5, atol=1e-6)


def test_population_is_calibrated_on_average(quick_run):
    """mean_n max_c p_nc - mean_n p_n[argmax p_n] = 0: the raters' beliefs are not over- or under-confident."""
    for split in ("trained", "held-out"):
        assert float(quick_run["table"]["population", split]["overconfidence"]) == pytest.approx(0.0, abs=1e-12)


def test_dpo_is_more_confident_than_spl_at_global_temperature_ten(quick_run):
    table = quick_run["table"]
    assert float(table["DPO", "trained"]["mean_confidence"]) > float(table["SPL", "trained"]["mean_confidence"])
    assert float(table["DPO", "trained"]["overconfidence"]) > float(table["SPL", "trained"]["overconfidence"])


def test_expected_metrics_against_closed_forms():
    rng = np.random.default_rng(0)
    beliefs = rng.dirichlet(np.ones(4), size=40)  # (40, 4)
    probs = rng.dirichlet(np.ones(4), size=40)  # (40, 4)
    brier = [sum(p[c] * brier_score(q[None], np.array([c])) for c in range(4)) for p, q in zip(beliefs, probs)]
    assert exp.expected_brier(probs, beliefs) == pytest.approx(np.mean(brier), rel=1e-12)
    hit = [sum(p[c] * float(np.argmax(q) == c) for c in range(4)) for p, q in zip(beliefs, probs)]  # (40,)
    assert exp.expected_accuracy(probs, beliefs) == pytest.approx(np.mean(hit), rel=1e-12)
    # One-hot predictions: every confidence is 1, one bin, so ECE = 1 - acc for every label draw and
    # E[ECE] = 1 - mean(hit); the Monte-Carlo mean over D draws has standard deviation sd(acc) / sqrt(D).
    one_hot = np.eye(4)[probs.argmax(1)]  # (40, 4)
    sd_acc = np.sqrt(sum(h * (1 - h) for h in hit)) / 40
    draws = 400
    assert exp.expected_ece(one_hot, beliefs, draws) == pytest.approx(1 - np.mean(hit), abs=4 * sd_acc / draws ** 0.5)


def test_bad_arguments_fail_at_start(capsys):
    for argv, message in ((["--ratios", "0.5"], "--ratios: alpha/beta must be >= 1"),
                          (["--label-draws", "0"], "--label-draws must be > 0"),
                          (["--ratios", "x"], "--ratios: expected comma-separated numbers"),
                          (["--held-out", "41"], "--held-out must be in 0..40")):
        with pytest.raises(SystemExit) as error:
            exp.main(argv)
        assert error.value.code == 2
        assert message in capsys.readouterr().err


def test_split_items():
    items = list(range(48))
    assert exp.split_items(items, 16) == {"trained": list(range(32)), "held-out": list(range(32, 48))}
    assert exp.split_items(items, 0) == {"trained": items}
    with pytest.raises(ValueError, match="held_out"):
        exp.split_items(items, 48)
