"""What adaptation starts from: a source bundle adapted as itself, or a raw checkpoint of a registered network.

``open_source`` turns ``--source`` (and ``--arch`` for a raw checkpoint) into a ``Source``: the
network with the source's weights and a head for the target's classes, the deterministic
transform that gives that network its inputs from manifest rows, and what an export needs to
write a bundle that builds the same network with the same inputs.

- **A bundle** (folder or zip) is first imported as ``medtl bundle import`` imports it (unpacked,
  audited against the allow-list, verified) into the run's folder; its own ``network_def`` and
  inference ``preprocessing`` are then built from that copy, so channels (a lesion mask), crop,
  spacing and intensity preset are the source's, and the adapted model is exported from the
  source's configs (``template``).
- **A raw checkpoint** (state dict, training checkpoint, TorchScript, MedicalNet) is loaded into
  ``medtl.networks.create_network(arch, ...)``; its inputs are medtl's preprocessing (a second
  channel is the lesion mask) and its export is the ``tumor_cls_finetune`` template with
  ``network_def`` naming that architecture.
- **A bundle with ``arch``** takes the bundle's weights as a checkpoint for ``arch``, with the
  size arguments of the bundle's ``network_def`` that ``arch`` shares: a segmentation bundle's
  SegResNet as a ``segresnet-encoder``.

Every mismatch (architecture, width, channels, classes) is found here, before any training: the
weights must fill every tensor but the head, and one preprocessed case must run through the
network with the target's class count.
"""

from __future__ import annotations

import inspect
import json
import logging
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from pydoc import locate
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch import nn

from medtl.bundle.components import load_source
from medtl.bundle.share import import_bundle
from medtl.errors import MedtlError
from medtl.networks import (
    classes_argument,
    create_network,
    find_classifier,
    first_conv,
    network_def,
    network_options_for,
    network_spec,
)
from medtl.transforms import preprocessing
from medtl.weights import read_checkpoint

logger = logging.getLogger(__name__)

#: the template a raw checkpoint's adapted model is exported with
RAW_TEMPLATE = "tumor_cls_finetune"


@dataclass
class Source:
    """A pretrained network ready for the target's classes, with the inputs it takes."""

    network: nn.Module
    build: Callable[[], nn.Module]  # the same architecture, freshly initialised (training from scratch)
    preprocessing: Callable[[Mapping[str, Any]], Any]
    label: str  # the source's file or folder name, for messages (never its path)
    load_report: dict[str, Any]
    template: str | Path  # the bundle the adapted model is exported from
    network_def: dict[str, Any] | None = None  # written into the template's configs (raw checkpoints)
    settings: dict[str, Any] = field(default_factory=dict)  # the template's input literals to set
    bundle: Path | None = None  # the imported, verified copy of a source bundle
    arch: str | None = None

    @property
    def new_head(self) -> bool:
        """The classifier carries nothing of the source's (a new task, or classes matched to none):
        ``medtl.adapt.recipe.finetune(new_head=...)`` then neither keeps nor averages toward it."""
        mapping = self.load_report.get("class_mapping")
        if mapping is not None:
            return all(v is None for v in mapping.values())
        head, _ = find_classifier(self.network)
        return any(n.startswith(f"{head}.") for n in [*self.load_report["missing"], *self.load_report["mismatched"]])

    @property
    def in_channels(self) -> int:
        """Input channels of the network's first convolution."""
        return int(self._stem().in_channels)

    @property
    def spatial_dims(self) -> int:
        """2 or 3, from the first convolution's kernel."""
        return len(self._stem().kernel_size)

    def _stem(self) -> nn.Module:
        return self.network.get_submodule(first_conv(self.network) or "")

    def student(self, arch: str, **options: Any) -> nn.Module:
        """A fresh network of ``arch`` that takes the same inputs, for distillation."""
        return create_network(
            arch,
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            num_classes=_outputs(self.network),
            **options,
        )


def _outputs(network: nn.Module) -> int:
    return int(find_classifier(network)[1].out_features)


def is_bundle(path: Path) -> bool:
    """A bundle folder (``configs/metadata.json``) or a zip holding one."""
    if path.is_dir():
        return (path / "configs" / "metadata.json").is_file()
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("configs/metadata.json") for n in archive.namelist())
    return False


