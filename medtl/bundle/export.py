"""Write a trained network as a MONAI bundle: the template's configs, the weights, metadata filled
from the actual evaluation, and a TorchScript copy checked against the eager network.

Templates are the bundles in the repository's ``bundles/`` folder. The bundle is built in a
temporary folder beside the destination and renamed into place, so an interrupted export leaves
the previous bundle (or nothing), never half of one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.networks import convert_to_torchscript
from torch import nn

from medtl.errors import MedtlError
from medtl.fileio import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parents[2] / "bundles"


def template_dir(name: str) -> Path:
    """The bundle template ``name`` (e.g. ``tumor_cls_finetune``) from the repository's ``bundles/``."""
    path = TEMPLATES / name
    if not (path / "configs" / "metadata.json").is_file():
        raise MedtlError(f"bundle template {name!r} not found", path=path.name,
                         hint="medtl exports bundles from its source checkout's bundles/ folder (pip install -e .)")
    return path


def eval_metrics(results: Mapping[str, Mapping[str, Any]], keys: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity")) -> dict[str, Any]:
    """Metadata ``eval_metrics`` from ``classification_metrics`` results per evaluation set:
    ``{"<set>_<metric>": value, "<set>_<metric>_ci95": [lo, hi]}`` plus case counts."""
    out: dict[str, Any] = {}
    for name, result in results.items():
        tag = name.replace(" ", "_")
        out[f"{tag}_n"] = result["n"]
        for key in keys:
            metric = result["metrics"][key]
            out[f"{tag}_{key}"] = None if metric["value"] is None else round(metric["value"], 4)
            out[f"{tag}_{key}_ci95"] = metric["ci95"] and [round(v, 4) for v in metric["ci95"]]
    return out


def _torchscript_parity(network: nn.Module, scripted: torch.jit.ScriptModule, shape: list[int], seed: int = 0) -> float:
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed))
    network.eval()
    with torch.no_grad():
        return float((scripted(x) - network(x)).abs().max())


def _onnx_export(network: nn.Module, path: Path, shape: list[int], seed: int = 0) -> float | None:
    """``models/model.onnx`` (dynamic batch) checked with ONNX Runtime; None when onnx/onnxruntime
    are not installed (``pip install onnx onnxruntime``)."""
    try:
        import onnxruntime
    except ImportError:
        logger.warning("onnxruntime not installed: no ONNX export (pip install onnx onnxruntime)")
        return None
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed))

    def write(tmp: Path) -> None:
        torch.onnx.export(network, (x,), str(tmp), input_names=["image"], output_names=["pred"],
                          dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}}, dynamo=False)

    atomic_write(path, write)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        return float(np.abs(session.run(None, {"image": x.numpy()})[0] - network(x).numpy()).max())


def export_bundle(
    network: nn.Module,
    dest: str | Path,
    *,
    template: str,
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    changelog: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    torchscript: bool = True,
    onnx: bool = True,
) -> dict[str, Any]:
    """Write ``network`` as the bundle ``template`` at ``dest`` (replacing what is there).

    ``metrics`` (name -> ``classification_metrics`` result) fill ``eval_metrics``; ``changelog`` adds
    an entry for the template's version; ``metadata`` overrides other fields. With ``torchscript``
    the network is scripted to ``models/model.ts`` and must match the eager network's outputs
    (max abs difference returned); with ``onnx`` (and onnxruntime installed) the same for
    ``models/model.onnx``. Returns ``{"path", "version", "torchscript_max_abs_diff", "onnx_max_abs_diff"}``.
    """
    source = template_dir(template)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    network = network.cpu().eval()
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        build = Path(tmp) / dest.name
        shutil.copytree(source, build, ignore=shutil.ignore_patterns("models", "runs", "eval", "cache", "__pycache__"))
        models = build / "models"
        models.mkdir()
        torch.save(network.state_dict(), models / "model.pt")

        meta_path = build / "configs" / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta.update({"monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
                     "numpy_version": np.__version__})
        if metrics:
            meta["eval_metrics"] = eval_metrics(metrics)
        if changelog:
            meta["changelog"] = {meta["version"]: changelog, **{k: v for k, v in meta["changelog"].items() if k != meta["version"]}}
        meta.update(metadata or {})
        atomic_write_json(meta_path, meta)
        from medtl.bundle.components import load_bundle_network

        load_bundle_network(build)  # the template's network_def must take these weights, all of them

        diff = onnx_diff = None
        shape = [meta["network_data_format"]["inputs"]["image"]["num_channels"], *meta["network_data_format"]["inputs"]["image"]["spatial_shape"]]
        if torchscript:
            scripted = convert_to_torchscript(network)
            diff = _torchscript_parity(network, scripted, shape)
            if diff > 1e-4:
                raise MedtlError(f"TorchScript output differs from the network by {diff:.2e}", path=dest.name)
            atomic_write(models / "model.ts", lambda p: torch.jit.save(scripted, str(p)))
        if onnx:
            onnx_diff = _onnx_export(network, models / "model.onnx", shape)
            if onnx_diff is not None and onnx_diff > 1e-4:
                raise MedtlError(f"ONNX output differs from the network by {onnx_diff:.2e}", path=dest.name)
        if dest.exists():  # moved into the temporary folder, which removes it on the way out
            dest.rename(Path(tmp) / "previous")
        build.rename(dest)
    logger.info("bundle %s %s written (max abs diff to the network: TorchScript %s, ONNX %s)", dest.name, meta["version"], diff, onnx_diff)
    return {"path": dest, "version": meta["version"], "torchscript_max_abs_diff": diff, "onnx_max_abs_diff": onnx_diff}


__all__ = ["eval_metrics", "export_bundle", "template_dir"]
