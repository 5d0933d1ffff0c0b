"""Data manifests: the one file that says which images, labels, sites and splits a run uses.

A manifest joins a scan index (``medtl scan``) or NIfTI files with a label table, assigns
patient-level train/val/test splits (seeded, stratified by site and label), records the sha256 of
every referenced file and of its own content, and refuses leakage, unknown labels, missing images
and duplicate rows. Paths are relative to a data root given at use time; patients appear only as
salted keys. The format is described by ``medtl/schemas/manifest-1.schema.json``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

import medtl
from medtl.dicom import index_with_folder_names
from medtl.errors import ManifestError
from medtl.fileio import atomic_write_json, canonical_json, csv_problem, csv_value, sha256_file, sha256_text
from medtl.nifti import is_nifti
from medtl.privacy import load_or_create_salt, load_salt, pseudonym
from medtl.progress import track

MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"
_REQUIRED_COLUMNS = ("patient_id", "label")
_KNOWN_COLUMNS = {"patient_id", "label", "series_uid", "image", "site", "mask", "roi_center_mm", "roi_size_mm", "split"}


def manifest_schema() -> dict[str, Any]:
    return json.loads(package_files("medtl").joinpath("schemas/manifest-1.schema.json").read_text(encoding="utf-8"))


def read_label_table(path: str | Path) -> list[dict[str, str]]:
    """Read a labels CSV (comma, semicolon or tab separated, UTF-8) into rows keyed by column.

    A cell medtl wrote with a leading ``'`` against spreadsheet formulas (``fileio.csv_cell``) is
    read back as it was. A table the ``csv`` module cannot read (a field longer than its limit, a
    NUL byte) raises ManifestError naming the line.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read label table ({exc.strerror or exc})", path=path) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x})",
            path=path,
            hint="save the table as UTF-8 CSV",
        ) from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ManifestError("empty label table", path=path)
    delimiter = max(",;\t", key=lines[0].count)
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    try:
        return _label_rows(reader, path)
    except csv.Error as exc:
        raise ManifestError(csv_problem(exc, reader.reader.line_num), path=path) from None


def _label_rows(reader: csv.DictReader, path: Path) -> list[dict[str, str]]:
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}",
            path=path,
            hint=(
                "required: patient_id,label; optional: series_uid or image, site, mask, "
                "roi_center_mm, roi_size_mm, split"
            ),
        )
    unknown = [c for c in columns if c not in _KNOWN_COLUMNS]
    if unknown:
        raise ManifestError(
            f"unknown column(s) {', '.join(unknown)}",
            path=path,
            hint=f"known columns: {', '.join(sorted(_KNOWN_COLUMNS))}",
        )
    rows = []
    for row in reader:
        if None in row:
            raise ManifestError(f"row {reader.line_num} has more fields than the header", path=path)
        rows.append({k.strip(): csv_value((v or "").strip()) for k, v in row.items()})
    if not rows:
        raise ManifestError("label table has a header but no rows", path=path)
    return rows


