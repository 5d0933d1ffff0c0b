"""How far the target site is from the source site: image statistics and a feature-space distance.

Before adapting, a user wants to know *what* differs between two sites (voxel spacing, intensity
calibration, lesion contrast) and *how much* a network notices it. The image part compares
statistics computed from the images themselves; the feature part measures the distance between
the penultimate features of the two sites with the squared maximum mean discrepancy (MMD) and a
permutation p-value. Given several networks (source-only, AdaBN, ...) it shows whether adaptation
brought the sites closer::

    report = shift_report("A.json", "B.json", "data", model={"source-only": m1, "AdaBN": m2}, out="shift.json")
    print(format_shift_report(report))

Conventions:

* Intensity statistics (mean, std, 1st/50th/99th percentile) are computed per case, then the
  median over cases is reported: one huge scan cannot dominate, and a calibration offset shows.
  "image" statistics are raw values over the whole volume (HU for CT); "crop" statistics are of the
  preprocessed lesion crop the network sees (``eval_transforms``: [0, 1] of the CT window, z-score for MR).
* Spacing and shape are per axis in RAS order (x, y, z).
* MMD uses the Gaussian kernel ``exp(-|a - b|^2 / (2 bandwidth^2))``, by default with the median
  heuristic (median distance between distinct pooled points), so each network's value is free of its
  feature scale. The estimate is the unbiased one, so it can be slightly negative when the sites agree.
* The report names manifests by file name and cases by their pseudonymous case id; file paths never
  appear, also not inside the reasons for skipped cases.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import medtl
from medtl.errors import MedtlError
from medtl.fileio import atomic_write_json
from medtl.manifest import SPLITS, UNLABELED, datalist, load_manifest
from medtl.networks import create_network, find_classifier
from medtl.progress import track
from medtl.reader import LoadVolumed
from medtl.transforms import eval_transforms
from medtl.weights import backbone_not_loaded, load_weights

__all__ = [
    "ALL_SPLITS",
    "extract_features",
    "feature_shift",
    "format_shift_report",
    "median_bandwidth",
    "mmd2",
    "mmd_permutation_test",
    "network_from_checkpoint",
    "shift_report",
]

ALL_SPLITS = (*SPLITS, UNLABELED)
_STATS = ("mean", "std", "p1", "p50", "p99")
_UNITS = {"ct": ("HU", "[0, 1] of the CT window"), "mr": ("scanner units", "z-score")}


# --------------------------------------------------------------------------- MMD (pure)


def _samples(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise MedtlError(
            f"{name} must be a 2-D array (samples, features) with at least 2 samples, got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise MedtlError(f"{name} contains NaN or infinite values")
    return array


def _pair(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _samples(x, "x"), _samples(y, "y")
    if x.shape[1] != y.shape[1]:
        raise MedtlError(f"x and y must have the same number of features, got {x.shape[1]} and {y.shape[1]}")
    return x, y


def _squared_distances(z: np.ndarray) -> np.ndarray:
    sq = (z * z).sum(axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)


def median_bandwidth(z: Any) -> float:
    """Median heuristic: the median Euclidean distance over distinct pairs of points that differ.

    Pairs of identical points are left out so duplicated cases cannot shrink the bandwidth to 0;
    when all points coincide any bandwidth gives the same (zero) MMD, and 1.0 is returned.
    """
    z = _samples(z, "z")
    d2 = _squared_distances(z)[np.triu_indices(len(z), k=1)]
    d2 = d2[d2 > 0]
    return float(np.median(np.sqrt(d2))) if d2.size else 1.0


def _kernel(z: np.ndarray, bandwidth: float | None) -> tuple[np.ndarray, float]:
    if bandwidth is None:
        bandwidth = median_bandwidth(z)
    elif not float(bandwidth) > 0 or not np.isfinite(bandwidth):
        raise MedtlError(f"bandwidth must be a positive number, got {bandwidth!r}")
    bandwidth = float(bandwidth)
    return np.exp(-_squared_distances(z) / (2.0 * bandwidth**2)), bandwidth


def _mmd2_of_kernel(k: np.ndarray, m: int) -> float:
    """Unbiased squared MMD from the pooled kernel matrix whose first ``m`` rows are x."""
    n = len(k) - m
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def mmd2(x: Any, y: Any, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD between samples ``x`` (m, d) and ``y`` (n, d) with a Gaussian kernel.

    ``bandwidth`` is the kernel's sigma; None uses the median heuristic on the pooled samples.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
        >>> abs(mmd2(a, b)) < 0.05, mmd2(a, b + 2.0) > 0.3
        (True, True)
    """
    x, y = _pair(x, y)
    k, _ = _kernel(np.concatenate([x, y]), bandwidth)
    return _mmd2_of_kernel(k, len(x))


