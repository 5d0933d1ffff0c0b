"""Faster CPU training without losing accuracy? fp32 against channels-last and bfloat16 autocast.

    .venv/bin/python benchmarks/precision.py [--data medtl-demo] [--epochs 10] [--seeds 0 1 2] [--threads 2]
        [--out precision.json]

Trains the demo's source model (ResNet10 width 0.5 on site A, ``TrainRecipe``) once per setting and
seed: fp32 (the default), channels-last layout, and channels-last with bfloat16 autocast
(``medtl.adapt.placement.FastForward``). Prints seconds per epoch, the speed-up over fp32 measured in
this run, and test AUC on sites A and B per seed with patient-level 95% CIs, and their means. Even
channels-last alone, the same arithmetic in another order, ends on a different model (rounding
noise grows through training and the best-epoch choice), so settings are compared over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from monai.utils import set_determinism

from medtl.adapt.recipe import train
from medtl.demo import CLASSES, demo_splits, prepare_demo_data
from medtl.fileio import atomic_write_json
from medtl.networks import resnet
from medtl.recipes import TrainRecipe
from medtl.stages import evaluate_items

SETTINGS = {
    "fp32": {},
    "channels-last": {"channels_last": True},
    "channels-last + bf16": {"channels_last": True, "bf16": True},
}


def _cell(metric: dict) -> str:
    ci = metric["ci95"]
    return f"{metric['value']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{metric['value']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="medtl-demo", help="demo cohort folder (generated if absent)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not torch.backends.mkldnn.is_available():
        print("note: this torch build has no oneDNN; bf16 autocast may be slow on this CPU")
    items = demo_splits(prepare_demo_data(Path(args.data), progress=False), progress=False)
    rows: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for seed in args.seeds:
        for name, options in SETTINGS.items():
            set_determinism(seed)
            network = resnet(0.5)
            start = time.perf_counter()
            run = train(
                network, items["A train"], items["A val"], TrainRecipe(epochs=args.epochs, **options), progress=False
            )
            seconds = (time.perf_counter() - start) / run["epochs_run"]
            rows[name].append(
                {
                    "seed": seed,
                    "seconds_per_epoch": seconds,
                    "best_epoch": run["best_epoch"],
                    "site A test": evaluate_items(network, items["A test"], class_names=CLASSES, seed=seed)["metrics"],
                    "site B test": evaluate_items(network, items["B test"], class_names=CLASSES, seed=seed)["metrics"],
                }
            )
            print(f"seed {seed}, {name}: {seconds:.1f} s/epoch", flush=True)
    base = statistics.median(r["seconds_per_epoch"] for r in rows["fp32"])
    print(f"\n{'setting':<22}{'seed':>5}{'s/epoch':>9}  {'site A AUC':<20}{'site B AUC':<20}")
    for name, runs in rows.items():
        for r in runs:
            print(
                f"{name:<22}{r['seed']:>5}{r['seconds_per_epoch']:>9.1f}  {_cell(r['site A test']['auc']):<20}"
                f"{_cell(r['site B test']['auc']):<20}"
            )
    print(f"\n{'setting':<22}{'median s/epoch':>15}{'speed-up':>10}{'mean site A AUC':>17}{'mean site B AUC':>17}")
    summary = {}
    for name, runs in rows.items():
        median = statistics.median(r["seconds_per_epoch"] for r in runs)
        means = {
            site: statistics.mean(r[site]["auc"]["value"] for r in runs) for site in ("site A test", "site B test")
        }
        summary[name] = {"median_seconds_per_epoch": median, "speedup": base / median, "mean_auc": means}
        print(
            f"{name:<22}{median:>15.1f}{base / median:>9.2f}x{means['site A test']:>17.3f}{means['site B test']:>17.3f}"
        )
    if args.out:
        atomic_write_json(args.out, {"epochs": args.epochs, "threads": args.threads, "runs": rows, "summary": summary})


if __name__ == "__main__":
    main()
