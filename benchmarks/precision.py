"""Faster CPU training without losing accuracy? fp32 against channels-last and bfloat16 autocast.

    .venv/bin/python benchmarks/precision.py [--data medtl-demo] [--epochs 10] [--threads 2] [--out precision.json]

Trains the demo's source model (ResNet10 width 0.5 on site A, ``TrainRecipe``, fixed seed) once per
setting: fp32 (the default), channels-last layout, and channels-last with bfloat16 autocast
(``medtl.adapt.train.FastForward``). Prints seconds per epoch, the speed-up over fp32 measured in
this run, and test AUC and accuracy with patient-level 95% CIs on sites A and B, so a setting is
judged on both speed and what it does to the model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from monai.utils import set_determinism

from medtl.adapt.recipe import TrainRecipe, train
from medtl.demo import demo_splits, evaluate_items, prepare_demo_data, resnet
from medtl.fileio import atomic_write_json

SETTINGS = {"fp32": {}, "channels-last": {"channels_last": True}, "channels-last + bf16": {"channels_last": True, "bf16": True}}


def _cell(metric: dict) -> str:
    ci = metric["ci95"]
    return f"{metric['value']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{metric['value']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="medtl-demo", help="demo cohort folder (generated if absent)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not torch.backends.mkldnn.is_available():
        print("note: this torch build has no oneDNN; bf16 autocast may be slow on this CPU")
    items = demo_splits(prepare_demo_data(Path(args.data), progress=False), progress=False)
    rows = {}
    for name, options in SETTINGS.items():
        set_determinism(0)
        network = resnet(0.5)
        start = time.perf_counter()
        run = train(network, items["A train"], items["A val"], TrainRecipe(epochs=args.epochs, **options), progress=False)
        seconds = (time.perf_counter() - start) / run["epochs_run"]
        rows[name] = {"seconds_per_epoch": seconds, "best_epoch": run["best_epoch"],
                      "site A test": evaluate_items(network, items["A test"])["metrics"],
                      "site B test": evaluate_items(network, items["B test"])["metrics"]}
        print(f"{name}: {seconds:.1f} s/epoch", flush=True)
    base = rows["fp32"]["seconds_per_epoch"]
    print(f"\n{'setting':<22}{'s/epoch':>9}{'speed-up':>10}  {'site A AUC':<20}{'site B AUC':<20}{'site B accuracy':<20}")
    for name, row in rows.items():
        row["speedup"] = base / row["seconds_per_epoch"]
        print(f"{name:<22}{row['seconds_per_epoch']:>9.1f}{row['speedup']:>9.2f}x  {_cell(row['site A test']['auc']):<20}"
              f"{_cell(row['site B test']['auc']):<20}{_cell(row['site B test']['accuracy']):<20}")
    if args.out:
        atomic_write_json(args.out, {"epochs": args.epochs, "threads": args.threads, "settings": rows})


if __name__ == "__main__":
    main()
