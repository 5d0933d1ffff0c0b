"""Run a received bundle's workflow as ``python -m monai.bundle run`` does, audited and confined.

``python -m monai.bundle run`` builds whatever a config names and evaluates its ``$`` expressions
with no limit; on an imported bundle it runs what the import audit admitted, nothing watches it.
``medtl bundle run`` takes the same arguments and runs the same ``ConfigWorkflow``, but only after
auditing the exact configs it merges, with MONAI's path-taking components in their confined forms,
inside ``confine.confined``: the run reads the bundle, the paths given on its command line and the
Python installation, and writes only the bundle and the folders given as ``--*_dir`` options.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

from medtl.bundle.audit import (
    audit_bundle,
    audit_logging_conf,
    audit_metadata,
    audit_workflow,
    read_config_file,
    require_accepted,
)
from medtl.bundle.confine import confined, retarget
from medtl.bundle.files import check_plain_tree
from medtl.errors import MedtlError, reported

_META, _LOGGING = "configs/metadata.json", "configs/logging.conf"
#: Options of ``monai.bundle run`` that are not config overrides.
_WORKFLOW_OPTIONS = ("config_file", "meta_file", "logging_file", "init_id", "run_id", "final_id", "workflow_type")
#: ``--*_dir`` options the run reads only; every other ``--*_dir`` is a folder it may write.
INPUT_DIRS = frozenset({"input_dir", "dataset_dir", "data_dir"})


def parse_arguments(args: Sequence[str]) -> dict[str, Any]:
    """``--key value`` pairs as MONAI's command line (python-fire) reads them: a Python literal
    (``3``, ``true``, ``"['a.json', 'b.json']"``) becomes that value, anything else stays text."""
    pairs: dict[str, Any] = {}
    args = list(args)
    while args:
        key = args.pop(0)
        if not key.startswith("--") or len(key) < 3:
            raise MedtlError(f"expected --KEY VALUE, got {key!r}", hint="e.g. --output_dir out --input_dir scans")
        key, _, value = key[2:].partition("=")
        if not _:
            if not args or args[0].startswith("--"):
                raise MedtlError(f"--{key} needs a value")
            value = args.pop(0)
        pairs[key] = _value(value)
    return pairs


def _value(text: str) -> Any:
    lowered = {"true": True, "false": False, "none": None}.get(text.lower(), text)
    if lowered is not text:
        return lowered
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _config_names(root: Path, given: Any) -> list[str]:
    """Bundle-relative config names: a run reads only the audited files inside the bundle."""
    names = [given] if isinstance(given, str) else list(given or ["configs/inference.json"])
    relative = []
    for name in names:
        path = Path(str(name))
        path = path if path.is_absolute() or path.exists() else root / path
        try:
            relative.append(path.resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            raise MedtlError(
                f"config {Path(str(name)).name!r} is not inside the bundle",
                path=root.name,
                hint="a confined run reads the bundle's own configs (e.g. --config_file configs/inference.json)",
            ) from None
        if not (root / relative[-1]).is_file():
            raise MedtlError(f"no config {relative[-1]}", path=root.name)
    return relative


def declared_paths(overrides: Mapping[str, Any]) -> tuple[list[Path], list[Path]]:
    """The run's inputs (every override naming an existing file or folder, and a table's folder,
    where its rows' paths start) and outputs (every ``--*_dir`` but ``INPUT_DIRS``)."""
    inputs: list[Path] = []
    outputs: list[Path] = []
    for key, value in overrides.items():
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            if not isinstance(item, str) or not item:
                continue
            if key.endswith("_dir") and key not in INPUT_DIRS:
                outputs.append(Path(item))
            elif Path(item).exists():
                inputs.append(Path(item))
                if Path(item).is_file():
                    inputs.append(Path(item).parent)  # a manifest's or table's cases are relative to it
    return inputs, outputs


def run_bundle(bundle: str | Path, args: Sequence[str], *, trust: bool = False) -> None:
    """Run ``bundle``'s workflow with ``monai.bundle run``'s arguments (``--config_file``,
    ``--meta_file``, ``--logging_file``, ids, overrides), audited and confined.

    Raises ``MedtlError`` for a config outside the bundle or the allow-list (``trust`` runs the
    latter anyway, still confined), an override of ``bundle_root``, an access outside the declared
    folders (``confine.ConfinementError``) and, in one line, any failure of the workflow."""
    root = Path(bundle)
    if not (root / "configs").is_dir():
        raise MedtlError("not a bundle folder (no configs/)", path=root.name, hint="import a zip first")
    check_plain_tree(root)
    overrides = parse_arguments(args)
    if "bundle_root" in overrides:
        raise MedtlError("--bundle_root cannot be overridden: the run is confined to the bundle", path=root.name)
    options = {k: overrides.pop(k) for k in _WORKFLOW_OPTIONS if k in overrides}
    names = _config_names(root, options.pop("config_file", None))
    meta = _config_names(root, options.pop("meta_file", _META))[0]
    logging_file = options.pop("logging_file", _LOGGING if (root / _LOGGING).is_file() else False)
    if logging_file is not False:
        logging_file = _config_names(root, logging_file)[0]
    findings = audit_bundle(root)  # configs/: every workflow, metadata.json, logging.conf
    metadata = read_config_file(root / meta, meta)
    findings += audit_metadata(metadata, meta)  # another file given as --meta_file is audited as such
    findings += audit_workflow([(n, read_config_file(root / n, n)) for n in names], metadata)
    if logging_file is not False:
        findings += audit_logging_conf(root / logging_file, logging_file)
    require_accepted(findings, root.name, trust=trust)  # a workflow audit_bundle saw too is named once
    inputs, outputs = declared_paths(overrides)
    with confined(root, inputs=inputs, outputs=outputs):
        try:
            workflow = ConfigWorkflow(
                config_file=[str(root / n) for n in names],
                meta_file=str(root / meta),
                logging_file=logging_file if logging_file is False else str(root / logging_file),
                **options,
                **{**overrides, "bundle_root": str(root)},
            )
            retarget(workflow.parser.get())
            workflow.initialize()
            workflow.run()
            workflow.finalize()
        except Exception as exc:  # noqa: BLE001 - a user's input error is reported as such, anything else as the bundle's
            raise reported(exc, "the workflow", root.name) from exc


__all__ = ["INPUT_DIRS", "declared_paths", "parse_arguments", "run_bundle"]