def open_source(
    source: str | Path,
    *,
    target_classes: Sequence[str],
    workdir: str | Path,
    class_map: Mapping[str, str] | str | None = None,
    arch: str | None = None,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    modality: str | None = None,
    network_options: Mapping[str, Any] | None = None,
    trust: bool = False,
) -> Source:
    """The source at ``source`` with a head for ``target_classes``; see the module docstring.

    ``workdir`` receives the imported copy of a source bundle (``workdir/source/NAME``).
    ``arch``, ``spatial_dims``, ``in_channels`` and ``network_options`` (e.g. ``widen_factor``)
    describe a raw checkpoint's network; for a bundle they are refused unless ``arch`` names an
    architecture to take its weights into. ``modality`` must agree with a bundle's own.
    """
    path = Path(source)
    if not path.exists():
        raise MedtlError("no such source bundle or weights file", path=path.name)
    if not is_bundle(path):
        if arch is None:  # medtl's own ResNet10, at the width its bundles use unless told otherwise
            network_options = {"widen_factor": 0.5, **{k: v for k, v in (network_options or {}).items() if v}}
        return _raw_source(
            path,
            target_classes=target_classes,
            arch=arch or "resnet10",
            spatial_dims=spatial_dims or 3,
            in_channels=in_channels or 1,
            modality=modality or "ct",
            network_options=network_options,
            trust=trust,
        )
    if arch is None:  # options of a raw checkpoint's network are refused before anything is unpacked
        given = {
            "--spatial-dims": spatial_dims,
            "--in-channels": in_channels,
            **{f"--{k.replace('_', '-')}": v for k, v in (network_options or {}).items()},
        }
        stray = [k for k, v in given.items() if v is not None]
        if stray:
            raise MedtlError(
                f"{', '.join(stray)} describe a raw checkpoint's network; a source bundle builds its own network_def",
                path=path.name,
                hint="drop them, or add --arch NAME to take the bundle's weights into another architecture",
            )
    bundle = _import(path, Path(workdir) / "source" / (path.stem if path.is_file() else path.name), trust=trust)
    if arch is not None:
        return _bundle_as_checkpoint(
            bundle,
            path.name,
            target_classes=target_classes,
            arch=arch,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            modality=modality,
            network_options=network_options,
            trust=trust,
        )
    return _bundle_source(bundle, path.name, target_classes, class_map=class_map, modality=modality, trust=trust)


def _import(path: Path, to: Path, *, trust: bool) -> Path:
    """The source bundle unpacked, audited and verified as ``medtl bundle import`` does it."""
    import_bundle(path, to, trust=trust, replace=True)
    return to