def _shown(value: str, limit: int = 60) -> str:
    """``repr(value)`` for an error message, cut short when a cell is long (a message stays one readable line)."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value):,} characters)"


def _vector(text: str, what: str) -> list[float]:
    parts = text.replace(";", " ").replace(",", " ").split()
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3:
        raise ValueError(f"{what} must be three numbers 'x y z' in mm, got {_shown(text)}")
    return values


def _relative(path: Path, root: Path, what: str) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"{what} {path} is outside the data root {root}") from None


def build_manifest(
    *,
    labels: str | Path,
    classes: Sequence[str],
    root: str | Path,
    salt: str,
    scan: dict[str, Any] | None = None,
    scan_root: str | Path | None = None,
    site: str | None = None,
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Join a label table with a scan index and/or NIfTI files into a manifest (see module doc).

    A scan index that names folders by salted keys (``medtl scan``'s default) finds them again
    under ``scan_root`` with ``salt``, the salt it was written with. All row problems are collected
    and raised together in one ManifestError naming each row.
    """
    labels, root = Path(labels), Path(root)
    classes = [c.strip() for c in classes if c.strip()]
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ManifestError(
            f"need at least two distinct class names, got {classes}", hint="e.g. --classes benign,malignant"
        )
    fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
    if set(fractions) - set(SPLITS) or abs(sum(fractions.values()) - 1.0) > 1e-6 or min(fractions.values()) < 0:
        raise ManifestError(f"split fractions must be train/val/test summing to 1, got {fractions}")
    rows = read_label_table(labels)
    if scan is not None and scan_root is None:
        raise ManifestError("a scan index needs the folder it was scanned from", hint="pass --scan-root")
    indexed = (
        index_with_folder_names(scan, scan_root, salt) if scan is not None else {}
    )  # folder keys back to the folders
    series_by_key = {s["series_key"]: s for s in indexed.get("series", [])}
    series_by_patient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in series_by_key.values():
        series_by_patient[s["patient_key"]].append(s)

    errors: list[str] = []
    cases: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], int] = {}
    for line, row in enumerate(rows, start=2):
        where = f"row {line}"  # the error names the table itself
        try:
            case = _case_from_row(
                row, classes, labels.parent, root, salt, series_by_key, series_by_patient, scan_root, site
            )
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
            continue
        key = (case["patient_key"], json.dumps(case["image"], sort_keys=True))
        if key in seen:
            errors.append(f"{where}: duplicate of row {seen[key]} (same patient and image)")
            continue
        seen[key] = line
        case["_row"] = line
        cases.append(case)
    if errors:
        raise ManifestError(_error_list(errors), path=labels)

    errors = _assign_splits(cases, fractions, seed)
    if errors:
        raise ManifestError(_error_list(errors), path=labels)
    cases.sort(key=lambda c: (c["site"], c["patient_key"], c["_row"]))
    for i, case in enumerate(cases, start=1):
        case["case_id"] = f"case-{i:05d}"
        del case["_row"]
    for case in track(cases, desc="hashing referenced files", unit="case", disable=not progress, leave=False):
        for entry in _file_entries(case):
            entry["sha256"] = sha256_file(root / entry["path"])
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "name": name or labels.stem,
        "created_by": f"medtl {medtl.__version__}",
        "label_map": {c: i for i, c in enumerate(classes)},
        "split": {"seed": seed, "fractions": fractions, "stratified_by": ["site", "label"], "unit": "patient"},
        "sources": {
            "labels_sha256": sha256_file(labels),
            "scan_sha256": sha256_text(canonical_json(scan)) if scan else None,
        },
        "counts": _counts(cases),
        "cases": cases,
    }
    manifest["content_sha256"] = content_hash(manifest)
    _validate(manifest, path=labels)
    return manifest


def _error_list(errors: list[str], limit: int = 20) -> str:
    """All row problems on one line, so the CLI prints one error line however many rows are bad."""
    if len(errors) == 1:
        return errors[0]
    shown = errors[:limit] + ([f"... and {len(errors) - limit} more"] if len(errors) > limit else [])
    return f"{len(errors)} problems: " + "; ".join(shown)


def _case_from_row(
    row, classes, table_dir, root, salt, series_by_key, series_by_patient, scan_root, site
) -> dict[str, Any]:
    if not row.get("patient_id"):
        raise ValueError("empty patient_id")
    label = row.get("label") or None
    if label is not None and label not in classes:
        raise ValueError(f"unknown label {_shown(label)} (allowed: {', '.join(classes)}; leave empty for unlabeled)")
    patient_key = pseudonym(row["patient_id"], salt, "pat")
    case_site = row.get("site") or site
    if not case_site:
        raise ValueError("no site: add a 'site' column or pass --site")
    if row.get("image"):
        image_path = table_dir / row["image"]
        if not is_nifti(image_path):
            raise ValueError(
                f"image {_shown(row['image'])} is not a .nii/.nii.gz file (DICOM series are given by series_uid)"
            )
        if not image_path.is_file():
            raise ValueError(f"image file {_shown(row['image'])} not found")
        image = {"type": "nifti", "path": _relative(image_path, root, "image")}
    else:
        image = _series_image(row, patient_key, salt, series_by_key, series_by_patient, scan_root, root)
    case: dict[str, Any] = {"patient_key": patient_key, "site": case_site, "label": label, "image": image}
    roi: dict[str, Any] = {}
    if row.get("mask"):
        mask_path = table_dir / row["mask"]
        if not mask_path.is_file():
            raise ValueError(f"mask file {_shown(row['mask'])} not found")
        roi["mask"] = {"path": _relative(mask_path, root, "mask")}
    if row.get("roi_center_mm"):
        roi["center_mm"] = _vector(row["roi_center_mm"], "roi_center_mm")
    if row.get("roi_size_mm"):
        roi["size_mm"] = _vector(row["roi_size_mm"], "roi_size_mm")
    if roi:
        case["roi"] = roi
    if row.get("split"):
        fixed = row["split"]
        if fixed not in SPLITS:
            raise ValueError(f"split {_shown(fixed)} is not one of {', '.join(SPLITS)}")
        if label is None:
            raise ValueError(f"split {_shown(fixed)} given for an unlabeled row")
        case["split"] = fixed
    return case


