"""Cross-task transfer: the shipped LIDC nodule bundle adapted to AdrenalMNIST3D, against training from scratch.

    .venv/bin/python benchmarks/cross_task.py [--npz ../shared/data/medmnist/adrenalmnist3d.npz]
        [--bundle bundles/lidc_nodule_malignancy] [--work medtl-cross-task] [--draws 3]
        [--budgets 0.05 0.1 0.25 1.0] [--epochs 10] [--device auto] [--out cross_task.json] [--resume]

The source is a received bundle, opened as ``medtl adapt --source BUNDLE --class-map new`` opens it
(``medtl.adapt.source.open_source``): imported and verified, its own network (3D ResNet10 at width
0.25, CT + lesion mask as two channels) and its own preprocessing (lung window, 32 mm crop at 1 mm
around the mask), a new head for the target's classes. The target is another organ and task: adrenal
gland shapes from CT, normal vs hyperplasia, imported with ``medtl import medmnist --roi shape`` so
each case carries its shape as the lesion mask.

For each draw d (seed d) and budget b (a stratified fraction of the training images, drawn with seed
d), four ways to use the labels, each scored on the untouched test split (298 images):

- medtl recipe: ``FineTuneRecipe`` (AdaBN, head first, gradual unfreezing, L2-SP, WiSE-FT), its epoch
  count chosen by k-fold over the budget's cases plus the validation split;
- linear probe: the source backbone frozen (no AdaBN), only the new head trained, same selection;
- naive fine-tune: every layer at one rate from the first step, best epoch on the validation split;
- scratch: the same architecture freshly initialised (``Source.build``), same k-fold selection.

Prints AUC and accuracy as mean ± sd over draws with the first draw's bootstrap 95% CI, and each
method's paired AUC difference to scratch (mean ± sd over draws). ``--resume`` keeps the rows already
in ``--out`` and runs only the missing ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.utils import set_determinism
from real_data import subset  # this folder's label-budget draw: stratified by class, whole patients

from medtl.adapt.recipe import finetune, preprocess_splits, train
from medtl.adapt.source import open_source
from medtl.bundle.components import class_names
from medtl.fileio import atomic_write_json
from medtl.importers import import_medmnist
from medtl.loading import resolve_device
from medtl.manifest import load_manifest
from medtl.recipes import FineTuneRecipe, TrainRecipe
from medtl.stages import evaluate_items

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "medmnist" / "adrenalmnist3d.npz"
LIDC = ROOT / "bundles" / "lidc_nodule_malignancy"
METHODS = ("medtl recipe", "linear probe", "naive fine-tune", "scratch")
RUN_SETTINGS = ("epochs", "folds", "budgets", "bundle")


def recipes(epochs: int, folds: int) -> dict[str, FineTuneRecipe]:
    """The three ways to fine-tune the source network (scratch trains with ``TrainRecipe``)."""
    return {
        "medtl recipe": FineTuneRecipe(epochs=epochs, folds=folds),
        "linear probe": FineTuneRecipe(epochs=epochs, folds=folds, head_epochs=epochs, adabn=False, wise=1.0),
        "naive fine-tune": FineTuneRecipe.naive(epochs=epochs),
    }


def summary(rows: list[dict], draws: int) -> list[dict]:
    """Per budget and method: mean ± sd over draws, the paired AUC difference to scratch, draw 0's CI."""
    scratch = {(r["budget"], r["draw"]): r["auc"] for r in rows if r["method"] == "scratch"}

    def sd(a: np.ndarray) -> float:
        return float(a.std(ddof=1)) if len(a) > 1 else 0.0

    out = []
    for budget in sorted({r["budget"] for r in rows}):
        for method in METHODS:
            group = sorted(
                (r for r in rows if r["budget"] == budget and r["method"] == method), key=lambda r: r["draw"]
            )
            if not group:
                continue
            auc, acc = np.array([r["auc"] for r in group]), np.array([r["accuracy"] for r in group])
            diff = np.array([r["auc"] - scratch[(budget, r["draw"])] for r in group if (budget, r["draw"]) in scratch])
            lo, hi = group[0]["auc_ci95"]
            out.append(
                {
                    "budget": f"{budget:.0%}",
                    "labels": group[0]["labels"],
                    "method": method,
                    "auc": f"{auc.mean():.3f} ± {sd(auc):.3f}",
                    "accuracy": f"{acc.mean():.3f} ± {sd(acc):.3f}",
                    "gap": "" if method == "scratch" or not len(diff) else f"{diff.mean():+.3f} ± {sd(diff):.3f}",
                    "draw0": f"{group[0]['auc']:.3f} [{lo:.3f}, {hi:.3f}]",
                    "note": f"{len(group)} of {draws} draws" if len(group) < draws else "",
                }
            )
    return out


def table(rows: list[dict], draws: int) -> str:
    """``summary`` as aligned text."""
    lines = [f"{'budget':>7}{'labels':>8}  {'method':<16}{'AUC':>15}{'accuracy':>16}{'AUC - scratch':>17}  draw 0 AUC"]
    for r in summary(rows, draws):
        lines.append(
            f"{r['budget']:>7}{r['labels']:>8}  {r['method']:<16}{r['auc']:>15}{r['accuracy']:>16}{r['gap']:>17}"
            f"  {r['draw0']}" + (f"  ({r['note']})" if r["note"] else "")
        )
    return "\n".join(lines)


