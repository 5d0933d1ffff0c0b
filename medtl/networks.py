"""The networks medtl builds: one registry of architectures, each defined by the constructor a bundle names.

timm-style: an architecture name maps to a ``NetworkSpec``: the MONAI (or medtl) constructor's dotted
path (a bundle's ``_target_``), the fixed arguments that make it that architecture (depth, variant,
``pretrained=False``), how that constructor spells the common arguments (``n_input_channels`` or
``in_channels``, ``num_classes`` or ``out_channels``) and its *family*. ``network_def`` writes a
network as the JSON a bundle's ``network_def`` holds and ``create_network`` instantiates exactly
that, as MONAI's ``ConfigParser`` would: one definition for training, export and reloading.

A family is the network class with the three facts the rest of medtl needs about it: the first
convolution (whose input channels ``medtl.weights`` adapts), the classifier (which
``medtl.adapt.head`` swaps) and the layer groups, input to output (which ``medtl.adapt.schedule``
freezes and unfreezes); optionally how known checkpoint layouts name its tensors. A network built
elsewhere (a bundle's ``network_def``, a user's own module) is recognised by its class, so the
declared names hold for it too; only a class no family covers falls back to "first convolution,
last linear layer, top-level children".

Registered: ``resnet10`` ... ``resnet200``, ``densenet121/169/201``, ``efficientnet-b0`` ... ``-b7``
and segmentation networks' encoders (``medtl.encoders``): ``segresnet-encoder`` (SegResNet),
``unet-encoder`` (BasicUNet), ``monai-unet-encoder`` (UNet), ``swinunetr-encoder`` (SwinUNETR's
Swin-ViT); every one in 2D and 3D. Weights are never downloaded: every network starts randomly
initialised, and pretrained weights come from files through ``medtl.weights.load_weights``
(``network_options_for`` tells what a checkpoint's layout needs, e.g. MedicalNet's shortcuts).

Examples:
    >>> network_def("resnet18", in_channels=2, medicalnet=True)["shortcut_type"]
    'A'
    >>> model = create_network("resnet10", num_classes=2, widen_factor=0.25)
    >>> find_classifier(model)[0], first_conv(model)
    ('fc', 'conv1')
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from monai.networks import nets
from monai.networks.nets.resnet import get_inplanes
from monai.utils import instantiate
from torch import Tensor, nn

from medtl import encoders
from medtl.errors import MedtlError

__all__ = [
    "FAMILIES",
    "Family",
    "NetworkSpec",
    "classes_argument",
    "create_network",
    "family_of",
    "find_classifier",
    "first_conv",
    "layer_patterns",
    "list_networks",
    "network_def",
    "network_options_for",
    "network_spec",
    "register_network",
    "resnet",
    "resnet_config",
]


@dataclass(frozen=True)
class Family:
    """A network class and the module paths medtl relies on in it."""

    module_class: type[nn.Module]
    first_conv: str  # module path of the convolution that sees the image (or of the block holding it first)
    classifier: str  # module path of the classifier (a Linear, or the Sequential a new head puts there)
    groups: Callable[[nn.Module], dict[str, str]]  # {group: regex on parameter names}, input to output, head excluded
    # (regex, replacement) renaming tensors of known checkpoint layouts onto this family's names
    checkpoint_keys: tuple[tuple[str, str], ...] = ()


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


def _segresnet_encoder_groups(model: nn.Module) -> dict[str, str]:
    return {"stem": r"^convInit\.", **{f"down{i}": rf"^down_layers\.{i}\." for i in range(len(model.down_layers))}}


def _basicunet_encoder_groups(model: nn.Module) -> dict[str, str]:
    return {"stem": r"^conv_0\.", **{f"down{i}": rf"^down_{i}\." for i in range(1, 5)}}


def _unet_encoder_groups(model: nn.Module) -> dict[str, str]:
    *downs, bottom = model.level_paths()
    names = ["stem", *(f"down{i}" for i in range(1, len(downs))), "bottom"]
    return {name: rf"^{re.escape(path)}\." for name, path in zip(names, [*downs, bottom], strict=True)}


def _swinunetr_encoder_groups(model: nn.Module) -> dict[str, str]:
    return {"stem": r"^swinViT\.patch_embed\.", **{f"stage{i}": rf"^swinViT\.layers{i}c?\." for i in range(1, 5)}}


RESNET = Family(nets.ResNet, "conv1", "fc", _resnet_groups)
DENSENET = Family(nets.DenseNet, "features.conv0", "class_layers.out", _densenet_groups)
EFFICIENTNET = Family(nets.EfficientNet, "_conv_stem", "_fc", _efficientnet_groups)
SEGRESNET_ENCODER = Family(encoders.SegResNetEncoder, "convInit.conv", "fc", _segresnet_encoder_groups)
BASICUNET_ENCODER = Family(encoders.BasicUNetEncoder, "conv_0.conv_0.conv", "fc", _basicunet_encoder_groups)
UNET_ENCODER = Family(encoders.UNetEncoder, "model.0", "fc", _unet_encoder_groups)
SWINUNETR_ENCODER = Family(
    encoders.SwinUNETREncoder,
    "swinViT.patch_embed.proj",
    "fc",
    _swinunetr_encoder_groups,
    # MONAI's self-supervised model_swinvit.pt holds the bare Swin-ViT (module.patch_embed.*,
    # module.layers1.0.*); other SwinUNETR trainings saved it as swin_vit.*
    checkpoint_keys=((r"^swin_vit\.", "swinViT."), (r"^(patch_embed|layers\dc?)\.", r"swinViT.\1.")),
)
FAMILIES: tuple[Family, ...] = (
    RESNET,
    DENSENET,
    EFFICIENTNET,
    SEGRESNET_ENCODER,
    BASICUNET_ENCODER,
    UNET_ENCODER,
    SWINUNETR_ENCODER,
)


@dataclass(frozen=True)
class NetworkSpec:
    """A registered architecture: the constructor that builds it, the arguments that make it that
    architecture, how the constructor spells the common ones, and its family."""

    name: str
    target: str  # dotted path of the constructor: a bundle's network_def ``_target_``
    family: Family
    fixed: Mapping[str, Any] = field(default_factory=dict)  # depth, variant, pretrained=False
    in_arg: str = "in_channels"  # the constructor's name for the input channels
    classes_arg: str = "num_classes"  # and for the class count
    translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # medtl's options -> constructor arguments
    options_for: Callable[[Mapping[str, Tensor]], dict[str, Any]] | None = None  # options a checkpoint implies


_REGISTRY: dict[str, NetworkSpec] = {}
# every spelling of the common arguments: set by network_def, never by options
_COMMON = frozenset({"spatial_dims", "in_channels", "n_input_channels", "num_classes", "out_channels"})


def register_network(
    name: str,
    target: str,
    family: Family,
    *,
    fixed: Mapping[str, Any] | None = None,
    in_arg: str = "in_channels",
    classes_arg: str = "num_classes",
    translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    options_for: Callable[[Mapping[str, Tensor]], dict[str, Any]] | None = None,
) -> NetworkSpec:
    """Register ``name``: built by the constructor at ``target`` with ``fixed`` arguments, the
    input channels passed as ``in_arg`` and the class count as ``classes_arg``."""
    spec = NetworkSpec(name, target, family, dict(fixed or {}), in_arg, classes_arg, translate, options_for)
    _REGISTRY[name] = spec
    return spec


def list_networks() -> list[str]:
    """Names ``create_network`` knows, sorted."""
    return sorted(_REGISTRY)


def network_spec(arch: str) -> NetworkSpec:
    """The registered architecture ``arch``; an unknown name is an error listing the known ones."""
    if arch not in _REGISTRY:
        raise MedtlError(f"unknown network {arch!r}; known networks: {', '.join(list_networks())}")
    return _REGISTRY[arch]


def network_def(
    arch: str, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 2, **kwargs: Any
) -> dict[str, Any]:
    """``arch`` as a bundle's ``network_def``: ``_target_`` and the constructor's arguments, plain JSON values.

    Args:
        arch: a name from ``list_networks()``, e.g. ``"resnet10"``, ``"densenet121"``, ``"efficientnet-b0"``,
            ``"segresnet-encoder"``.
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for CT/MR; 2 with the lesion mask as a second channel).
        num_classes: classifier outputs.
        kwargs: the constructor's own arguments (``widen_factor`` for ResNets, ``init_filters`` for
            ``segresnet-encoder``, ...). ResNets also take ``medicalnet=True``, written as MedicalNet's
            shortcut layout (``shortcut_type="A", bias_downsample=True`` for depths 18/34, ``"B"``
            without downsample bias otherwise) so MedicalNet checkpoints match tensor for tensor.
            ``pretrained=True`` is refused: it would download; weights come from local files.

    Examples:
        MedicalNet's ResNet-18 for CT + lesion mask, as ``inference.json`` holds it::

            network_def("resnet18", in_channels=2, medicalnet=True)
            # {"_target_": "monai.networks.nets.resnet18", "spatial_dims": 3, "n_input_channels": 2,
            #  "num_classes": 2, "shortcut_type": "A", "bias_downsample": True, "pretrained": False}
    """
    spec = network_spec(arch)
    if spatial_dims not in (2, 3):
        raise MedtlError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if in_channels < 1 or num_classes < 1:
        raise MedtlError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
    if kwargs.pop("pretrained", False):
        raise MedtlError(
            f"{arch}: pretrained=True downloads weights, which medtl never does",
            hint="build it untrained and load a local file with medtl.weights.load_weights",
        )
    options = spec.translate(dict(kwargs)) if spec.translate is not None else dict(kwargs)
    clash = sorted(set(options) & (_COMMON | set(spec.fixed)))
    if clash:
        raise MedtlError(
            f"cannot build {arch!r} with options {clash}: the registry sets them",
            hint="give spatial_dims=, in_channels= and num_classes=; the architecture name fixes the rest",
        )
    common = {"spatial_dims": spatial_dims, spec.in_arg: in_channels, spec.classes_arg: num_classes}
    return {
        "_target_": spec.target,
        **common,
        **{k: _plain(v, f"{arch} option {k}") for k, v in options.items()},
        **_plain(dict(spec.fixed), arch),
    }


def create_network(
    arch: str, *, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 2, **kwargs: Any
) -> nn.Module:
    """Build a randomly initialised network by name (never downloads weights): ``network_def``'s
    constructor called with ``network_def``'s arguments, as a bundle's ``ConfigParser`` builds it.
    Arguments as for ``network_def``."""
    config = network_def(arch, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **kwargs)
    target = config.pop("_target_")
    try:
        return instantiate(target, "default", **config)
    except RuntimeError as exc:  # MONAI's instantiate wraps the constructor's error
        cause = exc.__cause__ or exc
        text = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), type(cause).__name__)
        raise MedtlError(f"cannot build {arch!r} with options {sorted(kwargs)}: {text}") from exc


def classes_argument(config: Mapping[str, Any]) -> str | None:
    """The key of a ``network_def`` dict that holds its class count (``"num_classes"`` or
    ``"out_channels"``), from its ``_target_``: a registered target, or a MONAI network (full or
    short name) whose constructor takes one of the two. None when neither tells."""
    target = config.get("_target_")
    if not isinstance(target, str):
        return None
    short = target.removeprefix("monai.networks.nets.")  # MONAI's ConfigParser finds its classes by short name too
    for spec in _REGISTRY.values():
        if short == spec.target.removeprefix("monai.networks.nets."):
            return spec.classes_arg
    constructor = getattr(nets, short, None) if short.isidentifier() and not short.startswith("_") else None
    parameters = inspect.signature(constructor).parameters if callable(constructor) else {}
    return next((k for k in ("num_classes", "out_channels") if k in parameters), None)


def network_options_for(
    arch: str, state: Mapping[str, Tensor], *, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Options for ``network_def``/``create_network`` that a checkpoint's tensors imply for ``arch``.

    ``{"medicalnet": True}`` for a ResNet checkpoint in MedicalNet's shortcut layout (no downsample
    convolutions at depth 18/34; downsample convolutions without bias at the other depths); an
    encoder's sizes from its tensors (``init_filters``/``blocks_down``, BasicUNet's ``features``,
    Swin-ViT's ``feature_size``/``depths``/``num_heads``/``window_size``...); ``{}`` when the
    defaults fit or the tensors say nothing. Names may carry any prefix (``module.``, ``swinViT.``).

    ``given``: the options a caller sets explicitly. Implied options that would set any constructor
    argument of theirs are left out (``shortcut_type="B"`` given: no ``medicalnet``), so
    ``{**network_options_for(arch, state, given=given), **given}`` builds what the caller asked for.
    """
    spec = network_spec(arch)
    implied = spec.options_for(state) if spec.options_for is not None else {}
    if not given:
        return implied
    taken = _arguments_set(arch, given)
    return {k: v for k, v in implied.items() if k not in given and not _arguments_set(arch, {k: v}) & taken}


