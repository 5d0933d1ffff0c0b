"""What a wheel carries: every bundle template as package data mapped from the top-level bundles/
folder, found by template_dir where the wheel installs it, and no run outputs.

The real wheel, installed into a fresh venv and run from outside the checkout, is .ci/run's
scripts/check_wheel.sh; these tests build only the package tree (setuptools build_py, under a second)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medtl.bundle import templates
from medtl.bundle.templates import RUN_OUTPUTS, template_dir, template_names
from medtl.errors import MedtlError

REPO = Path(__file__).resolve().parents[1]
CHECKOUT_TEMPLATES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())


def _template_files(root: Path) -> set[str]:
    """A template's files as export_bundle copies them: run outputs left out."""
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not set(p.relative_to(root).parts) & set(RUN_OUTPUTS)
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The package tree a wheel holds (setuptools build_py), built from a copy of the checkout's
    pyproject.toml, medtl/ and bundles/ in which every template also holds a bundle run's outputs."""
    tmp = tmp_path_factory.mktemp("wheel")
    project = tmp / "project"
    project.mkdir()
    shutil.copy2(REPO / "pyproject.toml", project)
    shutil.copy2(REPO / "README.md", project)
    skip = shutil.ignore_patterns(*RUN_OUTPUTS, "*.pyc")
    shutil.copytree(REPO / "medtl", project / "medtl", ignore=skip)
    shutil.copytree(REPO / "bundles", project / "bundles", ignore=skip)
    for name in CHECKOUT_TEMPLATES:
        for leftover in (
            "models/model.pt",
            "runs/run.json",
            "eval/metrics.json",
            "cache/case.pt",
            "configs/__pycache__/x.pyc",
        ):
            (project / "bundles" / name / leftover).parent.mkdir(parents=True, exist_ok=True)
            (project / "bundles" / name / leftover).write_bytes(b"run output")
    lib = tmp / "lib"
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import setup; setup(script_args=['-q', 'build_py', '--build-lib', {str(lib)!r}])",
        ],
        cwd=project,
        check=True,
        capture_output=True,
    )
    return lib


def test_every_template_resolves_through_the_package_mapping(built):
    # the built medtl, imported from outside any checkout, finds the templates it carries
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from medtl.bundle.templates import TEMPLATES, template_dir, template_names; "
        "print(json.dumps({'root': str(TEMPLATES), 'dirs': {n: str(template_dir(n)) for n in template_names()}}))"
    )
    found = json.loads(
        subprocess.run(
            [sys.executable, "-I", "-c", code, str(built)], cwd=built.parent, check=True, capture_output=True, text=True
        ).stdout
    )
    root = built / "medtl" / "bundle_templates"
    assert found["root"] == str(root)
    assert sorted(found["dirs"]) == CHECKOUT_TEMPLATES
    for name, path in found["dirs"].items():
        assert Path(path) == root / name
        assert _template_files(Path(path)) == _template_files(REPO / "bundles" / name), name
    assert (root / "README.md").is_file()


def test_the_wheel_carries_no_run_outputs(built):
    carried = [
        p.relative_to(built).as_posix() for p in (built / "medtl" / "bundle_templates").rglob("*") if p.is_file()
    ]
    assert carried and not [p for p in carried if set(p.split("/")) & set(RUN_OUTPUTS)]


def test_pyproject_lists_every_medtl_package():
    # packages are listed, not found (medtl.bundle_templates lives outside medtl/): a new subpackage must be added
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"medtl.bundle_templates": "bundles"}
    on_disk = {"medtl"} | {
        ".".join(p.relative_to(REPO).parts)
        for p in (REPO / "medtl").rglob("*")
        if p.is_dir() and p.name != "__pycache__" and any(p.iterdir())
    }
    assert set(setuptools["packages"]) == on_disk | {"medtl.bundle_templates"}


def test_checkout_templates_resolve():
    # an editable install or a checkout on PYTHONPATH reads the top-level bundles/ folder itself
    assert template_names() == CHECKOUT_TEMPLATES
    for name in CHECKOUT_TEMPLATES:
        assert (template_dir(name) / "configs" / "inference.json").is_file()


def test_a_missing_template_names_those_there_are_and_an_empty_installation_says_reinstall(tmp_path, monkeypatch):
    with pytest.raises(
        MedtlError, match="template 'nope' not found; there are lidc_nodule_malignancy, tumor_cls_distill"
    ):
        template_dir("nope")
    monkeypatch.setattr(templates, "TEMPLATES", tmp_path / "bundle_templates")
    with pytest.raises(MedtlError, match="reinstall medtl"):
        template_dir("tumor_cls_source")
