"""model-zoo conformance of the bundles in ``bundles/``, one test per bundle as model-zoo's CI runs
per bundle: ``verify_bundle_directory``'s files, the README sections, its JSON format (pre-commit's
``pretty-format-json``: 4 spaces, ASCII, keys as written) and no large file outside ``large_files.yml``.

A bundle folder may hold no code (``medtl bundle verify`` refuses it), so the tests live here. The
``tumor_cls_*`` folders are templates without weights: their shipped form is what ``export_bundle``
writes from them, so the weights, ``large_files.yml``, data licence and card are checked on an export.

``test_model_zoo_ci`` runs model-zoo's own ``ci/verify_bundle.py`` and pre-commit hooks on all of them
(``scripts/model_zoo_check.py``) when ``MEDTL_MODEL_ZOO`` names a model-zoo checkout (docs/model-zoo.md).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser

from medtl.bundle.card import MODEL_ZOO_SECTIONS
from medtl.bundle.export import export_bundle
from medtl.bundle.files import large_files_yml
from medtl.bundle.templates import RUN_OUTPUTS, template_dir, template_names
from medtl.fileio import sha256_file

REPO = Path(__file__).resolve().parents[1]
#: Files above this size go to large_files.yml, not into model-zoo's repository.
MAX_COMMITTED_BYTES = 1 << 20
#: model-zoo's verify_bundle_directory: necessary files, and (beside the weights) the preferred ones.
REQUIRED = ("configs/metadata.json", "configs/inference.json", "LICENSE", "docs/README.md", "docs/data_license.txt")


def _committed(bundle: Path) -> list[Path]:
    """The bundle's files under version control (every file when there is no git checkout)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", "."], cwd=bundle, capture_output=True, check=True, timeout=30
        ).stdout
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
    """Every JSON file as ``pretty-format-json --no-sort-keys --indent=4`` leaves it (configs and provenance)."""
    for path in sorted(bundle.rglob("*.json")):
        if path.relative_to(bundle).parts[0] in RUN_OUTPUTS:
            continue
        text = path.read_text(encoding="utf-8")
        assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{path} is not 4-space ASCII JSON"


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
    return export_bundle(
        parser.get_parsed_content("network_def"), tmp_path / name, template=name, torchscript=False, onnx=False
    )["path"]


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
    for text in (
        "CC BY 3.0",
        "https://creativecommons.org/licenses/by/3.0/",
        "10.7937/K9/TCIA.2015.LO9QL9SX",
        "10.1118/1.3528204",
    ):
        assert text in licence
    assert "not stated" not in licence

    # re-exported, it ships the template's data licence and lists only the weights it was given
    exported = _export("lidc_nodule_malignancy", tmp_path)
    assert (exported / "docs" / "data_license.txt").read_text(encoding="utf-8") == licence
    assert sorted(_large_files(exported)) == ["models/model.pt"]
    check_shipped(exported)


def _model_zoo_check():
    """``scripts/model_zoo_check.py`` as a module (scripts/ is no package; dataclasses need it in sys.modules)."""
    if "model_zoo_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("model_zoo_check", REPO / "scripts" / "model_zoo_check.py")
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["model_zoo_check"]


def test_model_zoo_names_say_classification():
    """MONAI Label takes a bundle's type from its folder name: every bundle's model-zoo name says so."""
    names = [_model_zoo_check().model_zoo_name(name) for name in template_names()]
    assert len(set(names)) == len(names)
    assert all(n.endswith("_classification") and re.fullmatch(r"[a-z0-9_]+", n) for n in names), names


def test_templates_name_the_deploy_sdk_they_run_in():
    """``supported_apps``: the templates' exports run in MONAI Deploy's bundle operator (tests/test_deploy.py);
    LIDC needs its mask beside the image, which that operator does not hand over, so it claims none."""
    for name in template_names():
        meta = json.loads((template_dir(name) / "configs" / "metadata.json").read_text(encoding="utf-8"))
        expected = {} if name == "lidc_nodule_malignancy" else {"monai-deploy-app-sdk": "4.0.0"}
        assert meta.get("supported_apps", {}) == expected, name


def test_published_weights_leave_the_tree_and_download_back(tmp_path):
    """In the model-zoo tree the weights sit behind ``large_files.yml`` URLs; MONAI's downloader fetches
    them back and checks their sha256, and refuses a file that changed."""
    from monai.bundle import download_large_files

    bundle = tmp_path / "tree" / "b"
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.pt").write_bytes(b"weights" * 100)
    (bundle / "large_files.yml").write_text(large_files_yml(bundle, ["models/model.pt"]), encoding="utf-8")
    _model_zoo_check().publish_large_files(bundle, tmp_path / "release")
    assert not (bundle / "models" / "model.pt").exists()
    entry = yaml.safe_load((bundle / "large_files.yml").read_text(encoding="utf-8"))["large_files"][0]
    assert entry["url"] == (tmp_path / "release" / "b" / "models" / "model.pt").as_uri()
    download_large_files(bundle_path=str(bundle))
    assert (bundle / "models" / "model.pt").read_bytes() == b"weights" * 100

    (bundle / "models" / "model.pt").unlink()
    (tmp_path / "release" / "b" / "models" / "model.pt").write_bytes(b"tampered")
    with pytest.raises(Exception, match="hash check"):
        download_large_files(bundle_path=str(bundle))


def test_model_zoo_ci(tmp_path):
    """model-zoo's ``ci/verify_bundle.py`` (CPU premerge mode ``min``) and its pre-commit hooks pass on
    every bundle in a model-zoo-shaped tree (scripts/model_zoo_check.py; about two minutes)."""
    check = _model_zoo_check()
    model_zoo = check.model_zoo_checkout()
    if model_zoo is None:
        pytest.skip(
            f"{check.ENV_VAR} names no model-zoo checkout (git clone https://github.com/Project-MONAI/model-zoo; "
            f"export {check.ENV_VAR}=<path>); docs/model-zoo.md"
        )
    if importlib.util.find_spec("pre_commit_hooks") is None:
        pytest.skip(f"pre-commit-hooks not installed in {sys.prefix}: pip install -e '.[model-zoo]'")
    report = check.check(model_zoo, tmp_path / "tree", ("min",))
    failed = [f"{step.name}:\n{step.output}" for step in report.steps if not step.passed]
    assert not failed, "\n\n".join(failed)
    assert sorted(report.bundles.values()) == template_names()
    verified = [step.name for step in report.steps if "verify_bundle.py" in step.name]
    assert len(verified) == len(template_names())
