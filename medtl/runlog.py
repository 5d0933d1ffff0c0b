"""What an adaptation run keeps for its report: predictions per case, learning curves, features, Grad-CAM.

A run folder is plain files a person can open, and ``medtl report`` reads only these::

    RUN_DIR/run/
        evaluations/<stage>__<set>.json   class names, each case's label and probabilities, metrics with CIs
        curves/<stage>.json               mean training loss and validation AUC per epoch, the epoch kept
        features/<stage>.npz              penultimate features per evaluation set (domain shift)
        intensities.json                  histogram of the preprocessed crops' voxels per set
        explanations/<stage>.npz          central slices and Grad-CAM of correct and wrong test cases

Cases appear only under their pseudonymous manifest ids; sets are named by the caller ("site B
test"). Every file is written atomically, so a report never reads half a record.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtl.adapt.recipe import loader
from medtl.adapt.shift import extract_features, mmd_permutation_test
from medtl.errors import MedtlError
from medtl.evaluate import collect_predictions
from medtl.fileio import atomic_write_bytes, atomic_write_json

__all__ = [
    "HISTOGRAM_BINS",
    "load_run",
    "record_curve",
    "record_evaluation",
    "record_explanations",
    "record_features",
    "record_intensities",
    "run_folder",
]

HISTOGRAM_BINS = np.linspace(0.0, 1.0, 51)  # preprocessed CT crops are [0, 1] of the window


def run_folder(out: str | Path) -> Path:
    """The records folder of a run whose outputs go to ``out``."""
    return Path(out) / "run"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unnamed"


def _sequence(folder: Path) -> int:
    """Records carry the order they were written in, so a report lists stages as the run ran them."""
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def record_evaluation(
    run: str | Path,
    stage: str,
    evaluated_on: str,
    *,
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    case_ids: Sequence[str],
    result: Mapping[str, Any],
) -> Path:
    """One evaluation of one stage: the per-case rows a ROC curve, confusion matrix and reliability
    diagram are drawn from, beside the metrics (with CIs) that ``classification_metrics`` gave."""
    probs = np.asarray(probs, dtype=np.float64)
    if not len(y_true) == len(probs) == len(case_ids):
        raise MedtlError(
            f"evaluation record of {stage} on {evaluated_on}: {len(y_true)} labels, {len(probs)} "
            f"predictions, {len(case_ids)} ids"
        )
    folder = Path(run) / "evaluations"
    record = {
        "stage": stage,
        "evaluated_on": evaluated_on,
        "sequence": _sequence(folder),
        "class_names": list(class_names),
        "cases": [
            {"case_id": str(c), "label": int(y), "probs": [round(float(p), 6) for p in row]}
            for c, y, row in zip(case_ids, y_true, probs, strict=True)
        ],
        "metrics": result["metrics"],
        "n": result["n"],
    }
    return atomic_write_json(folder / f"{_slug(stage)}__{_slug(evaluated_on)}.json", record)


def record_curve(run: str | Path, stage: str, fitted: Mapping[str, Any]) -> Path:
    """Learning curve of one ``fit`` summary; validation AUC of epoch 0 is the starting weights' when
    ``keep_initial`` validated them."""
    losses, aucs = list(fitted.get("train_loss", [])), list(fitted.get("val_auc", []))
    # 1 when the starting weights were validated first; k-fold selection states it (its curve is the folds')
    offset = 1 - fitted["val_first_epoch"] if "val_first_epoch" in fitted else len(aucs) - len(losses)
    record = {
        "stage": stage,
        "sequence": _sequence(Path(run) / "curves"),
        "train_loss": [{"epoch": i + 1, "value": v} for i, v in enumerate(losses)],
        "val_auc": [{"epoch": i + 1 - offset, "value": None if v != v else v} for i, v in enumerate(aucs)],
        "best_epoch": fitted.get("best_epoch"),
    }
    return atomic_write_json(Path(run) / "curves" / f"{_slug(stage)}.json", record)


def _loader(items: Sequence[Mapping[str, Any]], batch_size: int = 32) -> Any:

    return loader(items, batch_size=batch_size)


def record_features(
    run: str | Path,
    stage: str,
    network: nn.Module,
    sets: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Path:
    """Penultimate features of ``network`` on each set and the squared MMD (with permutation p-value)
    between the first set and each other: how far apart the network sees the sites."""

    names = list(sets)
    features = {name: extract_features(network, _loader(sets[name]), device) for name in names}
    tests = {
        name: mmd_permutation_test(features[names[0]], features[name], n_permutations=200, seed=seed)
        for name in names[1:]
    }
    arrays = {f"features_{i}": features[name].astype(np.float32) for i, name in enumerate(names)}
    arrays["meta"] = np.frombuffer(
        json.dumps(
            {"stage": stage, "sequence": _sequence(Path(run) / "features"), "sets": names, "mmd": tests}
        ).encode(),
        dtype=np.uint8,
    )
    return _save_npz(Path(run) / "features" / f"{_slug(stage)}.npz", arrays)


def record_intensities(run: str | Path, sets: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    """Voxel-value histograms of the preprocessed crops per set: a calibration or contrast shift
    between sites shows as displaced curves."""
    record = {}
    for name, items in sets.items():
        counts = np.zeros(len(HISTOGRAM_BINS) - 1)
        for item in items:
            counts += np.histogram(np.clip(np.asarray(item["image"], dtype=np.float64), 0.0, 1.0), bins=HISTOGRAM_BINS)[
                0
            ]
        record[name] = {"cases": len(items), "density": (counts / max(counts.sum(), 1.0)).round(8).tolist()}
    return atomic_write_json(Path(run) / "intensities.json", {"bins": HISTOGRAM_BINS.tolist(), "sets": record})


def record_explanations(
    run: str | Path,
    stage: str,
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    per_group: int = 3,
    device: str | torch.device = "cpu",
) -> Path:
    """Grad-CAM of up to ``per_group`` correctly and ``per_group`` wrongly classified labeled cases
    (the most confident of each), kept as the central slices a report shows."""
    from medtl.explain import central_slices, gradcam

    labeled = [item for item in items if int(item["label"]) >= 0]
    if not labeled:
        raise MedtlError(f"no labeled cases to explain for {stage}")
    y, probs, _ = collect_predictions(network, _loader(labeled), device=device)
    pred = probs.argmax(1)
    confidence = probs.max(1)
    chosen: list[tuple[int, str]] = []
    for group, hit in (("correct", True), ("wrong", False)):
        members = [i for i in np.argsort(-confidence, kind="stable") if (pred[i] == y[i]) == hit]
        chosen += [(int(i), group) for i in members[:per_group]]
    images = torch.stack([torch.as_tensor(np.asarray(labeled[i]["image"]), dtype=torch.float32) for i, _ in chosen])
    maps = gradcam(network, images.to(device), class_index=[int(pred[i]) for i, _ in chosen])
    arrays: dict[str, np.ndarray] = {}
    cases = []
    for n, ((i, group), heat) in enumerate(zip(chosen, maps, strict=True)):
        for plane, values in central_slices(images[n, 0].numpy()).items():
            arrays[f"image_{n}_{plane}"] = values.astype(np.float32)
        for plane, values in central_slices(heat).items():
            arrays[f"cam_{n}_{plane}"] = values.astype(np.float32)
        cases.append(
            {
                "case_id": str(labeled[i].get("case_id", i)),
                "group": group,
                "label": class_names[int(y[i])],
                "pred": class_names[int(pred[i])],
                "prob": round(float(confidence[i]), 4),
            }
        )
    arrays["meta"] = np.frombuffer(
        json.dumps({"stage": stage, "sequence": _sequence(Path(run) / "explanations"), "cases": cases}).encode(),
        dtype=np.uint8,
    )
    return _save_npz(Path(run) / "explanations" / f"{_slug(stage)}.npz", arrays)


def _npz(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    return meta | {"arrays": arrays}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MedtlError(f"cannot read this run record: {exc}", path=path.name) from None


def _in_order(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: (r.get("sequence", 0), r["stage"]))


def load_run(run: str | Path) -> dict[str, Any]:
    """Every record of a run folder (evaluations, curves, features, intensities, explanations)."""
    run = Path(run)
    if not run.is_dir():
        raise MedtlError(
            "not a run folder",
            path=run,
            hint="give the folder a medtl demo or medtl adapt run wrote (it holds run/evaluations/)",
        )
    evaluations = _in_order(_json(p) for p in (run / "evaluations").glob("*.json"))
    if not evaluations:
        raise MedtlError(
            "the run folder holds no evaluations to report",
            path=run,
            hint="give the run/ folder written by medtl demo or medtl adapt",
        )
    try:
        features = _in_order(_npz(p) for p in (run / "features").glob("*.npz"))
        explanations = _in_order(_npz(p) for p in (run / "explanations").glob("*.npz"))
    except (OSError, ValueError, KeyError) as exc:
        raise MedtlError(f"a feature or explanation record is damaged: {exc}", path=run) from None
    intensities = run / "intensities.json"
    return {
        "evaluations": evaluations,
        "curves": _in_order(_json(p) for p in (run / "curves").glob("*.json")),
        "features": features,
        "intensities": _json(intensities) if intensities.exists() else None,
        "explanations": explanations,
        "info": _json(run / "run.json") if (run / "run.json").exists() else {},
    }
