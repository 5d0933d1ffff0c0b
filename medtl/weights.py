"""Pretrained weights from wherever users keep them, loaded into MONAI networks with an explicit report.

Three steps, each a small function:

1. ``read_checkpoint`` turns a file or folder into a flat ``{name: tensor}`` dict: a MONAI bundle
   (folder or .zip, ``models/model.pt`` else ``models/model.ts``), a plain state dict, a training
   checkpoint (``{"state_dict"|"model"|"network": ...}``, Lightning), TorchScript, MedicalNet/Med3D.
   Safe by default (``torch.load(weights_only=True)``); pickled code needs ``trust=True``.
2. ``match_keys`` renames checkpoint tensors onto the model's names with explicit rules: wrapper
   prefixes stripped (``module.``, ``model.``, ...), a user regex ``key_map``, the network family's
   rules for known layouts (MONAI's self-supervised Swin-ViT, ``medtl.networks.Family``), an added prefix.
3. ``load_weights`` merges matched tensors into the model's state, adapting what has a principled
   adaptation (input channels of the stem conv, 2D -> 3D kernel inflation) and reporting everything
   else: nothing is skipped silently. A classifier head with another class count is *mismatched*,
   never adapted (swapping heads is a separate step).

Examples:
    MedicalNet ResNet-10 backbone into a 2-class nodule classifier::

        model = create_network("resnet10", num_classes=2)
        report = load_weights(model, "resnet_10_23dataset.pth")
        print(report.summary())   # fc.* missing (new head), conv_seg.* unexpected (seg head)
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medtl.errors import MedtlError, first_line
from medtl.networks import create_network, family_of, find_classifier, first_conv, network_def, network_options_for

__all__ = [
    "DEFAULT_STRIP_PREFIXES",
    "Adaptation",
    "LoadReport",
    "Mismatch",
    "UntrustedCheckpointWarning",
    "adapt_input_conv",
    "bundle_member",
    "inflate_conv_2d_to_3d",
    "inspect_checkpoint",
    "load_weights",
    "match_keys",
    "read_checkpoint",
]

DEFAULT_STRIP_PREFIXES: tuple[str, ...] = ("module.", "model.", "net.", "network.")

# Keys under which training code nests the weights, tried in this order.
_CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "network", "net", "module")


class UntrustedCheckpointWarning(UserWarning):
    """A checkpoint was unpickled with ``trust=True``: it could have run arbitrary code."""


# --------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, *, trust: bool = False) -> dict[str, Tensor]:
    """Read the weights in ``path`` as a flat ``{name: tensor}`` dict on the CPU, names as stored.

    ``path`` may be a MONAI bundle folder or .zip (``models/model.pt``, else ``models/model.ts``),
    a state dict or training checkpoint (.pt/.pth/.ckpt; nested under ``state_dict``/``model``/
    ``network``... is unwrapped), or a TorchScript file. Prefixes such as ``module.`` are kept here
    and removed by ``match_keys``.

    Loading is ``torch.load(weights_only=True)``: tensors and plain containers only. A file that
    needs pickled code, and any TorchScript file, is refused unless ``trust=True`` (which warns:
    unpickling and TorchScript can run code).
    """
    path = Path(path)
    if not path.exists():
        raise MedtlError("checkpoint not found", path=path)
    if path.is_dir():
        return _read_bundle_dir(path, trust=trust)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if _is_torchscript(names):
                return _state_of(_jit_load(path, path, trust=trust), path)
            if not _is_torch_zip(names):
                return _read_bundle_zip(path, archive, names, trust=trust)
    return _state_of(_torch_load(path, path, trust=trust), path)


def state_sha256(state: Mapping[str, Tensor]) -> str:
    """sha256 over a state dict's names, shapes, dtypes and values: equal for equal weights, however
    the file holding them was written (``torch.save`` output differs between saves)."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _read_bundle_dir(path: Path, *, trust: bool) -> dict[str, Tensor]:
    for name in ("model.pt", "model.ts"):
        file = path / "models" / name
        if file.is_file():
            return read_checkpoint(file, trust=trust)
    raise MedtlError(
        "folder holds no weights: expected a MONAI bundle with models/model.pt or models/model.ts",
        path=path,
        hint="pass the weights file itself, or the bundle's root folder",
    )


