"""Adapting a site-A model to site B of the demo cohort, every stage on the same site-B test split, over several seeds.

    .venv/bin/python benchmarks/adaptation.py [--data medtl-demo] [--seeds 3] [--first-seed 0] [--source-epochs 20]
        [--device auto] [--source-weights source-A-{seed}.pt] [--out adaptation.json]

Stages: source-only (trained on site A), AdaBN (site B's scans, no labels), naive fine-tuning (all
layers, one learning rate, best epoch on B's val split), medtl's fine-tuning recipe as ``medtl
demo`` runs it (AdaBN on B's scans, head first, gradual unfreezing with discriminative rates,
L2-SP, the epoch count chosen by patient-level k-fold over B's labeled train+val cases, then
trained on all of them and averaged with its start, WiSE-FT), from scratch on B's labels, and a
smaller student distilled from the fine-tuned teacher on site B's labeled and unlabeled scans plus
site A's labeled cases. No run chooses anything on the test split; but the recipe's two defaults
that changed last (AdaBN not judged, WiSE-FT 0.5) were picked after comparing variants on these
seeds' test results (0, 1, 2), so that table does not confirm them independently; ``--first-seed 3``
runs seeds the choice never saw (docs/benchmarks.md).
Each seed trains its own source model and runs every stage; the table shows mean ± sd over seeds
of AUC and accuracy, the paired difference to source-only, and the first seed's AUC with its
patient-bootstrap 95% CI.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from monai.utils import set_determinism

from medtl.adapt.adabn import adabn
from medtl.adapt.recipe import distill, finetune, loader, train
from medtl.demo import CLASSES, demo_splits, prepare_demo_data
from medtl.fileio import atomic_write, atomic_write_json
from medtl.loading import resolve_device
from medtl.networks import resnet
from medtl.recipes import DistillRecipe, FineTuneRecipe, TrainRecipe
from medtl.stages import evaluate_items


def run_seed(split: dict, seed: int, args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Every stage once, with ``seed`` for the source model, the folds and every training run."""
    rows: dict[str, dict] = {}

    def record(stage: str, network: torch.nn.Module, labels: int, seconds: float, extra: dict | None = None) -> None:
        result = evaluate_items(network, split["B test"], class_names=CLASSES, seed=seed, device=device)
        rows[stage] = {
            "labels_used": labels,
            "params": sum(p.numel() for p in network.parameters()),
            "seconds": round(seconds, 1),
            "test": result,
            **(extra or {}),
        }
        m = result["metrics"]
        print(
            f"seed {seed} {stage}: AUC {m['auc']['value']:.3f} {m['auc']['ci95']}, accuracy "
            f"{m['accuracy']['value']:.3f}",
            flush=True,
        )

    n_a, n_b = len(split["A train"]) + len(split["A val"]), len(split["B train"]) + len(split["B val"])
    set_determinism(seed)
    source = resnet(args.widen)
    t = time.perf_counter()
    weights = Path(args.source_weights.format(seed=seed)) if args.source_weights else None
    if weights is not None and weights.is_file():
        source.load_state_dict(torch.load(weights, weights_only=True))
        fitted = {"best_epoch": None}
    else:
        fitted = train(
            source,
            split["A train"],
            split["A val"],
            TrainRecipe(epochs=args.source_epochs),
            desc=f"source (site A) seed {seed}",
            device=device,
        )
        if weights is not None:
            atomic_write(weights, lambda tmp: torch.save(source.state_dict(), tmp))
    record("source-only", source, n_a, time.perf_counter() - t, {"best_epoch": fitted["best_epoch"]})

    t = time.perf_counter()
    adapted = copy.deepcopy(source)
    adabn(adapted, loader([*split["B train"], *split["B unlabeled"]], batch_size=16, device=device), device=device)
    record("AdaBN", adapted, n_a, time.perf_counter() - t)

    epochs = args.target_epochs
    for stage, recipe in [
        ("naive fine-tune", FineTuneRecipe.naive(epochs=epochs)),
        ("medtl fine-tune", FineTuneRecipe(epochs=epochs)),
    ]:
        set_determinism(seed)
        model, t = copy.deepcopy(source), time.perf_counter()
        fitted = finetune(
            model,
            split["B train"],
            split["B val"],
            recipe,
            unlabeled_items=split["B unlabeled"],
            desc=stage,
            device=device,
            seed=seed,
        )
        record(
            stage,
            model,
            n_a + n_b,
            time.perf_counter() - t,
            {"best_epoch": fitted["best_epoch"], "adabn_kept": fitted.get("adabn", {}).get("kept")},
        )
        if stage == "medtl fine-tune":
            teacher = model

    set_determinism(seed)
    scratch, t = resnet(args.widen), time.perf_counter()
    fitted = train(
        scratch,
        split["B train"],
        split["B val"],
        TrainRecipe(epochs=epochs, batch_size=8, patience=10),
        desc="scratch (site B)",
        device=device,
    )
    record("scratch on B", scratch, n_b, time.perf_counter() - t, {"best_epoch": fitted["best_epoch"]})

    set_determinism(seed)
    student, t = resnet(args.student_widen), time.perf_counter()
    # the student learns the teacher's outputs on site B's scans (labeled and not) and on site A's labeled cases
    fitted = distill(
        teacher,
        student,
        [*split["B train"], *split["A train"]],
        split["B unlabeled"],
        split["B val"],
        DistillRecipe(epochs=args.student_epochs),
        class_names=CLASSES,
        desc="distill student",
        device=device,
    )
    record(
        f"student (widen {args.student_widen})",
        student,
        n_a + n_b,
        time.perf_counter() - t,
        {"best_epoch": fitted["best_epoch"], "pseudo_labels": fitted["pseudo_labels"]},
    )
    return rows


