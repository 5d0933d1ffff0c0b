"""Lesion masks from DICOM SEG: which SEG belongs to a series, and its segment on the series' voxels.

One code path for ``medtl predict`` (through the bundles' ``inference_cases``) and the MONAI Deploy
app in ``deploy/lidc_app``: a SEG belongs to the series its ``ReferencedSeriesSequence`` names, its
frames are placed on the series' slices by ``ImagePositionPatient`` (every SEG gives it; source-image
references are optional), and the mask goes through the same slice resampling as the CT, so it lies
on the grid ``medtl.reader`` builds for the series. Example::

    headers = [read_header(p) for p in series_files]
    seg = find_seg([pydicom.dcmread(p) for p in seg_files], headers[0].series_uid)
    mask = mask_volume(seg, headers)  # a Volume on the series' canonical RAS grid
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pydicom

from medtl.dicom import Geometry, Header, needs_resampling, resample_slices, stack_geometry
from medtl.errors import DicomError
from medtl.volume import Volume

__all__ = ["find_seg", "is_seg", "mask_volume", "referencing", "seg_mask", "stacked_mask"]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: How far (mm) a SEG frame may lie from a CT slice and still be that slice's.
POSITION_TOL_MM = 0.05
#: How to pick one segment of a SEG that holds several, where the caller gives no other way.
CHOOSE_SEGMENT = "give the lesion's mask as a NIfTI file in a masks table instead (medtl predict --masks)"


def is_seg(ds: pydicom.Dataset) -> bool:
    """Whether a dataset (a header is enough) is a DICOM Segmentation."""
    return str(ds.get("Modality", "")) == "SEG" or str(ds.get("SOPClassUID", "")) == SEGMENTATION_STORAGE


def referencing(segs: Iterable[pydicom.Dataset], series_uid: str) -> list[pydicom.Dataset]:
    """The SEGs among ``segs`` whose ``ReferencedSeriesSequence`` names ``series_uid``."""
    return [
        ds
        for ds in segs
        if is_seg(ds)
        and any(str(ref.get("SeriesInstanceUID", "")) == series_uid for ref in ds.get("ReferencedSeriesSequence", []))
    ]


def find_seg(segs: Iterable[pydicom.Dataset], series_uid: str, *, where: str = "input folder") -> pydicom.Dataset:
    """The one DICOM SEG among ``segs`` that references ``series_uid``; none or several is an error."""
    segs = [ds for ds in segs if is_seg(ds)]
    mine = referencing(segs, series_uid)
    if len(mine) != 1:
        raise DicomError(
            f"{len(mine)} DICOM SEG instance(s) reference the series ({len(segs)} SEG in the input); "
            "the model takes the lesion mask as an input channel",
            path=where,
            hint="give one DICOM SEG of the lesion that references this series",
        )
    return mine[0]


def _segment_number(seg: pydicom.Dataset, wanted: int | None, name: str, choose: str) -> int:
    numbers = [int(s.SegmentNumber) for s in seg.get("SegmentSequence", [])]
    if wanted is None and len(numbers) == 1:
        return numbers[0]
    if wanted is not None and wanted in numbers:
        return wanted
    listing = ", ".join(
        f"{s.SegmentNumber} ({s.get('SegmentLabel', 'no label')})" for s in seg.get("SegmentSequence", [])
    )
    raise DicomError(
        f"segment {wanted} is not in the SEG" if wanted is not None else "the SEG holds several segments",
        path=name,
        hint=f"{choose}; its segments: {listing or 'none'}",
    )


def _frame_item(seg: pydicom.Dataset, frame: Any, item: str, name: str) -> Any:
    """A functional group of one frame, per frame or shared."""
    for groups in (frame, *seg.get("SharedFunctionalGroupsSequence", [])):
        if item in groups:
            return groups[item].value[0]
    raise DicomError(f"the SEG gives no {item}", path=name)


def _frames(seg: pydicom.Dataset, rows: int, cols: int, name: str) -> np.ndarray:
    """The SEG's frames as float32 [frame, row, column], fractional ones scaled to 0..1."""
    try:
        pixels = np.asarray(seg.pixel_array)
    except Exception as exc:  # pydicom raises many types on damaged or missing pixel data
        raise DicomError(f"the SEG's pixel data cannot be read ({type(exc).__name__}: {exc})", path=name) from None
    pixels = pixels.reshape(-1, rows, cols).astype(np.float32)
    if str(seg.get("SegmentationType", "")) == "FRACTIONAL":
        pixels /= float(seg.MaximumFractionalValue)
    return pixels


