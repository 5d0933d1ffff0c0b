"""Same seed, same machine, same weights, however slowly the loader thread delivers batches.

The loader thread prepares (augments) the next batch while the training thread steps the network;
on a busy machine their relative timing changes from run to run. Training must not depend on it:
no random draw may come from a stream both threads use. The network below has dropout, so the
training thread draws from torch's global stream at every step: a draw from that stream in the
loader thread (a shuffle seed taken mid-epoch, a transform using torch's global generator) would
land at a different place in it when the loader is slowed, and change the weights.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import torch
from monai.utils import set_determinism
from torch import nn
from torch.utils.data import Dataset

import medtl.adapt.recipe as recipe_module
from medtl.adapt.recipe import train
from medtl.loading import data_loader
from medtl.recipes import TrainRecipe


class _Slowed(Dataset):
    """``dataset`` whose items take a random 0-``ms`` milliseconds more (in the loader thread);
    the delays come from an unseeded generator of their own, so they differ every run."""

    def __init__(self, dataset: Dataset, ms: float) -> None:
        self.dataset, self.ms, self.delays = dataset, ms, random.Random()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        time.sleep(self.delays.uniform(0, self.ms) / 1000)
        return self.dataset[index]


def _items() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(1, 16, 16, generator=g), "label": i % 2} for i in range(24)]


def _network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4, 2),
    )


def _trained(monkeypatch: pytest.MonkeyPatch, slow_ms: float) -> dict[str, torch.Tensor]:
    """Weights after a seeded ``train`` run with augmentation and shuffling, the loader slowed by
    up to ``slow_ms`` per item."""
    with monkeypatch.context() as patch:
        if slow_ms:
            patch.setattr(
                recipe_module, "data_loader", lambda dataset, **kw: data_loader(_Slowed(dataset, slow_ms), **kw)
            )
        set_determinism(0)
        network, items = _network(), _items()
        recipe = TrainRecipe(epochs=2, batch_size=4, augment="strong")
        train(network, items[:16], items[16:], recipe, num_classes=2, progress=False)
    set_determinism(None)
    return network.state_dict()


def test_a_slowed_loader_thread_gives_bit_identical_weights(monkeypatch):
    quick = _trained(monkeypatch, 0)
    slowed = _trained(monkeypatch, 5)
    assert quick.keys() == slowed.keys()
    assert [name for name in quick if not torch.equal(quick[name], slowed[name])] == []
