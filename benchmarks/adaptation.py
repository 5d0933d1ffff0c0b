"""Adapting a site-A model to site B of the demo cohort, every stage on the same site-B test split, in one run.

    .venv/bin/python benchmarks/adaptation.py [--data medtl-demo] [--source-epochs 30] [--seed 0] [--out adaptation.json]

Stages: source-only (trained on site A), AdaBN (site B's scans, no labels), naive fine-tuning (all
layers, one learning rate), medtl's fine-tuning recipe (AdaBN, head first, gradual unfreezing with
discriminative rates, L2-SP, best validation epoch), from scratch on the same few site-B labels,
and a smaller student distilled from the fine-tuned teacher on site B's labeled and unlabeled
scans plus site A's labeled cases. Model selection uses site B's validation split only; the test split is evaluated once per
stage. Prints AUC, accuracy, sensitivity, specificity (95% bootstrap CIs over patients), ECE,
parameters and seconds; writes the figures as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from monai.utils import set_determinism

from medtl.adapt.adabn import adabn
from medtl.adapt.recipe import DistillRecipe, FineTuneRecipe, TrainRecipe, distill, finetune, loader, train
from medtl.demo import CLASSES, demo_splits, evaluate_items, prepare_demo_data, resnet
from medtl.fileio import atomic_write, atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="medtl-demo", help="demo folder (generated if absent)")
    parser.add_argument("--source-epochs", type=int, default=30)
    parser.add_argument("--target-epochs", type=int, default=30, help="epochs of every site-B training stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the demo cohort's patients (smoke runs)")
    parser.add_argument("--widen", type=float, default=0.5, help="ResNet10 width of source, fine-tuned and scratch models")
    parser.add_argument("--student-widen", type=float, default=0.25, help="ResNet10 width of the distilled student")
    parser.add_argument("--source-weights", help="reuse the site-A model saved here (trained and saved there when absent)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    set_determinism(args.seed)
    demo = prepare_demo_data(args.data, seed=0, scale=args.scale)
    split = demo_splits(demo)
    print(", ".join(f"{k}: {len(v)}" for k, v in split.items()))

    rows: dict[str, dict] = {}

    def record(stage: str, network: torch.nn.Module, labels: int, seconds: float, extra: dict | None = None) -> None:
        result = evaluate_items(network, split["B test"], seed=args.seed)
        rows[stage] = {"labels_used": labels, "params": sum(p.numel() for p in network.parameters()),
                       "seconds": round(seconds, 1), "test": result, **(extra or {})}
        m = result["metrics"]
        print(f"{stage}: AUC {m['auc']['value']:.3f} {m['auc']['ci95']}, accuracy {m['accuracy']['value']:.3f}")

    n_a, n_b = len(split["A train"]) + len(split["A val"]), len(split["B train"]) + len(split["B val"])
    source = resnet(args.widen)
    t = time.perf_counter()
    if args.source_weights and Path(args.source_weights).is_file():
        source.load_state_dict(torch.load(args.source_weights, weights_only=True))
        fitted = {"best_epoch": None}
    else:
        fitted = train(source, split["A train"], split["A val"], TrainRecipe(epochs=args.source_epochs), desc="source (site A)")
        if args.source_weights:
            atomic_write(args.source_weights, lambda tmp: torch.save(source.state_dict(), tmp))
    record("source-only", source, n_a, time.perf_counter() - t, {"best_epoch": fitted["best_epoch"]})

    t = time.perf_counter()
    adapted = copy.deepcopy(source)
    adabn(adapted, loader([*split["B train"], *split["B unlabeled"]], batch_size=16))
    record("AdaBN", adapted, n_a, time.perf_counter() - t)

    epochs = args.target_epochs
    for stage, recipe in [("naive fine-tune", FineTuneRecipe.naive(epochs=epochs)), ("medtl fine-tune", FineTuneRecipe(epochs=epochs))]:
        set_determinism(args.seed)
        model, t = copy.deepcopy(source), time.perf_counter()
        fitted = finetune(model, split["B train"], split["B val"], recipe, unlabeled_items=split["B unlabeled"], desc=stage)
        record(stage, model, n_a + n_b, time.perf_counter() - t, {"best_epoch": fitted["best_epoch"]})
        if stage == "medtl fine-tune":
            teacher = model

    set_determinism(args.seed)
    scratch, t = resnet(args.widen), time.perf_counter()
    fitted = train(scratch, split["B train"], split["B val"], TrainRecipe(epochs=epochs, batch_size=8, patience=10), desc="scratch (site B)")
    record("scratch on B", scratch, n_b, time.perf_counter() - t, {"best_epoch": fitted["best_epoch"]})

    set_determinism(args.seed)
    student, t = resnet(args.student_widen), time.perf_counter()
    # the student learns the teacher's outputs on site B's scans (labeled and not) and on site A's labeled cases
    fitted = distill(teacher, student, [*split["B train"], *split["A train"]], split["B unlabeled"], split["B val"], DistillRecipe(),
                     class_names=CLASSES, desc="distill student")
    record(f"student (widen {args.student_widen})", student, n_a + n_b, time.perf_counter() - t,
           {"best_epoch": fitted["best_epoch"], "pseudo_labels": fitted["pseudo_labels"]})

    print(f"\nsite B test split: {rows['source-only']['test']['n']} cases; labels used counts site A and B train+val labels")
    header = f"{'stage':<24}{'labels':>7}{'params':>8}{'AUC [95% CI]':>24}{'accuracy':>10}{'sens':>6}{'spec':>6}{'ECE':>7}{'seconds':>9}"
    print(header)
    for stage, row in rows.items():
        m = row["test"]["metrics"]
        lo, hi = m["auc"]["ci95"]
        print(f"{stage:<24}{row['labels_used']:>7}{row['params'] / 1e6:>7.2f}M{m['auc']['value']:>9.3f} [{lo:.3f}, {hi:.3f}]"
              f"{m['accuracy']['value']:>10.3f}{m['sensitivity']['value']:>6.2f}{m['specificity']['value']:>6.2f}"
              f"{m['ece']['value']:>7.3f}{row['seconds']:>9.0f}")
    kept = rows[f"student (widen {args.student_widen})"]["pseudo_labels"]
    print(f"pseudo-labels kept at p >= {kept['threshold']}: {kept['pseudo_labels_kept']}, {kept['below_threshold']} below the threshold")
    if args.out:
        atomic_write_json(args.out, {"args": vars(args), "stages": rows})
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