def _parser(bundle: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser["bundle_root"] = str(bundle)
    return parser


def _bundle_source(
    bundle: Path,
    label: str,
    target_classes: Sequence[str],
    *,
    class_map: Mapping[str, str] | str | None,
    modality: str | None,
    trust: bool,
) -> Source:
    """A source bundle adapted as itself: its network_def with the target's class count, its weights
    (head rows matched to the target's classes by name), its inference preprocessing."""
    parser = _parser(bundle)
    config = parser.get()
    own = config.get("modality")
    if modality is not None and own is not None and str(own).lower() != str(modality).lower():
        raise MedtlError(
            f"--modality {modality} given, but the source bundle's inputs are {own}",
            path=label,
            hint="drop --modality: a source bundle keeps its own intensity preset",
        )
    for key in ("network_def", "preprocessing"):
        if key not in config:
            raise MedtlError(f"the source bundle's inference.json has no {key!r}", path=label)
    k = len(target_classes)
    if "num_classes" in config:
        parser["num_classes"] = k
    else:
        definition = parser["network_def"]
        _set_classes(definition, k, label)
        parser["network_def"] = definition
    try:
        network = parser.get_parsed_content("network_def", lazy=False)
        transform = parser.get_parsed_content("preprocessing", lazy=False)
    except MedtlError:
        raise
    except Exception as exc:  # a bundle config that MONAI cannot build
        raise MedtlError(f"cannot build the source bundle's network or preprocessing: {exc}", path=label) from None
    if not isinstance(network, nn.Module):
        raise MedtlError(f"network_def builds a {type(network).__name__}, not a network", path=label)
    report = load_source(network, bundle, trust=trust, target_classes=target_classes, class_map=class_map)
    return Source(
        network=network,
        build=lambda: parser.get_parsed_content("network_def", lazy=False),
        preprocessing=transform,
        label=label,
        load_report=report,
        template=bundle,
        settings={k: config[k] for k in ("modality", "spatial_dims", "mask_channel", "crop_mm") if k in config},
        bundle=bundle,
    )


def _set_classes(config: Any, k: int, label: str) -> None:
    """The class count of a network_def that holds it as a literal (no top-level ``num_classes``)."""
    key = classes_argument(config) if isinstance(config, Mapping) else None
    if key is None or not isinstance(config.get(key), int):
        raise MedtlError(
            "cannot tell which argument of the source's network_def is its class count",
            path=label,
            hint="a bundle declares a top-level num_classes that network_def references (@num_classes)",
        )
    config[key] = k


def _raw_source(
    path: Path,
    *,
    target_classes: Sequence[str],
    arch: str,
    spatial_dims: int,
    in_channels: int,
    modality: str,
    network_options: Mapping[str, Any] | None,
    trust: bool,
    state: Mapping[str, torch.Tensor] | None = None,
    label: str | None = None,
    load_from: Path | None = None,
) -> Source:
    """A checkpoint loaded into the registered ``arch``, with medtl's preprocessing."""
    if in_channels not in (1, 2):
        raise MedtlError(
            f"--in-channels {in_channels}: medtl's inputs are the scan (1 channel) or the scan and its lesion mask (2)",
            hint="a checkpoint with other input channels is adapted to these (e.g. 3 -> 1 by summing)",
        )
    spec = network_spec(arch)
    state = dict(state) if state is not None else read_checkpoint(path, trust=trust)
    given = {k: v for k, v in (network_options or {}).items() if v is not None}
    options = {**network_options_for(arch, state, given=given), **given}
    config = network_def(
        spec.name, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=len(target_classes), **options
    )

    def build() -> nn.Module:
        return create_network(
            spec.name, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=len(target_classes), **options
        )

    network = build()
    report = load_source(network, load_from or path, trust=trust, state=state)  # a new head: names do not carry
    transform = preprocessing(modality=modality, spatial_dims=spatial_dims, mask_channel=in_channels == 2)
    return Source(
        network=network,
        build=build,
        preprocessing=transform,
        label=label or path.name,
        load_report=report,
        template=RAW_TEMPLATE,
        network_def=config,
        settings={"modality": modality, "spatial_dims": spatial_dims, "mask_channel": in_channels == 2},
        arch=spec.name,
    )


def _bundle_as_checkpoint(
    bundle: Path,
    label: str,
    *,
    target_classes: Sequence[str],
    arch: str,
    spatial_dims: int | None,
    in_channels: int | None,
    modality: str | None,
    network_options: Mapping[str, Any] | None,
    trust: bool,
) -> Source:
    """A bundle's weights (a segmentation model, say) taken into ``arch``: the size arguments of its
    network_def that ``arch``'s constructor shares are kept, so its encoder tensors fit."""
    definition = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8")).get("network_def")
    if not isinstance(definition, Mapping):
        raise MedtlError("the bundle's inference.json has no network_def to take sizes from", path=label)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    image = meta.get("network_data_format", {}).get("inputs", {}).get("image", {})
    target = network_def(network_spec(arch).name)["_target_"]
    accepted = _constructor_arguments(target)
    shared = {
        k: v
        for k, v in definition.items()
        if (accepted is None or k in accepted) and not k.startswith("_") and _literal(v) and k not in _COMMON_ARGUMENTS
    }
    dims = spatial_dims or _first(definition, ("spatial_dims",))
    channels = in_channels or _first(definition, ("in_channels", "n_input_channels")) or image.get("num_channels")
    options = {**shared, **{k: v for k, v in (network_options or {}).items() if v is not None}}
    logger.info("taking %s's weights into %s with %s", label, arch, options)
    state = read_checkpoint(bundle, trust=trust)
    return _raw_source(
        bundle,
        target_classes=target_classes,
        arch=arch,
        spatial_dims=int(dims or 3),
        in_channels=int(channels or 1),
        modality=modality or "ct",
        network_options=options,
        trust=trust,
        state=state,
        label=label,
        load_from=bundle,
    )


_COMMON_ARGUMENTS = frozenset(
    {"spatial_dims", "in_channels", "n_input_channels", "out_channels", "num_classes", "pretrained"}
)


def _literal(value: Any) -> bool:
    """A JSON literal (no reference or expression), safe to copy from another bundle's config."""
    if isinstance(value, str):
        return not value.startswith(("@", "$", "%"))
    if isinstance(value, (list, tuple)):
        return all(_literal(v) for v in value)
    return isinstance(value, (int, float, bool)) or value is None


def _first(config: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((config[k] for k in keys if k in config and isinstance(config[k], int)), None)


def _constructor_arguments(target: str) -> set[str] | None:
    """The keyword arguments ``target`` names; None when it takes any (``resnet10(**kwargs)``)."""
    parameters = inspect.signature(locate(target)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def check_inputs(src: Source, item: Mapping[str, Any], num_classes: int, where: str) -> None:
    """One preprocessed case through the network before any training: its channels and dimensions
    must be the network's, and the output must have the target's class count."""
    image = item["image"]
    channels, dims = int(image.shape[0]), image.ndim - 1
    if channels != src.in_channels or dims != src.spatial_dims:
        raise MedtlError(
            f"the preprocessed cases have {channels} channel(s) in {dims}D but {src.label}'s network takes "
            f"{src.in_channels} in {src.spatial_dims}D",
            path=where,
            hint="a 2-channel network takes the lesion mask as its second channel: give every case a mask",
        )
    network = src.network
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            out = network(torch.as_tensor(image, dtype=torch.float32)[None])
    except RuntimeError as exc:
        raise MedtlError(
            f"{src.label}'s network cannot take inputs of shape {tuple(image.shape)}: {str(exc).splitlines()[0]}",
            path=where,
        ) from None
    finally:
        network.train(was_training)
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise MedtlError(
            f"{src.label}'s network gives outputs of shape {tuple(out.shape)}, not (batch, {num_classes} classes)",
            path=where,
            hint="a segmentation network is a source through its encoder: --arch segresnet-encoder, "
            "unet-encoder or swinunetr-encoder",
        )


__all__ = ["RAW_TEMPLATE", "Source", "check_inputs", "is_bundle", "open_source"]
