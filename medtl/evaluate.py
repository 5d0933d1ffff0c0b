"""Honest evaluation on the target domain: classification metrics with patient-level bootstrap CIs, per site.

Everything here takes arrays and returns plain data (``classification_metrics``), except
``write_report`` (a path) and ``collect_predictions`` (a model and a loader). The result is a
JSON-serialisable dict, so a report is a file a user can inspect and diff::

    y, probs, ids = collect_predictions(model, val_loader, device="cuda")
    result = classification_metrics(y, probs, class_names=["benign", "malignant"],
                                     patient_ids=patients, sites=sites)
    print(format_table(result))
    write_report(result, "eval/report.json")

Conventions (stated once, used by every metric):

* Predictions are the argmax of ``probs`` (ties go to the lower class index); for a binary task
  ``threshold=t`` predicts class 1 when ``probs[:, 1] >= t`` instead.
* Binary (K = 2): AUC, sensitivity and F1 are of class 1 (the positive class); specificity is the
  recall of class 0. K > 2: AUC is macro one-vs-rest, sensitivity is macro recall, specificity is
  macro one-vs-rest specificity, F1 is macro F1.
* Macro averages run over the classes present in ``y_true`` of the sample being evaluated (the whole
  set, or one site). A bootstrap replicate in which one of those classes is missing (e.g. a
  replicate with a single class, for AUC) gives an undefined value and is skipped; each metric
  reports how many replicates were used (``n_boot``).
* Balanced accuracy is the mean recall over those classes.
* Expected calibration error: 15 equal-width, right-closed bins ``(k/15, (k+1)/15]`` on the maximum
  probability; ECE = sum over bins of (cases in bin / N) * |accuracy in bin - mean confidence in bin|.
* 95% CIs are percentile bootstrap intervals (2.5th and 97.5th percentiles, linear interpolation).
  With ``patient_ids`` a replicate draws patients with replacement and takes all of each drawn
  patient's cases, so correlated cases (several lesions or scans of one patient) never make the
  interval look narrower than the number of patients supports. Without them, cases are resampled.
  Replicates are drawn by ``bootstrap_indices`` from ``seed`` alone, so results are reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtl.errors import MedtlError
from medtl.fileio import atomic_write_json

__all__ = [
    "ECE_BINS",
    "METRICS",
    "bootstrap_indices",
    "classification_metrics",
    "collect_predictions",
    "expected_calibration_error",
    "format_table",
    "roc_auc_ovr",
    "write_report",
]

ECE_BINS = 15
METRICS = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "ece")
_ROW_SUM_TOL = 1e-3


# --------------------------------------------------------------------------- pure metric helpers


def _midranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores``, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def _binary_auc(is_pos: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC: P(score_pos > score_neg) + 0.5 * P(tie); NaN without both classes."""
    n_pos = int(is_pos.sum())
    n_neg = is_pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(scores)
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_ovr(y_true: np.ndarray, probs: np.ndarray, *, classes: Iterable[int] | None = None) -> float:
    """ROC AUC: of class 1 for K = 2, else the macro one-vs-rest mean over ``classes``.

    ``classes`` defaults to the classes present in ``y_true``; the result is NaN when fewer than two
    classes are present or when one of ``classes`` has no positive case.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float)
    k = probs.shape[1]
    if k == 2:
        return _binary_auc(y_true == 1, probs[:, 1])
    classes = sorted(set(np.unique(y_true).tolist())) if classes is None else list(classes)
    if len(classes) < 2:
        return float("nan")
    values = [_binary_auc(y_true == c, probs[:, c]) for c in classes]
    return float(np.mean(values))  # NaN propagates when a class is missing


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, *, n_bins: int = ECE_BINS) -> float:
    """ECE on the maximum probability over ``n_bins`` equal-width right-closed bins (argmax predictions)."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.arange(1, n_bins) / n_bins  # inner edges; i / n is correctly rounded, so 0.2 == 3 / 15
    bins = np.searchsorted(edges, confidence, side="left")  # confidence == edge goes to the lower bin
    n = confidence.size
    ece = 0.0
    for b in np.unique(bins):
        members = bins == b
        ece += members.sum() / n * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _metrics_of(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, k: int, present: list[int]) -> dict[str, float]:
    """All scalar metrics of one sample; NaN where undefined (see the module docstring)."""
    cm = _confusion(y, pred, k)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)  # true cases per class
    predicted = cm.sum(axis=0)
    n = cm.sum()
    recall = _ratio(tp, support)
    negatives = n - support
    specificity = _ratio(negatives - (predicted - tp), negatives)
    f1 = _ratio(2 * tp, support + predicted)
    out = {
        "auc": roc_auc_ovr(y, probs, classes=present),
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(np.mean(recall[present])) if present else float("nan"),
        "ece": expected_calibration_error(y, probs),
    }
    if k == 2:
        f1_pos = float(f1[1]) if support[1] > 0 else float("nan")
        out.update(sensitivity=float(recall[1]), specificity=float(recall[0]), f1=f1_pos)
    else:
        out.update(
            sensitivity=float(np.mean(recall[present])) if present else float("nan"),
            specificity=float(np.mean(specificity[present])) if len(present) >= 2 else float("nan"),
            f1=float(np.mean(f1[present])) if present else float("nan"),
        )
    if k > 2 and present and np.any(support[present] == 0):
        # a replicate lost a class the sample has: macro averages would change meaning -> skipped
        for name in ("auc", "balanced_accuracy", "sensitivity", "specificity", "f1"):
            out[name] = float("nan")
    return {name: out[name] for name in METRICS}


