"""Grad-CAM maps of a classifier's decision, cut into the slices a person looks at.

MONAI's ``GradCAM`` computes the map; this module chooses the layer, runs it one case at a time and
cuts the lesion's central slices out of the volume. Preprocessing centres every crop on the lesion
(``medtl.transforms.preprocessing``), so the central slices of the network input are the lesion's.

Two details of ``GradCAM`` are handled here rather than left to callers: its default normaliser maps
a map's maximum to 0 (it flips magnitudes), so maps are scaled to [0, 1] with 1 = most important;
and with a batch it scores every case against every case's class, so each case runs on its own.

Slices are returned in radiological display orientation from RAS arrays: patient right on the image
left, anterior (axial, sagittal) or superior (coronal) at the top::

    maps = gradcam(network, images)                 # (B, *spatial), [0, 1]
    panels = central_slices(images[0, 0].numpy())   # {"axial": 2D, "coronal": 2D, "sagittal": 2D}
    rgb = overlay(panels["axial"], central_slices(maps[0])["axial"])
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medtl.errors import MedtlError

__all__ = ["central_slices", "display", "gradcam", "overlay", "target_layer"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def target_layer(network: nn.Module, example: torch.Tensor | None = None, *, min_size: int = 4) -> str:
    """Name of the last top-level block holding a convolution whose output is still a map.

    Grad-CAM wants the last feature map with spatial extent, before pooling and the classifier:
    ``layer4`` of a ResNet on a large input. On a small lesion crop ``layer4`` may be 1-2 voxels
    wide, which says nothing about where; given an ``example`` input, the last block whose output
    is at least ``min_size`` wide along every axis is chosen instead (``layer3``, say).
    """
    found = [
        (name, child) for name, child in network.named_children() if any(isinstance(m, _CONVS) for m in child.modules())
    ]
    if not found:
        raise MedtlError(
            f"{type(network).__name__} has no convolutional block to explain with Grad-CAM",
            hint="give the layer name explicitly (layer=...)",
        )
    if example is None:
        return found[-1][0]
    sizes: dict[str, int] = {}

    def measure(name: str, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.dim() > 2:  # a block giving a list (Swin-ViT) is no map
            sizes[name] = min(out.shape[2:])

    hooks = [child.register_forward_hook(lambda _m, _i, out, name=name: measure(name, out)) for name, child in found]
    try:
        with torch.no_grad():
            network(example)
    finally:
        for hook in hooks:
            hook.remove()
    if not sizes:
        raise MedtlError(
            f"no top-level block of {type(network).__name__} gives a feature map to explain with Grad-CAM",
            hint="give the layer name explicitly (layer=...)",
        )
    wide = [name for name, _ in found if sizes.get(name, 0) >= min_size]
    return wide[-1] if wide else [name for name, _ in found if name in sizes][-1]


def _unit(values: torch.Tensor) -> torch.Tensor:
    """Per-case min-max scaling to [0, 1]; a flat map (no evidence anywhere) becomes all zeros."""
    flat = values.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    shape = (-1, *[1] * (values.dim() - 1))
    return torch.where(
        (high > low).view(shape), (values - low.view(shape)) / span.view(shape), torch.zeros_like(values)
    )


def gradcam(
    network: nn.Module,
    images: torch.Tensor,
    *,
    class_index: int | Sequence[int] | None = None,
    layer: str | None = None,
) -> np.ndarray:
    """Grad-CAM of each case for ``class_index`` (default: the predicted class), as (B, *spatial) in [0, 1].

    The network is copied, so the caller's model keeps no hooks and its training mode and
    ``requires_grad`` flags (a frozen backbone has none) are untouched.
    """
    from monai.visualize import GradCAM

    if images.dim() < 4:
        raise MedtlError(f"Grad-CAM needs a batch of images (B, C, *spatial), got shape {tuple(images.shape)}")
    model = copy.deepcopy(network).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    device = next(model.parameters()).device
    layer = layer or target_layer(
        model, torch.as_tensor(images[:1], dtype=torch.float32, device=device).as_subclass(torch.Tensor)
    )
    cam = GradCAM(nn_module=model, target_layers=layer, postprocessing=_unit)
    if class_index is None or isinstance(class_index, int):
        indices: list[int | None] = [class_index] * len(images)
    else:
        indices = list(class_index)
        if len(indices) != len(images):
            raise MedtlError(f"{len(indices)} class indices for {len(images)} images")
    maps = []
    with torch.enable_grad():
        for image, index in zip(images, indices, strict=True):
            x = (
                torch.as_tensor(image, dtype=torch.float32, device=device)
                .unsqueeze(0)
                .as_subclass(torch.Tensor)
                .requires_grad_(True)
            )
            if index is None:
                with torch.no_grad():
                    index = int(model(x).argmax(1))
            maps.append(cam(x=x, class_idx=int(index)).detach().cpu()[0, 0])
    return torch.stack(maps).numpy()


def display(plane: np.ndarray) -> np.ndarray:
    """A RAS plane (first axis towards patient right or anterior, second towards anterior or superior)
    as an image array in radiological orientation (rows top to bottom, columns left to right)."""
    return np.ascontiguousarray(plane[::-1, ::-1].T)


def central_slices(volume: np.ndarray) -> dict[str, np.ndarray]:
    """The three central planes of a RAS volume (x, y, z), or a 2D image as its only "axial" plane."""
    volume = np.asarray(volume)
    if volume.ndim == 2:
        return {"axial": display(volume)}
    if volume.ndim != 3:
        raise MedtlError(f"central slices need a 2D or 3D array, got shape {volume.shape}")
    x, y, z = (n // 2 for n in volume.shape)
    return {
        "axial": display(volume[:, :, z]),
        "coronal": display(volume[:, y, :]),
        "sagittal": display(volume[x, :, :]),
    }


def overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45, colormap: str = "jet") -> np.ndarray:
    """An RGB uint8 picture of ``image`` (grey, scaled by its own 1st-99th percentile) with ``heat``
    ([0, 1]) blended on top where it matters, so the anatomy stays visible under weak evidence."""
    import matplotlib

    image, heat = np.asarray(image, dtype=np.float64), np.clip(np.asarray(heat, dtype=np.float64), 0.0, 1.0)
    if image.shape != heat.shape:
        raise MedtlError(f"image {image.shape} and heat map {heat.shape} differ in shape")
    low, high = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    grey = np.clip((image - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(image)
    colour = matplotlib.colormaps[colormap](heat)[..., :3]
    weight = (alpha * heat)[..., None]
    rgb = (1.0 - weight) * grey[..., None] + weight * colour
    return np.round(rgb * 255).astype(np.uint8)