def seg_mask(
    seg: pydicom.Dataset,
    slices: Sequence[Header],
    segment: int | None = None,
    *,
    frame_of_reference: str = "",
    name: str = "DICOM SEG",
    choose: str = CHOOSE_SEGMENT,
) -> np.ndarray:
    """One segment of a DICOM SEG as a [column, row, slice] float32 mask on the CT ``slices`` (in
    order), 0 where it has no frame.

    Frames are placed by their position; a frame on no slice of the series, another frame of
    reference (when both name one), another slice size or an empty segment is a ``DicomError``
    naming ``name``. A SEG with several segments needs ``segment``; ``choose`` says how to give it.
    """
    number = _segment_number(seg, segment, name, choose)
    first = slices[0]
    seg_frame = str(seg.get("FrameOfReferenceUID", ""))
    if frame_of_reference and seg_frame and seg_frame != frame_of_reference:
        raise DicomError(
            "the SEG lies in another frame of reference than the series (FrameOfReferenceUID differs)",
            path=name,
            hint="give the SEG made on this series",
        )
    if (int(seg.Rows), int(seg.Columns)) != (first.rows, first.cols):
        raise DicomError(
            f"the SEG's frames are {seg.Rows}x{seg.Columns}, the CT's slices {first.rows}x{first.cols}",
            path=name,
            hint="give the SEG made on this series",
        )
    orientation = np.asarray(first.orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.asarray([h.position for h in slices], dtype=float)
    pixels = _frames(seg, first.rows, first.cols, name)
    mask = np.zeros((first.cols, first.rows, len(slices)), dtype=np.float32)
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        if int(_frame_item(seg, frame, "SegmentIdentificationSequence", name).ReferencedSegmentNumber) != number:
            continue
        frame_orientation = np.asarray(
            _frame_item(seg, frame, "PlaneOrientationSequence", name).ImageOrientationPatient, dtype=float
        )
        where = np.asarray(_frame_item(seg, frame, "PlanePositionSequence", name).ImagePositionPatient, dtype=float)
        k = int(np.argmin(np.abs((positions - where) @ normal)))
        if (
            np.abs(frame_orientation - orientation).max() > 1e-4
            or np.linalg.norm(positions[k] - where) > POSITION_TOL_MM
        ):
            raise DicomError(
                f"SEG frame {index + 1} at {np.round(where, 2).tolist()} mm lies on no slice of the series",
                path=name,
                hint="give the SEG made on this series",
            )
        mask[:, :, k] = np.maximum(mask[:, :, k], pixels[index].T)
    if not mask.any():
        raise DicomError(f"segment {number} of the SEG is empty on this series", path=name)
    return mask


def stacked_mask(
    seg: pydicom.Dataset, ordered: Sequence[Header], geom: Geometry, segment: int | None = None, **options: Any
) -> np.ndarray:
    """``seg_mask`` on the slices ``stack_geometry`` ordered, resampled onto the uniform slice grid
    where the slices are uneven, as the CT is (``options`` as for ``seg_mask``)."""
    mask = seg_mask(seg, ordered, segment, **options)
    return resample_slices(mask, geom.positions_mm, geom.slice_spacing) if needs_resampling(geom) else mask


def mask_volume(
    seg: pydicom.Dataset,
    headers: Sequence[Header],
    segment: int | None = None,
    *,
    series: str = "series",
    **options: Any,
) -> Volume:
    """The SEG's segment on the canonical RAS grid ``medtl.reader`` builds for the series of
    ``headers`` (same shape and affine as the loaded CT), ``series`` naming it in errors;
    ``options`` as for ``seg_mask``."""
    ordered, geom, affine = stack_geometry(headers, name=series)
    return Volume(stacked_mask(seg, ordered, geom, segment, **options), affine).canonical()
