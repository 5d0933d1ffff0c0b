"""Where the bundle templates are: the repository's top-level ``bundles/`` folder, which a wheel carries
as the package data ``medtl/bundle_templates/`` (pyproject.toml maps that package to the folder)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from medtl.errors import MedtlError

# what a template folder may hold that is not part of the template: a bundle run's outputs (trained
# weights and large_files.yml, their hashes; logs, metrics, caches). export_bundle leaves them out of
# its copy (and writes large_files.yml for the weights it exports); wheels never carry them.
RUN_OUTPUTS = ("models", "large_files.yml", "runs", "eval", "cache", "__pycache__")


def template_root() -> Path:
    """The folder holding the templates: ``medtl/bundle_templates/`` in an installed wheel, else the
    source checkout's ``bundles/`` (an editable install, or a checkout on ``PYTHONPATH``)."""
    installed = resources.files("medtl") / "bundle_templates"
    if isinstance(installed, Path) and installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "bundles"


TEMPLATES = template_root()


def template_names() -> list[str]:
    """The templates there are: folders of ``TEMPLATES`` with a ``configs/metadata.json``."""
    if not TEMPLATES.is_dir():
        return []
    return sorted(p.name for p in TEMPLATES.iterdir() if (p / "configs" / "metadata.json").is_file())


def template_dir(name: str) -> Path:
    """The bundle template ``name`` (e.g. ``tumor_cls_finetune``), a folder of ``TEMPLATES``.

    Examples:
        >>> (template_dir("tumor_cls_source") / "configs" / "inference.json").is_file()
        True
    """
    path = TEMPLATES / name
    if (path / "configs" / "metadata.json").is_file():
        return path
    available = template_names()
    if available:
        raise MedtlError(f"bundle template {name!r} not found; there are {', '.join(available)}", path=TEMPLATES)
    raise MedtlError(
        f"bundle template {name!r} not found: no templates at all",
        path=TEMPLATES,
        hint="this medtl installation lacks its bundle templates: reinstall medtl from its wheel, "
        "or with pip install -e . from a checkout",
    )


__all__ = ["RUN_OUTPUTS", "TEMPLATES", "template_dir", "template_names", "template_root"]
