"""Write a trained network as a MONAI bundle: the template's configs, the weights, metadata filled
from the actual evaluation, TorchScript and ONNX copies checked against the eager network, a
provenance record, the weights' ``large_files.yml`` (model-zoo's format, their sha256) and a model card.

Templates are the bundles in the repository's ``bundles/`` folder (``medtl.bundle.templates``; a wheel
carries them as package data). The bundle is built in a
temporary folder beside the destination and renamed into place, so an interrupted export leaves
the previous bundle (or nothing), never half of one. Exporting over an earlier bundle bumps its
semantic version and adds a changelog entry.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.networks import convert_to_torchscript
from torch import nn

from medtl import __version__ as medtl_version
from medtl.bundle.card import model_card
from medtl.bundle.components import load_bundle_network
from medtl.bundle.files import CHECKSUMS, LARGE_FILES, PROVENANCE, SIGNATURE, large_files_yml
from medtl.bundle.provenance import describe_source, manifest_record, provenance
from medtl.bundle.templates import RUN_OUTPUTS, template_dir
from medtl.errors import MedtlError, first_line
from medtl.fileio import atomic_write, atomic_write_bytes, atomic_write_text
from medtl.networks import classes_argument

logger = logging.getLogger(__name__)


def eval_metrics(
    results: Mapping[str, Mapping[str, Any]], keys: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity")
) -> dict[str, Any]:
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


DATA_LICENSE = """Terms of use of the data this model was trained on: not stated.

