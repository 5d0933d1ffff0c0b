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


@pytest.mark.parametrize(
    ("kind", "workers", "cls"),
    [("thread", 0, ThreadDataLoader), ("process", 0, DataLoader), ("process", 2, DataLoader)],
)
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
        (
            {"on_device": True, "num_workers": 2},
            "augmentation on the device runs in the loading thread, but num_workers is 2",
        ),
    ],
)
def test_bad_settings_raise_one_clear_error(options, message):
    with pytest.raises(MedtlError, match=message):
        data_loader(Dataset(DATA), **options)


def test_resolve_device_picks_cuda_only_when_present_and_names_a_missing_gpu(monkeypatch):
    from medtl.loading import resolve_device

    assert resolve_device("CPU") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(MedtlError, match="no CUDA GPU"):
        resolve_device("cuda")
    for bad in ("tpu", "cuda:x", ""):
        with pytest.raises(MedtlError, match="device"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MedtlError, match=r"has 2 CUDA GPU\(s\): cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_demo_adapt_and_fl_refuse_a_missing_gpu_before_any_work(tmp_path, capsys):
    from medtl.cli import main

    for verb in (
        ["demo", "--out", str(tmp_path / "demo")],
        ["adapt", "--source", "s.pt", "--manifest", "m.json", "--root", ".", "--out", str(tmp_path / "adapt")],
    ):
        assert main(["-q", *verb, "--device", "cuda:9"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