def markdown(rows: list[dict], draws: int) -> str:
    """``summary`` as the rows of docs/benchmarks.md's table."""
    lines = []
    for r in summary(rows, draws):
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(
            f"| {r['budget']} | {r['labels']} | {r['method']} | {r['auc']} | {r['accuracy']} | {r['gap'] or '-'} | "
            f"{r['draw0']}{note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", default=str(SHARED), help="the AdrenalMNIST3D file (adrenalmnist3d.npz)")
    parser.add_argument("--bundle", default=str(LIDC), help="the source bundle (folder or zip)")
    parser.add_argument("--classes", help="class names of the npz's labels, comma-separated (default: MedMNIST's)")
    parser.add_argument("--work", default="medtl-cross-task", help="where the imported cases and the source copy go")
    parser.add_argument("--epochs", type=int, default=10, help="most epochs of every method")
    parser.add_argument("--folds", type=int, default=3, help="folds of the k-fold selection")
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.25, 1.0], help="fractions of the training labels"
    )
    parser.add_argument("--draws", type=int, default=3, help="draws (seeds 0..N-1), a label subset per budget each")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out and run only the rest")
    parser.add_argument("--markdown", action="store_true", help="also print the table as docs/benchmarks.md's rows")
    args = parser.parse_args()
    if not Path(args.npz).is_file():
        raise SystemExit(f"AdrenalMNIST3D not found at {args.npz}: pass --npz (see ../shared/data/README.md)")
    device = resolve_device(args.device)
    work = Path(args.work)
    classes = args.classes.split(",") if args.classes else None
    summary = import_medmnist(args.npz, work / "adrenal", classes=classes, roi="shape", progress=False)
    manifest_path = work / "adrenal" / summary["manifest"]
    names = class_names(manifest_path)
    source = open_source(args.bundle, target_classes=names, workdir=work, class_map="new")
    items = preprocess_splits(
        load_manifest(manifest_path), work / "adrenal", ("train", "val", "test"), source.preprocessing
    )
    print(
        f"source {source.label}: {sum(p.numel() for p in source.network.parameters()) / 1e6:.2f}M parameters, "
        f"inputs {tuple(items['train'][0]['image'].shape)}; " + ", ".join(f"{k}: {len(v)}" for k, v in items.items())
    )
    test = items["test"]
    settings = {k: vars(args)[k] for k in RUN_SETTINGS} | {"bundle": Path(args.bundle).name}  # no local paths
    rows: list[dict] = []
    if args.resume and args.out and Path(args.out).is_file():
        previous = json.loads(Path(args.out).read_text(encoding="utf-8"))
        if previous["settings"] != settings:
            raise SystemExit(f"{args.out} was run with other settings: {previous['settings']}")
        rows = previous["rows"]
        print(f"resuming: {len(rows)} rows already in {args.out}")

    def record(
        method: str, budget: float, draw: int, network: torch.nn.Module, seconds: float, **extra: object
    ) -> None:
        m = evaluate_items(network, test, seed=draw, class_names=names, device=device)["metrics"]
        rows.append(
            {
                "method": method,
                "budget": budget,
                "draw": draw,
                "auc": m["auc"]["value"],
                "auc_ci95": m["auc"]["ci95"],
                "accuracy": m["accuracy"]["value"],
                "seconds": round(seconds, 1),
                **extra,
            }
        )
        print(f"draw {draw} {method} ({budget:.0%}): AUC {m['auc']['value']:.3f} {m['auc']['ci95']}", flush=True)
        if args.out:
            atomic_write_json(args.out, {"settings": settings, "rows": rows})

    ways = recipes(args.epochs, args.folds)
    for budget in args.budgets:  # every draw of the small budgets first: they are the question
        for draw in range(args.draws):
            labeled = subset(items["train"], budget, seed=draw)
            chosen = {i["case_id"] for i in labeled}
            unlabeled = [i for i in items["train"] if i["case_id"] not in chosen]  # AdaBN sees their scans only
            labels = len(labeled) + len(items["val"])
            done = {r["method"] for r in rows if r["budget"] == budget and r["draw"] == draw}
            for method in [m for m in args.methods if m not in done]:
                set_determinism(draw)
                t = time.perf_counter()
                if method == "scratch":
                    network = source.build()
                    fitted = train(
                        network,
                        labeled,
                        items["val"],
                        TrainRecipe(epochs=args.epochs, batch_size=8, selection="kfold", folds=args.folds),
                        desc=f"scratch {budget:g}",
                        device=device,
                        seed=draw,
                    )
                else:
                    network = copy.deepcopy(source.network)
                    fitted = finetune(
                        network,
                        labeled,
                        items["val"],
                        ways[method],
                        num_classes=len(names),
                        unlabeled_items=unlabeled,
                        desc=f"{method} {budget:g}",
                        device=device,
                        seed=draw,
                        new_head=source.new_head,
                    )
                record(
                    method, budget, draw, network, time.perf_counter() - t, labels=labels, epochs=fitted["best_epoch"]
                )
    print(f"\nAdrenalMNIST3D test split ({len(test)} images); mean ± sd over {args.draws} draws")
    print(table(rows, args.draws))
    if args.markdown:
        print(markdown(rows, args.draws))
    if args.out:
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