# --------------------------------------------------------------------------- bootstrap


def bootstrap_indices(
    n_cases: int, *, patient_ids: Sequence[Any] | None = None, n_boot: int = 1000, seed: int = 0
) -> list[np.ndarray]:
    """Case indices of ``n_boot`` bootstrap replicates, drawn from ``seed`` alone.

    Without ``patient_ids`` each replicate draws ``n_cases`` cases with replacement. With them it
    draws as many patients as there are, with replacement, and takes all cases of each drawn
    patient (in their original order, the patient's block repeated if drawn twice), so the
    replicate's size varies.

    Examples:
        Two CT studies of patient "p1" always travel together:

        >>> reps = bootstrap_indices(3, patient_ids=["p1", "p1", "p2"], n_boot=2, seed=0)
        >>> all((r == 0).sum() == (r == 1).sum() for r in reps)
        True
    """
    rng = np.random.default_rng(seed)
    if patient_ids is None:
        return [rng.integers(0, n_cases, size=n_cases) for _ in range(n_boot)]
    if len(patient_ids) != n_cases:
        raise MedtlError(f"patient_ids has {len(patient_ids)} entries but there are {n_cases} cases")
    _, inverse = np.unique(np.asarray([str(p) for p in patient_ids]), return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # cases grouped by patient
    counts = np.bincount(inverse)
    starts = np.cumsum(counts) - counts  # where each patient's block begins in ``order``
    n_patients = counts.size
    replicates = []
    for _ in range(n_boot):
        drawn = rng.integers(0, n_patients, size=n_patients)
        lengths = counts[drawn]
        offset_in_block = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        replicates.append(order[np.repeat(starts[drawn], lengths) + offset_in_block])
    return replicates


def _percentile_ci(values: np.ndarray) -> tuple[list[float] | None, int]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, 0
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)], int(values.size)