def mmd_permutation_test(
    x: Any, y: Any, *, bandwidth: float | None = None, n_permutations: int = 500, seed: int = 0
) -> dict[str, Any]:
    """Squared MMD and the permutation p-value of "x and y come from the same distribution".

    The pooled samples are relabelled at random ``n_permutations`` times (drawn from ``seed`` alone);
    p = (1 + number of relabellings with an MMD at least as large) / (1 + n_permutations), so it is
    never 0. The bandwidth is fixed from the pooled samples, which relabelling does not change.
    """
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, (int, np.integer)) or n_permutations < 0:
        raise MedtlError(f"n_permutations must be a non-negative integer, got {n_permutations!r}")
    x, y = _pair(x, y)
    k, bandwidth = _kernel(np.concatenate([x, y]), bandwidth)
    observed = _mmd2_of_kernel(k, len(x))
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(n_permutations):
        order = rng.permutation(len(k))
        exceed += _mmd2_of_kernel(k[np.ix_(order, order)], len(x)) >= observed
    p_value = (1 + exceed) / (1 + n_permutations) if n_permutations else None
    return {
        "mmd2": observed,
        "p_value": p_value,
        "bandwidth": bandwidth,
        "n_permutations": int(n_permutations),
        "seed": int(seed),
    }


# --------------------------------------------------------------------------- features


def extract_features(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    *,
    image_key: str = "image",
    progress: bool = False,
) -> np.ndarray:
    """Penultimate features (N, D): the input of the classifier layer, captured by a forward hook.

    The input of the classifier is what the head separates classes with, so a shift there is a shift
    the prediction feels. ``loader`` yields dicts holding ``image_key`` or plain tensors; the model runs
    in eval mode (BatchNorm uses its running statistics, as at inference) and its mode is restored.
    """
    _, layer = find_classifier(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().flatten(1).float().cpu())
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in track(loader, desc="features", unit="batch", disable=not progress, leave=False):
                x = batch[image_key] if isinstance(batch, Mapping) else batch
                model(torch.as_tensor(x).to(device))
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise MedtlError(
            f"no features captured from {type(model).__name__}: the loader was empty or the classifier never ran"
        )
    return torch.cat(captured).double().numpy()


