"""Where a network runs and in what layout, and how to see through the wrappers that arrange it.

``place_network`` moves a network to its device (bundle configs build it by ``_target_``),
``FastForward`` runs one in channels-last layout and/or bfloat16 autocast, and ``unwrap`` finds the
plain network inside them and inside ``DistributedDataParallel``: layer groups, learning rates and
checkpoints are defined on the plain network's parameter names.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FastForward", "channels_last_input", "memory_format", "place_network", "unwrap"]


class FastForward(nn.Module):
    """``module`` run in channels-last layout and/or under bfloat16 autocast, returning float32 outputs.

    On CPUs, the demo's 3D training epochs run faster in channels-last layout, and faster still with
    bfloat16 autocast on top (``benchmarks/precision.py``; figures in docs/benchmarks.md). Wrapping instead of
    converting keeps the caller's module, its parameter names and its checkpoints as they are;
    ``unwrap`` sees through it like through ``DistributedDataParallel``.
    """

    def __init__(
        self, module: nn.Module, *, channels_last: bool = False, bf16: bool = False, device_type: str = "cpu"
    ) -> None:
        super().__init__()
        self.module, self.channels_last, self.bf16, self.device_type = module, channels_last, bf16, device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = channels_last_input(x)
        if not self.bf16:
            return self.module(x)
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.module(x).float()


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """An image batch (N, C, H, W[, D]) in channels-last layout; other tensors unchanged."""
    if x.dim() not in (4, 5):
        return x
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def memory_format(network: nn.Module, channels_last: bool) -> torch.memory_format:
    """The layout for the network's weights: channels-last of its convolutions' rank, or the default."""
    if not channels_last:
        return torch.contiguous_format
    ranks = {m.weight.dim() for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))}
    return torch.channels_last_3d if 5 in ranks else torch.channels_last


def place_network(network: nn.Module, device: str | torch.device = "cpu", *, channels_last: bool = False) -> nn.Module:
    """``network`` on ``device``; with ``channels_last`` its weights, and every input it receives (a
    forward pre-hook), in channels-last layout: faster convolutions on CPUs with the same arithmetic
    (``benchmarks/precision.py``). Parameter names stay as they are, so a bundle's ``CheckpointSaver``
    writes the usual keys (wrapping in ``FastForward`` would prefix them with ``module.``)."""
    network.to(device, memory_format=memory_format(network, channels_last))
    if channels_last:
        network.register_forward_pre_hook(lambda _module, args: (channels_last_input(args[0]), *args[1:]))
    return network


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside ``DistributedDataParallel``/``DataParallel`` (multi-GPU bundles wrap it) or
    ``FastForward``: layer groups, learning rates and freezing are defined on its own parameter names."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel, FastForward)
    while isinstance(model, wrappers):
        model = model.module
    return model