def _series_image(row, patient_key, salt, series_by_key, series_by_patient, scan_root, root) -> dict[str, Any]:
    if not series_by_key:
        raise ValueError("no image column and no scan index to find the patient's series in")
    if row.get("series_uid"):
        series = series_by_key.get(pseudonym(row["series_uid"], salt, "ser"))
        if series is None:
            raise ValueError("series_uid not found in the scan index (missing image, or scanned with another salt)")
        if series["patient_key"] != patient_key:
            raise ValueError("series_uid belongs to another patient in the scan index")
    else:
        found = series_by_patient.get(patient_key, [])
        candidates = [s for s in found if s["loadable"]]
        if not candidates and found:
            blocking = "; ".join(p["message"] for p in found[0]["problems"] if p["blocking"])
            raise ValueError(f"the patient's series in the scan index cannot be loaded: {blocking}")
        if not candidates:
            raise ValueError("no loadable series for this patient in the scan index (missing image)")
        if len(candidates) > 1:
            raise ValueError(f"patient has {len(candidates)} loadable series; add a series_uid column to choose")
        series = candidates[0]
    if not series["loadable"]:
        blocking = "; ".join(p["message"] for p in series["problems"] if p["blocking"])
        raise ValueError(f"series cannot be loaded: {blocking}")
    prefix = _relative(Path(scan_root), root, "scan root")
    files = [(Path(prefix) / f).as_posix() if prefix != "." else f for f in series["files"]]
    return {"type": "dicom", "series_key": series["series_key"], "files": [{"path": f} for f in files]}


def _assign_splits(cases: list[dict[str, Any]], fractions: dict[str, float], seed: int) -> list[str]:
    """Patient-level splits stratified by (site, label); fixed splits from the table are kept."""
    by_patient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for case in cases:
        by_patient[case["patient_key"]].append(case)
    errors = []
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for patient, pcases in sorted(by_patient.items()):
        fixed = {c["split"] for c in pcases if c.get("split")}
        if len(fixed) > 1:
            rows = ", ".join(str(c["_row"]) for c in pcases)
            errors.append(f"patient in rows {rows} is placed in several splits ({', '.join(sorted(fixed))}): leakage")
            continue
        labeled = [c for c in pcases if c["label"] is not None]
        for c in pcases:
            if c["label"] is None:
                c["split"] = UNLABELED
        if fixed:
            for c in labeled:
                c["split"] = next(iter(fixed))
        elif labeled:
            label = Counter(c["label"] for c in labeled).most_common(1)[0][0]
            strata[(pcases[0]["site"], label)].append(patient)
    rng = np.random.default_rng(seed)
    for key in sorted(strata):
        patients = strata[key]
        rng.shuffle(patients)
        counts = _largest_remainder(len(patients), fractions)
        start = 0
        for split in SPLITS:
            for patient in patients[start : start + counts[split]]:
                for c in by_patient[patient]:
                    if c["label"] is not None:
                        c["split"] = split
            start += counts[split]
    return errors or leakage(cases)  # a patient given two fixed splits is one problem, not two


def _largest_remainder(n: int, fractions: dict[str, float]) -> dict[str, int]:
    exact = {s: n * fractions.get(s, 0.0) for s in SPLITS}
    counts = {s: int(np.floor(v)) for s, v in exact.items()}
    for s in sorted(SPLITS, key=lambda s: exact[s] - counts[s], reverse=True)[: n - sum(counts.values())]:
        counts[s] += 1
    return counts


def leakage(cases: Sequence[dict[str, Any]]) -> list[str]:
    """Patients whose labeled cases sit in more than one of train/val/test."""
    splits: dict[str, set[str]] = defaultdict(set)
    for c in cases:
        if c.get("split") in SPLITS:
            splits[c["patient_key"]].add(c["split"])
    return [
        f"patient {p} is in several splits ({', '.join(sorted(s))}): leakage"
        for p, s in sorted(splits.items())
        if len(s) > 1
    ]


def _counts(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    table: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(Counter))
    for c in cases:
        table[c["site"]][c["split"]][c["label"] or UNLABELED] += 1
    return {
        "cases": len(cases),
        "patients": len({c["patient_key"] for c in cases}),
        "by_site_split_label": {
            s: {sp: dict(sorted(lab.items())) for sp, lab in sorted(v.items())} for s, v in sorted(table.items())
        },
    }


def _file_entries(case: dict[str, Any]) -> list[dict[str, Any]]:
    entries = list(case["image"]["files"]) if case["image"]["type"] == "dicom" else [case["image"]]
    if "mask" in case.get("roi", {}):
        entries.append(case["roi"]["mask"])
    return entries


