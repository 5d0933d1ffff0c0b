"""Loader choice: thread or worker processes, pinned memory on CUDA only, clear errors."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, Dataset, ThreadDataLoader
from torch.utils.data.distributed import DistributedSampler

from medtl.errors import MedtlError
from medtl.loading import data_loader

DATA = [{"image": torch.full((1, 2, 2, 2), float(i)), "label": i % 2} for i in range(10)]


def _values(loader) -> list[float]:
    return [float(v) for batch in loader for v in batch["image"][:, 0, 0, 0, 0]]


@pytest.mark.parametrize(("kind", "workers", "cls"), [("thread", 0, ThreadDataLoader), ("process", 0, DataLoader), ("process", 2, DataLoader)])
def test_every_loader_gives_every_case_once_per_epoch(kind, workers, cls):
    loader = data_loader(Dataset(DATA), batch_size=4, shuffle=True, loader=kind, num_workers=workers)
    assert type(loader) is cls and loader.num_workers == workers
    for _ in range(2):
        assert sorted(_values(loader)) == [float(i) for i in range(10)]


def test_thread_loader_keeps_the_shuffle_order_of_the_plain_loader():
    """The background thread only prefetches: with one seed, both loaders give the same batches."""
    orders = []
    for kind in ("thread", "process"):
        torch.manual_seed(0)
        orders.append(_values(data_loader(Dataset(DATA), batch_size=3, shuffle=True, loader=kind)))
    assert orders[0] == orders[1]


def test_memory_is_pinned_only_for_cuda_batches_from_the_host():
    assert not data_loader(Dataset(DATA), device="cpu").pin_memory
    assert data_loader(Dataset(DATA), device="cuda").pin_memory  # a setting: nothing is pinned until iteration
    assert not data_loader(Dataset(DATA), device="cuda", on_device=True).pin_memory


def test_options_reach_the_loader_as_in_multi_gpu_configs():
    sampler = DistributedSampler(Dataset(DATA), num_replicas=2, rank=1, shuffle=False)
    loader = data_loader(Dataset(DATA), batch_size=10, sampler=sampler)
    assert loader.sampler is sampler and _values(loader) == [1.0, 3.0, 5.0, 7.0, 9.0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loader": "fork"}, "unknown loader 'fork'; allowed: thread, process"),
        ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
        ({"on_device": True, "num_workers": 2}, "augmentation on the device runs in the loading thread, but num_workers is 2"),
    ],
)
def test_bad_settings_raise_one_clear_error(options, message):
    with pytest.raises(MedtlError, match=message):
        data_loader(Dataset(DATA), **options)
