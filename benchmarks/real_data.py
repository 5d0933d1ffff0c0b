"""Real transfer on LIDC-IDRI nodules: source = thin-slice scans, target = thick-slice scans, over several draws.

    .venv/bin/python benchmarks/real_data.py [--lidc ../shared/data/lidc_nodule_vois] [--work medtl-lidc]
        [--variant mask48-strong] [--draws 3] [--budgets 0.05 0.1 0.25 1.0] [--device auto] [--out real_data.json]

Imports the nodule VOIs (``medtl.importers.import_lidc_vois``) and preprocesses them with the input
setting ``--variant`` of ``benchmarks/lidc_model.py`` (by default the one that ablation chose: the
lesion mask as a second channel, a 48 mm field of view, strong augmentation). Each draw d (seed d)
trains its own 0.9M-parameter 3D ResNet10 on the thin-slice site, then on the thick-slice test
split (patients never used for training or selection) reports source-only, AdaBN and, for each
budget of target training labels (a stratified random fraction of thick-slice training patients,
drawn with seed d), three ways to use them:

- medtl fine-tune: ``FineTuneRecipe`` (AdaBN, head first, gradual unfreezing, L2-SP, WiSE-FT weight
  averaging; ``--adabn judged --wise 1`` is the recipe before those defaults), its epoch count chosen by patient-level
  k-fold over the budget's cases plus the thick-slice validation split, then trained on all of them;
- naive fine-tune: every layer at one rate, best epoch on the validation split;
- scratch: a new network on the same labeled cases, its epoch count chosen by the same k-fold.

``--resume`` keeps the rows already in ``--out`` and runs only the missing ones; ``--reuse`` takes
every stage but medtl's fine-tuning from a run with another ``--adabn``/``--wise``, so comparing two
recipes costs only the source models and that stage (``--stages`` limits what runs). When the
retrained source model is not that run's (another thread count or library build rounds
differently), the draw's source-only, AdaBN and naive fine-tune rows are measured again, since they
are paired with the source model.

Beside them the diameter-only baseline: the nodule diameter alone as the score. AUC and accuracy as
mean ± sd over draws, with the first draw's patient-bootstrap 95% CI.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from lidc_model import SHARED, VARIANTS, diameter_scores  # this folder's ablation: one definition of the inputs
from monai.utils import set_determinism

from medtl.adapt.adabn import adabn
from medtl.adapt.recipe import finetune, loader, preprocess_splits, train
from medtl.evaluate import classification_metrics
from medtl.fileio import atomic_write_json
from medtl.importers import LIDC_CLASSES, import_lidc_vois
from medtl.loading import resolve_device
from medtl.manifest import load_manifest
from medtl.networks import resnet
from medtl.recipes import FineTuneRecipe, TrainRecipe
from medtl.stages import evaluate_items
from medtl.transforms import preprocessing


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


RUN_SETTINGS = ("variant", "source_epochs", "target_epochs", "folds", "budgets", "widen", "adabn", "wise")
RECIPE_SETTINGS = ("adabn", "wise")  # only the "medtl fine-tune" stage depends on these
TARGET_STAGES = ("medtl fine-tune", "naive fine-tune", "scratch")  # run at each budget
PAIRED = ("source-only", "AdaBN", "naive fine-tune")  # rows that belong to one source model (reused only with it)
LEGACY = {"adabn": "judged", "wise": 1.0}  # what runs written before these options existed used


def previous_rows(path: str, settings: dict, *, reuse: bool = False) -> list[dict]:
    """The rows of a previous run with the same settings; with ``reuse``, a run that differs only in
    the medtl recipe (``RECIPE_SETTINGS``), keeping the rows of the stages that do not depend on it."""
    previous = json.loads(Path(path).read_text(encoding="utf-8"))
    changed = [k for k in RUN_SETTINGS if previous["args"].get(k, LEGACY.get(k)) != settings[k]]
    if reuse:
        changed = [k for k in changed if k not in RECIPE_SETTINGS]
    if changed:
        raise SystemExit(f"{path} was run with other settings ({', '.join(changed)}): cannot take rows from it")
    if not reuse:
        return previous["rows"]
    return [r | {"reused": True} for r in previous["rows"] if r["stage"] != "medtl fine-tune"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lidc", default=str(SHARED), help="the lidc_nodule_vois folder")
    parser.add_argument("--work", default="medtl-lidc", help="where the imported NIfTI files and manifests go")
    parser.add_argument(
        "--variant", default="mask48-strong", choices=list(VARIANTS), help="input setting (benchmarks/lidc_model.py)"
    )
    parser.add_argument("--source-epochs", type=int, default=20)
    parser.add_argument("--target-epochs", type=int, default=15)
    parser.add_argument("--folds", type=int, default=3, help="folds of the k-fold selection")
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.25, 1.0], help="fractions of target training labels"
    )
    parser.add_argument(
        "--draws", type=int, default=3, help="draws (seeds 0..N-1): a source model and a label subset per budget each"
    )
    parser.add_argument("--widen", type=float, default=0.25, help="ResNet10 width (0.25: 0.9M parameters)")
    parser.add_argument(
        "--adabn",
        choices=("always", "judged"),
        default="always",
        help="medtl fine-tune: AdaBN always, or kept only when the labeled cases agree (FineTuneRecipe.adabn_judged)",
    )
    parser.add_argument(
        "--wise",
        type=float,
        default=FineTuneRecipe.wise,
        help="medtl fine-tune: weight of the fine-tuned weights in the WiSE-FT average (1: none)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=TARGET_STAGES,
        default=list(TARGET_STAGES),
        help="the target stages to run at each budget",
    )
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out and run only the rest")
    parser.add_argument(
        "--reuse",
        metavar="JSON",
        help="take the stages that do not depend on --adabn/--wise from this earlier run (same draws and "
        "settings otherwise) and run only medtl's fine-tuning",
    )
    args = parser.parse_args()
    if not Path(args.lidc).is_dir():
        raise SystemExit(f"LIDC VOIs not found at {args.lidc}: pass --lidc (see ../shared/data/README.md)")
    device = resolve_device(args.device)
    variant = VARIANTS[args.variant]
    in_channels = 2 if variant["mask_channel"] else 1
    work = Path(args.work)
    summary = import_lidc_vois(args.lidc, work, progress=False)
    pre = preprocessing(modality="ct", mask_channel=variant["mask_channel"], crop_mm=(variant["crop_mm"],) * 3)
    items = {}
    for site in ("thin", "thick"):
        manifest = load_manifest(work / summary["sites"][site]["manifest"])
        items |= preprocess_splits(manifest, work, ("train", "val", "test"), pre, prefix=f"{site} ")
    print(", ".join(f"{k}: {len(v)}" for k, v in items.items()))
    test = items["thick test"]
    rows: list[dict] = []
    if args.resume and args.out and Path(args.out).is_file():
        rows = previous_rows(args.out, vars(args))
        print(f"resuming: {len(rows)} rows already in {args.out}")
    if args.reuse:
        kept = {(r["stage"], r["budget"], r["draw"]) for r in rows}
        # a draw whose source model this run measured itself (it did not reproduce the reused run's)
        # takes none of the reused rows paired with the other model
        own_source = {r["draw"] for r in rows if r["stage"] == "source-only" and not r.get("reused")}
        reused = [
            r
            for r in previous_rows(args.reuse, vars(args), reuse=True)
            if (r["stage"], r["budget"], r["draw"]) not in kept
            and not (r["draw"] in own_source and r["stage"] in PAIRED)
        ]
        rows += reused
        print(f"reusing {len(reused)} rows of {args.reuse}")

    def record(
        stage: str,
        budget: float | None,
        draw: int,
        network: torch.nn.Module | None,
        seconds: float,
        labels: int,
        result: dict | None = None,
        **extra: object,
    ) -> None:
        result = result or evaluate_items(network, test, seed=draw, class_names=LIDC_CLASSES, device=device)
        m = result["metrics"]
        rows.append(
            {
                "stage": stage,
                "budget": budget,
                "draw": draw,
                "labels": labels,
                "auc": m["auc"]["value"],
                "auc_ci95": m["auc"]["ci95"],
                "accuracy": m["accuracy"]["value"],
                "seconds": round(seconds, 1),
                **extra,
            }
        )
        print(
            f"draw {draw} {stage} (labels {budget}): AUC {m['auc']['value']:.3f} {m['auc']['ci95']}, "
            f"accuracy {m['accuracy']['value']:.3f}",
            flush=True,
        )
        if args.out:
            atomic_write_json(args.out, {"args": vars(args), "rows": rows})

    y = np.array([i["label"] for i in test])
    diameter = classification_metrics(
        y, diameter_scores(work, test), class_names=list(LIDC_CLASSES), patient_ids=[i["patient"] for i in test], seed=0
    )
    if not any(r["stage"] == "diameter only" for r in rows):
        record("diameter only", None, 0, None, 0.0, 0, result=diameter)
    n_thin = len(items["thin train"]) + len(items["thin val"])
    for draw in range(args.draws):
        have = {(r["stage"], r["budget"]) for r in rows if r["draw"] == draw}
        source_rows = {("source-only", 0.0), ("AdaBN", 0.0)}
        missing = (source_rows | {(s, b) for b in args.budgets for s in args.stages}) - have
        if any(stage != "scratch" for stage, _ in missing):  # every stage but scratch starts from the source model
            set_determinism(draw)
            source, t = resnet(args.widen, in_channels=in_channels), time.perf_counter()
            train(
                source,
                items["thin train"],
                items["thin val"],
                TrainRecipe(epochs=args.source_epochs, augment=variant["augment"]),
                desc=f"source (thin) draw {draw}",
                device=device,
            )
            seconds = time.perf_counter() - t
            before = next((r for r in rows if r["stage"] == "source-only" and r["draw"] == draw), None)
            again = evaluate_items(source, test, seed=draw, class_names=LIDC_CLASSES, device=device)
            if (
                before is not None
                and before.get("reused")
                and abs(before["auc"] - again["metrics"]["auc"]["value"]) > 1e-9
            ):
                # Not the same model (another thread count or library build rounds differently): the
                # stages paired with the source must come from this one, so drop the reused ones.
                print(
                    f"draw {draw}: the retrained source model differs from the reused run's (test AUC "
                    f"{again['metrics']['auc']['value']:.4f} vs {before['auc']:.4f}); its source-only, AdaBN "
                    "and naive fine-tune rows are measured again"
                )
                rows[:] = [r for r in rows if not (r["draw"] == draw and r.get("reused") and r["stage"] in PAIRED)]
                missing |= source_rows | {
                    ("naive fine-tune", b) for b in args.budgets if "naive fine-tune" in args.stages
                }
            if ("source-only", 0.0) in missing:
                record("source-only", 0.0, draw, source, seconds, n_thin, result=again)
        if ("AdaBN", 0.0) in missing:
            adapted, t = copy.deepcopy(source), time.perf_counter()
            adabn(adapted, loader(items["thick train"], batch_size=16, device=device), device=device)
            record("AdaBN", 0.0, draw, adapted, time.perf_counter() - t, n_thin)
        for budget in args.budgets:
            labeled = subset(items["thick train"], budget, seed=draw)
            chosen = {i["case_id"] for i in labeled}
            unlabeled = [
                i for i in items["thick train"] if i["case_id"] not in chosen
            ]  # AdaBN sees their scans, not labels
            n_labels = len(labeled) + len(items["thick val"])
            for stage, recipe in (
                (
                    "medtl fine-tune",
                    FineTuneRecipe(
                        epochs=args.target_epochs,
                        folds=args.folds,
                        augment=variant["augment"],
                        adabn_judged=args.adabn == "judged",
                        wise=args.wise,
                    ),
                ),
                ("naive fine-tune", FineTuneRecipe.naive(epochs=args.target_epochs, augment=variant["augment"])),
            ):
                if (stage, budget) not in missing:
                    continue
                set_determinism(draw)
                model, t = copy.deepcopy(source), time.perf_counter()
                fitted = finetune(
                    model,
                    labeled,
                    items["thick val"],
                    recipe,
                    unlabeled_items=unlabeled,
                    desc=f"{stage} {budget:g}",
                    device=device,
                    seed=draw,
                )
                record(
                    stage,
                    budget,
                    draw,
                    model,
                    time.perf_counter() - t,
                    n_thin + n_labels,
                    epochs=fitted["best_epoch"],
                    adabn_kept=fitted.get("adabn", {}).get("kept"),
                )
            if ("scratch", budget) not in missing:
                continue
            set_determinism(draw)
            scratch, t = resnet(args.widen, in_channels=in_channels), time.perf_counter()
            fitted = train(
                scratch,
                labeled,
                items["thick val"],
                TrainRecipe(
                    epochs=args.target_epochs,
                    batch_size=8,
                    augment=variant["augment"],
                    selection="kfold",
                    folds=args.folds,
                ),
                desc=f"scratch {budget:g}",
                device=device,
                seed=draw,
            )
            record("scratch", budget, draw, scratch, time.perf_counter() - t, n_labels, epochs=fitted["best_epoch"])

    print(
        f"\nthick-slice test split: {len(test)} nodules of unseen patients; mean ± sd over {args.draws} draws "
        f"(each its own source model and label subsets); input {args.variant}"
    )
    print(
        f"{'stage':<18}{'budget':>7}{'labels':>7}{'AUC':>16}{'AUC - source':>15}{'accuracy':>16}"
        f"{'draw 0 AUC [95% CI]':>24}"
    )
    source_auc = {r["draw"]: r["auc"] for r in rows if r["stage"] == "source-only"}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["stage"], row["budget"]), []).append(row)
    order = ["diameter only", "source-only", "AdaBN", *TARGET_STAGES]
    for (stage, budget), group in sorted(groups.items(), key=lambda g: (g[0][1] or 0, order.index(g[0][0]))):
        auc, acc = np.array([r["auc"] for r in group]), np.array([r["accuracy"] or np.nan for r in group])

        def sd(a):
            return a.std(ddof=1) if len(a) > 1 else 0.0

        gain = np.array([r["auc"] - source_auc[r["draw"]] for r in group]) if budget is not None else None
        lo, hi = group[0]["auc_ci95"]
        print(
            f"{stage:<18}{'-' if budget is None else f'{budget:.0%}':>7}{group[0]['labels']:>7}"
            f"{auc.mean():>9.3f} ± {sd(auc):.3f}"
            f"{'' if gain is None else f'{gain.mean():+.3f} ± {sd(gain):.3f}':>15}"
            f"{'' if budget is None else f'{np.nanmean(acc):.3f} ± {sd(acc):.3f}':>16}"
            f"{group[0]['auc']:>10.3f} [{lo:.3f}, {hi:.3f}]"
        )
    if args.out:
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
