"""Evaluation metrics against hand-computed values, the patient-level bootstrap, per-site splits and reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc

import medtl.evaluate as ev
from medtl.errors import MedtlError
from medtl.evaluate import (
    bootstrap_indices,
    classification_metrics,
    collect_predictions,
    expected_calibration_error,
    format_table,
    roc_auc_ovr,
    write_report,
)

NAMES2 = ["benign", "malignant"]
NAMES3 = ["cyst", "benign", "malignant"]

# 6 nodules, binary. p(malignant) and argmax prediction:
#   case: 0    1    2    3    4    5
#   y:    0    0    1    1    1    1
#   p1:  .2   .6   .6   .3   .8   .9
#   pred: 0    1    1    0    1    1   -> TN=1 FP=1 FN=1 TP=3
Y6 = np.array([0, 0, 1, 1, 1, 1])
P1_6 = np.array([0.2, 0.6, 0.6, 0.3, 0.8, 0.9])
PROBS6 = np.stack([1 - P1_6, P1_6], axis=1)

# 3 classes, 6 cases; argmax predictions 0, 1, 1, 1, 2, 1 (ties only in the AUC scores)
Y3 = np.array([0, 0, 1, 1, 2, 2])
PROBS3 = np.array(
    [
        [0.60, 0.30, 0.10],
        [0.30, 0.45, 0.25],
        [0.20, 0.50, 0.30],
        [0.35, 0.45, 0.20],
        [0.10, 0.20, 0.70],
        [0.30, 0.40, 0.30],
    ]
)


def _value(result, name):
    return result["metrics"][name]["value"]


def test_binary_metrics_by_hand():
    r = classification_metrics(Y6, PROBS6, class_names=NAMES2, n_boot=0)
    assert r["confusion_matrix"] == [[1, 1], [1, 3]]
    assert _value(r, "accuracy") == pytest.approx(4 / 6)
    assert _value(r, "sensitivity") == pytest.approx(3 / 4)  # TP / (TP + FN)
    assert _value(r, "specificity") == pytest.approx(1 / 2)  # TN / (TN + FP)
    assert _value(r, "balanced_accuracy") == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert _value(r, "f1") == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # precision 3/4, recall 3/4
    # Mann-Whitney over the 4 x 2 (pos, neg) pairs, a tie counting 1/2; negatives score .2 and .6:
    # .6 -> 1 + 0.5, .3 -> 1 + 0, .8 -> 2, .9 -> 2  => 6.5 / 8
    assert _value(r, "auc") == pytest.approx(6.5 / 8)
    assert r["n"] == 6 and r["n_patients"] is None
    assert r["class_counts"] == {"benign": 2, "malignant": 4}
    assert r["predicted_counts"] == {"benign": 2, "malignant": 4}
    assert r["class_names"] == NAMES2
    assert r["bootstrap"]["resampling"] == "case"
    assert all(m["ci95"] is None and m["n_boot"] == 0 for m in r["metrics"].values())
    assert "per_site" not in r


def test_auc_with_ties_matches_mann_whitney_and_monai():
    y = np.array([0, 1, 0, 1, 1, 0, 1])
    p1 = np.array([0.5, 0.5, 0.5, 0.7, 0.2, 0.2, 0.9])
    # positives .5 .7 .2 .9 vs negatives .5 .5 .2:  .5 -> 0.5+0.5+1 = 2, .7 -> 3, .2 -> 0.5, .9 -> 3
    expected = (2 + 3 + 0.5 + 3) / 12
    probs = np.stack([1 - p1, p1], axis=1)
    assert roc_auc_ovr(y, probs) == pytest.approx(expected)
    assert compute_roc_auc(torch.tensor(p1), torch.tensor(y)) == pytest.approx(expected)
    assert roc_auc_ovr(np.array([0, 1, 0, 1]), np.full((4, 2), 0.5)) == pytest.approx(0.5)  # all tied


def test_threshold_moves_the_operating_point():
    r = classification_metrics(Y6, PROBS6, class_names=NAMES2, n_boot=0, threshold=0.65)
    # p1 >= .65 -> predictions 0 0 0 0 1 1
    assert r["confusion_matrix"] == [[2, 0], [2, 2]]
    assert _value(r, "sensitivity") == pytest.approx(0.5)
    assert _value(r, "specificity") == pytest.approx(1.0)
    assert _value(r, "auc") == pytest.approx(6.5 / 8)  # threshold-free
    assert "0.65" in r["prediction"]


def test_three_class_macro_metrics_by_hand():
    r = classification_metrics(Y3, PROBS3, class_names=NAMES3, n_boot=0)
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 1, 1]]
    # one-vs-rest AUCs (positives vs the 4 others, ties 1/2):
    #   class 0: pos .6 .3  vs .2 .35 .1 .3  -> (4 + 2.5) / 8
    #   class 1: pos .5 .45 vs .3 .45 .2 .4  -> (4 + 3.5) / 8
    #   class 2: pos .7 .3  vs .1 .25 .3 .2  -> (4 + 3.5) / 8
    macro = (6.5 / 8 + 7.5 / 8 + 7.5 / 8) / 3
    assert _value(r, "auc") == pytest.approx(macro)
    onehot = torch.nn.functional.one_hot(torch.tensor(Y3), 3)
    assert compute_roc_auc(torch.tensor(PROBS3), onehot, average="macro") == pytest.approx(macro)
    assert _value(r, "accuracy") == pytest.approx(4 / 6)
    recalls = [1 / 2, 2 / 2, 1 / 2]
    assert _value(r, "sensitivity") == pytest.approx(np.mean(recalls))
    assert _value(r, "balanced_accuracy") == pytest.approx(np.mean(recalls))
    # specificity: class 0 no FP among 4 others (1), class 1 two FP among 4 (1/2), class 2 none (1)
    assert _value(r, "specificity") == pytest.approx((1 + 0.5 + 1) / 3)
    # F1 = 2TP / (2TP + FP + FN): class 0 2/3, class 1 4/6, class 2 2/3
    assert _value(r, "f1") == pytest.approx(2 / 3)


def test_expected_calibration_error_by_hand():
    p1 = np.array([0.95, 0.85, 0.30, 0.62, 0.39])
    y = np.array([1, 0, 0, 1, 1])
    probs = np.stack([1 - p1, p1], axis=1)
    # confidence .95 (correct), .85 (wrong), .70 (correct), .62 (correct), .61 (wrong)
    # bins of width 1/15: .95 alone, .85 alone, .70 alone, .62 and .61 share (0.6, 0.667]
    # gaps |accuracy - confidence| x cases: .05, .85, .30 and |1/2 - .615| x 2 = .23 -> 1.43 / 5
    assert expected_calibration_error(y, probs) == pytest.approx(0.286)
    r = classification_metrics(y, probs, class_names=NAMES2, n_boot=0)
    assert _value(r, "ece") == pytest.approx(0.286)
    # one bin: accuracy 3/5 against mean confidence 3.73/5
    assert expected_calibration_error(y, probs, n_bins=1) == pytest.approx(0.746 - 0.6)
    # always sure: never wrong -> 0, always wrong -> 1
    assert expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([1, 0]), np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    # perfectly calibrated: confidence .75, 3 of 4 correct -> 0
    calibrated = np.array([[0.25, 0.75]] * 4)
    assert expected_calibration_error(np.array([1, 1, 1, 0]), calibrated) == pytest.approx(0.0)


def test_ece_bins_are_right_closed():
    # confidence exactly 0.4 = 6/15 belongs to bin (1/3, 0.4] together with 0.35, not with 0.45
    probs = np.array([[0.4, 0.3, 0.3], [0.35, 0.33, 0.32], [0.45, 0.3, 0.25]])
    y = np.array([0, 1, 0])  # correct, wrong, correct
    # {.4, .35}: |1/2 - .375| x 2 = .25, {.45}: .55 -> .8 / 3 (.4 binned with .45 would give 1.5 / 3)
    assert expected_calibration_error(y, probs) == pytest.approx(0.8 / 3)


def test_bootstrap_is_deterministic_given_seed():
    pids = ["a", "a", "b", "c", "d", "d"]
    a = classification_metrics(Y6, PROBS6, class_names=NAMES2, patient_ids=pids, n_boot=200, seed=3)
    b = classification_metrics(Y6, PROBS6, class_names=NAMES2, patient_ids=pids, n_boot=200, seed=3)
    c = classification_metrics(Y6, PROBS6, class_names=NAMES2, patient_ids=pids, n_boot=200, seed=4)
    assert a == b
    assert a["metrics"] != c["metrics"]
    assert a["n_patients"] == 4 and a["bootstrap"]["resampling"] == "patient"
    for m in a["metrics"].values():
        lo, hi = m["ci95"]
        assert lo <= m["value"] <= hi or m["value"] is None


def test_bootstrap_indices_draw_whole_patients():
    pids = ["p1", "p2", "p1", "p3", "p1", "p2"]  # p1: cases 0 2 4, p2: 1 5, p3: 3
    members = {"p1": [0, 2, 4], "p2": [1, 5], "p3": [3]}
    reps = bootstrap_indices(6, patient_ids=pids, n_boot=200, seed=0)
    assert len(reps) == 200
    sizes = set()
    for idx in reps:
        counts = np.bincount(idx, minlength=6)
        for cases in members.values():
            assert len(set(counts[cases])) == 1  # a patient's cases are drawn the same number of times
        assert sum(counts[c[0]] for c in members.values()) == 3  # 3 patients drawn per replicate
        # and they come as contiguous blocks
        pos = 0
        while pos < idx.size:
            block = next(c for c in members.values() if c[0] == idx[pos])
            assert idx[pos : pos + len(block)].tolist() == block
            pos += len(block)
        sizes.add(idx.size)
    assert len(sizes) > 1  # replicate size varies with who was drawn
    case_level = bootstrap_indices(6, n_boot=50, seed=0)
    assert all(r.size == 6 for r in case_level)
    assert [r.tolist() for r in bootstrap_indices(6, patient_ids=pids, n_boot=5, seed=9)] == [
        r.tolist() for r in bootstrap_indices(6, patient_ids=pids, n_boot=5, seed=9)
    ]


def test_classification_metrics_resamples_patients_not_cases(monkeypatch):
    # patient "good": 5 cases all correct; patient "bad": 5 cases all wrong.
    y = np.array([1] * 10)
    probs = np.array([[0.1, 0.9]] * 5 + [[0.9, 0.1]] * 5)
    pids = ["good"] * 5 + ["bad"] * 5
    calls = []
    real = ev.bootstrap_indices

    def spy(n_cases, *, patient_ids=None, n_boot, seed):
        reps = real(n_cases, patient_ids=patient_ids, n_boot=n_boot, seed=seed)
        calls.append((patient_ids, reps))
        return reps

    monkeypatch.setattr(ev, "bootstrap_indices", spy)
    by_patient = classification_metrics(y, probs, class_names=NAMES2, patient_ids=pids, n_boot=200)
    assert calls[0][0] == pids
    for idx in calls[0][1]:
        counts = np.bincount(idx, minlength=10)
        assert len(set(counts[:5])) == 1 and len(set(counts[5:])) == 1
    # with 2 patients a replicate's accuracy is 0, 1/2 or 1: about a quarter of replicates are 0 and a
    # quarter 1, so the interval spans everything. Case-level resampling of 10 cases cannot reach it.
    assert by_patient["metrics"]["accuracy"]["ci95"] == [0.0, 1.0]
    by_case = classification_metrics(y, probs, class_names=NAMES2, n_boot=200)
    lo, hi = by_case["metrics"]["accuracy"]["ci95"]
    assert 0.0 < lo < 0.5 < hi < 1.0


def test_duplicated_cases_widen_patient_level_interval():
    rng = np.random.default_rng(1)
    y_pat = np.array([0, 1] * 6)
    p1_pat = np.clip(0.5 + (y_pat - 0.5) * 0.4 + rng.normal(0, 0.25, 12), 0.01, 0.99)
    y = np.repeat(y_pat, 8)  # 8 identical scans per patient
    probs = np.stack([1 - np.repeat(p1_pat, 8), np.repeat(p1_pat, 8)], axis=1)
    pids = np.repeat(np.arange(12), 8)
    by_patient = classification_metrics(y, probs, class_names=NAMES2, patient_ids=pids, n_boot=200)
    by_case = classification_metrics(y, probs, class_names=NAMES2, n_boot=200)
    for name in ("auc", "accuracy"):
        wp = np.diff(by_patient["metrics"][name]["ci95"])[0]
        wc = np.diff(by_case["metrics"][name]["ci95"])[0]
        assert wp > 1.5 * wc, name


def test_single_class_replicates_are_skipped_for_auc():
    y = np.array([0, 1, 1])
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]])
    r = classification_metrics(y, probs, class_names=NAMES2, n_boot=200, seed=5)
    both = sum(len(set(y[idx])) == 2 for idx in bootstrap_indices(3, n_boot=200, seed=5))
    assert 0 < both < 200
    assert r["metrics"]["auc"]["n_boot"] == both
    assert r["metrics"]["accuracy"]["n_boot"] == 200
    assert r["metrics"]["ece"]["n_boot"] == 200


def test_macro_auc_skips_replicates_missing_a_class():
    r = classification_metrics(Y3, PROBS3, class_names=NAMES3, n_boot=200, seed=2)
    full = sum(len(set(Y3[idx])) == 3 for idx in bootstrap_indices(6, n_boot=200, seed=2))
    assert 0 < full < 200
    for name in ("auc", "sensitivity", "specificity", "f1", "balanced_accuracy"):
        assert r["metrics"][name]["n_boot"] == full, name


def test_per_site_results_match_evaluating_each_site_alone():
    sites = ["A", "A", "B", "B", "B", "A"]
    pids = ["a1", "a2", "b1", "b1", "b2", "a3"]
    r = classification_metrics(Y6, PROBS6, class_names=NAMES2, patient_ids=pids, sites=sites, n_boot=200)
    assert sorted(r["per_site"]) == ["A", "B"]
    a = r["per_site"]["A"]
    # site A: cases 0, 1, 5 -> y 0 0 1, pred 0 1 1
    assert a["n"] == 3 and a["n_patients"] == 3
    assert a["confusion_matrix"] == [[1, 1], [0, 1]]
    assert _value(a, "sensitivity") == pytest.approx(1.0)
    assert _value(a, "specificity") == pytest.approx(0.5)
    assert _value(a, "auc") == pytest.approx(1.0)  # .9 beats .2 and .6
    assert "per_site" not in a
    alone = classification_metrics(
        Y6[[0, 1, 5]], PROBS6[[0, 1, 5]], class_names=NAMES2, patient_ids=["a1", "a2", "a3"], n_boot=200
    )
    assert alone["metrics"] == a["metrics"]
    # site B holds only malignant cases: AUC and specificity are undefined, never invented
    b = r["per_site"]["B"]
    assert b["metrics"]["auc"] == {"value": None, "ci95": None, "n_boot": 0}
    assert b["metrics"]["specificity"]["value"] is None
    assert _value(b, "sensitivity") == pytest.approx(2 / 3)
    assert b["n_patients"] == 2


@pytest.mark.parametrize(
    ("y", "probs", "kwargs", "match"),
    [
        ([], np.zeros((0, 2)), {}, "empty"),
        ([0, 1, 1], PROBS6[:2], {}, "length mismatch"),
        ([0, 1], [0.3, 0.7], {}, "2-D"),
        ([[0, 1]], PROBS6[:1], {}, "1-D"),
        ([0, 2], PROBS6[:2], {}, "out of range"),
        ([0, -1], PROBS6[:2], {}, "out of range"),
        ([0, 0.5], PROBS6[:2], {}, "integer"),
        ([0, 1], [[2.0, -1.0], [0.1, 3.0]], {}, "softmax"),
        ([0, 1], [[0.5, 0.6], [0.1, 0.9]], {}, "summing to 1"),
        ([0, 1], [[np.nan, 0.5], [0.1, 0.9]], {}, "NaN"),
        ([0, 1], PROBS6[:2], {"class_names": ["a", "b", "c"]}, "class_names"),
        ([0, 1], PROBS6[:2], {"class_names": ["a", "a"]}, "unique"),
        ([0, 1], PROBS6[:2], {"patient_ids": ["p"]}, "patient_ids"),
        ([0, 1], PROBS6[:2], {"sites": ["A", "B", "C"]}, "sites"),
        ([0, 1], PROBS6[:2], {"threshold": 1.5}, "threshold"),
        ([0, 1], PROBS6[:2], {"n_boot": -1}, "n_boot"),
        (Y3, PROBS3, {"class_names": NAMES3, "threshold": 0.5}, "binary"),
        ([0, 1], np.ones((2, 1)), {"class_names": ["a"]}, "at least 2"),
    ],
)
def test_invalid_inputs_raise_medtl_error(y, probs, kwargs, match):
    kwargs = {"class_names": NAMES2, "n_boot": 0, **kwargs}
    with pytest.raises(MedtlError, match=match):
        classification_metrics(np.asarray(y), np.asarray(probs), **kwargs)


def test_format_table_shows_numbers_and_sites():
    r = classification_metrics(
        Y6, PROBS6, class_names=NAMES2, patient_ids=list("aabcdd"), sites=list("AABBBA"), n_boot=200
    )
    text = format_table(r)
    auc = r["metrics"]["auc"]
    assert "0.8125" in text
    assert f"[{auc['ci95'][0]:.4f}, {auc['ci95'][1]:.4f}]" in text
    for name in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "ece"):
        assert name in text
    assert "site A: 3 cases, 2 patients" in text and "site B: 3 cases, 3 patients" in text
    assert "all sites: 6 cases, 4 patients" in text
    assert "n/a" in text  # site B's AUC
    lines = text.splitlines()
    row = next(line for line in lines if line.strip().startswith("malignant") and line.split()[1:] == ["1", "3"])
    assert row
    assert "patient-level" in text


def test_write_report_roundtrips_as_strict_json(tmp_path):
    r = classification_metrics(Y3, PROBS3, class_names=NAMES3, sites=["x", "x", "y", "y", "y", "x"], n_boot=50)
    json.dumps(r, allow_nan=False)  # no NaN or numpy scalars leak out
    path = write_report(r, tmp_path / "eval" / "report.json")
    assert json.loads(path.read_text(encoding="utf-8")) == r
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_collect_predictions_applies_softmax_and_keeps_ids():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    model.train()
    batches = [
        {"image": torch.tensor([[0.0, 1.0], [2.0, 0.0]]), "label": torch.tensor([1, 0]), "case_id": ["c1", "c2"]},
        {"image": torch.tensor([[0.0, 0.0]]), "label": torch.tensor([1]), "case_id": ["c3"]},
    ]
    y, probs, ids = collect_predictions(model, batches, "cpu")
    assert y.tolist() == [1, 0, 1]
    expected = torch.softmax(torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    assert ids == ["c1", "c2", "c3"]
    assert model.training  # mode restored
    _, _, no_ids = collect_predictions(model, [{k: v for k, v in batches[0].items() if k != "case_id"}], "cpu")
    assert no_ids is None
    r = classification_metrics(y, probs, class_names=NAMES2, n_boot=0)
    assert r["n"] == 3


def test_boolean_labels_and_float_whole_labels_are_accepted():
    a = classification_metrics(Y6.astype(bool), PROBS6, class_names=NAMES2, n_boot=0)
    b = classification_metrics(Y6.astype(float), PROBS6.astype(np.float32), class_names=NAMES2, n_boot=0)
    assert a["confusion_matrix"] == b["confusion_matrix"] == [[1, 1], [1, 3]]


def test_paired_auc_difference_resamples_the_same_patients_for_both_models():
    from medtl.evaluate import paired_auc_difference

    y = np.array([0, 1] * 10)
    ranked = np.stack([1 - np.linspace(0, 1, 20), np.linspace(0, 1, 20)], axis=1)
    perfect = np.stack([1.0 - y, y.astype(float)], axis=1)
    same = paired_auc_difference(y, ranked, ranked, patient_ids=[f"p{i // 2}" for i in range(20)], n_boot=200)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]  # one model against itself: no spread at all
    better = paired_auc_difference(y, ranked, perfect, n_boot=200, seed=1)
    assert (
        better["auc_b"] == 1.0
        and better["difference"] == pytest.approx(1.0 - better["auc_a"])
        and better["ci95"][0] > 0
    )
    with pytest.raises(MedtlError, match="one prediction per case"):
        paired_auc_difference(y, ranked, ranked[:5])
