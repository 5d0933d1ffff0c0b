"""P1: does the data path starve the model? A full training step (cached preprocessing, augmentation,
collation, forward, backward, update) against the model-only step on tensors already in memory.

    .venv/bin/python benchmarks/training_step.py [--data medtl-demo] [--steps 30] [--batch-size 16]
        [--threads 2] [--out training_step.json]

Uses the demo cohort's site A training cases (generated if absent) through the bundles' own
``train_transforms`` with the deterministic part cached in memory, and the bundles' ResNet10
(width 0.5). Loader settings compared (``medtl.loading.data_loader``, the bundles' ``--loader``): MONAI
``DataLoader`` in the main process, and ``ThreadDataLoader`` (augmentation in a background thread,
overlapping the model step). Target:
full ÷ model-only ≤ 1.10. One run; medians of ``--steps`` steps after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import cycle, islice
from pathlib import Path

import torch
from monai.data import DataLoader
from monai.utils import set_determinism

from medtl.adapt.train import PlainBatch
from medtl.cache import cached_dataset
from medtl.demo import prepare_demo_data
from medtl.fileio import atomic_write_json
from medtl.loading import data_loader
from medtl.manifest import datalist, load_manifest
from medtl.networks import resnet
from medtl.transforms import train_transforms

TARGET = 1.10


def _step(network: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    image, label = PlainBatch()(batch)  # what medtl's trainers hand the network
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(network(image), label.long())
    loss.backward()
    optimizer.step()


def _timed_steps(network, optimizer, batches, steps: int, warmup: int = 3) -> list[float]:
    times, it = [], iter(batches)
    for i in range(warmup + steps):
        t = time.perf_counter()
        _step(network, optimizer, next(it))  # the next() is part of the step: waiting for data counts
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="medtl-demo", help="demo cohort folder (generated if absent)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_determinism(0)
    demo = prepare_demo_data(args.data, progress=True)
    items = datalist(load_manifest(demo["sites"]["A"]["manifest"]), demo["out"], "train")
    dataset = cached_dataset(items, train_transforms(level="light", seed=0), cache="memory", progress=True)
    network = resnet(0.5).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)

    def endless(loader):
        while True:
            yield from loader

    fixed = next(iter(DataLoader(dataset, batch_size=args.batch_size, shuffle=True)))
    fixed = {"image": fixed["image"].as_tensor().contiguous(), "label": torch.as_tensor(fixed["label"])}
    model_only = statistics.median(_timed_steps(network, optimizer, cycle([fixed]), args.steps))
    rows = [("model only (tensors in memory)", model_only)]
    loaders = {  # the bundles' two --loader settings, with no worker processes
        "DataLoader, main process": data_loader(dataset, batch_size=args.batch_size, shuffle=True, loader="process"),
        "ThreadDataLoader (background thread)": data_loader(
            dataset, batch_size=args.batch_size, shuffle=True, loader="thread"
        ),
    }
    for name, loader in loaders.items():
        rows.append(
            (name, statistics.median(_timed_steps(network, optimizer, islice(endless(loader), None), args.steps)))
        )

    print(f"\n{len(items)} cases, batch {args.batch_size}, {args.threads} threads, median of {args.steps} steps")
    print(f"{'step':<40}{'seconds':>10}{'÷ model only':>14}{'target':>10}")
    results = []
    for name, seconds in rows:
        ratio = seconds / model_only
        verdict = "" if name.startswith("model") else ("PASS" if ratio <= TARGET else "MISS")
        print(f"{name:<40}{seconds:>10.3f}{ratio:>14.2f}{verdict:>10}")
        results.append({"step": name, "seconds": seconds, "ratio": ratio})
    if args.out:
        atomic_write_json(Path(args.out), {"args": vars(args), "target": TARGET, "rows": results})
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
