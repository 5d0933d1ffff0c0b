"""Lesion masks for the series of a DICOM folder (``series_masks``): a NIfTI file a masks table
names, else the DICOM SEG in the folder that references the series (``medtl.seg``, the code path
the MONAI Deploy app shares), written as NIfTI on the series' own grid into the output folder.

Both end as a file path in the case's ``mask`` entry, so the bundle's ``LoadVolumed`` reads a SEG's
mask exactly as it reads a mask the user gave, and the file the network saw can be opened.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom

from medtl.dicom import Header, needs_resampling, read_header, resample_slices, stack_geometry
from medtl.errors import MedtlError
from medtl.fileio import csv_problem
from medtl.nifti import is_nifti, write_nifti
from medtl.privacy import pseudonym
from medtl.seg import is_seg, mask_volume, referencing
from medtl.volume import canonical_transform

#: Folder of the output where masks read from DICOM SEGs are written, one ``<series key>.nii.gz`` each.
MASKS_DIR = "masks"
#: Why a DICOM SEG of the input is listed as skipped.
UNUSED_SEG = "a DICOM SEG that references none of the loadable series in the input"
#: Why a series that needs a mask gets none (``inference_cases`` with ``mask_required``).
NO_MASK = (
    "no lesion mask, which this model takes as an input channel: put the DICOM SEG that references this "
    "series into the input folder, or name a NIfTI mask for it in a masks table (medtl predict --masks)"
)
_TABLE_HINT = (
    "columns series,mask: series is the id medtl predict prints (dir-...#2), the folder relative to the input "
    "folder (when it holds one series) or the SeriesInstanceUID; mask is a NIfTI file relative to the table, "
    "on the series' voxel grid (as medtl convert writes the series)"
)


@dataclass
class Series:
    """A loadable image series of the input: its case id, its scan record and the input folder."""

    id: str
    record: Mapping[str, Any]
    root: Path

    @property
    def key(self) -> str:
        return str(self.record["series_key"])

    def uid(self) -> str:
        """Its SeriesInstanceUID (the scan keeps only its salted key), from its first file's header."""
        return read_header(self.root / self.record["files"][0]).series_uid

    @cached_property
    def headers(self) -> list[Header]:
        """Every file's header, in the scan's slice order."""
        return [read_header(self.root / f) for f in self.record["files"]]


@dataclass
class Masks:
    """What ``series_masks`` found: a mask path per series key, the reason a series gets none where
    it has a SEG that gives none, and the keys of the SEG series that reference an input series
    (masks, not skipped input: a problem with one is its series')."""

    paths: dict[str, str] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    used_segs: set[str] = field(default_factory=set)


def is_seg_record(record: Mapping[str, Any]) -> bool:
    """Whether a scan record is a DICOM SEG series."""
    return record.get("modality") == "SEG" or record.get("sop_class") == "Segmentation Storage"


def series_masks(
    series: Sequence[Series],
    seg_records: Sequence[Mapping[str, Any]],
    *,
    table: Path | None,
    salt: str,
    output_dir: Path,
    name: Callable[[str], str],
) -> Masks:
    """A mask for each series that has one: the masks table's row (every bad row raises one
    ``MedtlError`` naming the table and the rows, before any work), else its one DICOM SEG, whose
    segment is written to ``output_dir/masks/<series key>.nii.gz``. A SEG that gives no mask (two
    referencing the series, frames off its slices, several segments...) is a problem of that
    series alone. ``name`` names input files in messages (salted folder keys unless real ids)."""
    found = Masks()
    if table is not None:
        found.paths.update(_table_masks(table, series, salt))
    segs = _seg_headers(seg_records, series[0].root) if series else []
    for item in series if segs else []:
        mine = referencing([ds for _, ds in segs], item.uid())
        files = sorted(rel for rel, ds in segs if any(ds is m for m in mine))
        found.used_segs.update(r["series_key"] for r in seg_records if set(files) & set(r["files"]))
        if item.key in found.paths:  # the table's row wins over a SEG
            continue
        if len(files) > 1:
            found.problems[item.key] = (
                f"{len(files)} DICOM SEGs reference this series ({', '.join(name(f) for f in files)}); "
                "name its mask in a masks table (medtl predict --masks)"
            )
        elif files:
            try:
                found.paths[item.key] = _write_seg_mask(item, files[0], output_dir, name)
            except MedtlError as exc:
                found.problems[item.key] = f"its DICOM SEG gives no mask: {exc}"
    return found


def _seg_headers(records: Sequence[Mapping[str, Any]], root: Path) -> list[tuple[str, pydicom.Dataset]]:
    """Every SEG instance's header (no pixels) with its path relative to the input."""
    headers = []
    for record in records:
        for rel in record["files"]:
            ds = pydicom.dcmread(root / rel, stop_before_pixels=True)
            if is_seg(ds):
                headers.append((rel, ds))
    return headers


def _write_seg_mask(item: Series, seg_file: str, output_dir: Path, name: Callable[[str], str]) -> str:
    """The SEG's segment on the series' grid as ``masks/<series key>.nii.gz``; returns its path."""
    headers = item.headers
    ct = pydicom.dcmread(headers[0].path, stop_before_pixels=True, specific_tags=["FrameOfReferenceUID"])
    volume = mask_volume(
        pydicom.dcmread(item.root / seg_file),
        headers,
        frame_of_reference=str(ct.get("FrameOfReferenceUID", "")),
        name=name(seg_file),
        series=item.id,
    )
    return str(write_nifti(volume, output_dir / MASKS_DIR / f"{item.key}.nii.gz"))


