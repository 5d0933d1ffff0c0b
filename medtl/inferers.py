"""Test-time augmentation as a MONAI inferer: the softmax averaged over flipped copies of each input.

A lesion's class does not change when the crop is mirrored, so averaging the network's outputs over
mirror images removes part of the noise a single view carries (``benchmarks/lidc_model.py`` measures
what it gives). ``FlipInferer`` slots into a bundle's ``inferer`` and ``SupervisedEvaluator``;
``FlipAveraged`` wraps a network for Python code that calls it directly. Both return the log of the
mean probabilities, so a following softmax (the bundles' postprocessing) gives those probabilities.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer
from torch import nn

from medtl.errors import MedtlError


def flip_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` (0 = first spatial axis): the identity first, 2**len(axes) in all."""
    axes = tuple(int(a) for a in axes)
    if len(set(axes)) != len(axes) or any(a < 0 for a in axes):
        raise MedtlError(f"flip axes must be distinct spatial axes >= 0, got {list(axes)!r}")
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def flip_average(
    network: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, axes: Sequence[int]
) -> torch.Tensor:
    """log(mean softmax) of ``network`` over ``inputs`` flipped along every subset of ``axes``."""
    if any(a >= inputs.dim() - 2 for a in axes):
        raise MedtlError(f"flip axes {list(axes)!r} do not fit an input of {inputs.dim() - 2} spatial dimensions")
    probs = [
        torch.softmax(network(torch.flip(inputs, [a + 2 for a in dims]) if dims else inputs).float(), dim=1)
        for dims in flip_sets(axes)
    ]
    return torch.log(torch.stack(probs).mean(dim=0).clamp_min(1e-12))


class FlipInferer(Inferer):
    """MONAI inferer averaging over mirror images along ``axes`` (default: all three of a volume)."""

    def __init__(self, axes: Sequence[int] = (0, 1, 2)) -> None:
        super().__init__()
        self.axes = tuple(int(a) for a in axes)
        flip_sets(self.axes)  # validates

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        return flip_average(lambda x: network(x, *args, **kwargs), inputs, self.axes)


class FlipAveraged(nn.Module):
    """``module`` with flip test-time augmentation; its weights and names stay the module's own."""

    def __init__(self, module: nn.Module, axes: Sequence[int] = (0, 1, 2)) -> None:
        super().__init__()
        self.module, self.axes = module, tuple(int(a) for a in axes)
        flip_sets(self.axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flip_average(self.module, x, self.axes)


__all__ = ["FlipAveraged", "FlipInferer", "flip_average", "flip_sets"]
