"""model-zoo conformance of the bundles in ``bundles/``, one test per bundle as model-zoo's CI runs
per bundle: ``verify_bundle_directory``'s files, the README sections, its JSON format (pre-commit's
``pretty-format-json``: 4 spaces, keys as written) and no large file outside ``large_files.yml``.

A bundle folder may hold no code (``medtl bundle verify`` refuses it), so the tests live here. The
``tumor_cls_*`` folders are templates without weights: their shipped form is what ``export_bundle``
writes from them, so the weights, ``large_files.yml``, data licence and card are checked on an export.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser

from medtl.bundle.card import MODEL_ZOO_SECTIONS
from medtl.bundle.export import export_bundle
from medtl.bundle.templates import template_dir
from medtl.fileio import sha256_file

REPO = Path(__file__).resolve().parents[1]
#: Files above this size go to large_files.yml, not into model-zoo's repository.
MAX_COMMITTED_BYTES = 1 << 20
#: model-zoo's verify_bundle_directory: necessary files, and (beside the weights) the preferred ones.
REQUIRED = ("configs/metadata.json", "configs/inference.json", "LICENSE", "docs/README.md", "docs/data_license.txt")


def _committed(bundle: Path) -> list[Path]:
    """The bundle's files under version control (every file when there is no git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=bundle, capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return sorted(p for p in bundle.rglob("*") if p.is_file())
    return sorted(bundle / name for name in out.decode().split("\0") if name)


def _large_files(bundle: Path) -> dict[str, dict]:
    path = bundle / "large_files.yml"
    if not path.is_file():
        return {}
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))["large_files"]
    for entry in entries:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"}, entry
        assert entry["hash_type"] in ("md5", "sha1", "sha256", "sha512")
    return {entry["path"]: entry for entry in entries}


def check_json_format(bundle: Path) -> None:
    for path in sorted((bundle / "configs").glob("*.json")):
        text = path.read_text(encoding="utf-8")
        assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{path.relative_to(REPO)} is not 4-space JSON"


def check_readme(bundle: Path) -> None:
    headings = re.findall(r"(?m)^## (.+?)\s*$", (bundle / "docs" / "README.md").read_text(encoding="utf-8"))
    found = [h for h in headings if h in MODEL_ZOO_SECTIONS]
    assert found == list(MODEL_ZOO_SECTIONS), f"{bundle.name}/docs/README.md sections: {headings}"


def check_shipped(bundle: Path, committed: list[Path] | None = None) -> None:
    """What model-zoo's CI wants of a bundle that ships: files, sections, format, weights' hashes."""
    missing = [name for name in REQUIRED if not (bundle / name).is_file()]
    assert not missing, f"{bundle.name} lacks {missing}"
    large = _large_files(bundle)
    assert (bundle / "models" / "model.pt").is_file() or large
    for name, entry in large.items():
        assert entry["hash_val"] == sha256_file(bundle / name) and entry["hash_type"] == "sha256", name
    check_readme(bundle)
    check_json_format(bundle)
    oversized = [p.relative_to(bundle).as_posix() for p in committed or [] if p.stat().st_size > MAX_COMMITTED_BYTES]
    assert set(oversized) <= set(large), f"over 1 MB and not in large_files.yml: {sorted(set(oversized) - set(large))}"


def _export(name: str, tmp_path: Path) -> Path:
    """The template ``name`` exported with its own network_def's initial weights (no TorchScript/ONNX)."""
    parser = ConfigParser()
    parser.read_config(template_dir(name) / "configs" / "inference.json")
    torch.manual_seed(0)
    return export_bundle(parser.get_parsed_content("network_def"), tmp_path / name, template=name, torchscript=False, onnx=False)["path"]


def check_template(name: str, tmp_path: Path) -> None:
    """A weightless template: its own files and format, then the bundle export writes from it."""
    root = template_dir(name)
    for required in ("configs/metadata.json", "configs/inference.json", "LICENSE", "docs/README.md"):
        assert (root / required).is_file(), f"{name} lacks {required}"
    check_json_format(root)
    committed = [p.relative_to(root).as_posix() for p in _committed(root)]
    assert not [p for p in committed if (root / p).stat().st_size > MAX_COMMITTED_BYTES]
    assert not [p for p in committed if p.startswith("models/") or p == "large_files.yml"]  # templates ship no weights

    bundle = _export(name, tmp_path)
    assert sorted(_large_files(bundle)) == ["models/model.pt"]
    assert (bundle / "docs" / "data_license.txt").read_text(encoding="utf-8").startswith("Terms of use of the data")
    check_shipped(bundle)


def test_tumor_cls_source(tmp_path):
    check_template("tumor_cls_source", tmp_path)


def test_tumor_cls_finetune(tmp_path):
    check_template("tumor_cls_finetune", tmp_path)


def test_tumor_cls_distill(tmp_path):
    check_template("tumor_cls_distill", tmp_path)


def test_lidc_nodule_malignancy(tmp_path):
    bundle = REPO / "bundles" / "lidc_nodule_malignancy"
    if not (bundle / "models" / "model.pt").is_file():
        pytest.skip("no lidc_nodule_malignancy weights in this checkout")
    check_shipped(bundle, _committed(bundle))
    assert sorted(_large_files(bundle)) == ["models/model.onnx", "models/model.pt", "models/model.ts"]
    licence = (bundle / "docs" / "data_license.txt").read_text(encoding="utf-8")
    for text in ("CC BY 3.0", "https://creativecommons.org/licenses/by/3.0/", "10.7937/K9/TCIA.2015.LO9QL9SX", "10.1118/1.3528204"):
        assert text in licence
    assert "not stated" not in licence

    # re-exported, it ships the template's data licence and lists only the weights it was given
    exported = _export("lidc_nodule_malignancy", tmp_path)
    assert (exported / "docs" / "data_license.txt").read_text(encoding="utf-8") == licence
    assert sorted(_large_files(exported)) == ["models/model.pt"]
    check_shipped(exported)