# ----------------------------------------------------------------------------------- the masks table


def _table_rows(path: Path) -> list[dict[str, str]]:
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")))
        rows = list(reader)
    except (OSError, UnicodeDecodeError) as exc:
        raise MedtlError(f"cannot read the masks table ({type(exc).__name__})", path=path.name) from None
    except csv.Error as exc:
        raise MedtlError(
            f"cannot read the masks table: {csv_problem(exc, reader.line_num)}", path=path.name, hint=_TABLE_HINT
        ) from None
    if not rows or not {"series", "mask"} <= set(rows[0]):
        raise MedtlError("the masks table needs the columns 'series' and 'mask'", path=path.name, hint=_TABLE_HINT)
    return rows


def table_files(path: str | Path) -> list[Path]:
    """The mask files a masks table names (relative to its folder): what a confined run may read."""
    path = Path(path)
    return [path.parent / row["mask"].strip() for row in _table_rows(path) if (row.get("mask") or "").strip()]


def _names(series: Sequence[Series]) -> dict[str, list[Series]]:
    """Every name a table row may give a series by: its id, its folder and number (``a/ct#2``) and
    its folder."""
    names: dict[str, list[Series]] = {}
    for item in series:
        folder = item.record["folders"][0]
        number = item.record["series_number"] if item.record["series_number"] is not None else item.key
        for text in {item.id, f"{folder}#{number}", folder}:
            names.setdefault(text, []).append(item)
    return names


def _table_masks(path: Path, series: Sequence[Series], salt: str) -> dict[str, str]:
    """Series key -> mask path from the table; every bad row named in one ``MedtlError``."""
    names, by_key = _names(series), {item.key: item for item in series}
    masks: dict[str, str] = {}
    problems = []
    for n, row in enumerate(_table_rows(path), start=2):
        given, mask = (row.get("series") or "").strip().strip("/"), (row.get("mask") or "").strip()
        given = given[2:] if given.startswith("./") else given
        if not given or not mask:
            problems.append(f"row {n}: the {'series' if not given else 'mask'} cell is empty")
            continue
        uid_key = pseudonym(given, salt, "ser")  # the scan keys series by their salted UID
        matches = names.get(given) or ([by_key[uid_key]] if uid_key in by_key else [])
        if len(matches) != 1:
            problems.append(
                f"row {n}: its folder holds {len(matches)} series; name one by its id or SeriesInstanceUID"
                if matches
                else f"row {n}: its series is none of the loadable series in the input"
            )
            continue
        item = matches[0]
        if item.key in masks:
            problems.append(f"row {n}: a second mask for the series of an earlier row")
            continue
        problem = _grid_problem(path.parent / mask, item)
        if problem:
            problems.append(f"row {n}: {Path(mask).name}: {problem}")
            continue
        masks[item.key] = str(path.parent / mask)
    if problems:
        raise MedtlError(
            f"{len(problems)} bad row(s) in the masks table: " + "; ".join(problems), path=path.name, hint=_TABLE_HINT
        )
    return masks


def canonical_grid(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a grid once its axes run closest to R, A, S, as ``Volume.canonical`` turns it
    (no voxels needed)."""
    transform = canonical_transform(affine)
    turned = nib.orientations.apply_orientation(np.broadcast_to(np.False_, tuple(shape)), transform)
    return tuple(turned.shape), np.asarray(affine, dtype=float) @ nib.orientations.inv_ornt_aff(transform, shape)


def series_grid(headers: Sequence[Header]) -> tuple[tuple[int, ...], np.ndarray]:
    """The canonical grid ``medtl.reader`` loads the series onto, from its headers alone."""
    ordered, geom, affine = stack_geometry(headers, name="series")
    slices = len(ordered)
    if needs_resampling(geom):  # as many slices as the uniform grid the loader resamples onto
        slices = resample_slices(np.zeros((1, 1, slices), np.float32), geom.positions_mm, geom.slice_spacing).shape[-1]
    return canonical_grid((ordered[0].cols, ordered[0].rows, slices), affine)


def _grid_problem(mask: Path, item: Series) -> str | None:
    """Why the NIfTI ``mask`` cannot be the series' mask (missing, unreadable, not on its voxels), or None."""
    if not is_nifti(mask):
        return "not a NIfTI file (.nii or .nii.gz)"
    if not mask.is_file():
        return "file not found"
    try:
        image = nib.load(str(mask))
    except Exception as exc:  # nibabel raises many types on damaged files
        return f"not a readable NIfTI file ({type(exc).__name__})"
    shape = tuple(image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        return f"a mask is one 3D volume, this one has shape {shape}"
    mask_shape, mask_affine = canonical_grid(shape, image.affine)
    series_shape, series_affine = series_grid(item.headers)
    corners = np.array([[i, j, k, 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    spacing = float(np.linalg.norm(series_affine[:3, :3], axis=0).min())
    if mask_shape == series_shape:
        scaled = corners * np.array([*(s - 1 for s in series_shape), 1.0])
        offset = np.abs((scaled @ mask_affine.T) - (scaled @ series_affine.T)).max()
        if offset <= 0.1 * spacing:
            return None
        return f"its voxels lie up to {offset:.2f} mm from the series' (same shape {list(series_shape)})"
    return f"its grid is {list(mask_shape)} voxels, the series' {list(series_shape)} (RAS order)"
