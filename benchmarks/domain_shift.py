"""Does the demo cohort carry a real domain shift? Train a source-only model on site A and
evaluate it on held-out site A and on site B, in one run.

    .venv/bin/python benchmarks/domain_shift.py [--data medtl-demo] [--epochs 25] [--seed 0]

Prints AUC (95% bootstrap CI), accuracy, sensitivity and specificity per evaluation set, the A->B
change, the same model after AdaBN on site B's unlabeled scans, and a size-only baseline (lesion
mask volume as the score), so the image model is compared with the trivial rule.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler, from_engine
from monai.networks.nets import resnet10
from monai.utils import set_determinism

from medtl.adapt.adabn import adabn
from medtl.demo import prepare_demo_data
from medtl.evaluate import classification_metrics, collect_predictions, roc_auc_ovr
from medtl.manifest import datalist, load_manifest
from medtl.nifti import read_nifti
from medtl.progress import EngineProgress
from medtl.transforms import augmentation, preprocessing


def lesion_volume_mm3(mask_path: str) -> float:
    mask = read_nifti(mask_path)
    return float(mask.array.sum() * np.prod(mask.spacing))


def predict(model: torch.nn.Module, data: list[dict], transform) -> tuple[np.ndarray, np.ndarray]:
    """Labels and P(malignant) for every case."""
    loader = DataLoader(CacheDataset(data, transform, progress=False), batch_size=16)
    y, probs, _ = collect_predictions(model, loader)
    return y, probs[:, 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="medtl-demo", help="demo folder (generated if absent)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--widen", type=float, default=0.5, help="ResNet10 width factor (0.5: 3.6M parameters)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    set_determinism(args.seed)
    demo = prepare_demo_data(args.data, seed=0)
    root = Path(args.data)
    manifests = {site: load_manifest(info["manifest"]) for site, info in demo["sites"].items()}
    pre = preprocessing(modality="ct")
    train = datalist(manifests["A"], root, "train")
    evals = {
        "site A test": datalist(manifests["A"], root, "test"),
        "site A val+test": datalist(manifests["A"], root, ("val", "test")),
        "site B test": datalist(manifests["B"], root, "test"),
        "site B all labeled": datalist(manifests["B"], root, ("train", "val", "test")),
    }
    t0 = time.perf_counter()
    cached = CacheDataset(train, pre, progress=True)
    train_ds = Dataset(cached, augmentation(level="light"))
    loader = DataLoader(train_ds, batch_size=16, shuffle=True)
    model = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=args.widen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=args.epochs,
        train_data_loader=loader,
        network=model,
        optimizer=optimizer,
        loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=[LrScheduleHandler(schedule, print_lr=False)],
    )
    EngineProgress(desc="train").attach(trainer, output_transform=from_engine(["loss"], first=True))
    trainer.run()
    train_time = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\nsource-only ResNet10 (widen {args.widen}, {params / 1e6:.1f}M parameters) trained on {len(train)} "
        f"site-A cases, {args.epochs} epochs, {train_time:.0f}s"
    )
    print(
        f"{'evaluation set':<28}{'n':>5}{'AUC':>8}{'95% CI':>16}{'acc':>7}{'majority acc':>14}{'sens':>6}"
        f"{'spec':>6}{'mean p(mal)':>13}{'size-only AUC':>15}"
    )
    results = {}
    adapted = copy.deepcopy(model)
    unlabeled = datalist(manifests["B"], root, "unlabeled")
    adabn(adapted, DataLoader(CacheDataset(unlabeled, pre, progress=False), batch_size=16))
    rows = [(name, data, model) for name, data in evals.items()]
    rows += [(f"{name} (AdaBN)", evals[name], adapted) for name in ("site B test", "site B all labeled")]
    for name, data, net in rows:
        y, p = predict(net, data, pre)
        m = classification_metrics(
            y, np.stack([1 - p, p], axis=1), class_names=["benign", "malignant"], seed=args.seed
        )["metrics"]
        auc, (lo, hi) = m["auc"]["value"], m["auc"]["ci95"]
        size = np.array([lesion_volume_mm3(d["mask"]) for d in data])
        size_auc = roc_auc_ovr(y, np.stack([-size, size], axis=1))
        acc, sens, spec = (m[k]["value"] for k in ("accuracy", "sensitivity", "specificity"))
        majority = float(max(np.mean(y), 1 - np.mean(y)))
        results[name] = (auc, acc)
        print(
            f"{name:<28}{len(y):>5}{auc:>8.3f}{f'[{lo:.3f}, {hi:.3f}]':>16}{acc:>7.3f}{majority:>14.3f}"
            f"{sens:>6.2f}{spec:>6.2f}{p.mean():>13.3f}{size_auc:>15.3f}"
        )
    print(f"AdaBN used {len(unlabeled)} unlabeled site-B cases (no labels)")
    for a, b in (("site A test", "site B test"), ("site A val+test", "site B all labeled")):
        print(f"{a} -> {b}: AUC {results[b][0] - results[a][0]:+.3f}, accuracy {results[b][1] - results[a][1]:+.3f}")


if __name__ == "__main__":
    main()
