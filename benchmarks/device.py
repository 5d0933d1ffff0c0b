"""GPU figures: training and inference throughput, mixed-precision speed-up, peak memory, and where
augmentation should run. Falls back to the CPU (bfloat16 there) so the script itself is checked on
machines without a GPU; quote only figures from the device you mean.

    .venv/bin/python benchmarks/device.py [--device cuda] [--batch-size 16] [--steps 30] [--widen 0.5]
        [--cases 256] [--out device.json]

Network: the bundles' 3D ResNet10 on 32³ crops. Rows, each the median of ``--steps`` steps after
warm-up, with ratios against the fp32 row of the same run:

- training step (forward, backward, AdamW) on a batch already on the device: fp32, mixed precision
  (fp16 autocast with gradient scaling on CUDA, as the bundles' ``amp``; bf16 on the CPU), and
  mixed precision in channels-last layout; cases/s and peak device memory (CUDA only);
- inference (no grad): fp32 and mixed precision, cases/s;
- augmentation of one batch (``medtl.transforms.augmentation``, light) on host tensors and on
  device tensors (what ``train_transforms(device=...)`` does), the first with the host→device copy;
- the full training step through the bundles' data path (``CacheDataset`` + ``ThreadDataLoader``)
  with augmentation on the host (pinned memory) and on the device, ÷ the model-only step (P1).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.data import CacheDataset

from medtl.adapt.train import PlainBatch
from medtl.fileio import atomic_write_json
from medtl.loading import data_loader
from medtl.networks import resnet
from medtl.transforms import augmentation

SIZE = (32, 32, 32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(step: Callable[[], object], device: torch.device, steps: int, warmup: int = 5) -> float:
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _autocast(device: torch.device, mixed: bool) -> contextlib.AbstractContextManager:
    if not mixed:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def _trainer(widen: float, device: torch.device, *, mixed: bool, channels_last: bool) -> Callable[[dict], None]:
    """One training step as the bundles run it: ``amp`` on CUDA scales the fp16 loss."""
    network = resnet(widen).to(device).train()
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    network.to(memory_format=layout)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=mixed and device.type == "cuda")
    prepare = PlainBatch()

    def step(batch: dict) -> None:
        image, label = prepare(batch, device, non_blocking=True)
        image = image.contiguous(memory_format=layout)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, mixed):
            loss = torch.nn.functional.cross_entropy(network(image), label.long())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def _cases(n: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand((1, *SIZE), generator=generator), "label": i % 2} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--widen", type=float, default=0.5, help="ResNet10 width (the bundles' source network: 0.5)")
    parser.add_argument("--cases", type=int, default=256, help="cases in the cached dataset of the data-path rows")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop shape, as configure_torch sets it
    cases = _cases(max(args.cases, args.batch_size))
    host_batch = {
        "image": torch.stack([c["image"] for c in cases[: args.batch_size]]),
        "label": torch.tensor([c["label"] for c in cases[: args.batch_size]]),
    }
    batch = {k: v.to(device) for k, v in host_batch.items()}
    rows: list[dict] = []

    def add(group: str, name: str, seconds: float, baseline: float | None, peak: float | None = None) -> None:
        rows.append(
            {
                "group": group,
                "row": name,
                "seconds": seconds,
                "cases_per_s": args.batch_size / seconds,
                "speedup": None if baseline is None else baseline / seconds,
                "peak_mb": peak,
            }
        )

    for name, mixed, channels_last in (
        ("fp32", False, False),
        ("mixed precision", True, False),
        ("mixed precision, channels-last", True, True),
    ):
        _reset_peak(device)
        step = _trainer(args.widen, device, mixed=mixed, channels_last=channels_last)
        seconds = _median_seconds(functools.partial(step, batch), device, args.steps)
        add("train", name, seconds, rows[0]["seconds"] if rows else None, _peak_mb(device))

    network = resnet(args.widen).to(device).eval()
    for name, mixed in (("fp32", False), ("mixed precision", True)):

        def infer(mixed: bool = mixed) -> None:
            with torch.inference_mode(), _autocast(device, mixed):
                network(batch["image"])

        _reset_peak(device)
        seconds = _median_seconds(infer, device, args.steps)
        add("inference", name, seconds, None if name == "fp32" else rows[-1]["seconds"], _peak_mb(device))

    augment = augmentation(level="light", spatial_size=SIZE, seed=0)
    host_items = [{"image": c["image"]} for c in cases[: args.batch_size]]
    device_items = [{"image": c["image"].to(device)} for c in cases[: args.batch_size]]
    on_host = _median_seconds(
        lambda: torch.stack([augment(dict(i))["image"] for i in host_items]).to(device, non_blocking=True),
        device,
        args.steps,
    )
    add("augmentation", "on the host, then copied", on_host, None)
    add(
        "augmentation",
        "on the device",
        _median_seconds(lambda: torch.stack([augment(dict(i))["image"] for i in device_items]), device, args.steps),
        on_host,
    )

    step = _trainer(args.widen, device, mixed=device.type == "cuda", channels_last=False)
    model_only = _median_seconds(lambda: step(batch), device, args.steps)
    add("data path", "model only (batch on the device)", model_only, None)
    for name, on_device in (("augmentation on the host, pinned", False), ("augmentation on the device", True)):
        pipeline = augmentation(level="light", spatial_size=SIZE, seed=0)
        items = [{"image": c["image"].to(device) if on_device else c["image"], "label": c["label"]} for c in cases]
        loader = data_loader(
            CacheDataset(items, pipeline, progress=False),
            batch_size=args.batch_size,
            shuffle=True,
            device=device,
            on_device=on_device,
        )
        batches = iter(_endless(loader))
        seconds = _median_seconds(lambda batches=batches: step(next(batches)), device, args.steps)
        rows.append(
            {
                "group": "data path",
                "row": name,
                "seconds": seconds,
                "cases_per_s": args.batch_size / seconds,
                "speedup": None,
                "peak_mb": None,
                "per_model_only": seconds / model_only,
            }
        )

    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{label}; ResNet10 width {args.widen}, batch {args.batch_size}, 32³ crops, median of {args.steps} steps")
    print(f"{'':<14}{'row':<38}{'ms':>9}{'cases/s':>10}{'ratio':>9}{'peak MB':>10}")
    for r in rows:
        ratio = r.get("per_model_only", r["speedup"])
        ratio_text = "" if ratio is None else (f"÷{ratio:.2f}" if "per_model_only" in r else f"{ratio:.2f}×")
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(
            f"{r['group']:<14}{r['row']:<38}{r['seconds'] * 1e3:>9.1f}{r['cases_per_s']:>10.1f}"
            f"{ratio_text:>9}{peak:>10}"
        )
    if args.out:
        atomic_write_json(Path(args.out), {"args": vars(args), "device": label, "rows": rows})
        print(f"-> {args.out}")


def _endless(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
