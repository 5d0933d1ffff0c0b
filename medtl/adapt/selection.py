"""Choices made on every labeled target case, not on a handful: patient-level k-fold splits.

A target site that gives 30-50 labeled cases leaves 10-20 for a validation split, and an AUC on 19
cases moves by 0.1 when one case flips: a recipe that picks its epoch, or whether to keep AdaBN, on
such a split picks noise (in ``medtl demo`` it threw away AdaBN's gain and every fine-tuning epoch).
``patient_folds`` splits all labeled cases into k folds that keep each patient's cases together and
each class spread over the folds, so every case is used once for validation and k-1 times for
training; ``medtl.adapt.recipe.finetune`` averages the folds' validation curves to choose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medtl.errors import MedtlError


def patient_folds(items: Sequence[Mapping[str, Any]], k: int, *, seed: int = 0) -> list[list[int]]:
    """Indices of ``items`` in ``k`` folds: a patient's cases share a fold; patients are dealt out per
    class (by their first case's label) in a seeded random order, so class counts differ by at most
    one patient between folds."""
    if k < 2:
        raise MedtlError(f"k-fold selection needs k >= 2 folds, got {k}")
    by_patient: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_patient.setdefault(str(item["patient"]), []).append(index)
    if len(by_patient) < k:
        raise MedtlError(
            f"{k}-fold selection needs at least {k} labeled patients, got {len(by_patient)}",
            hint="label more target cases, lower the number of folds, or select on the validation split",
        )
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    dealt = 0
    for label in sorted({int(items[i[0]]["label"]) for i in by_patient.values()}):
        patients = sorted(p for p, idx in by_patient.items() if int(items[idx[0]]["label"]) == label)
        for patient in rng.permutation(patients):
            folds[dealt % k].extend(by_patient[str(patient)])
            dealt += 1
    return [sorted(f) for f in folds]


def mean_curve(curves: Sequence[Sequence[float]]) -> np.ndarray:
    """Mean over folds of per-epoch validation AUCs, ignoring folds where an epoch's AUC is undefined."""
    stacked = np.array([[np.nan if v is None else v for v in c] for c in curves], dtype=float)
    with np.errstate(all="ignore"):
        counts = np.sum(~np.isnan(stacked), axis=0)
        return np.where(counts > 0, np.nansum(stacked, axis=0) / np.maximum(counts, 1), np.nan)


__all__ = ["mean_curve", "patient_folds"]
