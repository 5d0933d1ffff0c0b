"""Cases and class names from medtl manifests, as bundle configs ask for them (``datalist``,
``class_names``, ``channel_names``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medtl.bundle import confine
from medtl.errors import MedtlError
from medtl.manifest import datalist as _datalist
from medtl.manifest import load_manifest


def required_path(value: Any, option: str, example: str) -> Path:
    if value in (None, ""):
        raise MedtlError(f"no {option} given", hint=f"pass --{option} {example} to python -m monai.bundle run")
    return confine.check(value, write=False, what=option)


Manifests = str | Path | Sequence[str | Path]


def manifest_paths(manifest: Manifests) -> list[Path]:
    """One manifest file, or several sites' files to pool (``--manifest "['a.json', 'b.json']"``)."""
    many = manifest if isinstance(manifest, Sequence) and not isinstance(manifest, str) else [manifest]
    if not many:
        raise MedtlError("no manifest given", hint="pass --manifest manifests/site.json to python -m monai.bundle run")
    return [required_path(m, "manifest", "manifests/site.json") for m in many]


def _no_manifest(manifest: Manifests) -> bool:
    return manifest in (None, "") or (isinstance(manifest, Sequence) and not isinstance(manifest, str) and not manifest)


def datalist(
    manifest: Manifests,
    dataset_dir: str | Path,
    splits: str | Sequence[str],
    *,
    num_classes: int | None = None,
    missing_ok: bool = False,
) -> list[dict[str, Any]]:
    """Data dicts of ``splits`` from one manifest file or several (pooled, in the order given),
    paths resolved under ``dataset_dir``.

    ``num_classes`` (the bundle's literal class count, which its ``network_def`` is built with)
    must be the manifests' class count. ``missing_ok`` gives no cases while no manifest is given,
    so a workflow can be built and inspected without data (MONAI's ``create_workflow``,
    ``check_properties``, ``monai.bundle.load``); its ``run`` then stops at ``require_cases``.
    """
    if missing_ok and _no_manifest(manifest):
        return []
    paths = manifest_paths(manifest)
    names = class_names(paths)  # pooled sites must mean the same by each label index
    if num_classes is not None and len(names) != int(num_classes):
        raise MedtlError(
            f"the manifest has {len(names)} classes ({', '.join(names)}) but the bundle's network is built "
            f"for num_classes={num_classes}",
            path=", ".join(p.name for p in paths),
            hint=f"train with --num_classes {len(names)}, or give a manifest labelled with the bundle's "
            f"{num_classes} classes",
        )
    root = required_path(dataset_dir, "dataset_dir", "DATA_ROOT")
    items = [item for path in paths for item in _datalist(load_manifest(path), root, splits)]
    if not items:
        raise MedtlError(f"the manifest has no cases in split(s) {splits!r}", path=", ".join(p.name for p in paths))
    return items


def class_names(manifest: Manifests) -> list[str]:
    """Class names in label-index order, from the manifests' label map (pooled ones must agree)."""
    maps = {path.name: load_manifest(path)["label_map"] for path in manifest_paths(manifest)}
    first = next(iter(maps.values()))
    for name, label_map in maps.items():
        if label_map != first:
            raise MedtlError(
                f"the manifests' label maps differ ({label_map} vs {first}), so their cases cannot be pooled", path=name
            )
    return sorted(first, key=first.get)


def channel_names(channel_def: Mapping[str, str]) -> list[str]:
    """Class names in output-channel order from the metadata's ``outputs/pred/channel_def``
    (``{"0": "benign", "1": "malignant"}``), the one place a bundle keeps them."""
    try:
        return [str(channel_def[str(i)]) for i in range(len(channel_def))]
    except KeyError as exc:
        raise MedtlError(
            f"channel_def must number the classes 0..{len(channel_def) - 1}; {exc} is missing",
            path="configs/metadata.json",
        ) from None
