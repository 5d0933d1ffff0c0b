"""Real transfer on LIDC-IDRI nodules: source = thin-slice scans, target = thick-slice scans, in one run.

    .venv/bin/python benchmarks/real_data.py [--lidc ../shared/data/lidc_nodule_vois] [--work medtl-lidc]
        [--draws 3] [--budgets 0.1 0.25 1.0] [--export bundles/lidc_nodule_malignancy]

Imports the nodule VOIs (``medtl.importers.import_lidc_vois``), trains a 0.9M-parameter 3D ResNet10
(width 0.25) on the thin-slice site, then on the thick-slice test split (patients never used for
training or selection) reports: source-only, AdaBN, and for each budget of target training labels
(a stratified random fraction of thick-slice training patients, ``--draws`` draws) medtl's
fine-tuning recipe, naive full fine-tuning and training from scratch, plus a student (width 0.125)
distilled from the best fine-tuned model on every thick-slice training scan. Beside them the
diameter-only baseline: the nodule diameter alone as the score. Model selection uses the full
thick-slice validation split. AUC and accuracy with patient-level bootstrap 95% CIs; for several
draws the mean and the range over draws.
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from monai.utils import set_determinism

from medtl.adapt.adabn import adabn
from medtl.adapt.recipe import DistillRecipe, FineTuneRecipe, TrainRecipe, distill, finetune, loader, preprocess_splits, train
from medtl.demo import evaluate_items, resnet
from medtl.evaluate import classification_metrics
from medtl.fileio import atomic_write_json
from medtl.importers import LIDC_CLASSES, import_lidc_vois
from medtl.manifest import load_manifest
from medtl.transforms import preprocessing

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc_nodule_vois"


def subset(items: list[dict], fraction: float, seed: int) -> list[dict]:
    """A stratified random fraction of the patients (all their nodules), at least one per class."""
    if fraction >= 1:
        return list(items)
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for label in sorted({i["label"] for i in items}):
        patients = sorted({i["patient"] for i in items if i["label"] == label})
        k = max(1, round(fraction * len(patients)))
        chosen.update(rng.choice(patients, size=k, replace=False).tolist())
    return [i for i in items if i["patient"] in chosen]


def diameter_baseline(work: Path, items: list[dict], seed: int) -> dict:
    """Metrics of the nodule diameter as the malignancy score (scaled to [0, 1]; AUC is rank-based)."""
    with (work / "baseline.csv").open(encoding="utf-8") as fh:
        diameter = {(r["site"], r["case_id"]): float(r["diameter_mm"]) for r in csv.DictReader(fh)}
    d = np.array([diameter[(i["site"], i["case_id"])] for i in items])
    score = (d - d.min()) / (d.max() - d.min())
    return classification_metrics([i["label"] for i in items], np.stack([1 - score, score], axis=1), class_names=list(LIDC_CLASSES),
                                  patient_ids=[i["patient"] for i in items], seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lidc", default=str(SHARED), help="the lidc_nodule_vois folder")
    parser.add_argument("--work", default="medtl-lidc", help="where the imported NIfTI files and manifests go")
    parser.add_argument("--source-epochs", type=int, default=30)
    parser.add_argument("--target-epochs", type=int, default=30)
    parser.add_argument("--student-epochs", type=int, default=30)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 1.0], help="fractions of target training labels")
    parser.add_argument("--draws", type=int, default=3, help="random label subsets per budget below 100%%")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--widen", type=float, default=0.25, help="ResNet10 width (0.25: 0.9M parameters)")
    parser.add_argument("--student-widen", type=float, default=0.125)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--export", help="write the fine-tuned model with the best validation AUC as the lidc_nodule_malignancy bundle here")
    args = parser.parse_args()
    if not Path(args.lidc).is_dir():
        raise SystemExit(f"LIDC VOIs not found at {args.lidc}: pass --lidc (see ../shared/data/README.md)")
    set_determinism(args.seed)
    work = Path(args.work)
    summary = import_lidc_vois(args.lidc, work, seed=args.seed)
    pre = preprocessing(modality="ct")
    items = {}
    for site in ("thin", "thick"):
        manifest = load_manifest(work / summary["sites"][site]["manifest"])
        items |= preprocess_splits(manifest, work, ("train", "val", "test"), pre, prefix=f"{site} ")
    print(", ".join(f"{k}: {len(v)}" for k, v in items.items()))
    test = items["thick test"]
    rows: list[dict] = []

    def record(stage: str, budget: float | None, network: torch.nn.Module | None, seconds: float, draw: int = 0,
               result: dict | None = None) -> dict:
        result = result or evaluate_items(network, test, seed=args.seed, class_names=LIDC_CLASSES)
        m = result["metrics"]
        row = {"stage": stage, "budget": budget, "draw": draw, "auc": m["auc"]["value"], "auc_ci95": m["auc"]["ci95"],
               "accuracy": m["accuracy"]["value"], "accuracy_ci95": m["accuracy"]["ci95"], "seconds": round(seconds, 1),
               "params": None if network is None else sum(p.numel() for p in network.parameters())}
        rows.append(row)
        print(f"{stage} (labels {budget}, draw {draw}): AUC {row['auc']:.3f} {row['auc_ci95']}, accuracy {row['accuracy']:.3f}")
        return row

    record("diameter only", None, None, 0.0, result=diameter_baseline(work, test, args.seed))
    source, t = resnet(args.widen), time.perf_counter()
    train(source, items["thin train"], items["thin val"], TrainRecipe(epochs=args.source_epochs), desc="source (thin)")
    record("source-only", 0.0, source, time.perf_counter() - t)
    adapted, t = copy.deepcopy(source), time.perf_counter()
    adabn(adapted, loader(items["thick train"], batch_size=16))
    record("AdaBN", 0.0, adapted, time.perf_counter() - t)

    best: tuple[float, torch.nn.Module, float] | None = None
    for budget in args.budgets:
        for draw in range(1 if budget >= 1 else args.draws):
            labeled = subset(items["thick train"], budget, seed=args.seed + draw)
            chosen = {i["case_id"] for i in labeled}
            unlabeled = [i for i in items["thick train"] if i["case_id"] not in chosen]  # AdaBN sees their scans, not labels
            for stage, recipe in (("medtl fine-tune", FineTuneRecipe(epochs=args.target_epochs)),
                                  ("naive fine-tune", FineTuneRecipe.naive(epochs=args.target_epochs))):
                set_determinism(args.seed + draw)
                model, t = copy.deepcopy(source), time.perf_counter()
                fitted = finetune(model, labeled, items["thick val"], recipe, unlabeled_items=unlabeled, desc=f"{stage} {budget:g}")
                record(stage, budget, model, time.perf_counter() - t, draw)
                if stage == "medtl fine-tune" and (best is None or fitted["best_val_auc"] > best[0]):
                    best = (fitted["best_val_auc"], model, budget)
            set_determinism(args.seed + draw)
            scratch, t = resnet(args.widen), time.perf_counter()
            train(scratch, labeled, items["thick val"], TrainRecipe(epochs=args.target_epochs, batch_size=8, patience=10),
                  desc=f"scratch {budget:g}")
            record("scratch", budget, scratch, time.perf_counter() - t, draw)

    set_determinism(args.seed)
    student, t = resnet(args.student_widen), time.perf_counter()
    distilled = distill(best[1], student, [*items["thick train"], *items["thin train"]], [], items["thick val"],
                        DistillRecipe(epochs=args.student_epochs), class_names=LIDC_CLASSES, desc="student")
    record("student (distilled)", 1.0, student, time.perf_counter() - t)

    print(f"\nthick-slice test split: {len(test)} nodules of unseen patients; mean [min, max] over draws")
    print(f"{'stage':<22}{'labels':>7}{'AUC':>22}{'accuracy':>22}{'draws':>6}")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["stage"], row["budget"]), []).append(row)
    for (stage, budget), group in groups.items():
        auc, acc = np.array([r["auc"] for r in group]), np.array([r["accuracy"] for r in group])
        label = "-" if budget is None else f"{budget:.0%}"
        if len(group) == 1:
            lo, hi = group[0]["auc_ci95"]
            cells = f"{auc[0]:.3f} [{lo:.2f}, {hi:.2f}]", f"{acc[0]:.3f}" if budget is not None else "-"
        else:
            cells = f"{auc.mean():.3f} [{auc.min():.2f}, {auc.max():.2f}]", f"{acc.mean():.3f} [{acc.min():.2f}, {acc.max():.2f}]"
        print(f"{stage:<22}{label:>7}{cells[0]:>22}{cells[1]:>22}{len(group):>6}")
    print(f"student pseudo-labels: {distilled['pseudo_labels']['pseudo_labels_kept']} (every training scan is labeled here)")
    if args.export:
        from medtl.bundle.export import export_bundle

        chosen = {"thick test": evaluate_items(best[1], test, seed=args.seed, class_names=LIDC_CLASSES)}
        manifests = [load_manifest(work / summary["sites"][site]["manifest"]) for site in ("thin", "thick")]
        recipe = {"source": f"thin-slice training split, {TrainRecipe(epochs=args.source_epochs)}",
                  "fine-tuning": asdict(FineTuneRecipe(epochs=args.target_epochs)), "thick-slice labels used": f"{best[2]:.0%}"}
        info = export_bundle(best[1], args.export, template="lidc_nodule_malignancy", metrics=chosen, manifests=manifests, recipe=recipe,
                             changelog=f"adapted from thin- to thick-slice LIDC nodules with {best[2]:.0%} of the thick-slice training labels "
                                       f"(best validation AUC {best[0]:.3f}); benchmarks/real_data.py, seed {args.seed}")
        print(f"exported {info['path']} {info['version']} (TorchScript max abs diff {info['torchscript_max_abs_diff']:.1e})")
    if args.out:
        atomic_write_json(args.out, {"args": vars(args), "rows": rows, "import": {k: v for k, v in summary.items() if k != "files"}})
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
