"""Batches for training and evaluation: which loader runs the per-step transforms.

With the deterministic part of a pipeline cached (``medtl.cache``), the work left per step is
augmentation (timed in docs/benchmarks.md, training step). Two loaders, picked by one setting (a bundle's ``loader``):

- ``"thread"`` (default): MONAI's ``ThreadDataLoader`` prepares the next batch in a background
  thread while the network works on the current one, which hides augmentation wherever a core is
  free (a GPU machine; the training-step section of docs/benchmarks.md). It is the loader for data already on the GPU
  (``medtl.transforms.train_transforms(device=)``), because worker processes cannot share CUDA tensors.
- ``"process"``: PyTorch's ``DataLoader`` with ``num_workers`` worker processes, for pipelines whose
  per-step work outweighs the network step (no cache, heavy augmentation, many cores).

On CUDA, batches that come from host memory are pinned, so their copy to the GPU can overlap.

Neither loader makes training depend on timing (a busy machine; tests/test_reproducible.py): the
random transforms draw from their own generators, seeded from torch's global stream when the
loader is made, and the one thread (or each worker, on its fixed share of the batches) consumes
them in sampler order. The only other draw, the shuffle seed, is taken when an epoch's first batch
is asked for, while the training thread waits for it. Code running in the loader thread must keep
it so: no draw from torch's global stream, which the training thread uses (dropout) meanwhile.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.data import DataLoader, ThreadDataLoader
from torch.utils.data import Dataset

from medtl.errors import MedtlError

LOADERS = ("thread", "process")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The device a run trains on: ``"auto"`` is the first GPU when CUDA is present, else the CPU;
    ``"cuda[:N]"`` must name a GPU this machine has (a clear error, not a failure mid-training)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise MedtlError(f"unknown device {spec!r}; use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise MedtlError(f"unsupported device {spec!r}; use {DEVICE_CHOICES}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise MedtlError(
            f"device {spec!r} asked for, but this machine has no CUDA GPU (torch {torch.__version__})",
            hint="use --device cpu, or install a CUDA build of torch into the environment",
        )
    if device.index is not None and device.index >= count:
        raise MedtlError(
            f"device {spec!r} asked for, but this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}"
        )
    return device


def data_loader(
    dataset: Dataset,
    *,
    batch_size: int = 1,
    shuffle: bool = False,
    loader: str = "thread",
    num_workers: int = 0,
    device: str | torch.device | None = None,
    on_device: bool = False,
    **options: Any,
) -> DataLoader:
    """Batches of ``dataset`` from the loader named by ``loader`` (see the module docstring).

    Args:
        num_workers: worker processes (0: none; ``"thread"`` still overlaps in its thread).
        device: where the batches go; pinned memory is used when it is a CUDA device.
        on_device: the dataset's items are already on ``device`` (augmentation on the GPU): no
            pinning, and no worker processes.
        options: passed on to the loader (``sampler``, ``collate_fn``, ...).

    An empty dataset (a bundle built before its data is given) gets an unshuffled loader: there is
    nothing to shuffle, and PyTorch's random sampler refuses zero samples.
    """
    if loader not in LOADERS:
        raise MedtlError(f"unknown loader {loader!r}; allowed: {', '.join(LOADERS)}")
    if int(num_workers) < 0:
        raise MedtlError(f"num_workers must be >= 0, got {num_workers}")
    if on_device and int(num_workers) > 0:
        raise MedtlError(
            f"augmentation on the device runs in the loading thread, but num_workers is {num_workers}",
            hint="set num_workers 0 with augment_on_device, or augment on the CPU",
        )
    cuda = device is not None and torch.device(device).type == "cuda"
    shuffle = bool(shuffle) and len(dataset) > 0
    settings = {
        "batch_size": int(batch_size),
        "shuffle": shuffle,
        "num_workers": int(num_workers),
        "pin_memory": cuda and not on_device,
        **options,
    }
    if loader == "thread":
        return ThreadDataLoader(dataset, **settings)
    return DataLoader(dataset, **settings)


__all__ = ["DEVICE_CHOICES", "resolve_device", "LOADERS", "data_loader"]
