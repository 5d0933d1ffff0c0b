"""Which image model ranks LIDC-IDRI nodules best: an ablation with several seeds, against nodule diameter.

    .venv/bin/python benchmarks/lidc_model.py [--lidc ../shared/data/lidc_nodule_vois] [--work medtl-lidc]
        [--seeds 3] [--epochs 15] [--variants baseline mask mask48 mask48-strong] [--selection val|kfold]
        [--device auto] [--out lidc_model.json]
        [--export bundles/lidc_nodule_malignancy --export-variant mask]

Every variant trains the same 3D ResNet10 (width 0.25) from scratch on the pooled training splits of
both LIDC sites (thin- and thick-slice scans; ``medtl import lidc``'s patient-level split), keeps the
epoch with the best AUC on the pooled validation splits (``--selection kfold``: the epoch count with
the best mean AUC over patient-level folds of train+val, then trained on both), and is scored once on
the pooled test splits (patients never used for training or selection). Per variant: test AUC mean ± sd over ``--seeds``
seeds, the same with flip test-time augmentation (``medtl.inferers.FlipAveraged``), and the
ensemble of the seeds' TTA probabilities with a patient-level bootstrap 95% CI. The diameter-only
score on the same test nodules is the baseline an image model has to beat.

Variants (``VARIANTS``) change one thing at a time: the lesion mask as a second input channel, a
48 mm field of view instead of 32 mm (the largest nodules are 27 mm across), and ``strong``
augmentation (flips of every axis, quarter turns, wider rotations and zooms).

``--export`` writes the ``--export-variant`` model of the seed with the best validation AUC (chosen
on validation, never on test) as the ``lidc_nodule_malignancy`` bundle, its metadata holding the
pooled test metrics with flip TTA (as its ``inference.json`` runs) and the diameter-only AUC on the
same nodules.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import set_determinism

from medtl.adapt.recipe import loader, preprocess_splits, train
from medtl.evaluate import classification_metrics, collect_predictions
from medtl.fileio import atomic_write_json
from medtl.importers import LIDC_CLASSES, import_lidc_vois
from medtl.inferers import FlipAveraged
from medtl.loading import resolve_device
from medtl.manifest import load_manifest
from medtl.networks import resnet
from medtl.recipes import SELECTIONS, TrainRecipe
from medtl.stages import evaluate_items
from medtl.transforms import preprocessing

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc_nodule_vois"

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"mask_channel": False, "crop_mm": 32, "augment": "light"},  # the 0.1.x bundle's inputs
    "mask": {"mask_channel": True, "crop_mm": 32, "augment": "light"},
    "mask48": {"mask_channel": True, "crop_mm": 48, "augment": "light"},
    "mask48-strong": {"mask_channel": True, "crop_mm": 48, "augment": "strong"},
    "image48-strong": {"mask_channel": False, "crop_mm": 48, "augment": "strong"},
}

TRAINED_ON = {
    "val": "training splits (best epoch on the validation splits)",
    "kfold": "training and validation splits (epoch count by patient-level k-fold over them)",
}


def pooled_items(work: Path, summary: dict, *, mask_channel: bool, crop_mm: float) -> dict[str, list[dict]]:
    """Train, val and test of both sites together, preprocessed once for one input setting."""
    pre = preprocessing(modality="ct", mask_channel=mask_channel, crop_mm=(crop_mm,) * 3)
    items: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for site in ("thin", "thick"):
        manifest = load_manifest(work / summary["sites"][site]["manifest"])
        for split, cases in preprocess_splits(manifest, work, tuple(items), pre).items():
            items[split] += cases
    return items


def probabilities(network: torch.nn.Module, items: list[dict], *, tta: bool, device: torch.device) -> np.ndarray:
    model = FlipAveraged(network) if tta else network
    return collect_predictions(model, loader(items, batch_size=32, device=device), device)[1]


def scored(y: np.ndarray, probs: np.ndarray, patients: list[str], seed: int) -> dict[str, Any]:
    m = classification_metrics(y, probs, class_names=list(LIDC_CLASSES), patient_ids=patients, seed=seed)["metrics"]
    return {"auc": m["auc"]["value"], "auc_ci95": m["auc"]["ci95"], "accuracy": m["accuracy"]["value"]}


def diameter_scores(work: Path, items: list[dict]) -> np.ndarray:
    """Diameter as a two-class probability (min-max scaled; AUC only uses the ranking)."""
    import csv

    with (work / "baseline.csv").open(encoding="utf-8") as fh:
        diameter = {(r["site"], r["case_id"]): float(r["diameter_mm"]) for r in csv.DictReader(fh)}
    d = np.array([diameter[(i["site"], i["case_id"])] for i in items])
    s = (d - d.min()) / (d.max() - d.min())
    return np.stack([1 - s, s], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lidc", default=str(SHARED), help="the lidc_nodule_vois folder")
    parser.add_argument("--work", default="medtl-lidc", help="where the imported NIfTI files and manifests go")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--widen", type=float, default=0.25)
    parser.add_argument(
        "--selection",
        default="val",
        choices=SELECTIONS,
        help="val: best epoch on the pooled val split; kfold: epoch count by 3-fold selection on train+val, "
        "then trained on both",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--export", help="write the chosen model as the lidc_nodule_malignancy bundle here")
    parser.add_argument(
        "--export-variant",
        default="mask",
        choices=list(VARIANTS),
        help="the variant to export (default: the one with the best pooled validation AUC in docs/benchmarks.md)",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    if not Path(args.lidc).is_dir():
        raise SystemExit(f"LIDC VOIs not found at {args.lidc}: pass --lidc (see ../shared/data/README.md)")
    work = Path(args.work)
    summary = import_lidc_vois(args.lidc, work)
    results: dict[str, Any] = {"args": vars(args), "variants": {}}
    test = None
    for name in args.variants:
        v = VARIANTS[name]
        items = pooled_items(work, summary, mask_channel=v["mask_channel"], crop_mm=v["crop_mm"])
        test = items["test"]
        y = np.array([i["label"] for i in test])
        patients = [i["patient"] for i in test]
        if "diameter only" not in results:
            results["diameter only"] = scored(y, diameter_scores(work, test), patients, 0)
            print(f"pooled split: train {len(items['train'])}, val {len(items['val'])}, test {len(test)} nodules")
            print(
                f"diameter only: test AUC {results['diameter only']['auc']:.3f} {results['diameter only']['auc_ci95']}"
            )
        runs, tta_probs, kept = [], [], None
        for seed in range(args.seeds):
            set_determinism(seed)
            network, t = (
                resnet(args.widen, len(LIDC_CLASSES), in_channels=2 if v["mask_channel"] else 1),
                time.perf_counter(),
            )
            recipe = TrainRecipe(epochs=args.epochs, augment=v["augment"], selection=args.selection)
            fitted = train(
                network,
                items["train"],
                items["val"],
                recipe,
                desc=f"{name} seed {seed}",
                device=device,
                seed=seed,
            )
            plain, flipped = (probabilities(network, test, tta=tta, device=device) for tta in (False, True))
            tta_probs.append(flipped)
            run = {
                "seed": seed,
                "best_epoch": fitted["best_epoch"],
                "best_val_auc": fitted["best_val_auc"],
                "seconds": round(time.perf_counter() - t, 1),
                "test": scored(y, plain, patients, seed),
                "test_tta": scored(y, flipped, patients, seed),
            }
            runs.append(run)
            if args.export and name == args.export_variant and (kept is None or run["best_val_auc"] > kept[0]):
                kept = (run["best_val_auc"], network, seed, recipe, items)
            print(
                f"{name} seed {seed}: val {run['best_val_auc']:.3f} (epoch {run['best_epoch']}), test AUC "
                f"{run['test']['auc']:.3f}, with TTA {run['test_tta']['auc']:.3f} ({run['seconds']:.0f} s)",
                flush=True,
            )
        ensemble = scored(y, np.mean(tta_probs, axis=0), patients, 0)
        results["variants"][name] = {"settings": v, "runs": runs, "ensemble_tta": ensemble}
        if args.out:
            atomic_write_json(args.out, results)
        if kept is not None:
            results["exported"] = export(args, work, summary, kept)

    base = results["diameter only"]
    print(f"\npooled LIDC test split: {len(test)} nodules of unseen patients; mean ± sd over {args.seeds} seeds")
    print(f"{'variant':<16}{'AUC':>16}{'AUC, flip TTA':>16}{'ensemble+TTA [95% CI]':>28}")
    print(
        f"{'diameter only':<16}{'':>16}{'':>16}{base['auc']:>10.3f} [{base['auc_ci95'][0]:.3f}, "
        f"{base['auc_ci95'][1]:.3f}]"
    )
    for name, r in results["variants"].items():
        a = np.array([run["test"]["auc"] for run in r["runs"]])
        b = np.array([run["test_tta"]["auc"] for run in r["runs"]])
        e = r["ensemble_tta"]
        print(
            f"{name:<16}{a.mean():>9.3f} ± {a.std(ddof=1) if len(a) > 1 else 0:.3f}"
            f"{b.mean():>9.3f} ± {b.std(ddof=1) if len(b) > 1 else 0:.3f}"
            f"{e['auc']:>10.3f} [{e['auc_ci95'][0]:.3f}, {e['auc_ci95'][1]:.3f}]"
        )
    if args.out:
        atomic_write_json(args.out, results)
        print(f"-> {args.out}")


def export(args: argparse.Namespace, work: Path, summary: dict, kept: tuple) -> dict[str, Any]:
    """The kept model as the ``lidc_nodule_malignancy`` bundle, scored as its inference.json scores (flip TTA)."""
    from dataclasses import asdict

    from medtl.bundle.export import eval_metrics, export_bundle

    val_auc, network, seed, recipe, items = kept
    test = items["test"]
    result = evaluate_items(FlipAveraged(network), test, seed=0, class_names=LIDC_CLASSES)
    y = np.array([i["label"] for i in test])
    size = classification_metrics(
        y, diameter_scores(work, test), class_names=list(LIDC_CLASSES), patient_ids=[i["patient"] for i in test], seed=0
    )["metrics"]["auc"]
    metrics = eval_metrics({"pooled test": result}) | {
        "pooled_test_diameter_only_auc": round(size["value"], 4),
        "pooled_test_diameter_only_auc_ci95": [round(v, 4) for v in size["ci95"]],
    }
    manifests = [load_manifest(work / summary["sites"][site]["manifest"]) for site in ("thin", "thick")]
    info = export_bundle(
        network,
        args.export,
        template="lidc_nodule_malignancy",
        manifests=manifests,
        metadata={"eval_metrics": metrics},
        bump="minor",
        settings={
            "crop_mm": [VARIANTS[args.export_variant]["crop_mm"]] * 3,
            "augment": VARIANTS[args.export_variant]["augment"],
        },
        recipe={
            "training": asdict(recipe),
            "inputs": VARIANTS[args.export_variant],
            "selection": (
                f"best pooled {'validation' if recipe.selection == 'val' else f'{recipe.folds}-fold mean validation'}"
                f" AUC {val_auc:.3f} of {args.seeds} seeds (seed {seed}); flip TTA at inference"
            ),
        },
        changelog=(
            f"{args.export_variant} (lesion mask as a second input channel, {VARIANTS[args.export_variant]['crop_mm']}"
            f" mm field of view, {VARIANTS[args.export_variant]['augment']} augmentation, flip TTA) trained on "
            f"both LIDC sites' {TRAINED_ON[recipe.selection]}; pooled test AUC "
            f"{result['metrics']['auc']['value']:.3f} against "
            f"diameter-only {size['value']:.3f}; benchmarks/lidc_model.py seed {seed}"
        ),
    )
    m = result["metrics"]["auc"]
    print(
        f"exported {info['path']} {info['version']}: pooled test AUC {m['value']:.3f} {m['ci95']} with TTA (diameter "
        f"only {size['value']:.3f} {size['ci95']}); TorchScript max abs diff {info['torchscript_max_abs_diff']:.1e}"
    )
    return {
        "version": info["version"],
        "seed": seed,
        "val_auc": val_auc,
        "test_tta": {"auc": m["value"], "auc_ci95": m["ci95"]},
    }


if __name__ == "__main__":
    main()
