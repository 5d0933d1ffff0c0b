"""Where a bundle came from: source model, data, configuration and software, by hash.

``provenance.json`` sits at the bundle root. Export records what only the training run knows
(the source it was adapted from, the manifests, the recipe); ``provenance`` adds what can be
derived from the bundle itself (name, version, config hash, versions, metrics), so the record is
the same whenever it is recomputed. Data enters as manifest content hashes and aggregate counts,
never as cases or paths.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtl.bundle.files import PROVENANCE, bundle_digest, open_bundle
from medtl.errors import MedtlError
from medtl.fileio import canonical_json, sha256_file, sha256_text

TRAINING_CONFIGS = ("configs/train.json", "configs/multi_gpu_train.json")


def describe_source(path: str | Path) -> dict[str, Any]:
    """Name, version and content hash of the source a bundle was adapted from (a bundle folder or
    zip, or a weights file: then the file's name and sha256)."""
    path = Path(path)
    if path.is_file() and path.suffix != ".zip":
        return {"name": path.name, "version": None, "sha256": sha256_file(path)}
    with open_bundle(path) as root:
        meta_path = root / "configs" / "metadata.json"
        if not meta_path.is_file():
            raise MedtlError("not a bundle (no configs/metadata.json)", path=path.name)
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return {"name": meta.get("name", root.name), "version": meta.get("version"), "sha256": bundle_digest(root)}


def manifest_record(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest as provenance: its name, content hash and aggregate counts (no cases)."""
    return {"name": manifest["name"], "sha256": manifest["content_sha256"], "counts": manifest.get("counts", {})}


def provenance(root: str | Path, recorded: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The provenance record of the bundle folder ``root``: ``recorded`` (or the bundle's own
    ``provenance.json``) completed with the fields derived from the bundle."""
    root = Path(root)
    if recorded is None and (root / PROVENANCE).is_file():
        recorded = json.loads((root / PROVENANCE).read_text(encoding="utf-8"))
    record = dict(recorded or {})
    meta = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    configs = {
        name: sha256_text(canonical_json(json.loads((root / name).read_text(encoding="utf-8"))))
        for name in TRAINING_CONFIGS
        if (root / name).is_file()
    }
    record.update(
        {
            "bundle": {"name": meta.get("name", root.name), "version": meta["version"]},
            "training_config_sha256": configs,
            "software": {
                "medtl": meta.get("required_packages_version", {}).get("medtl"),
                "monai": meta["monai_version"],
                "torch": meta["pytorch_version"],
                "numpy": meta["numpy_version"],
            },
            "metrics": meta.get("eval_metrics", {}),
        }
    )
    record.setdefault("adapted_from", None)
    record.setdefault("data", {"manifests": []})
    return record


__all__ = ["describe_source", "manifest_record", "provenance"]