def paired_auc_difference(
    y_true: Sequence[int],
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    *,
    patient_ids: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC of ``probs_b`` minus AUC of ``probs_a`` on the same cases, with a 95% CI from bootstrap
    replicates that resample the same patients for both, so what the two models share cancels out.
    Returns ``{"auc_a", "auc_b", "difference", "ci95"}`` (``ci95`` None when no replicate has both classes)."""
    y = np.asarray(y_true)
    a, b = np.asarray(probs_a, dtype=float), np.asarray(probs_b, dtype=float)
    if not len(y) == len(a) == len(b):
        raise MedtlError(
            f"paired comparison needs one prediction per case from each model, got {len(y)}, {len(a)} and {len(b)}"
        )
    auc_a, auc_b = roc_auc_ovr(y, a), roc_auc_ovr(y, b)
    diffs = np.array(
        [
            roc_auc_ovr(y[r], b[r]) - roc_auc_ovr(y[r], a[r])
            for r in bootstrap_indices(len(y), patient_ids=patient_ids, n_boot=n_boot, seed=seed)
        ]
    )
    ci, _ = _percentile_ci(diffs)
    return {"auc_a": auc_a, "auc_b": auc_b, "difference": auc_b - auc_a, "ci95": ci}


# --------------------------------------------------------------------------- validation


def _validate(y_true, probs, class_names, patient_ids, sites, n_boot, threshold):
    y = np.asarray(y_true)
    p = np.asarray(probs)
    if y.ndim != 1:
        raise MedtlError(f"y_true must be a 1-D array of integer labels, got shape {tuple(y.shape)}")
    if y.size == 0:
        raise MedtlError("nothing to evaluate: y_true is empty", hint="check the evaluation split is not empty")
    if p.ndim != 2:
        raise MedtlError(f"probs must be a 2-D array (N cases, K classes), got shape {tuple(p.shape)}")
    if p.shape[0] != y.size:
        raise MedtlError(f"length mismatch: {y.size} labels but probs has {p.shape[0]} rows")
    k = p.shape[1]
    if k < 2:
        raise MedtlError(f"probs must have at least 2 class columns, got shape {tuple(p.shape)}")
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise MedtlError(f"class_names has {len(names)} names but probs has {k} columns")
    if len(set(names)) != k:
        raise MedtlError(f"class_names must be unique, got {names}")
    if y.dtype == bool:
        y = y.astype(np.int64)  # False/True as benign/malignant
    if not np.issubdtype(y.dtype, np.number):
        raise MedtlError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    if not np.all(np.isfinite(y)) or not np.all(np.asarray(y) == np.round(y)):
        raise MedtlError("y_true must hold integer class indices, found non-integer values")
    y = y.astype(np.int64)
    bad = np.flatnonzero((y < 0) | (y >= k))
    if bad.size:
        raise MedtlError(
            f"labels out of range: {bad.size} label(s) outside 0..{k - 1} (first: case {bad[0]} = {y[bad[0]]})",
            hint=f"labels are indices into class_names {names}",
        )
    if not np.issubdtype(p.dtype, np.number) or p.dtype == bool:
        raise MedtlError(f"probs must be numeric, got dtype {p.dtype}")
    p = p.astype(float)
    if not np.all(np.isfinite(p)):
        raise MedtlError("probs contains NaN or infinite values")
    row_err = np.abs(p.sum(axis=1) - 1.0)
    if np.any(p < 0) or np.any(p > 1) or np.any(row_err > _ROW_SUM_TOL):
        worst = int(np.argmax(row_err))
        raise MedtlError(
            f"probs rows must be class probabilities in [0, 1] summing to 1 (case {worst} "
            f"sums to {p[worst].sum():.4g})",
            hint="apply softmax to the network's logits",
        )
    pids = None
    if patient_ids is not None:
        pids = [str(x) for x in patient_ids]
        if len(pids) != y.size:
            raise MedtlError(f"length mismatch: {y.size} labels but {len(pids)} patient_ids")
    site_list = None
    if sites is not None:
        site_list = [str(x) for x in sites]
        if len(site_list) != y.size:
            raise MedtlError(f"length mismatch: {y.size} labels but {len(site_list)} sites")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise MedtlError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if threshold is not None:
        if k != 2:
            raise MedtlError(f"threshold applies to binary tasks only; this task has {k} classes")
        if not 0.0 <= float(threshold) <= 1.0:
            raise MedtlError(f"threshold must be within [0, 1], got {threshold!r}")
    return y, p, names, pids, site_list


# --------------------------------------------------------------------------- the verb


def _evaluate(y, p, names, pids, n_boot, seed, threshold) -> dict[str, Any]:
    k = len(names)
    pred = (p[:, 1] >= threshold).astype(np.int64) if threshold is not None else p.argmax(axis=1)
    present = sorted(set(np.unique(y).tolist()))
    point = _metrics_of(y, p, pred, k, present)
    boot = {name: np.full(n_boot, np.nan) for name in METRICS}
    for b, idx in enumerate(bootstrap_indices(y.size, patient_ids=pids, n_boot=n_boot, seed=seed)):
        for name, value in _metrics_of(y[idx], p[idx], pred[idx], k, present).items():
            boot[name][b] = value
    metrics = {}
    for name in METRICS:
        ci, used = _percentile_ci(boot[name])
        value = point[name]
        metrics[name] = {"value": None if np.isnan(value) else value, "ci95": ci, "n_boot": used}
    counts = np.bincount(y, minlength=k)
    pred_counts = np.bincount(pred, minlength=k)
    return {
        "n": int(y.size),
        "n_patients": None if pids is None else len(set(pids)),
        "class_names": list(names),
        "class_counts": {name: int(c) for name, c in zip(names, counts, strict=True)},
        "predicted_counts": {name: int(c) for name, c in zip(names, pred_counts, strict=True)},
        "metrics": metrics,
        "confusion_matrix": _confusion(y, pred, k).tolist(),
    }


def classification_metrics(
    y_true,
    probs,
    *,
    class_names: Sequence[str],
    patient_ids: Sequence[Any] | None = None,
    sites: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Classification metrics with 95% bootstrap CIs, overall and per site.

    Args:
        y_true: integer class indices, shape (N,).
        probs: class probabilities, shape (N, K), rows summing to 1 (softmax output, not logits).
        class_names: K names, in column order of ``probs``.
        patient_ids: optional patient of each case; the bootstrap then resamples patients.
        sites: optional acquisition site of each case; adds ``per_site`` results.
        n_boot: bootstrap replicates (0: no CIs).
        seed: seed of the bootstrap; the same inputs and seed give the same result.
        threshold: binary only; predict class 1 when ``probs[:, 1] >= threshold`` (default argmax).

    Returns:
        ``{"n", "n_patients", "class_names", "class_counts", "predicted_counts", "bootstrap",
        "prediction", "metrics": {name: {"value", "ci95": [lo, hi], "n_boot"}},
        "confusion_matrix" (rows = true class), "per_site": {site: same without per_site}}``.
        Undefined values (e.g. AUC with one class) are ``None``.

    Raises:
        MedtlError: on empty input, length mismatches, probs not (N, K) probabilities, labels out
            of range, or a threshold on a multi-class task.

    Examples:
        Malignancy of 6 lung nodules, 4 patients:

        >>> r = classification_metrics([0, 0, 1, 1, 1, 1],
        ...     [[.8, .2], [.4, .6], [.4, .6], [.7, .3], [.2, .8], [.1, .9]],
        ...     class_names=["benign", "malignant"], patient_ids=["a", "a", "b", "c", "d", "d"], n_boot=50)
        >>> r["metrics"]["sensitivity"]["value"], r["confusion_matrix"]
        (0.75, [[1, 1], [1, 3]])
    """
    y, p, names, pids, site_list = _validate(y_true, probs, class_names, patient_ids, sites, n_boot, threshold)
    n_boot = int(n_boot)
    seed = int(seed)
    result = _evaluate(y, p, names, pids, n_boot, seed, threshold)
    result["bootstrap"] = {
        "n_boot": n_boot,
        "seed": seed,
        "resampling": "patient" if pids is not None else "case",
        "ci": "percentile 95%",
    }
    result["prediction"] = "argmax" if threshold is None else f"{names[1]} if p({names[1]}) >= {float(threshold):g}"
    if site_list is not None:
        per_site = {}
        for site in sorted(set(site_list)):
            mask = np.array([s == site for s in site_list])
            site_pids = None if pids is None else [pid for pid, m in zip(pids, mask, strict=True) if m]
            per_site[site] = _evaluate(y[mask], p[mask], names, site_pids, n_boot, seed, threshold)
        result["per_site"] = per_site
    return result


# --------------------------------------------------------------------------- presentation and files


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _section(result: dict[str, Any], title: str) -> list[str]:
    names = result["class_names"]
    patients = "" if result.get("n_patients") is None else f", {result['n_patients']} patients"
    lines = [f"{title}: {result['n']} cases{patients}"]
    lines.append(f"  {'metric':<18} {'value':>8}   {'95% CI':<18} {'replicates':>10}")
    for name, m in result["metrics"].items():
        ci = "n/a" if m["ci95"] is None else f"[{_fmt(m['ci95'][0])}, {_fmt(m['ci95'][1])}]"
        lines.append(f"  {name:<18} {_fmt(m['value']):>8}   {ci:<18} {m['n_boot']:>10}")
    width = max(8, *(len(c) for c in names)) + 1
    lines.append("  confusion matrix (rows = true, columns = predicted)")
    lines.append("  " + " " * width + "".join(f"{c:>{width}}" for c in names))
    for name, row in zip(names, result["confusion_matrix"], strict=True):
        lines.append("  " + f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    return lines


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width text table (metric, value, 95% CI) and the confusion matrix, overall then per site."""
    lines = _section(result, "all sites" if "per_site" in result else "all cases")
    boot = result.get("bootstrap")
    if boot:
        lines.append(
            f"  bootstrap: {boot['n_boot']} replicates, {boot['resampling']}-level resampling, seed {boot['seed']}"
        )
    for site, sub in result.get("per_site", {}).items():
        lines.append("")
        lines.extend(_section(sub, f"site {site}"))
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as canonical JSON, atomically (an interrupted run leaves the old report)."""
    return atomic_write_json(path, result)


def collect_predictions(
    model,
    loader: Iterable[dict[str, Any]],
    device: Any = "cpu",
    *,
    image_key: str = "image",
    label_key: str = "label",
    id_key: str | None = "case_id",
    activation: str | None = "softmax",
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Run ``model`` over a MONAI-style loader of data dicts; return labels, probabilities and case ids.

    ``activation="softmax"`` turns logits into probabilities (``None``: the model already outputs
    them). Case ids come from ``batch[id_key]`` when every batch has it, else ``None``.
    """

    if activation not in ("softmax", None):
        raise MedtlError(f"activation must be 'softmax' or None, got {activation!r}")
    was_training = model.training
    model.eval()
    labels, probs, ids = [], [], []
    has_ids = id_key is not None
    try:
        with torch.no_grad():
            for batch in loader:
                out = model(batch[image_key].to(device)).float()
                if activation == "softmax":
                    out = torch.softmax(out, dim=1)
                probs.append(out.cpu().numpy())
                labels.append(torch.as_tensor(batch[label_key]).reshape(-1).cpu().numpy())
                if has_ids and id_key in batch:
                    ids.extend(str(x) for x in batch[id_key])
                else:
                    has_ids = False
    finally:
        model.train(was_training)
    if not probs:
        raise MedtlError("the loader yielded no batches", hint="check the evaluation split is not empty")
    return np.concatenate(labels).astype(np.int64), np.concatenate(probs).astype(float), ids if has_ids else None