def _arguments_set(arch: str, options: Mapping[str, Any]) -> set[str]:
    """The constructor arguments ``options`` add to or change in ``arch``'s default ``network_def``."""
    plain, config = network_def(arch), network_def(arch, **options)
    return {k for k, v in config.items() if k not in plain or plain[k] != v}


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON data (tuples become lists); anything else cannot go into a bundle config."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where) for k, v in value.items()}
    raise MedtlError(
        f"{where}: a {type(value).__name__} cannot be written into a bundle's network_def",
        hint="give numbers, strings, booleans, lists and string-keyed mappings",
    )


def _find(state: Mapping[str, Tensor], suffix: str) -> str | None:
    """The first name in ``state`` ending with the dotted path regex ``suffix``, whatever its prefix."""
    pattern = re.compile(rf"(?:^|\.){suffix}$")
    return next((name for name in state if pattern.search(name)), None)


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


def _medicalnet_depth(depth: int) -> bool:
    """MedicalNet's shortcut type A (zero-padded identity, no tensors) at depths 18/34; B elsewhere."""
    return depth in (18, 34)


def _resnet_translate(depth: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def translate(options: dict[str, Any]) -> dict[str, Any]:
        if options.pop("medicalnet", False):
            options.setdefault("shortcut_type", "A" if _medicalnet_depth(depth) else "B")
            options.setdefault("bias_downsample", _medicalnet_depth(depth))
        return options

    return translate


def _resnet_layout(depth: int) -> Callable[[Mapping[str, Tensor]], dict[str, Any]]:
    def options_for(state: Mapping[str, Tensor]) -> dict[str, Any]:
        if _find(state, r"layer2\.0\.conv1\.weight") is None:
            return {}  # not a ResNet's tensors
        downsample = [n for n in state if re.search(r"(?:^|\.)layer\d+\.0\.downsample\.", n)]
        if _medicalnet_depth(depth):
            medicalnet = not downsample
        else:
            medicalnet = bool(downsample) and not any(n.endswith("downsample.0.bias") for n in downsample)
        return {"medicalnet": True} if medicalnet else {}

    return options_for


def _segresnet_sizes(state: Mapping[str, Tensor]) -> dict[str, Any]:
    stem = _find(state, r"convInit\.conv\.weight")
    if stem is None:
        return {}
    blocks: dict[int, set[int]] = {}
    for name in state:
        found = re.search(r"(?:^|\.)down_layers\.(\d+)\.(\d+)\.conv1\.", name)
        if found:
            blocks.setdefault(int(found[1]), set()).add(int(found[2]))
    sizes: dict[str, Any] = {"init_filters": int(state[stem].shape[0])}
    if blocks and sorted(blocks) == list(range(len(blocks))):
        sizes["blocks_down"] = [len(blocks[i]) for i in range(len(blocks))]
    return sizes


def _basicunet_sizes(state: Mapping[str, Tensor]) -> dict[str, Any]:
    stages = [_find(state, r"conv_0\.conv_1\.conv\.weight")]
    stages += [_find(state, rf"down_{i}\.convs\.conv_1\.conv\.weight") for i in range(1, 5)]
    if None in stages:
        return {}
    features = [int(state[name].shape[0]) for name in stages]
    last = _find(state, r"upcat_1\.convs\.conv_1\.conv\.weight")  # the decoder's, when the checkpoint has it
    return {"features": [*features, int(state[last].shape[0]) if last else features[0]]}


def _swinunetr_sizes(state: Mapping[str, Tensor]) -> dict[str, Any]:
    proj = _find(state, r"patch_embed\.proj\.weight")
    if proj is None:
        return {}
    weight = state[proj]
    sizes: dict[str, Any] = {"feature_size": int(weight.shape[0]), "patch_size": int(weight.shape[2])}
    depths, tables = [], []
    for stage in range(1, 5):
        blocks = {int(m[1]) for n in state if (m := re.search(rf"(?:^|\.)layers{stage}\.0\.blocks\.(\d+)\.", n))}
        table = _find(state, rf"layers{stage}\.0\.blocks\.0\.attn\.relative_position_bias_table")
        if not blocks or table is None:
            return sizes
        depths.append(len(blocks))
        tables.append(state[table])
    sizes.update(depths=depths, num_heads=[int(t.shape[1]) for t in tables])
    sizes["use_v2"] = _find(state, r"layers1c\.0\.[\w.]+") is not None
    rows, dims = int(tables[0].shape[0]), weight.ndim - 2
    window = (round(rows ** (1 / dims)) + 1) // 2  # a window of w has a (2w - 1)^dims-row bias table
    if (2 * window - 1) ** dims == rows:
        sizes["window_size"] = window
    return sizes


for _depth in (10, 18, 34, 50, 101, 152, 200):
    register_network(
        f"resnet{_depth}",
        f"monai.networks.nets.resnet{_depth}",
        RESNET,
        fixed={"pretrained": False},
        in_arg="n_input_channels",
        translate=_resnet_translate(_depth),
        options_for=_resnet_layout(_depth),
    )
for _depth in (121, 169, 201):
    register_network(
        f"densenet{_depth}",
        f"monai.networks.nets.DenseNet{_depth}",
        DENSENET,
        fixed={"pretrained": False},
        classes_arg="out_channels",
    )
for _b in range(8):
    register_network(
        f"efficientnet-b{_b}",
        "monai.networks.nets.EfficientNetBN",
        EFFICIENTNET,
        fixed={"model_name": f"efficientnet-b{_b}", "pretrained": False},
    )
register_network(
    "segresnet-encoder", "medtl.encoders.SegResNetEncoder", SEGRESNET_ENCODER, options_for=_segresnet_sizes
)
register_network("unet-encoder", "medtl.encoders.BasicUNetEncoder", BASICUNET_ENCODER, options_for=_basicunet_sizes)
register_network("monai-unet-encoder", "medtl.encoders.UNetEncoder", UNET_ENCODER)
register_network(
    "swinunetr-encoder", "medtl.encoders.SwinUNETREncoder", SWINUNETR_ENCODER, options_for=_swinunetr_sizes
)


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
    """Module path of the convolution that sees the image: the family's declared one (the first
    convolution inside it when it declares a block, as MONAI's UNet, whose first block is a
    convolution or a residual unit), else the first convolution in the network's registration
    order (None when it has none)."""
    modules = dict(model.named_modules())
    family = family_of(model)
    scope = family.first_conv if family is not None and family.first_conv in modules else ""
    inside = modules[scope].named_modules(prefix=scope) if scope else modules.items()
    return next((n for n, m in inside if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)


def layer_patterns(model: nn.Module) -> dict[str, str] | None:
    """The family's layer groups (``{name: regex}`` on parameter names, input to output, head
    excluded); None for a network of no family."""
    family = family_of(model)
    return family.groups(model) if family is not None else None
