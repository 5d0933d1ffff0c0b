"""Seeding and the record of what a bundle run depended on (``configure_torch``, ``run_record``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import monai
import torch
from monai.utils import set_determinism

from medtl import __version__
from medtl.bundle import confine
from medtl.bundle.components.data import Manifests, manifest_paths
from medtl.fileio import atomic_write_json, sha256_file
from medtl.manifest import load_manifest


def configure_torch(seed: int | None = 0, deterministic: bool = True) -> None:
    """Seed every generator; then either repeatable kernels or, on CUDA, cuDNN's autotuner.

    ``set_determinism`` also turns cuDNN's benchmark mode off. Crops have one fixed shape, which is
    where ``cudnn.benchmark`` pays: the bundles ask for it on CUDA (``deterministic`` defaults to
    "no GPU") and keep bitwise repeatability on the CPU, where these flags change nothing.
    """

    set_determinism(seed=seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def run_record(
    manifest: Manifests = "",
    seed: int | None = None,
    output_dir: str | Path | None = None,
    weights: str | Path | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """What a run's results depend on: the seed, the data manifest (name and content hash, never
    its cases or paths), the weights' sha256, settings worth stating and the software versions.
    Written to ``output_dir/run.json`` when given; ``MetricsReport`` embeds it in every metrics file."""

    record: dict[str, Any] = {
        "seed": seed,
        **settings,
        "software": {"medtl": __version__, "monai": monai.__version__, "torch": torch.__version__.split("+")[0]},
    }
    if weights not in (None, "") and Path(weights).is_file():
        record["weights_sha256"] = sha256_file(weights)
    if manifest not in (None, "", []):
        data = [load_manifest(path) for path in manifest_paths(manifest)]
        named = [{"name": d["name"], "content_sha256": d["content_sha256"]} for d in data]
        record["manifest"] = named[0] if len(named) == 1 else named
    if output_dir is not None:
        atomic_write_json(confine.check(output_dir, write=True, what="run_record") / "run.json", record)
    return record
