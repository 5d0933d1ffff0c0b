"""The networks medtl builds, each declaring where its input enters and where its classes leave.

One registry, timm-style: an architecture name maps to a factory and to its *family*, the network
class with the three facts the rest of medtl needs about it: the first convolution (whose input
channels ``medtl.weights`` adapts), the classifier (which ``medtl.adapt.head`` swaps) and the layer
groups, input to output (which ``medtl.adapt.schedule`` freezes and unfreezes). A network built
elsewhere (a bundle's ``network_def``, a user's own module) is recognised by its class, so the
declared names hold for it too; only a class no family covers falls back to "first convolution,
last linear layer, top-level children".

Weights are never downloaded: every factory builds a randomly initialised network, and pretrained
weights come from files through ``medtl.weights.load_weights``.

Examples:
    >>> model = create_network("resnet10", num_classes=2, widen_factor=0.25)
    >>> find_classifier(model)[0], first_conv(model)
    ('fc', 'conv1')
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from monai.networks import nets
from monai.networks.nets.resnet import get_inplanes
from torch import nn

from medtl.errors import MedtlError

__all__ = [
    "FAMILIES",
    "Family",
    "NetworkSpec",
    "create_network",
    "family_of",
    "find_classifier",
    "first_conv",
    "layer_patterns",
    "list_networks",
    "network_spec",
    "register_network",
    "resnet",
    "resnet_config",
]


@dataclass(frozen=True)
class Family:
    """A network class and the module paths medtl relies on in it."""

    module_class: type[nn.Module]
    first_conv: str  # module path of the convolution that sees the image
    classifier: str  # module path of the classifier (a Linear, or the Sequential a new head puts there)
    groups: Callable[[nn.Module], dict[str, str]]  # {group: regex on parameter names}, input to output, head excluded


def _resnet_groups(model: nn.Module) -> dict[str, str]:
    layers = [n for n, _ in model.named_children() if re.fullmatch(r"layer\d+", n)]
    return {"stem": r"^(conv1|bn1)\.", **{n: rf"^{n}\." for n in layers}}


def _densenet_groups(model: nn.Module) -> dict[str, str]:
    blocks = [n for n, _ in model.features.named_children() if n.startswith("denseblock")]
    patterns = {"stem": r"^features\.(conv0|norm0)\."}
    for i, block in enumerate(blocks, 1):
        extra = f"transition{i}" if i < len(blocks) else "norm5"
        patterns[f"block{i}"] = rf"^features\.({block}|{extra})\."
    return patterns


def _efficientnet_groups(model: nn.Module) -> dict[str, str]:
    stages = {"stem": r"^(_conv_stem|_bn0)\."}
    stages.update({f"stage{i}": rf"^_blocks\.{i}\." for i in range(len(model._blocks))})
    stages["top"] = r"^(_conv_head|_bn1)\."
    return stages


RESNET = Family(nets.ResNet, "conv1", "fc", _resnet_groups)
DENSENET = Family(nets.DenseNet, "features.conv0", "class_layers.out", _densenet_groups)
EFFICIENTNET = Family(nets.EfficientNet, "_conv_stem", "_fc", _efficientnet_groups)
FAMILIES: tuple[Family, ...] = (RESNET, DENSENET, EFFICIENTNET)


@dataclass(frozen=True)
class NetworkSpec:
    """A registered architecture: its name, factory and family."""

    name: str
    build: Callable[..., nn.Module]
    family: Family


_REGISTRY: dict[str, NetworkSpec] = {}


def register_network(name: str, family: Family) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding ``factory(*, spatial_dims, in_channels, num_classes, **kwargs)`` under ``name``."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = NetworkSpec(name, factory, family)
        return factory

    return decorate


def list_networks() -> list[str]:
    """Names ``create_network`` knows, sorted."""
    return sorted(_REGISTRY)


def network_spec(arch: str) -> NetworkSpec:
    """The registered architecture ``arch``; an unknown name is an error listing the known ones."""
    if arch not in _REGISTRY:
        raise MedtlError(f"unknown network {arch!r}; known networks: {', '.join(list_networks())}")
    return _REGISTRY[arch]


def create_network(
    arch: str, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 2, **kwargs: Any
) -> nn.Module:
    """Build a randomly initialised network by name (never downloads weights).

    Args:
        arch: a name from ``list_networks()``, e.g. ``"resnet10"``, ``"densenet121"``, ``"efficientnet-b0"``.
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for CT/MR; 2 with the lesion mask as a second channel).
        num_classes: classifier outputs.
        kwargs: passed to the MONAI constructor (e.g. ``widen_factor`` for ResNets). ResNets also take
            ``medicalnet=True`` to use MedicalNet's shortcut layout (type A with
            ``bias_downsample=True`` for depths 18/34, type B without downsample bias otherwise),
            so MedicalNet checkpoints match tensor for tensor.
    """
    spec = network_spec(arch)
    if spatial_dims not in (2, 3):
        raise MedtlError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if in_channels < 1 or num_classes < 1:
        raise MedtlError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
    kwargs.pop("pretrained", None)  # MONAI's pretrained=True downloads; medtl loads local files
    try:
        return spec.build(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise MedtlError(f"cannot build {arch!r} with options {sorted(kwargs)}: {exc}") from exc


def _resnet_factory(depth: int) -> Callable[..., nn.Module]:
    def build(
        *, spatial_dims: int, in_channels: int, num_classes: int, medicalnet: bool = False, **kwargs: Any
    ) -> nn.Module:
        if medicalnet:
            kwargs.setdefault("shortcut_type", "A" if depth in (18, 34) else "B")
            kwargs.setdefault("bias_downsample", depth in (18, 34))
        return getattr(nets, f"resnet{depth}")(
            pretrained=False, spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes, **kwargs
        )

    return build


for _depth in (10, 18, 34, 50, 101, 152, 200):
    register_network(f"resnet{_depth}", RESNET)(_resnet_factory(_depth))


@register_network("densenet121", DENSENET)
def _densenet121(*, spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    return nets.DenseNet121(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, pretrained=False, **kwargs
    )


def _efficientnet_factory(variant: str) -> Callable[..., nn.Module]:
    def build(*, spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
        return nets.EfficientNetBN(
            variant,
            pretrained=False,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=num_classes,
            **kwargs,
        )

    return build


for _b in range(8):
    register_network(f"efficientnet-b{_b}", EFFICIENTNET)(_efficientnet_factory(f"efficientnet-b{_b}"))


def resnet(
    widen: float,
    num_classes: int = 2,
    *,
    spatial_dims: int = 3,
    depth: int = 10,
    small_input: bool = False,
    in_channels: int = 1,
) -> nn.Module:
    """The ResNet medtl's stages and bundles use (ResNet10 at width ``widen``), or its kin.

    ``spatial_dims=2`` builds the 2D network for images, ``depth`` picks ResNet10 or ResNet18.
    ``small_input`` swaps the 7x7 stride-2 stem and max-pool for a 3x3 stride-1 stem, as MedMNIST's
    28-pixel ResNets do: the usual stem leaves a 28x28 image 7x7 before the first residual block.
    ``in_channels=2`` takes the lesion mask as a second channel (``preprocessing(mask_channel=True)``).
    """
    if depth not in (10, 18):
        raise MedtlError(f"medtl's ResNet has depth 10 or 18, got depth={depth!r}")
    stem = {"conv1_t_size": 3, "conv1_t_stride": 1, "no_max_pool": True} if small_input else {}
    return create_network(
        f"resnet{depth}",
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        widen_factor=widen,
        **stem,
    )


def resnet_config(widen: float, num_classes: int, *, in_channels: int = 1) -> dict[str, Any]:
    """``resnet(widen, num_classes)`` as a class path and constructor arguments, for configs that
    name a class rather than call a factory (NVIDIA FLARE's persistor builds it on the server)."""
    return {
        "path": "monai.networks.nets.ResNet",
        "args": {
            "block": "basic",
            "layers": [1, 1, 1, 1],
            "block_inplanes": get_inplanes(),
            "spatial_dims": 3,
            "n_input_channels": in_channels,
            "num_classes": num_classes,
            "widen_factor": widen,
        },
    }


def family_of(model: nn.Module) -> Family | None:
    """The family whose class ``model`` is an instance of; None for a class medtl has no family for."""
    return next((f for f in FAMILIES if isinstance(model, f.module_class)), None)


def find_classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier's module path and its output layer.

    The family's declared path; when a new head with a hidden layer sits there (a Sequential), its
    last Linear. A network of no family: its last ``nn.Linear``.
    """
    modules = dict(model.named_modules())
    family = family_of(model)
    if family is not None and family.classifier in modules:
        head = modules[family.classifier]
        if isinstance(head, nn.Linear):
            return family.classifier, head
        inner = [(f"{family.classifier}.{n}", m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
        if inner:
            return inner[-1]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise MedtlError(
            f"{type(model).__name__} has no nn.Linear classifier", hint="give a network with a linear head"
        )
    return linears[-1]


def first_conv(model: nn.Module) -> str | None:
    """Module path of the convolution that sees the image: the family's declared one, else the first
    convolution in the network's registration order (None when it has none)."""
    modules = dict(model.named_modules())
    family = family_of(model)
    if family is not None and family.first_conv in modules:
        return family.first_conv
    return next((n for n, m in modules.items() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)


def layer_patterns(model: nn.Module) -> dict[str, str] | None:
    """The family's layer groups (``{name: regex}`` on parameter names, input to output, head
    excluded); None for a network of no family."""
    family = family_of(model)
    return family.groups(model) if family is not None else None