def content_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own hash field."""
    return sha256_text(canonical_json({k: v for k, v in manifest.items() if k != "content_sha256"}))


def _validate(manifest: dict[str, Any], path: str | Path | None) -> None:
    try:
        jsonschema.validate(manifest, manifest_schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ManifestError(f"does not match the manifest schema at {where}: {exc.message}", path=path) from None


def write_manifest(manifest: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_json(path, manifest)


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and schema-validate a manifest; a stale content hash is an error (edited by hand?)."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError("manifest not found", path=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"not a readable JSON manifest ({exc})", path=path) from None
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
        found = manifest.get("manifest_version") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f"unsupported manifest version {found!r} (this medtl reads {MANIFEST_VERSION})", path=path)
    _validate(manifest, path)
    if manifest["content_sha256"] != content_hash(manifest):
        raise ManifestError(
            "content hash does not match: the manifest was edited after it was built",
            path=path,
            hint="rebuild it with `medtl manifest build`",
        )
    return manifest


def check_manifest(path: str | Path, root: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Re-verify a manifest against the data: schema, content hash, leakage, every file's sha256."""
    manifest = load_manifest(path)
    root = Path(root)
    missing, changed = [], []
    entries = [(c["case_id"], e) for c in manifest["cases"] for e in _file_entries(c)]
    for case_id, entry in track(entries, desc="verifying files", unit="file", disable=not progress, leave=False):
        file = root / entry["path"]
        if not file.is_file():
            missing.append(f"{case_id}: {entry['path']}")
        elif sha256_file(file) != entry["sha256"]:
            changed.append(f"{case_id}: {entry['path']}")
    leaks = leakage(manifest["cases"])
    return {
        "manifest": Path(path).name,
        "cases": len(manifest["cases"]),
        "files": len(entries),
        "missing": missing,
        "changed": changed,
        "leakage": leaks,
        "ok": not (missing or changed or leaks),
    }


def datalist(manifest: dict[str, Any], root: str | Path, splits: str | Sequence[str] = "train") -> list[dict[str, Any]]:
    """MONAI-style list of data dicts for the given split(s), with paths resolved under ``root``."""
    root = Path(root)
    wanted = {splits} if isinstance(splits, str) else set(splits)
    label_map = manifest["label_map"]
    out = []
    for case in manifest["cases"]:
        if case["split"] not in wanted:
            continue
        image = case["image"]
        item: dict[str, Any] = {
            "case_id": case["case_id"],
            "patient": case["patient_key"],  # pseudonym: lets the bootstrap resample patients
            "site": case["site"],
            "image": [str(root / f["path"]) for f in image["files"]]
            if image["type"] == "dicom"
            else str(root / image["path"]),
            "label": -1 if case["label"] is None else label_map[case["label"]],
        }
        roi = case.get("roi", {})
        if "mask" in roi:
            item["mask"] = str(root / roi["mask"]["path"])
        if "center_mm" in roi:
            item["roi_center_mm"] = roi["center_mm"]
        if "size_mm" in roi:
            item["roi_size_mm"] = roi["size_mm"]
        checksums = [e.get("sha256") for e in _file_entries(case)]
        if all(checksums):  # what the files held when the manifest was built: a cache key for their content
            item["files_sha256"] = sha256_text("".join(checksums))
        out.append(item)
    return out


def read_scan_index(path: str | Path) -> tuple[dict[str, Any], Path]:
    """Load a scan index written by ``medtl scan``; return it and the folder it indexed."""
    path = Path(path)
    try:
        scan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(
            "scan index not found", path=path, hint="create it with `medtl scan DIR -o scan.json`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"not a readable scan index ({exc})", path=path) from None
    if not isinstance(scan, dict) or not isinstance(scan.get("series"), list) or "scan_root" not in scan:
        raise ManifestError("not a medtl scan index (no 'series' list or 'scan_root')", path=path)
    return scan, path.parent / scan["scan_root"]


def build_manifest_file(
    *,
    labels: str | Path,
    classes: Sequence[str],
    out: str | Path,
    scan: str | Path | None = None,
    root: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """File-level ``medtl manifest build``: read the scan index and salt, build, write atomically.

    The salt is the one beside the scan index (so keys match it), or beside ``out`` for
    NIfTI-only tables. ``root`` defaults to the folder holding both the labels and the scan root.
    """
    labels, out = Path(labels), Path(out)
    if scan is not None:
        index, scan_root = read_scan_index(scan)
        salt = load_salt(Path(scan).parent)
    else:
        index, scan_root, salt = None, None, load_or_create_salt(out.parent)
    if root is None:
        anchors = [labels.parent.resolve()] + ([scan_root.resolve()] if scan_root is not None else [])
        root = Path(os.path.commonpath(anchors))
    manifest = build_manifest(
        labels=labels, classes=classes, root=root, salt=salt, scan=index, scan_root=scan_root, **options
    )
    write_manifest(manifest, out)
    return manifest