def mean_sd(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="medtl-demo", help="demo folder (generated if absent)")
    parser.add_argument(
        "--source-epochs", type=int, default=20, help="epochs of source training on site A (the demo's)"
    )
    parser.add_argument(
        "--target-epochs", type=int, default=15, help="epochs of every site-B training stage (the demo's)"
    )
    parser.add_argument("--student-epochs", type=int, default=15, help="epochs of student distillation (the demo's)")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds, each a full run of every stage")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1 (new seeds check choices made on others)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the demo cohort's patients (smoke runs)")
    parser.add_argument(
        "--widen", type=float, default=0.5, help="ResNet10 width of source, fine-tuned and scratch models"
    )
    parser.add_argument("--student-widen", type=float, default=0.25, help="ResNet10 width of the distilled student")
    parser.add_argument(
        "--source-weights",
        help="reuse the site-A model of each seed saved here, e.g. source-A-{seed}.pt "
        "(trained and saved there when absent)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    demo = prepare_demo_data(args.data, seed=0, scale=args.scale)
    split = demo_splits(demo)
    print(", ".join(f"{k}: {len(v)}" for k, v in split.items()))
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        runs.append(run_seed(split, seed, args, device))
        if args.out:
            atomic_write_json(args.out, {"args": vars(args), "seeds": runs})

    first = runs[0]
    print(
        f"\nsite B test split: {first['source-only']['test']['n']} cases; mean ± sd over {len(runs)} seeds (each its "
        "own source model); labels used counts site A and B train+val labels"
    )
    print(
        f"{'stage':<24}{'labels':>7}{'params':>8}{'AUC':>16}{'AUC - source':>16}{'accuracy':>16}"
        f"{f'seed {args.first_seed} AUC [95% CI]':>26}{'seconds':>9}"
    )
    for stage, row in first.items():
        auc = [r[stage]["test"]["metrics"]["auc"]["value"] for r in runs]
        gain = [a - r["source-only"]["test"]["metrics"]["auc"]["value"] for a, r in zip(auc, runs, strict=True)]
        acc = [r[stage]["test"]["metrics"]["accuracy"]["value"] for r in runs]
        m = row["test"]["metrics"]["auc"]
        seconds = np.mean([r[stage]["seconds"] for r in runs])
        print(
            f"{stage:<24}{row['labels_used']:>7}{row['params'] / 1e6:>7.2f}M{mean_sd(auc):>16}{mean_sd(gain):>16}"
            f"{mean_sd(acc):>16}{m['value']:>10.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]{seconds:>9.0f}"
        )
    print(
        "medtl fine-tune per seed: "
        + "; ".join(
            f"seed {i}: {r['medtl fine-tune']['best_epoch']} epochs, AdaBN "
            f"{'kept' if r['medtl fine-tune']['adabn_kept'] else 'discarded'}"
            for i, r in enumerate(runs, start=args.first_seed)
        )
    )
    kept = runs[0][f"student (widen {args.student_widen})"]["pseudo_labels"]
    print(
        f"seed {args.first_seed} pseudo-labels kept at p >= {kept['threshold']}: {kept['pseudo_labels_kept']}, "
        f"{kept['below_threshold']} below the threshold"
    )
    if args.out:
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