def bundle_member(names: Iterable[str], wanted: str) -> str | None:
    """The zip entry holding a bundle's ``wanted`` file (``models/model.pt``): a bundle zip holds
    either ``models/...`` or ``<bundle_name>/models/...``; the shallowest match wins."""
    hits = sorted((n for n in names if n == wanted or n.endswith("/" + wanted)), key=lambda n: n.count("/"))
    return hits[0] if hits else None


def _read_bundle_zip(path: Path, archive: zipfile.ZipFile, names: list[str], *, trust: bool) -> dict[str, Tensor]:
    for wanted in ("models/model.pt", "models/model.ts"):
        member = bundle_member(names, wanted)
        if member is not None:
            label = f"{path}!{member}"
            data = io.BytesIO(archive.read(member))
            if zipfile.is_zipfile(data):
                data.seek(0)
                with zipfile.ZipFile(data) as inner:
                    scripted = _is_torchscript(inner.namelist())
                data.seek(0)
                if scripted:
                    return _state_of(_jit_load(data, label, trust=trust), label)
            data.seek(0)
            return _state_of(_torch_load(data, label, trust=trust), label)
    raise MedtlError(
        "zip file is neither a PyTorch checkpoint nor a MONAI bundle with models/model.pt or models/model.ts",
        path=path,
    )


def _is_torch_zip(names: list[str]) -> bool:
    return any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names)


def _is_torchscript(names: list[str]) -> bool:
    return _is_torch_zip(names) and any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names)


def _jit_load(source: Path | io.BytesIO, label: str | Path, *, trust: bool) -> Any:
    """TorchScript is a program: loading runs its ``__setstate__`` and using it runs its code, so
    it is read only with ``trust`` (a bundle's weights-only ``models/model.pt`` is preferred)."""
    if not trust:
        raise MedtlError(
            "TorchScript is a program that runs its own code when loaded; refused without --trust",
            path=label,
            hint="pass the weights-only model.pt (or the bundle folder holding it), or --trust for a file you trust",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", DeprecationWarning
            )  # torch 2.x deprecates TorchScript; bundles still ship it
            return torch.jit.load(source, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure here is a broken file, reported as such
        raise MedtlError(
            f"cannot read TorchScript file, it may be corrupted or truncated ({_first_sentence(exc)})", path=label
        ) from exc


def _torch_load(source: Path | io.BytesIO, label: str | Path, *, trust: bool) -> Any:
    if trust:
        warnings.warn(
            f"{label}: loading with trust=True unpickles arbitrary objects, which can run code; "
            "do this only for files from a source you trust",
            UntrustedCheckpointWarning,
            stacklevel=3,
        )
    try:
        return torch.load(source, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        unsafe = [] if trust else _unsafe_globals(source, exc)
        if unsafe:
            raise MedtlError(
                f"checkpoint needs pickled code to load ({', '.join(unsafe[:5])}); refused by default because "
                "unpickling can run arbitrary code",
                path=label,
                hint="pass --trust (trust=True) only if you trust where the file came from",
            ) from exc
        raise MedtlError(
            f"cannot read checkpoint, it may be corrupted or truncated ({_first_sentence(exc)})", path=label
        ) from exc
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for broken files
        raise MedtlError(
            f"cannot read checkpoint, it may be corrupted or truncated ({_first_sentence(exc)})", path=label
        ) from exc


def _unsafe_globals(source: Path | io.BytesIO, exc: Exception) -> list[str]:
    """Names of the pickled classes/functions that made a weights-only load fail (empty: file broken)."""
    try:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        found = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        if found:
            return list(found)
    except Exception:  # noqa: BLE001 - legacy (non-zip) format or unreadable: fall back to the message
        pass
    match = re.search(r"Unsupported (?:global|class|operand)[^:]*:\s*(?:GLOBAL\s+)?([\w.]+)", str(exc))
    return [match.group(1)] if match else []


def _first_sentence(exc: BaseException) -> str:
    """torch's advice that follows its first sentence is not for medtl users."""
    return first_line(exc, typed=False).split(". ")[0].rstrip(".")


def _state_of(obj: Any, label: str | Path) -> dict[str, Tensor]:
    """Flatten what ``torch.load``/``torch.jit.load`` returned into ``{name: tensor}``."""
    if isinstance(obj, nn.Module):  # includes TorchScript modules
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        nested = [k for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], (Mapping, nn.Module))]
        if tensors and len(tensors) >= len(obj) - len(nested):
            return {k: v.detach() for k, v in tensors.items()}
        for key in nested:
            try:
                return _state_of(obj[key], label)
            except MedtlError:
                continue
        if tensors:
            return {k: v.detach() for k, v in tensors.items()}
        keys = ", ".join(map(str, list(obj)[:10]))
        raise MedtlError(f"checkpoint holds no tensors (top-level keys: {keys or 'none'})", path=label)
    raise MedtlError(f"checkpoint holds a {type(obj).__name__}, not weights", path=label)