The sending site replaces this text with the licence or data-use agreement that covers the
training data (e.g. CC BY 4.0 for a public collection, or the institution's agreement), so a
receiving site knows what the model may be used for.
"""
BUMPS = ("major", "minor", "patch")


def bump_version(version: str, part: str = "patch") -> str:
    """``1.2.3`` -> ``1.2.4`` (patch), ``1.3.0`` (minor) or ``2.0.0`` (major)."""
    if part not in BUMPS:
        raise MedtlError(f"unknown version part {part!r}; allowed: {', '.join(BUMPS)}")
    try:
        numbers = [int(v) for v in version.split(".")]
    except ValueError:
        numbers = []
    if len(numbers) != 3:
        raise MedtlError(f"version {version!r} is not MAJOR.MINOR.PATCH", path="configs/metadata.json")
    i = BUMPS.index(part)
    return ".".join(str(n + 1 if j == i else 0 if j > i else n) for j, n in enumerate(numbers))


def torchscript_bytes(
    scripted: torch.jit.ScriptModule, extra_files: Mapping[str, str] | None = None, name: str = "model"
) -> bytes:
    """The saved TorchScript archive without its debug records, which hold the absolute paths of the
    Python sources on the exporting machine (a user's home folder); the model loads and runs the same.

    ``extra_files`` (name -> text) are embedded the way ``monai.bundle ckpt_export`` does, so a
    consumer given only ``model.ts`` (a MONAI Deploy application package) finds the bundle's
    ``metadata.json`` and ``inference.json`` inside it. The archive's top folder is ``name``, as
    ``torch.jit.save`` to ``<name>.ts`` writes it and as such consumers look for ``<name>/extra/``.
    """
    raw = io.BytesIO()
    torch.jit.save(scripted, raw, _extra_files=dict(extra_files or {}))
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if not info.filename.endswith(".debug_pkl"):
                member = f"{name}/{info.filename.split('/', 1)[1]}"
                dst.writestr(zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0)), src.read(info))
    return out.getvalue()


def _torchscript(network: nn.Module, shape: list[int]) -> torch.jit.ScriptModule:
    """The network scripted, or traced where MONAI's layers cannot be scripted (a ResNet with
    MedicalNet's shortcut A keeps a ``functools.partial`` TorchScript has no type for). A trace records
    one input's path, which for these feed-forward classifiers is every input's; the parity check
    that follows runs it on another batch size."""
    try:
        return convert_to_torchscript(network)
    except Exception as exc:  # noqa: BLE001 - the compiler's errors share no base class (NotSupportedError, ...)
        logger.info("scripting failed (%s); tracing instead", str(exc).splitlines()[0])
        example = torch.rand(1, *shape, generator=torch.Generator().manual_seed(1))
        return convert_to_torchscript(network, use_trace=True, inputs=[example])


def _torchscript_parity(network: nn.Module, data: bytes, shape: list[int], seed: int = 0) -> float:
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed))
    network.eval()
    with torch.no_grad():
        return float((torch.jit.load(io.BytesIO(data)).eval()(x) - network(x)).abs().max())


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
        torch.onnx.export(
            network,
            (x,),
            str(tmp),
            input_names=["image"],
            output_names=["pred"],
            dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}},
            dynamo=False,
        )

    atomic_write(path, write)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        return float(np.abs(session.run(None, {"image": x.numpy()})[0] - network(x).numpy()).max())


def output_classes(network: nn.Module, shape: Sequence[int], meta: Mapping[str, Any]) -> int:
    """The network's class count (the channels of its output for one input of ``shape``), which
    must be the number of classes the metadata's ``outputs/pred`` names: the bundle's only list of them."""
    with torch.no_grad():
        k = int(network.eval()(torch.zeros(1, *shape)).shape[1])
    pred = meta["network_data_format"]["outputs"]["pred"]
    named = len(pred.get("channel_def", {}))
    if k != named or k != pred.get("num_channels"):
        raise MedtlError(
            f"the network gives {k} classes but the metadata's outputs/pred has num_channels "
            f"{pred.get('num_channels')} and names {named} in channel_def",
            path="configs/metadata.json",
            hint="pass metadata={'network_data_format': ...} with the network's classes "
            "(network_data_format_with_classes)",
        )
    return k


def network_data_format_with_classes(
    names: list[str], template: str | Path = "tumor_cls_finetune", input_shape: Sequence[int] | None = None
) -> dict[str, Any]:
    """The ``template`` bundle's network_data_format with ``names`` as its output channels and, with
    ``input_shape`` (channels, *spatial), the inputs the adapted network takes."""
    meta = json.loads((_template_root(template) / "configs" / "metadata.json").read_text(encoding="utf-8"))
    fmt = meta["network_data_format"]
    pred = fmt["outputs"]["pred"]
    pred.update(
        num_channels=len(names), spatial_shape=[1, len(names)], channel_def={str(i): n for i, n in enumerate(names)}
    )
    if input_shape is not None:
        fmt["inputs"]["image"].update(num_channels=int(input_shape[0]), spatial_shape=[int(v) for v in input_shape[1:]])
    return fmt


def _template_root(template: str | Path) -> Path:
    """A template by name (``medtl.bundle.templates``), or a bundle folder given as a path."""
    return Path(template) if isinstance(template, Path) else template_dir(template)


def write_network_def(configs: Path, definition: Mapping[str, Any]) -> list[str]:
    """Put ``definition`` (``medtl.networks.network_def``) as ``network_def`` in every config that
    declares one, its class count as ``@num_classes`` where the config has that literal."""
    changed = []
    key = classes_argument(definition)
    for path in sorted(configs.glob("*.json")):
        config = json.loads(path.read_text(encoding="utf-8"))
        if path.name == "metadata.json" or not isinstance(config, dict) or "network_def" not in config:
            continue
        written = dict(definition)
        if key is not None and "num_classes" in config:
            written[key] = "@num_classes"
        config["network_def"] = written
        atomic_write_text(path, json.dumps(config, indent=4) + "\n")
        changed.append(path.name)
    return changed


def write_settings(configs: Path, values: Mapping[str, Any]) -> list[str]:
    """Set top-level literals (``num_classes``, ``crop_mm``...) in every config that declares them:
    ``network_def`` reads ``num_classes``, so MONAI's tools and consumers that never read the
    metadata build the right head, and inference crops as training did. Returns the files changed."""
    changed = []
    for path in sorted(configs.glob("*.json")):
        if path.name == "metadata.json":
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        updates = {k: v for k, v in values.items() if isinstance(config, dict) and k in config and config[k] != v}
        if updates:
            config.update(updates)
            atomic_write_text(
                path, json.dumps(config, indent=4) + "\n"
            )  # model-zoo's pretty-format-json: ASCII, 4 spaces
            changed.append(path.name)
    return changed


def _previous_metadata(dest: Path, name: str | None) -> dict[str, Any] | None:
    """The metadata of the bundle already at ``dest`` when it is an earlier export of the same bundle."""
    path = dest / "configs" / "metadata.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("name") == name and isinstance(meta.get("version"), str) else None


def export_bundle(
    network: nn.Module,
    dest: str | Path,
    *,
    template: str | Path,
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    changelog: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    source: str | Path | None = None,
    manifests: Sequence[Mapping[str, Any]] = (),
    recipe: Mapping[str, Any] | None = None,
    bump: str = "patch",
    torchscript: bool = True,
    onnx: bool = True,
    settings: Mapping[str, Any] | None = None,
    network_def: Mapping[str, Any] | None = None,
    derived: str | None = None,
) -> dict[str, Any]:
    """Write ``network`` as the bundle ``template`` at ``dest`` (replacing what is there).

    ``metrics`` (name -> ``classification_metrics`` result) fill ``eval_metrics``; ``changelog`` is
    the entry for this version: the template's version on a first export, the previous bundle's
    version bumped by ``bump`` when ``dest`` already holds one; ``metadata`` overrides other fields.
    The configs' literal ``num_classes`` becomes the network's class count, which must be the
    number of classes the metadata's ``outputs/pred`` names; ``settings`` set other top-level
    literals the configs declare (the inputs the network was trained on: ``crop_mm``, ``augment``).
    ``source`` (the bundle or weights it was adapted from), ``manifests`` (the loaded training
    manifests: hashes and counts only) and ``recipe`` (settings worth stating) go into
    ``provenance.json`` and the model card ``docs/README.md``. With ``torchscript`` the network is
    scripted to ``models/model.ts`` and must match the eager network's outputs (max abs difference
    returned); with ``onnx`` (and onnxruntime installed) the same for ``models/model.onnx``.
    ``template`` is a template name or a bundle folder (a source bundle adapted as itself);
    ``derived`` (a ``bump`` part) makes a first export a new version of the template's own model:
    its version bumped by that part, its changelog kept under the new entry. ``network_def``
    replaces the configs' ``network_def`` (a network of another architecture than the template's).
    A copy the network's layers do not allow (a trace that only takes one batch size) is left out
    with a warning, named in the result's ``not_written``; ``models/model.pt`` is what MONAI's
    ``bundle run`` loads. Returns ``{"path", "version", "torchscript_max_abs_diff",
    "onnx_max_abs_diff", "not_written"}``.
    """
    template_root = _template_root(template)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    network = network.cpu().eval()
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        build = Path(tmp) / dest.name
        # a source bundle's checksums and signature vouch for the source, not for this model
        shutil.copytree(template_root, build, ignore=shutil.ignore_patterns(*RUN_OUTPUTS, CHECKSUMS, SIGNATURE))
        models = build / "models"
        models.mkdir()
        torch.save(network.state_dict(), models / "model.pt")

        meta_path = build / "configs" / "metadata.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta.update(
            {
                "monai_version": monai.__version__,
                "pytorch_version": torch.__version__.split("+")[0],
                "numpy_version": np.__version__,
            }
        )
        meta["required_packages_version"] = {**meta.get("required_packages_version", {}), "medtl": medtl_version}
        previous = _previous_metadata(dest, meta.get("name"))
        if previous:
            meta["version"] = bump_version(previous["version"], bump)
            meta["changelog"] = {meta["version"]: changelog or "re-exported", **previous.get("changelog", {})}
        elif derived:
            meta["version"] = bump_version(meta["version"], derived)
            meta["changelog"] = {meta["version"]: changelog or "adapted", **meta.get("changelog", {})}
        elif changelog:
            meta["changelog"] = {
                meta["version"]: changelog,
                **{k: v for k, v in meta["changelog"].items() if k != meta["version"]},
            }
        if metrics:
            meta["eval_metrics"] = eval_metrics(metrics)
        meta.update(metadata or {})
        atomic_write_text(meta_path, json.dumps(meta, indent=4) + "\n")  # model-zoo's format: 4 spaces, keys as written
        shape = [
            meta["network_data_format"]["inputs"]["image"]["num_channels"],
            *meta["network_data_format"]["inputs"]["image"]["spatial_shape"],
        ]
        if network_def is not None:
            write_network_def(build / "configs", network_def)
        write_settings(build / "configs", {**(settings or {}), "num_classes": output_classes(network, shape, meta)})

        load_bundle_network(build)  # the template's network_def must take these weights, all of them

        diff = onnx_diff = None
        not_written: dict[str, str] = {}  # copies a network's layers do not allow, and why
        if torchscript:
            configs = build / "configs"
            try:
                embedded = ("metadata.json", "inference.json")
                data = torchscript_bytes(
                    _torchscript(network, shape),
                    {name: (configs / name).read_text(encoding="utf-8") for name in embedded},
                )
                diff = _torchscript_parity(network, data, shape)
            except Exception as exc:  # noqa: BLE001 - neither scripted nor traced into one that takes any batch size
                not_written["model.ts"] = first_line(exc, typed=False)
            else:
                if diff > 1e-4:
                    raise MedtlError(f"TorchScript output differs from the network by {diff:.2e}", path=dest.name)
                atomic_write_bytes(models / "model.ts", data)
        if onnx:
            try:
                onnx_diff = _onnx_export(network, models / "model.onnx", shape)
            except Exception as exc:  # the exporter's and ONNX Runtime's errors share no base class
                (models / "model.onnx").unlink(missing_ok=True)
                not_written["model.onnx"] = first_line(exc, typed=False)
            if onnx_diff is not None and onnx_diff > 1e-4:
                raise MedtlError(f"ONNX output differs from the network by {onnx_diff:.2e}", path=dest.name)
        for name, why in not_written.items():
            logger.warning("%s: no models/%s (model.pt serves MONAI's bundle run): %s", dest.name, name, why)
        weights = sorted(f"models/{p.name}" for p in models.iterdir() if p.is_file())
        atomic_write_text(build / LARGE_FILES, large_files_yml(build, weights))
        recorded = {
            "adapted_from": describe_source(source) if source else None,
            "data": {"manifests": [manifest_record(m) for m in manifests]},
            "recipe": dict(recipe or {}),
            "parameters": sum(p.numel() for p in network.parameters()),
        }
        record = provenance(build, recorded)
        atomic_write_text(build / PROVENANCE, json.dumps(record, indent=4, sort_keys=True) + "\n")  # as metadata.json
        readme = template_root / "docs" / "README.md"
        atomic_write_text(
            build / "docs" / "README.md",
            model_card(meta, record, readme.read_text(encoding="utf-8") if readme.is_file() else ""),
        )
        if not (build / "docs" / "data_license.txt").is_file():
            atomic_write_text(build / "docs" / "data_license.txt", DATA_LICENSE)
        if dest.exists():  # moved into the temporary folder, which removes it on the way out
            dest.rename(Path(tmp) / "previous")
        build.rename(dest)
    logger.info(
        "bundle %s %s written (max abs diff to the network: TorchScript %s, ONNX %s)",
        dest.name,
        meta["version"],
        diff,
        onnx_diff,
    )
    return {
        "path": dest,
        "version": meta["version"],
        "torchscript_max_abs_diff": diff,
        "onnx_max_abs_diff": onnx_diff,
        "not_written": not_written,
    }


__all__ = [
    "network_data_format_with_classes",
    "bump_version",
    "eval_metrics",
    "export_bundle",
    "output_classes",
    "template_dir",
    "torchscript_bytes",
    "write_network_def",
    "write_settings",
]
