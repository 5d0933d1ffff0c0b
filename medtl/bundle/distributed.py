"""What a bundle's ``multi_gpu_train.json`` needs from ``torchrun``, as components it can name.

A received config may not import ``os`` or ``torch.distributed`` (``medtl.bundle.audit``), so the
steps that read torchrun's environment or start the process group live here and the config
references them by ``_target_``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from monai.handlers import EarlyStopHandler


def device() -> torch.device:
    """This process's GPU (torchrun's ``LOCAL_RANK``), or the CPU when there is none."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def start() -> bool:
    """Join torchrun's process group once (NCCL on GPUs, Gloo on CPUs); the address comes from its environment."""
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def finish() -> bool:
    """Leave the process group at the end of the run."""
    if dist.is_initialized():
        dist.destroy_process_group()
    return True


def rank_handlers(handlers: Sequence[Any]) -> list[Any]:
    """Every handler on rank 0; on other ranks only early stopping, which every rank must run so
    that all stop at the same epoch (metrics are gathered on all ranks, files written by rank 0)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        return list(handlers)
    return [h for h in handlers if isinstance(h, EarlyStopHandler)]


__all__ = ["device", "finish", "rank_handlers", "start"]