# --------------------------------------------------------------------------------------------------
# Matching names
# --------------------------------------------------------------------------------------------------


def match_keys(
    keys: Iterable[str],
    model_keys: Iterable[str],
    *,
    strip_prefixes: Iterable[str] = DEFAULT_STRIP_PREFIXES,
    add_prefix: str = "",
    key_map: Mapping[str, str] | None = None,
    layout_rules: Iterable[tuple[str, str]] = (),
) -> dict[str, str]:
    """Map each checkpoint name to the name it takes in the model, by explicit rules in this order.

    1. Strip: while the name (with ``add_prefix``) is not a model name and starts with one of
       ``strip_prefixes``, remove that prefix (``module.model.conv1.weight`` -> ``conv1.weight``).
       When no stripping reaches a model name, the last form that still starts with one of the
       model's top-level modules is kept (MONAI UNet's own ``model.``), else the fully stripped one.
    2. ``key_map``: ``re.sub(pattern, replacement, name)`` for each item, in order.
    3. ``layout_rules`` (a family's ``checkpoint_keys``): ``(pattern, replacement)`` pairs, in order,
       for a name that is not a model name yet, kept only when they make it one.
    4. Prepend ``add_prefix``.

    Names that do not end up as model names are still returned (the caller reports them).
    """
    targets = set(model_keys)
    tops = {k.split(".", 1)[0] for k in targets}
    prefixes = tuple(strip_prefixes)
    compiled = [(re.compile(p), r) for p, r in (key_map or {}).items()]
    layouts = [(re.compile(p), r) for p, r in layout_rules]
    mapping: dict[str, str] = {}
    for key in keys:
        forms = [key]
        while add_prefix + forms[-1] not in targets:
            prefix = next((p for p in prefixes if p and forms[-1].startswith(p) and len(forms[-1]) > len(p)), None)
            if prefix is None:
                break
            forms.append(forms[-1][len(prefix) :])
        name = forms[-1]
        if add_prefix + name not in targets:
            name = next((f for f in reversed(forms) if f.split(".", 1)[0] in tops), name)
        for pattern, replacement in compiled:
            name = pattern.sub(replacement, name)
        if layouts and add_prefix + name not in targets:
            renamed = name
            for pattern, replacement in layouts:
                renamed = pattern.sub(replacement, renamed)
            name = renamed if add_prefix + renamed in targets else name
        mapping[key] = add_prefix + name
    return mapping


# --------------------------------------------------------------------------------------------------
# Adaptation of tensors
# --------------------------------------------------------------------------------------------------


def adapt_input_conv(weight: Tensor, in_channels: int) -> tuple[Tensor, str]:
    """Change the input channels (dim 1) of a conv weight so activations keep their scale.

    C -> 1 sums over channels (a grayscale image replicated into C channels gives the same output);
    1 -> N repeats and divides by N; C -> N repeats the channels cyclically and scales by C/N.
    Returns the new weight and a description of what was done.
    """
    c = weight.shape[1]
    if c == in_channels:
        return weight, "unchanged"
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True), f"input channels {c}->1: summed over channels"
    if c == 1:
        return weight.repeat_interleave(
            in_channels, dim=1
        ) / in_channels, f"input channels 1->{in_channels}: repeated, scaled by 1/{in_channels}"
    index = torch.arange(in_channels) % c
    return weight[:, index] * (
        c / in_channels
    ), f"input channels {c}->{in_channels}: repeated cyclically, scaled by {c}/{in_channels}"


