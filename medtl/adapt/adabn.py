"""AdaBN: re-estimate BatchNorm statistics on unlabeled target data.

Scanner differences shift the feature statistics a network normalises with; recomputing BatchNorm
running means and variances on target images (no labels, no gradient steps) removes much of that
shift (Li et al., "Revisiting Batch Normalization for Practical Domain Adaptation", 2016). Every
other parameter and buffer is left exactly as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.progress import track

logger = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_running_stats(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm statistics for AdaBN to re-estimate (GroupNorm, InstanceNorm
    and LayerNorm networks, such as SegResNet's and Swin-ViT's encoders, normalise per input)."""
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


def adabn(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    image_key: str = "image",
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, int]:
    """Replace every BatchNorm layer's running statistics by their average over ``loader``.

    ``loader`` yields dicts holding ``image_key`` (MONAI style) or plain tensors. Returns the number
    of BatchNorm layers updated and of batches/images seen. The model is left in eval mode.
    """
    layers = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not layers:  # callers that may get such a network ask has_running_stats first
        raise MedtlError(
            f"{type(model).__name__} has no BatchNorm layers with running statistics: AdaBN has nothing to adapt"
        )
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches, not an exponential one
    model.eval()
    for m in layers:
        m.train()
    batches = images = 0
    try:
        with torch.no_grad():
            for batch in track(loader, desc="AdaBN", unit="batch", disable=not progress, leave=False):
                x = batch[image_key] if isinstance(batch, dict) else batch
                model(torch.as_tensor(x).to(device))
                batches += 1
                images += len(x)
                if max_batches is not None and batches >= max_batches:
                    break
    except BaseException:
        for m, _, buffers in saved:  # a failed pass leaves the source statistics as they were
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
        raise
    finally:
        for m, momentum, _ in saved:
            m.momentum = momentum
        model.eval()
    if batches == 0:
        for m, _, buffers in saved:
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
        raise MedtlError("AdaBN got no target batches: the loader is empty")
    logger.info("AdaBN: BatchNorm statistics of %d layers re-estimated from %d target images", len(layers), images)
    return {"bn_layers": len(layers), "batches": batches, "images": images}
