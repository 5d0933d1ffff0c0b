"""Flip test-time augmentation: the mean probability over mirror images, as a MONAI inferer and a wrapper."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import resnet10

from medtl.errors import MedtlError
from medtl.inferers import FlipAveraged, FlipInferer, flip_sets


def test_flip_inferer_averages_the_softmax_over_every_mirror_image():
    torch.manual_seed(0)
    network = resnet10(spatial_dims=3, n_input_channels=2, num_classes=2, widen_factor=0.125).eval()
    x = torch.rand(3, 2, 16, 16, 16)
    with torch.no_grad():
        expected = torch.stack(
            [
                torch.softmax(network(torch.flip(x, [d + 2 for d in dims]) if dims else x), 1)
                for dims in flip_sets((0, 1, 2))
            ]
        ).mean(0)
        by_inferer = torch.softmax(FlipInferer()(x, network), 1)
        by_wrapper = torch.softmax(FlipAveraged(network)(x), 1)
    assert len(flip_sets((0, 1, 2))) == 8 and flip_sets((1,)) == [(), (1,)]
    assert torch.allclose(by_inferer, expected, atol=1e-6) and torch.allclose(by_wrapper, expected, atol=1e-6)
    assert not torch.allclose(
        torch.softmax(network(x), 1), expected, atol=1e-4
    )  # a random network is not mirror-symmetric
    assert list(FlipAveraged(network).state_dict())[0].startswith("module.")


def test_flip_axes_are_checked():
    for bad in ((0, 0), (-1,)):
        with pytest.raises(MedtlError, match="distinct spatial axes"):
            FlipInferer(bad)
    with pytest.raises(MedtlError, match="do not fit"):
        FlipInferer((0, 1, 2))(torch.rand(1, 1, 8, 8), lambda t: t.mean((2, 3)))