def feature_shift(
    model: nn.Module,
    source_loader: Iterable[Any],
    target_loader: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    image_key: str = "image",
    bandwidth: float | None = None,
    n_permutations: int = 500,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Squared MMD (with permutation p-value) between the penultimate features of two sites.

    Returns ``{"layer", "feature_dim", "n_source", "n_target", "mmd2", "p_value", "bandwidth",
    "n_permutations", "seed"}``. The model must already be on ``device``.
    """
    layer, _ = find_classifier(model)
    source = extract_features(model, source_loader, device, image_key=image_key, progress=progress)
    target = extract_features(model, target_loader, device, image_key=image_key, progress=progress)
    test = mmd_permutation_test(source, target, bandwidth=bandwidth, n_permutations=n_permutations, seed=seed)
    return {
        "layer": layer,
        "feature_dim": int(source.shape[1]),
        "n_source": len(source),
        "n_target": len(target),
        **test,
    }


def network_from_checkpoint(checkpoint: str | Path, *, arch: str, **network_kwargs: Any) -> nn.Module:
    """Build ``arch`` and load ``checkpoint`` into it, for feature extraction (eval mode).

    The classifier may have another class count (its outputs are not used here), but every other
    tensor must load: features from a partly random backbone would make any distance meaningless.
    """
    model = create_network(arch, **network_kwargs)
    left_out = backbone_not_loaded(model, load_weights(model, checkpoint))
    if left_out:
        shown = ", ".join(left_out[:5]) + (f", ... and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        raise MedtlError(
            f"checkpoint does not fit {arch} beyond its classifier: {len(left_out)} tensor(s) not loaded ({shown})",
            path=checkpoint,
            hint=(
                "check that the network name and options (e.g. widen factor) are those the checkpoint was trained with"
            ),
        )
    return model.eval()


# --------------------------------------------------------------------------- image statistics


def _intensity(values: np.ndarray) -> dict[str, float]:
    p1, p50, p99 = np.percentile(values, [1, 50, 99])
    return {
        "mean": float(values.mean(dtype=np.float64)),
        "std": float(values.std(dtype=np.float64)),
        "p1": float(p1),
        "p50": float(p50),
        "p99": float(p99),
    }


def _reason(exc: MedtlError, item: Mapping[str, Any], root: Path) -> str:
    """The error without file paths (folder names can identify patients): the case's own files become
    ``<image>``/``<mask>``, the data root ``<root>``."""
    text = f"{exc.message} (hint: {exc.hint})" if exc.hint else exc.message
    images = item["image"] if isinstance(item["image"], list) else [item["image"]]
    named = [(p, "<image>") for p in images] + ([(item["mask"], "<mask>")] if "mask" in item else [])
    for path, tag in named:
        text = text.replace(str(Path(path).resolve()), tag).replace(str(path), tag)
    return text.replace(str(root.resolve()), "<root>")


def _domain(
    path: Path,
    root: Path,
    splits: Sequence[str],
    modality: str,
    transform_options: Mapping[str, Any],
    progress: bool,
    what: str,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Summary of one manifest's selected cases and the lesion crops of those that loaded."""
    manifest = load_manifest(path)
    items = datalist(manifest, root, splits)
    if not items:
        raise MedtlError(
            f"no cases in split(s) {', '.join(splits)}", path=path, hint=f"choose among {', '.join(ALL_SPLITS)}"
        )
    load = LoadVolumed(keys=["image", "mask"], allow_missing_keys=True)
    preprocess = eval_transforms(modality=modality, load=False, **transform_options)
    class_names = {index: name for name, index in manifest["label_map"].items()}
    cases, crops, skipped = [], [], []
    for item in track(items, desc=f"{what} images", unit="case", disable=not progress, leave=False):
        try:
            data = load(item)
            image = data["image"]
            case = {
                "spacing": [float(v) for v in image.meta["spacing"]],
                "shape": list(image.shape[1:]),
                "image": _intensity(image.numpy()),
            }
            crop = preprocess(data)["image"]
        except MedtlError as exc:
            skipped.append({"case_id": item["case_id"], "reason": _reason(exc, item, root)})
            continue
        case["crop"] = _intensity(crop.numpy())
        cases.append(case)
        crops.append(crop.as_tensor())
    raw_unit, crop_unit = _UNITS[modality]
    summary: dict[str, Any] = {
        "manifest": path.name,
        "name": manifest["name"],
        "cases": len(items),
        "loaded": len(cases),
        "sites": dict(sorted(Counter(i["site"] for i in items).items())),
        "labels": dict(sorted(Counter(class_names.get(i["label"], UNLABELED) for i in items).items())),
        "spacing_mm": None,
        "shape": None,
        "image_intensity": None,
        "crop_intensity": None,
        "skipped": skipped,
    }
    if cases:
        spacing = np.asarray([c["spacing"] for c in cases])
        shape = np.asarray([c["shape"] for c in cases])
        summary["spacing_mm"] = {
            "median": np.median(spacing, axis=0).tolist(),
            "min": spacing.min(axis=0).tolist(),
            "max": spacing.max(axis=0).tolist(),
        }
        summary["shape"] = {"min": shape.min(axis=0).tolist(), "max": shape.max(axis=0).tolist()}
        for key, unit in (("image", raw_unit), ("crop", crop_unit)):
            summary[f"{key}_intensity"] = {
                "unit": unit,
                **{s: float(np.median([c[key][s] for c in cases])) for s in _STATS},
            }
    return summary, crops


def _batches(crops: Sequence[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(crops), batch_size):
        yield torch.stack(list(crops[start : start + batch_size]))


def shift_report(
    source: str | Path,
    target: str | Path,
    root: str | Path,
    *,
    target_root: str | Path | None = None,
    model: nn.Module | Mapping[str, nn.Module] | None = None,
    splits: Sequence[str] = ALL_SPLITS,
    modality: str = "ct",
    transform_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    n_permutations: int = 500,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Domain-shift report between the cases of two manifests; written atomically to ``out`` if given.

    Each image is loaded once: its raw statistics are taken, then it is preprocessed into the lesion
    crop (``eval_transforms``) that both the crop statistics and the networks see. A case that fails
    with a ``MedtlError`` (unreadable image, empty mask, ...) is skipped and listed with the reason.

    Args:
        source, target: manifest files of the source and target site.
        root: data root of the source manifest (and of the target one without ``target_root``).
        model: a network or ``{name: network}`` (e.g. source-only and AdaBN); adds one MMD per network.
            Networks must already be on ``device``.
        splits: manifest splits to include (default all, unlabeled cases too: no label is needed).
        modality: ``"ct"`` or ``"mr"``, for the crop preprocessing and the units.
        transform_options: further ``eval_transforms`` options (spatial_size, target_spacing, crop_mm,
            ct_window); they must match what the networks were trained with.
        batch_size: crops per forward pass.
        n_permutations, seed: the permutation test of each MMD.

    Returns:
        ``{"created_by", "splits", "modality", "source": summary, "target": summary, "feature_shift":
        {name: feature_shift(...)}}``; a summary holds ``manifest`` (file name), ``name``, ``cases``,
        ``loaded``, ``sites``, ``labels``, ``spacing_mm`` (median/min/max per axis), ``shape``
        (min/max), ``image_intensity`` and ``crop_intensity`` (medians over cases, with unit) and
        ``skipped`` (``[{"case_id", "reason"}]``).
    """
    splits = [splits] if isinstance(splits, str) else list(splits)
    unknown = [s for s in splits if s not in ALL_SPLITS]
    if unknown or not splits:
        raise MedtlError(f"unknown split(s) {', '.join(unknown) or '(none given)'}; allowed: {', '.join(ALL_SPLITS)}")
    modality = str(modality).lower()
    if modality not in _UNITS:
        raise MedtlError(f"unknown modality {modality!r}; allowed: {', '.join(_UNITS)}")
    if int(batch_size) < 1:
        raise MedtlError(f"batch_size must be at least 1, got {batch_size}")
    models = {} if model is None else {"model": model} if isinstance(model, nn.Module) else dict(model)
    options = dict(transform_options or {})
    root = Path(root)
    target_root = root if target_root is None else Path(target_root)
    sides = {}
    crops = {}
    for what, path, data_root in (("source", Path(source), root), ("target", Path(target), target_root)):
        sides[what], crops[what] = _domain(path, data_root, splits, modality, options, progress, what)
        if models and len(crops[what]) < 2:
            raise MedtlError(
                f"the feature shift needs at least 2 loaded cases, {len(crops[what])} of {sides[what]['cases']} loaded",
                path=path,
                hint="see the skipped cases with a report without a network",
            )
    shifts = {
        name: feature_shift(
            network,
            _batches(crops["source"], int(batch_size)),
            _batches(crops["target"], int(batch_size)),
            device=device,
            n_permutations=n_permutations,
            seed=seed,
            progress=progress,
        )
        for name, network in models.items()
    }
    report = {
        "created_by": f"medtl {medtl.__version__}",
        "splits": splits,
        "modality": modality,
        "source": sides["source"],
        "target": sides["target"],
        "feature_shift": shifts,
    }
    if out is not None:
        atomic_write_json(out, report)
    return report


# --------------------------------------------------------------------------- presentation


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _axes(values: Sequence[float] | None) -> str:
    return "n/a" if values is None else " x ".join(_num(v) for v in values)


def _stats(block: dict[str, Any] | None, names: Sequence[str]) -> str:
    return "n/a" if block is None else " / ".join(_num(block[n]) for n in names)


def format_shift_report(report: dict[str, Any]) -> str:
    """A fixed-width table: source and target side by side, skipped cases, then one MMD row per network."""
    src, tgt = report["source"], report["target"]
    raw_unit, crop_unit = _UNITS[report["modality"]]

    def get(side: dict[str, Any], *keys: str) -> Any:
        for key in keys:
            side = None if side is None else side[key]
        return side

    rows = [
        ("manifest", src["manifest"], tgt["manifest"]),
        ("sites", *(", ".join(f"{k} {v}" for k, v in s["sites"].items()) for s in (src, tgt))),
        ("cases loaded / selected", *(f"{s['loaded']} / {s['cases']}" for s in (src, tgt))),
        ("labels", *(", ".join(f"{k} {v}" for k, v in s["labels"].items()) for s in (src, tgt))),
        *(
            (f"spacing {k} (mm)", *(_axes(get(s, "spacing_mm", k)) for s in (src, tgt)))
            for k in ("median", "min", "max")
        ),
        *((f"shape {k}", *(_axes(get(s, "shape", k)) for s in (src, tgt))) for k in ("min", "max")),
        (f"image mean / std ({raw_unit})", *(_stats(s["image_intensity"], ("mean", "std")) for s in (src, tgt))),
        (
            f"image p1 / p50 / p99 ({raw_unit})",
            *(_stats(s["image_intensity"], ("p1", "p50", "p99")) for s in (src, tgt)),
        ),
        ("crop mean / std", *(_stats(s["crop_intensity"], ("mean", "std")) for s in (src, tgt))),
        ("crop p1 / p50 / p99", *(_stats(s["crop_intensity"], ("p1", "p50", "p99")) for s in (src, tgt))),
    ]
    width = max(len(r[0]) for r in rows) + 2
    column = max(24, *(len(str(v)) + 2 for r in rows for v in r[1:]))
    lines = [
        f"domain shift: {src['name']} -> {tgt['name']} (splits: {', '.join(report['splits'])}; "
        f"intensities: median over cases; crop in {crop_unit})",
        f"{'':<{width}}{'source':<{column}}{'target':<{column}}",
        *(f"{label:<{width}}{a:<{column}}{b:<{column}}".rstrip() for label, a, b in rows),
    ]
    for what, side in (("source", src), ("target", tgt)):
        lines.extend(f"skipped {what} {s['case_id']}: {s['reason']}" for s in side["skipped"])
    shifts = report["feature_shift"]
    if shifts:
        name_width = max(8, *(len(n) for n in shifts)) + 2
        first = next(iter(shifts.values()))
        lines += [
            "",
            f"feature shift: squared MMD of classifier-input features, Gaussian kernel, median-heuristic bandwidth, "
            f"p-value from {first['n_permutations']} permutations",
            f"{'network':<{name_width}}{'MMD^2':>10}{'p-value':>10}{'bandwidth':>12}{'source':>8}{'target':>8}{'features':>10}",
        ]
        for name, s in shifts.items():
            lines.append(
                f"{name:<{name_width}}{s['mmd2']:>10.4f}{_num(s['p_value']):>10}{s['bandwidth']:>12.4g}"
                f"{s['n_source']:>8}{s['n_target']:>8}{s['feature_dim']:>10}"
            )
    return "\n".join(lines) + "\n"