def inflate_conv_2d_to_3d(weight: Tensor, depth: int) -> tuple[Tensor, str]:
    """I3D inflation: repeat a 2D kernel ``(O, I, H, W)`` ``depth`` times along a new depth axis, divided by ``depth``.

    On a volume constant along depth the 3D conv then reproduces the 2D conv's output.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 2D conv weight (O, I, H, W), got shape {tuple(weight.shape)}")
    return weight.unsqueeze(2).repeat(
        1, 1, depth, 1, 1
    ) / depth, f"2D->3D: kernel inflated to depth {depth}, divided by {depth}"


def _adapt(tensor: Tensor, target: torch.Size, *, input_conv: bool) -> tuple[Tensor, list[str]] | None:
    """A principled adaptation of ``tensor`` to shape ``target`` or None. Heads are never adapted."""
    steps: list[str] = []
    if len(target) < 3:  # only conv weights (O, I, *kernel)
        return None
    if (
        tensor.ndim == 4
        and len(target) == 5
        and tensor.shape[0] == target[0]
        and tuple(tensor.shape[2:]) == tuple(target[3:])
    ):
        tensor, how = inflate_conv_2d_to_3d(tensor, target[2])
        steps.append(how)
    if tensor.ndim != len(target) or tensor.shape[0] != target[0] or tuple(tensor.shape[2:]) != tuple(target[2:]):
        return None
    if tensor.shape[1] != target[1]:
        if not input_conv:
            return None
        tensor, how = adapt_input_conv(tensor, target[1])
        steps.append(how)
    return tensor, steps


# --------------------------------------------------------------------------------------------------
# Loading with a report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    """A model tensor that a checkpoint tensor was named for, but whose shape could not be matched."""

    name: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]
    checkpoint_name: str

    def __str__(self) -> str:
        return f"{self.name} (checkpoint {list(self.checkpoint_shape)} vs model {list(self.model_shape)})"


@dataclass(frozen=True)
class Adaptation:
    """A checkpoint tensor loaded after a shape adaptation."""

    name: str
    how: str
    checkpoint_name: str

    def __str__(self) -> str:
        return f"{self.name} ({self.how})"


@dataclass
class LoadReport:
    """What a weight load did, tensor by tensor. The lists are disjoint except ``adapted`` (a subset of ``loaded``).

    Attributes:
        loaded: model tensors that received checkpoint values (possibly adapted).
        missing: model tensors no checkpoint tensor was named for; they keep their initialisation.
        unexpected: checkpoint tensors (names after prefix stripping and ``key_map``) with no model tensor.
        mismatched: model tensors whose checkpoint tensor had an incompatible shape; they keep their initialisation.
        adapted: loaded tensors that were reshaped first, with how.
        notes: how the network was chosen to fit the checkpoint (e.g. MedicalNet's shortcut layout).
    """

    source: str = ""
    model: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    adapted: list[Adaptation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when every model tensor was loaded and every checkpoint tensor used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, max_names: int = 6) -> str:
        """One paragraph: counts, then the names (shortened) of what was not loaded as is."""
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        parts = [
            f"Loaded {len(self.loaded)} of {total} {self.model or 'model'} tensors from {self.source or 'checkpoint'}"
        ]
        if self.adapted:
            parts.append(f"{len(self.adapted)} adapted: {_names(self.adapted, max_names)}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing (kept initialisation): {_names(self.missing, max_names)}")
        if self.mismatched:
            parts.append(
                f"{len(self.mismatched)} mismatched (kept initialisation): {_names(self.mismatched, max_names)}"
            )
        if self.unexpected:
            parts.append(
                f"{len(self.unexpected)} unexpected checkpoint tensors ignored: {_names(self.unexpected, max_names)}"
            )
        if self.exact:
            parts.append("exact match")
        parts.extend(self.notes)
        return "; ".join(parts) + "."

    def to_dict(self) -> dict[str, list[str]]:
        """JSON-ready tensor names: ``loaded``, ``missing``, ``unexpected``, ``mismatched``, ``adapted``;
        then ``notes``."""
        return {
            "loaded": list(self.loaded),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [m.name for m in self.mismatched],
            "adapted": [a.name for a in self.adapted],
            "notes": list(self.notes),
        }


def _names(items: list[Any], limit: int) -> str:
    text = ", ".join(str(i) for i in items[:limit])
    return text + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def load_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, Tensor],
    *,
    strict: bool = False,
    trust: bool = False,
    key_map: Mapping[str, str] | None = None,
    adapt: bool = True,
    strip_prefixes: Iterable[str] = DEFAULT_STRIP_PREFIXES,
    add_prefix: str = "",
) -> LoadReport:
    """Load weights from ``source`` (a path for ``read_checkpoint``, or a state dict) into ``model``.

    Checkpoint names are matched by ``match_keys``, with the network family's rules for known
    checkpoint layouts (``Family.checkpoint_keys``); tensors of another shape are adapted when
    ``adapt`` and a principled rule exists (input channels of the model's first conv, 2D -> 3D
    kernel inflation), otherwise reported as mismatched. With ``strict=True`` anything missing,
    unexpected or mismatched raises ``MedtlError`` with the report summary, before the model is touched.

    Examples:
        ImageNet-style 3-channel ResNet weights into a 1-channel CT model::

            report = load_weights(create_network("resnet18"), "rgb_resnet18.pth")
            report.adapted   # [Adaptation("conv1.weight", "input channels 3->1: summed over channels", ...)]
    """
    label = str(source) if isinstance(source, (str, Path)) else "state dict"
    checkpoint = read_checkpoint(source, trust=trust) if isinstance(source, (str, Path)) else dict(source)
    current = model.state_dict()
    stem = first_conv(model)
    family = family_of(model)
    mapping = match_keys(
        checkpoint,
        current,
        strip_prefixes=strip_prefixes,
        add_prefix=add_prefix,
        key_map=key_map,
        layout_rules=family.checkpoint_keys if family is not None else (),
    )

    report = LoadReport(source=label, model=type(model).__name__)
    merged = dict(current)
    claimed: set[str] = set()
    for ckpt_name, name in mapping.items():
        tensor = checkpoint[ckpt_name]
        if name not in current or name in claimed:
            report.unexpected.append(name if name not in claimed else ckpt_name)
            continue
        claimed.add(name)
        target = current[name]
        if tensor.shape == target.shape:
            merged[name] = tensor
            report.loaded.append(name)
            continue
        adapted = _adapt(tensor, target.shape, input_conv=name == f"{stem}.weight") if adapt else None
        if adapted is None:
            report.mismatched.append(Mismatch(name, tuple(tensor.shape), tuple(target.shape), ckpt_name))
            continue
        merged[name] = adapted[0]
        report.loaded.append(name)
        report.adapted.append(Adaptation(name, "; ".join(adapted[1]), ckpt_name))
    report.missing = [k for k in current if k not in claimed]

    if strict and not report.exact:
        raise MedtlError(
            f"weights do not match {report.model} exactly: {report.summary()}",
            path=label if isinstance(source, (str, Path)) else None,
            hint="load with strict=False to keep what matches, or rename tensors with key_map",
        )
    model.load_state_dict(merged, strict=False)
    return report


def backbone_not_loaded(model: nn.Module, report: LoadReport) -> list[str]:
    """Model tensors outside the classifier head that received no checkpoint values (missing or
    mismatched). A head of another class count is a head swap; anything else left at its
    initialisation means the checkpoint belongs to another network."""
    head, _ = find_classifier(model)
    return [n for n in [*report.missing, *(m.name for m in report.mismatched)] if not n.startswith(f"{head}.")]


def inspect_checkpoint(
    path: str | Path,
    *,
    arch: str,
    spatial_dims: int = 3,
    in_channels: int = 1,
    num_classes: int = 2,
    trust: bool = False,
    key_map: Mapping[str, str] | None = None,
    network_kwargs: Mapping[str, Any] | None = None,
) -> LoadReport:
    """Build ``arch`` from the registry and report how the checkpoint at ``path`` would load into it.

    The network takes the options the checkpoint's tensors imply (``network_options_for``:
    MedicalNet's shortcut layout, an encoder's sizes), stated in the report's ``notes``;
    ``network_kwargs`` go to ``create_network`` and override them (e.g. ``{"widen_factor": 0.5}``;
    ``{"shortcut_type": "B"}`` leaves MedicalNet's layout out).
    """
    state = read_checkpoint(path, trust=trust)
    given = dict(network_kwargs or {})
    implied = network_options_for(arch, state, given=given)
    options = {**implied, **given}
    dims = {"spatial_dims": spatial_dims, "in_channels": in_channels, "num_classes": num_classes}
    model = create_network(arch, **dims, **options)
    report = load_weights(model, state, key_map=key_map)
    report.source = str(path)
    if implied:
        report.notes.append(f"{arch} built with {_describe(arch, implied, dims)} as the checkpoint's tensors imply")
    return report


def _describe(arch: str, options: Mapping[str, Any], dims: Mapping[str, int]) -> str:
    """``options`` as ``key=value`` text; ``medicalnet`` spelled out as the shortcut layout it means."""
    text = ", ".join(f"{k}={v!r}" for k, v in options.items())
    if options.get("medicalnet"):
        config = network_def(arch, medicalnet=True, **dims)
        text += f" (MedicalNet's shortcut type {config['shortcut_type']}, bias_downsample={config['bias_downsample']})"
    return text
