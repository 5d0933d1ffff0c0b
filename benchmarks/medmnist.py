"""MedMNIST v2 BreastMNIST through medtl's 2D path, beside the published MedMNIST v2 test figures.

    .venv/bin/python benchmarks/medmnist.py [--npz ../shared/data/medmnist/breastmnist.npz]
        [--work medtl-breastmnist] [--epochs 100] [--threads 1] [--out medmnist.json]

Imports the file (``medtl.importers.import_medmnist``: one NIfTI per image and a manifest keeping
the official 546/78/156 split), preprocesses every split once with the importer's own
``preprocessing`` arguments (2D, 28x28, 0..255 to [0, 1]) and trains a 2D ResNet-18 from scratch
with MedMNIST's 28-pixel stem (3x3 stride 1, no max-pool) through medtl's ``TrainRecipe`` (AdamW,
cosine decay, light augmentation), keeping the epoch with the best validation AUC. The test split
is scored once: AUC and accuracy with 95% bootstrap CIs, printed beside the published table
(Yang et al., "MedMNIST v2", Scientific Data 2023), whose rows are single figures without CIs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from monai.utils import set_determinism

from medtl.adapt.recipe import preprocess_splits, train
from medtl.fileio import atomic_write_json
from medtl.importers import import_medmnist
from medtl.manifest import load_manifest
from medtl.networks import resnet
from medtl.recipes import TrainRecipe
from medtl.stages import evaluate_items
from medtl.transforms import preprocessing

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "breastmnist.npz"

# MedMNIST v2, Table 3 (BreastMNIST test split): (method, AUC, ACC)
PUBLISHED = (
    ("ResNet-18 (28)", 0.901, 0.863),
    ("ResNet-18 (224)", 0.891, 0.833),
    ("ResNet-50 (28)", 0.857, 0.812),
    ("ResNet-50 (224)", 0.866, 0.842),
    ("auto-sklearn", 0.836, 0.803),
    ("AutoKeras", 0.871, 0.831),
    ("Google AutoML Vision", 0.919, 0.861),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", default=str(SHARED), help="the breastmnist.npz file")
    parser.add_argument("--work", default="medtl-breastmnist", help="where the imported NIfTI files and manifest go")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs (MedMNIST v2 trained 100)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--augment", default="light", choices=("none", "light", "strong"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not Path(args.npz).is_file():
        raise SystemExit(f"BreastMNIST not found at {args.npz}: pass --npz (see ../shared/data/README.md)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    set_determinism(args.seed)
    work = Path(args.work)
    summary = import_medmnist(args.npz, work)
    items = preprocess_splits(
        load_manifest(work / summary["manifest"]),
        work,
        ("train", "val", "test"),
        preprocessing(**summary["preprocessing"]),
    )
    print(", ".join(f"{k}: {len(v)}" for k, v in items.items()) + f"; input {tuple(items['train'][0]['image'].shape)}")

    network, t = resnet(1.0, len(summary["classes"]), spatial_dims=2, depth=18, small_input=True), time.perf_counter()
    recipe = TrainRecipe(epochs=args.epochs, batch_size=args.batch_size, augment=args.augment)
    fitted = train(
        network, items["train"], items["val"], recipe, device=args.device, desc="ResNet-18 (28) on BreastMNIST"
    )
    seconds = time.perf_counter() - t
    result = evaluate_items(network.cpu(), items["test"], seed=args.seed, class_names=summary["classes"])
    m = result["metrics"]
    ours = {
        "method": "medtl ResNet-18 (28)",
        "auc": m["auc"]["value"],
        "auc_ci95": m["auc"]["ci95"],
        "accuracy": m["accuracy"]["value"],
        "accuracy_ci95": m["accuracy"]["ci95"],
        "epochs_run": fitted["epochs_run"],
        "best_epoch": fitted["best_epoch"],
        "best_val_auc": fitted["best_val_auc"],
        "params": sum(p.numel() for p in network.parameters()),
        "seconds": round(seconds, 1),
    }

    print(f"\nBreastMNIST test split ({result['n']} images); published rows: MedMNIST v2 (no CIs given)")
    print(f"{'method':<24}{'AUC [95% CI]':>24}{'ACC [95% CI]':>24}")
    print(
        f"{ours['method']:<24}{_cell(ours['auc'], ours['auc_ci95']):>24}"
        f"{_cell(ours['accuracy'], ours['accuracy_ci95']):>24}"
    )
    for method, auc, acc in PUBLISHED:
        print(f"{method:<24}{auc:>24.3f}{acc:>24.3f}")
    wall = time.perf_counter() - started
    print(
        f"\nkept epoch {ours['best_epoch']} of {ours['epochs_run']} (validation AUC {ours['best_val_auc']:.3f}); "
        f"{ours['params'] / 1e6:.2f}M parameters; training {seconds:.0f}s on {args.device}, wall time {wall:.0f}s"
    )
    if args.out:
        atomic_write_json(
            args.out,
            {
                "args": vars(args),
                "ours": ours | {"val_auc": fitted["val_auc"]},
                "published": [{"method": n, "auc": a, "accuracy": c} for n, a, c in PUBLISHED],
                "recipe": fitted["recipe"],
                "import": summary,
                "wall_seconds": round(wall, 1),
            },
        )
        print(f"-> {args.out}")


def _cell(value: float, ci: list[float] | None) -> str:
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.3f}"


if __name__ == "__main__":
    main()
