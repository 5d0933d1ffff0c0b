"""DICOM folders: header-only scanning into a series index, and loading one series as a volume.

Scanning reads headers only (no pixel data), groups files by SeriesInstanceUID across folders,
orders slices geometrically (ImagePositionPatient projected on the slice normal, never by
InstanceNumber or file name alone) and records what is wrong with each series instead of failing.
Loading reuses the same geometry code and headers: uncompressed pixels are read at the offset the
header read recorded (no second parse), compressed ones are decoded by pydicom's plugins
(pylibjpeg/pyjpegls; large JPEG 2000 and JPEG-LS series in worker processes); RescaleSlope/Intercept
are applied and a canonical RAS volume is returned.
"""

from __future__ import annotations

import filecmp
import functools
import multiprocessing
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes

from medtl.errors import DicomError
from medtl.fileio import atomic_write_json
from medtl.privacy import load_or_create_salt, pseudonym
from medtl.progress import track
from medtl.volume import Volume, canonical_transform, lps_to_ras

SCAN_FORMAT_VERSION = 1

# Storage SOP classes whose instances are not images to classify (reports, plans, segmentations...).
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.1.3.10",  # Media Storage Directory (DICOMDIR)
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.481.",  # RT dose/structure/plan
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, segmentation
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
)
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"}  # deflated transfer syntaxes
_NATIVE_LITTLE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # Implicit and Explicit VR Little Endian
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # PixelData, FloatPixelData, DoubleFloatPixelData

# Problems that make a series impossible to assemble into one 3D volume.
BLOCKING = {
    "non_image",
    "no_pixel_data",
    "no_pixel_spacing",
    "bad_pixel_spacing",
    "no_geometry",
    "bad_orientation",
    "mixed_orientation",
    "mixed_size",
    "duplicate_positions",
    "duplicate_instances",
    "color",
    "multi_frame",
    "unsupported_compression",
    "folder_missing",
}

_DECODE_HINT = "install medtl's decoder plugins (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls)"

_POS_TOL_MM = 1e-3  # positions closer than this are the same slice
_SPACING_RTOL = 0.01  # relative tolerance for gaps to count as equal (or as whole multiples)
_TILT_TOL = 1e-3  # in-plane drift per mm along the normal that counts as gantry tilt
_ORTHO_TOL = 1e-3  # |row . column| above this is a sheared grid (0.06 degrees off square), not rounding
_UNIT_TOL = 1e-2  # a direction cosine whose length is further than this from 1 is not a direction


@dataclass(frozen=True, slots=True)  # slots: one per file in a scan, pickled back from worker processes
class NativePixels:
    """Where one slice's uncompressed little-endian pixels lie in its file and how pydicom's
    ``pixel_array`` would interpret them: loading reads them with one call instead of parsing the
    file a second time (which doubled the load time of small series).

    ``size`` and ``mtime_ns`` are the file's when its header was read: a file whose size or
    modification time changed since then is parsed again rather than read at a stale offset.
    """

    offset: int  # of the PixelData value in the file
    dtype: str  # of one stored value, e.g. "<i2"
    unused_bits: int  # BitsAllocated - BitsStored: high bits pydicom shifts out (sign-extending if signed)
    slope: float
    intercept: float
    size: int
    mtime_ns: int


@dataclass
class Header:
    """The header fields scanning and loading need, read once per file."""

    path: Path
    sop_class: str
    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    series_number: int | None
    series_description: str
    transfer_syntax: str
    rows: int | None
    cols: int | None
    pixel_spacing: tuple[float, float] | None
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    instance_number: int | None
    frames: int
    samples_per_pixel: int
    slice_thickness: float | None
    spacing_between_slices: float | None
    has_pixels: bool
    native: NativePixels | None = None  # set when loading may read the pixels without parsing again
    sop_instance_uid: str = ""


@dataclass
class Geometry:
    """Slice order and spacing of one series, plus what is wrong with it."""

    order: list[int]
    positions_mm: list[float] | None  # slice positions along the normal, in slice order
    slice_spacing: float | None
    slice_step: np.ndarray | None  # LPS vector from one slice to the next, for a uniform grid
    problems: list[dict[str, Any]] = field(default_factory=list)


def problem(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "blocking": code in BLOCKING}


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _fragments_problem(fh: Any, offset: int, size: int, order: str) -> str | None:
    """Check that every compressed fragment fits in the file (reads 8 bytes per fragment)."""
    while True:
        fh.seek(offset)
        head = fh.read(8)
        if len(head) < 8:
            return "truncated file: compressed pixel data ends without its delimiter"
        group, elem = (int(v) for v in np.frombuffer(head[:4], dtype=f"{order}u2"))
        length = int(np.frombuffer(head[4:], dtype=f"{order}u4")[0])
        if (group, elem) == (0xFFFE, 0xE0DD):
            return None
        if (group, elem) != (0xFFFE, 0xE000):
            return f"corrupt compressed pixel data: unexpected tag ({group:04X},{elem:04X}) between fragments"
        offset += 8 + length
        if offset > size:
            return f"truncated file: a compressed fragment needs {offset - size} more bytes"


def _header_cut_off(ds: pydicom.Dataset) -> tuple[str | None, int | None]:
    """pydicom silently accepts a header cut off inside an element: compare each raw element's
    declared length with the bytes actually read. Returns (problem, end offset of the last element).

    Must run before any element is accessed (access converts raw elements and drops their lengths).
    """
    end = None
    for tag in ds.keys():
        elem = ds.get_item(tag)
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF or elem.value is None:
            end = None  # a sequence or converted element: its end is unknown
            continue
        if len(elem.value) < elem.length:
            return f"truncated file: header element {tag} needs {elem.length} bytes, {len(elem.value)} present", None
        end = elem.value_tell + elem.length
    return None, end


@dataclass(frozen=True)
class _ImagePixel:
    """Image Pixel module values that the checks, the pixel layout and the Header all use, fetched
    once per file: each first access to a pydicom element has a cost that a scan pays per file
    (timed in docs/benchmarks.md, DICOM I/O)."""

    rows: int | None
    cols: int | None
    samples: int | None
    frames: int | None  # None when NumberOfFrames is absent or empty (pydicom then assumes 1)
    bits_allocated: int | None
    photometric: str  # as stored (pydicom's pixel code does not strip it)
    plain: bool  # pydicom holds all of the above as plain integers, as its pixel code uses them

    @classmethod
    def of(cls, ds: pydicom.Dataset) -> _ImagePixel:
        rows, cols, samples, bits = (ds.get(kw) for kw in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated"))
        frames = ds.get("NumberOfFrames")
        plain = all(isinstance(v, int) for v in (rows, cols, samples, bits)) and (
            frames is None or isinstance(frames, int)
        )
        return cls(
            _int(rows),
            _int(cols),
            _int(samples),
            _int(frames),
            _int(bits),
            str(ds.get("PhotometricInterpretation", "")),
            plain,
        )


@dataclass(frozen=True)
class _PixelElement:
    """What ``_pixel_element`` found after the header."""

    present: bool
    problem: str | None = None
    value: tuple[int, int] | None = None  # (offset, length) of a defined-length PixelData value


def _pixel_element(fh: Any, ds: pydicom.Dataset, image: _ImagePixel, size: int) -> _PixelElement:
    """Peek at the pixel-data element after the header: is it there, is it complete, and where
    does its value lie?"""
    start = fh.tell()
    head = fh.read(12)
    if len(head) < 8:
        return _PixelElement(False)
    implicit, little = ds.original_encoding
    little = True if little is None else little
    order = "<" if little else ">"
    group, elem = np.frombuffer(head[:4], dtype=f"{order}u2")
    tag = (int(group) << 16) | int(elem)
    if tag not in _PIXEL_TAGS:
        return _PixelElement(False)
    as_read = True  # the element is encoded as pydicom read the dataset
    if not implicit and not head[4:6].isalpha():
        implicit, as_read = True, False  # explicit VR dataset with an implicit VR pixel element (some writers do this)
    if implicit:
        length, header_len = int(np.frombuffer(head[4:8], dtype=f"{order}u4")[0]), 8
    else:
        if len(head) < 12:
            return _PixelElement(True, "truncated file: pixel data element header is cut off")
        length, header_len = int(np.frombuffer(head[8:12], dtype=f"{order}u4")[0]), 12
    if length == 0xFFFFFFFF:  # encapsulated (compressed): walk the fragments to the delimiter
        return _PixelElement(True, _fragments_problem(fh, start + header_len, size, order))
    available = size - (start + header_len)
    if available < length:
        return _PixelElement(True, f"truncated file: pixel data needs {length} bytes, {available} present")
    expected = (
        (image.rows or 0)
        * (image.cols or 0)
        * (image.frames or 1)
        * (image.samples or 1)
        * (image.bits_allocated or 0)
        // 8
    )
    if image.photometric.strip() == "YBR_FULL_422":
        expected = expected * 2 // 3  # two chroma samples shared by each pair of pixels
    if length < expected:
        return _PixelElement(True, f"pixel data holds {length} bytes, Rows×Columns×frames needs {expected}")
    value = (start + header_len, length) if tag == 0x7FE00010 and as_read else None
    return _PixelElement(True, None, value)


def _native_pixels(
    ds: pydicom.Dataset, image: _ImagePixel, value: tuple[int, int] | None, stat: os.stat_result
) -> NativePixels | None:
    """The layout of a slice whose pixels can be read straight from the file, giving exactly what
    ``pixel_array`` gives; None for everything else, which loading hands to pydicom: compressed,
    deflated, big endian, no file meta, bit-packed or odd BitsAllocated, colour, palette, multi-frame,
    float pixels, and any element pydicom would reject or warn about shapes for."""
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    if value is None or syntax not in _NATIVE_LITTLE or ds.original_encoding[1] is False:
        return None
    rows, cols, bits = image.rows, image.cols, image.bits_allocated
    if not image.plain or not (0 < rows < 2**16 and 0 < cols < 2**16) or bits not in (8, 16, 32):
        return None
    if image.samples != 1 or image.frames not in (None, 1) or image.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    stored, signed = ds.get("BitsStored"), ds.get("PixelRepresentation")
    if not (isinstance(stored, int) and 1 <= stored <= bits and isinstance(signed, int) and signed in (0, 1)):
        return None
    offset, length = value
    if length // (rows * cols * bits // 8) != 1:  # pydicom reads a longer value as extra frames
        return None
    slope, intercept = _float(ds.get("RescaleSlope")), _float(ds.get("RescaleIntercept"))
    return NativePixels(
        offset,
        f"<{'ui'[signed]}{bits // 8}",
        bits - stored,
        1.0 if slope is None else slope,
        0.0 if intercept is None else intercept,
        stat.st_size,
        stat.st_mtime_ns,
    )


def read_header(path: str | Path) -> Header:
    """Read one file's header without pixel data; raise DicomError saying why it is unusable."""
    path = Path(path)
    try:
        stat = path.stat()
        size = stat.st_size
        if size == 0:
            raise DicomError("empty file (0 bytes)", path=path)
        with open(path, "rb") as fh:
            try:
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
            except InvalidDicomError:
                # Files without the 128-byte preamble exist (old exports); accept them only if
                # they parse into something with the identifiers an image must carry.
                fh.seek(0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
                if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
                    raise DicomError("not a DICOM file (no DICM header)", path=path) from None
            cut_problem, header_end = _header_cut_off(ds)
            if cut_problem:
                raise DicomError(cut_problem, path=path)
            image = _ImagePixel.of(ds)
            if str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")) in _DEFLATED:
                # pydicom inflated the dataset in memory: offsets in the file mean nothing, so look
                # for pixel data in a full read (rare transfer syntax, small cost)
                full = pydicom.dcmread(path, force=True)
                pixel, header_end = _PixelElement(any(t in full for t in _PIXEL_TAGS)), None
            else:
                pixel = _pixel_element(fh, ds, image, size)
            if not pixel.present and header_end is not None and 0 < size - header_end < 8:
                # the file ends in a partial element header (tag/VR/length), which pydicom ignores
                raise DicomError("truncated file: the header ends inside an element", path=path)
            sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
            if sop_class == _DICOMDIR_SOP or "DirectoryRecordSequence" in ds:
                raise DicomError("DICOMDIR (a directory of the media, not an image)", path=path)
            if pixel.problem:
                raise DicomError(pixel.problem, path=path)
            header = Header(
                path=path,
                sop_class=sop_class,
                series_uid=str(ds.get("SeriesInstanceUID", "")),
                study_uid=str(ds.get("StudyInstanceUID", "")),
                patient_id=str(ds.get("PatientID", "")),
                modality=str(ds.get("Modality", "") or "OT"),
                series_number=_int(ds.get("SeriesNumber")),
                series_description=str(ds.get("SeriesDescription", "")),
                transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
                rows=image.rows,
                cols=image.cols,
                pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                position=_floats(ds.get("ImagePositionPatient"), 3),
                instance_number=_int(ds.get("InstanceNumber")),
                frames=image.frames or 1,
                samples_per_pixel=image.samples or 1,
                slice_thickness=_float(ds.get("SliceThickness")),
                spacing_between_slices=_float(ds.get("SpacingBetweenSlices")),
                has_pixels=pixel.present,
                native=_native_pixels(ds, image, pixel.value, stat),
                sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
            )
    except DicomError:
        raise
    except PermissionError:
        raise DicomError("permission denied", path=path, hint="check the file's read permissions") from None
    except (OSError, EOFError) as exc:
        raise DicomError(f"unreadable or truncated file ({exc.__class__.__name__}: {exc})", path=path) from None
    except Exception as exc:  # pydicom raises many types on corrupt headers; name the file instead
        raise DicomError(f"corrupt DICOM header ({exc.__class__.__name__}: {exc})", path=path) from None
    if not header.series_uid:
        raise DicomError("no SeriesInstanceUID: cannot tell which series this file belongs to", path=path)
    return header


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def slice_geometry(headers: Sequence[Header]) -> Geometry:
    """Order slices along the normal and describe spacing problems (shared by scan and load)."""
    problems: list[dict[str, Any]] = []
    fallback = sorted(range(len(headers)), key=lambda i: (headers[i].instance_number or 0, str(headers[i].path)))
    orientations = {h.orientation for h in headers}
    if None in orientations or any(h.position is None for h in headers):
        problems.append(
            problem("no_geometry", "ImagePositionPatient/ImageOrientationPatient missing; ordered by InstanceNumber")
        )
        return Geometry(fallback, None, None, None, problems)
    ref = np.asarray(headers[0].orientation)
    if any(np.abs(np.asarray(o) - ref).max() > 1e-4 for o in orientations):
        problems.append(
            problem("mixed_orientation", f"{len(orientations)} different ImageOrientationPatient values in one series")
        )
        return Geometry(fallback, None, None, None, problems)
    normal = _normal(ref)
    positions = np.array([h.position for h in headers], dtype=float)
    proj = positions @ normal
    order = sorted(range(len(headers)), key=lambda i: (proj[i], headers[i].instance_number or 0))
    s = proj[order]
    if len(headers) == 1:
        thickness = headers[0].spacing_between_slices or headers[0].slice_thickness
        if thickness is None:
            problems.append(problem("single_slice", "one slice and no SliceThickness: slice spacing unknown"))
        step = normal * (thickness or 1.0)
        return Geometry(order, [float(s[0])], thickness, step, problems)
    gaps = np.diff(s)
    dup = int(np.sum(gaps < _POS_TOL_MM))
    if dup:
        problems.append(problem("duplicate_positions", f"{dup} slice(s) share a position with another slice"))
        return Geometry(order, [float(v) for v in s], None, None, problems)
    # Missing slices leave gaps that are whole multiples of the smallest one; then the smallest gap
    # is the true spacing (a median would be wrong when few slices remain).
    ratios = gaps / gaps.min()
    if np.all(np.abs(ratios - np.round(ratios)) < 2 * _SPACING_RTOL):
        spacing = float(np.mean(gaps[np.round(ratios) == 1]))
        missing = int(np.sum(np.round(ratios) - 1))
        if missing:
            wide = gaps[np.round(ratios) > 1]
            problems.append(
                problem(
                    "missing_slices",
                    f"{missing} slice(s) missing: gaps of {', '.join(f'{g:.3g}' for g in wide)} "
                    f"mm where {spacing:.3g} mm is expected",
                )
            )
    else:
        spacing = float(np.median(gaps))
        if np.any(np.abs(gaps - spacing) > _SPACING_RTOL * spacing):
            problems.append(
                problem(
                    "nonuniform_spacing",
                    f"slice gaps range {gaps.min():.3g}-{gaps.max():.3g} mm (median {spacing:.3g})",
                )
            )
    # In-plane drift of positions along the stack means a tilted gantry (sheared geometry).
    span = positions[order[-1]] - positions[order[0]]
    inplane = span - (s[-1] - s[0]) * normal
    if np.linalg.norm(inplane) / max(s[-1] - s[0], 1e-6) > _TILT_TOL:
        angle = float(np.degrees(np.arctan2(np.linalg.norm(inplane), s[-1] - s[0])))
        problems.append(
            problem("gantry_tilt", f"slices drift in-plane along the stack (tilt about {angle:.1f} degrees)")
        )
    step = span / (s[-1] - s[0]) * spacing
    return Geometry(order, [float(v) for v in s], spacing, step, problems)


@functools.cache
def decoder_problem(transfer_syntax: str) -> str | None:
    """Why pixel data in ``transfer_syntax`` cannot be decoded here (None when it can, or is unknown)."""
    if not transfer_syntax:
        return None  # no file meta: pydicom guesses the encoding, decoding decides
    name = UID(transfer_syntax).name
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        return f"pixel data encoded as {name}, which medtl has no decoder for"
    if not decoder.is_available:
        return f"pixel data encoded as {name}, whose decoder plugin is not installed"
    return None


def _numbers(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def orientation_problem(orientation: Sequence[float]) -> str | None:
    """Why ``orientation`` (ImageOrientationPatient) cannot place a voxel grid, or None when it can.

    Its two direction cosines must each have length 1 (within ``_UNIT_TOL``) and be perpendicular
    (|cos| of their angle at most ``_ORTHO_TOL``: writers round the values, so exact zero is not
    required). A zero vector or parallel directions give no slice normal; a skewed pair would give
    a sheared affine that no resampler reads back as the scanner meant.
    """
    row, col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    for name, vector in (("row", row), ("column", col)):
        length = float(np.linalg.norm(vector))
        if length == 0.0:
            return f"its {name} direction is a zero vector"
        if abs(length - 1.0) > _UNIT_TOL:
            return f"its {name} direction has length {length:.3g}, where a direction cosine has length 1"
    cosine = float(row @ col / (np.linalg.norm(row) * np.linalg.norm(col)))
    if abs(cosine) <= _ORTHO_TOL:
        return None
    angle = float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))
    if abs(cosine) > 1.0 - 1e-9:
        return "its row and column directions are parallel (no slice normal)"
    return (
        f"its row and column directions are {angle:.2f} degrees apart, not 90 (a sheared "
        f"grid; tolerance |cos| <= {_ORTHO_TOL:g})"
    )


def _geometry_tag_problems(headers: Sequence[Header]) -> list[dict[str, Any]]:
    """PixelSpacing that is not positive and ImageOrientationPatient that is not two perpendicular
    unit vectors, each named with the first file that has it: such a series would load mirrored,
    sheared or not at all."""
    problems = []
    bad_spacing = [h for h in headers if h.pixel_spacing is not None and min(h.pixel_spacing) <= 0]
    if bad_spacing:
        first = bad_spacing[0]
        more = f" (and {len(bad_spacing) - 1} more file(s))" if len(bad_spacing) > 1 else ""
        problems.append(
            problem(
                "bad_pixel_spacing",
                f"PixelSpacing must be positive: {first.path.name} has ({_numbers(first.pixel_spacing)}){more}",
            )
        )
    for orientation in dict.fromkeys(h.orientation for h in headers if h.orientation is not None):
        why = orientation_problem(orientation)
        if why:
            first = next(h for h in headers if h.orientation == orientation)
            problems.append(
                problem(
                    "bad_orientation", f"ImageOrientationPatient ({_numbers(orientation)}) of {first.path.name}: {why}"
                )
            )
            break
    return problems


def series_problems(headers: Sequence[Header]) -> list[dict[str, Any]]:
    """Problems of a series that are not about slice order and spacing along the normal."""
    problems = _geometry_tag_problems(headers)
    undecodable = sorted({why for h in headers if h.has_pixels and (why := decoder_problem(h.transfer_syntax))})
    if undecodable:
        problems.append(problem("unsupported_compression", "; ".join(undecodable)))
    sop = headers[0].sop_class
    if any(sop.startswith(p) for p in _NON_IMAGE_SOP_PREFIXES):
        problems.append(problem("non_image", f"non-image SOP class {UID(sop).name}"))
    elif not all(h.has_pixels for h in headers):
        problems.append(
            problem("no_pixel_data", f"{sum(not h.has_pixels for h in headers)} file(s) have no pixel data")
        )
    elif any(h.pixel_spacing is None for h in headers):
        problems.append(problem("no_pixel_spacing", "PixelSpacing missing: in-plane voxel size unknown"))
    if any(h.frames > 1 for h in headers):
        problems.append(
            problem(
                "multi_frame",
                f"multi-frame instances ({max(h.frames for h in headers)} frames); one file per slice is expected",
            )
        )
    if any(h.samples_per_pixel != 1 for h in headers):
        problems.append(problem("color", "colour (RGB) pixels where a grayscale CT/MR image is expected"))
    sizes = {(h.rows, h.cols) for h in headers}
    if len(sizes) > 1:
        problems.append(problem("mixed_size", f"slices of different sizes: {sorted(sizes, key=str)}"))
    return problems


def _orientation_label(orientation: Sequence[float] | None) -> str:
    if orientation is None:
        return "unknown"
    axis = int(np.argmax(np.abs(_normal(orientation))))
    return ("sagittal", "coronal", "axial")[axis]


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _listed(paths: Sequence[Path], limit: int = 4) -> str:
    names = [p.name for p in paths[:limit]]
    return ", ".join(names) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def unique_instances(headers: Sequence[Header]) -> tuple[list[Header], list[Header], list[dict[str, Any]]]:
    """The headers with each instance once, the byte-identical copies left out, and the problems.

    Files that share a SOPInstanceUID hold one instance. When they are byte-identical (the same
    export copied twice, a folder merged into another) nothing is lost by reading one: the first in
    path order is kept, the others are returned as dropped and the non-blocking ``duplicate_files``
    problem says so. When they differ, nothing says which one is the instance (a re-export after
    an edit, or a writer that reuses UIDs), so the series gets the blocking ``duplicate_instances``
    problem naming them and is refused. Files without a SOPInstanceUID are kept as they are.
    Returns ``(kept, dropped, problems)``.
    """
    by_uid: dict[str, list[Header]] = defaultdict(list)
    for h in headers:
        if h.sop_instance_uid:
            by_uid[h.sop_instance_uid].append(h)
    dropped: list[Header] = []
    differing: list[Path] = []
    for group in by_uid.values():
        if len(group) < 2:
            continue
        first, *others = sorted(group, key=lambda h: str(h.path))
        copies = [h for h in others if _same_bytes(first.path, h.path)]
        dropped += copies
        if len(copies) < len(others):
            copied = {id(h) for h in copies}
            differing += [h.path for h in sorted(group, key=lambda h: str(h.path)) if id(h) not in copied]
    problems = []
    if dropped:
        copies = "copy" if len(dropped) == 1 else "copies"
        problems.append(
            problem(
                "duplicate_files",
                f"{len(dropped)} byte-identical {copies} of an instance read once: "
                f"{_listed([h.path for h in dropped])}",
            )
        )
    if differing:
        problems.append(
            problem(
                "duplicate_instances",
                f"{len(differing)} files share a SOPInstanceUID but differ, so which one "
                f"is the instance is unknown: {_listed(differing)}",
            )
        )
    left_out = {id(h) for h in dropped}
    return [h for h in headers if id(h) not in left_out], dropped, problems


def _series_record(
    headers: list[Header], root: Path, salt: str, problems: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    problems = [*problems, *series_problems(headers)]
    geom = slice_geometry(headers)
    problems += geom.problems
    ordered = [headers[i] for i in geom.order]
    first = ordered[0]
    spacing = None
    if first.pixel_spacing is not None:
        slice_sp = geom.slice_spacing
        spacing = [
            round(first.pixel_spacing[1], 6),
            round(first.pixel_spacing[0], 6),
            None if slice_sp is None else round(slice_sp, 6),
        ]
    n_slices = len(ordered) if first.frames == 1 else first.frames
    if geom.positions_mm and len(geom.positions_mm) > 1 and geom.slice_spacing:
        n_slices = int(round((geom.positions_mm[-1] - geom.positions_mm[0]) / geom.slice_spacing)) + 1
    return {
        "series_key": pseudonym(first.series_uid, salt, "ser"),
        "patient_key": pseudonym(first.patient_id, salt, "pat"),
        "study_key": pseudonym(first.study_uid, salt, "stu"),
        "series_number": first.series_number,
        "modality": first.modality,
        "sop_class": UID(first.sop_class).name if first.sop_class else "unknown",
        "num_instances": len(ordered),
        "shape": [first.cols, first.rows, n_slices],
        "spacing": spacing,
        "slice_thickness": first.slice_thickness,
        "orientation": list(first.orientation) if first.orientation else None,
        "orientation_label": _orientation_label(first.orientation),
        "transfer_syntax": sorted({UID(h.transfer_syntax).name if h.transfer_syntax else "unknown" for h in ordered}),
        "folders": sorted({_rel(h.path.parent, root) for h in ordered}),
        "files": [_rel(h.path, root) for h in ordered],
        "problems": problems,
        "loadable": not any(p["blocking"] for p in problems),
    }


def iter_files(root: Path) -> list[Path]:
    """All regular files below ``root`` in a stable order, hidden files (e.g. salts) excluded."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


_NOT_UTF8 = "file or folder name is not valid UTF-8; rename it (the scan index and manifests are UTF-8 text)"
_COPY = "byte-identical copy of another file of its series (same SOPInstanceUID): read once"


def _is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    """``name`` with the bytes that are not UTF-8 written as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


#: Below this many files a scan reads headers in this process: starting workers costs more.
PARALLEL_MIN_FILES = 2000


def _header_or_reason(path: Path) -> Header | str:
    """``read_header`` for a worker process: the reason instead of raising, so one bad file
    never stops a chunk."""
    try:
        return read_header(path)
    except DicomError as exc:
        return exc.message


def _headers(files: list[Path], workers: int, progress: bool) -> Iterable[Header | str]:
    bar = {
        "desc": "reading DICOM headers",
        "unit": "file",
        "disable": not progress,
        "leave": False,
        "total": len(files),
    }
    if workers <= 1 or len(files) < PARALLEL_MIN_FILES:
        yield from track(map(_header_or_reason, files), **bar)
        return
    with ProcessPoolExecutor(
        max_workers=workers
    ) as pool:  # parsing headers is CPU-bound Python: threads would share one core
        yield from track(pool.map(_header_or_reason, files, chunksize=256), **bar)


def scan_dicom(root: str | Path, salt: str, *, progress: bool = True, workers: int | None = None) -> dict[str, Any]:
    """Build the series index of every DICOM file below ``root``; bad files are skipped and listed.

    Headers are read in ``workers`` processes (default: one per CPU) when there are at least
    ``PARALLEL_MIN_FILES`` files; the index is the same either way.

    Returns ``{"format_version", "series": [...], "skipped": [{"path", "reason"}], "summary"}``.
    Paths are relative to ``root``; patient/study/series identifiers are salted hashes. A file whose
    path is not valid UTF-8 is skipped (its name shown with ``\\xNN`` escapes): the index is UTF-8
    JSON. Byte-identical copies of an instance are read once (``unique_instances``) and listed as
    skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DicomError("not a folder", path=root, hint="pass the folder that holds the DICOM files")
    files = iter_files(root)
    not_utf8 = {
        path for path in files if not _is_utf8(str(path)) and not _is_utf8(_rel(path, root))
    }  # the root's own name may be anything
    skipped = [{"path": _printable(_rel(path, root)), "reason": _NOT_UTF8} for path in files if path in not_utf8]
    readable = [path for path in files if path not in not_utf8]
    groups: dict[str, list[Header]] = defaultdict(list)
    for path, header in zip(
        readable, _headers(readable, (os.cpu_count() or 1) if workers is None else workers, progress), strict=True
    ):
        if isinstance(header, str):
            skipped.append({"path": _rel(path, root), "reason": header})
            continue
        groups[header.series_uid].append(header)
    series = []
    for headers in groups.values():
        kept, dropped, problems = unique_instances(headers)
        skipped += [{"path": _rel(h.path, root), "reason": _COPY} for h in dropped]
        series.append(_series_record(kept, root, salt, problems))
    series.sort(key=lambda r: (r["patient_key"], r["folders"][0], r["series_number"] or 0, r["series_key"]))
    return {
        "format_version": SCAN_FORMAT_VERSION,
        "series": series,
        "skipped": skipped,
        "summary": {
            "files": len(files),
            "series": len(series),
            "loadable_series": sum(r["loadable"] for r in series),
            "skipped_files": len(skipped),
        },
    }


def group_series(files: Iterable[str | Path]) -> dict[str, list[Header]]:
    """Headers of readable files grouped by SeriesInstanceUID (unreadable files are ignored)."""
    groups: dict[str, list[Header]] = defaultdict(list)
    for f in files:
        try:
            h = read_header(f)
        except DicomError:
            continue
        groups[h.series_uid].append(h)
    return dict(groups)


def _decode(path: Path) -> tuple[np.ndarray, float, float]:
    try:
        ds = pydicom.dcmread(path, force=True)
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if "ds" in locals() and hasattr(ds, "file_meta") else ""
        why = decoder_problem(syntax)
        if why:
            hint = (
                _DECODE_HINT
                if "plugin" in why
                else "convert the series to an uncompressed transfer syntax (e.g. gdcmconv --raw)"
            )
            raise DicomError(f"cannot decode pixel data: {why}", path=path, hint=hint) from None
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        detail = " ".join([lines[0], "; ".join(lines[1:])]).strip()  # pydicom lists each plugin's error on its own line
        raise DicomError(
            f"cannot decode pixel data ({UID(syntax).name if syntax else 'unknown transfer syntax'}): {detail}",
            path=path,
            hint="the pixel data may be damaged; export the series again from the source",
        ) from None
    slope = _float(ds.get("RescaleSlope"))
    intercept = _float(ds.get("RescaleIntercept"))
    return pixels, 1.0 if slope is None else slope, 0.0 if intercept is None else intercept


def _read_native(path: Path, layout: NativePixels, rows: int, cols: int) -> tuple[np.ndarray, float, float] | None:
    """A slice's pixels read with one call at the offset its header recorded, the unused high bits
    shifted out as pydicom does; None when the file changed since then (it is parsed again)."""
    pixels = np.empty((rows, cols), layout.dtype)
    try:
        with open(path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            if (stat.st_size, stat.st_mtime_ns) != (layout.size, layout.mtime_ns):
                return None
            fh.seek(layout.offset)
            got = fh.readinto(pixels.reshape(-1).view(np.uint8))
    except PermissionError:
        raise DicomError("permission denied", path=path, hint="check the file's read permissions") from None
    except OSError as exc:
        raise DicomError(f"unreadable file ({exc.__class__.__name__}: {exc})", path=path) from None
    if got < pixels.nbytes:
        raise DicomError(f"truncated file: pixel data needs {pixels.nbytes} bytes, {got} present", path=path)
    if layout.unused_bits:
        np.left_shift(pixels, layout.unused_bits, out=pixels)
        np.right_shift(pixels, layout.unused_bits, out=pixels)
    return pixels, layout.slope, layout.intercept


def resample_slices(stack: np.ndarray, positions: Sequence[float], spacing: float) -> np.ndarray:
    """Linear interpolation along the last (slice) axis from the slices at ``positions`` (mm along the
    normal, ascending) onto a uniform grid of ``spacing`` from the first: fills missing slices, evens out gaps."""
    s = np.asarray(positions)
    n = int(round((s[-1] - s[0]) / spacing)) + 1
    target = s[0] + spacing * np.arange(n)
    hi = np.clip(np.searchsorted(s, target, side="right"), 1, len(s) - 1)
    lo = hi - 1
    # a grid rounded past the last acquired slice must not extrapolate: hold the edge slice's values
    w = np.clip((target - s[lo]) / (s[hi] - s[lo]), 0.0, 1.0).astype(np.float32)
    return stack[..., lo] * (1 - w) + stack[..., hi] * w


def read_series(files: Sequence[str | Path], *, name: str | None = None) -> Volume:
    """Assemble the DICOM files of one series into a canonical RAS float32 volume.

    Slices are ordered along the normal; missing slices or uneven gaps are interpolated onto a
    uniform grid; RescaleSlope/Intercept are applied per slice; byte-identical copies of an
    instance are read once. Raises DicomError naming the series (and the file, where one is to
    blame) when it cannot be assembled: several series, mixed sizes, duplicate positions, files
    that share a SOPInstanceUID but differ, PixelSpacing that is not positive, an
    ImageOrientationPatient that is not two perpendicular unit vectors, ...
    """
    if not files:
        raise DicomError("no DICOM files given", path=name or "<no files>")
    return assemble_series([read_header(f) for f in files], name=name)


def stack_geometry(headers: Sequence[Header], *, name: str | None = None) -> tuple[list[Header], Geometry, np.ndarray]:
    """The series' instances in slice order, their geometry and the RAS affine of the stacked slices
    ([column, row, slice] indices, one ``Geometry.slice_step`` per slice), or DicomError naming the
    series. What ``assemble_series`` builds on, public for callers that decode the pixels themselves
    (the MONAI Deploy app in ``deploy/lidc_app``), so both place voxels alike."""
    label = name or str(headers[0].path.parent)
    uids = {h.series_uid for h in headers}
    if len(uids) > 1:
        raise DicomError(
            f"files belong to {len(uids)} different series",
            path=label,
            hint="load one series at a time (see `medtl scan`)",
        )
    headers, _, problems = unique_instances(headers)
    problems += series_problems(headers)
    geom = slice_geometry(headers)
    blocking = [p for p in problems + geom.problems if p["blocking"]]
    if blocking:
        raise DicomError("; ".join(p["message"] for p in blocking), path=label)
    if geom.slice_step is None:
        raise DicomError(
            "series has no usable slice geometry (ImagePositionPatient/ImageOrientationPatient)", path=label
        )
    ordered = [headers[i] for i in geom.order]
    first = ordered[0]
    if first.pixel_spacing is None:
        raise DicomError("no PixelSpacing: in-plane voxel size unknown", path=first.path)
    row_sp, col_sp = first.pixel_spacing
    orient = np.asarray(first.orientation)
    lps = np.eye(4)
    lps[:3, 0] = orient[:3] * col_sp  # i runs along a row (next column)
    lps[:3, 1] = orient[3:] * row_sp  # j runs down a column (next row)
    lps[:3, 2] = geom.slice_step
    lps[:3, 3] = first.position
    return ordered, geom, lps_to_ras(lps)


def needs_resampling(geom: Geometry) -> bool:
    """Whether the slices lie off a uniform grid (missing slices, uneven gaps): ``resample_slices`` then."""
    return any(p["code"] in ("missing_slices", "nonuniform_spacing") for p in geom.problems)


def assemble_series(headers: Sequence[Header], *, name: str | None = None) -> Volume:
    """``read_series`` for headers already read (e.g. while picking a series from a folder)."""
    ordered, geom, affine = stack_geometry(headers, name=name)
    first = ordered[0]
    transform = canonical_transform(affine)
    if needs_resampling(geom):
        stack = resample_slices(_stack_slices(ordered), geom.positions_mm, geom.slice_spacing)
        return Volume(stack.astype(np.float32, copy=False), affine, first.modality).canonical()
    if not np.array_equal(
        transform[:, 0], [0, 1, 2]
    ):  # axes to permute (a sagittal or coronal stack): the general path
        return Volume(_stack_slices(ordered), affine, first.modality).canonical()
    flips = tuple(bool(f < 0) for f in transform[:, 1])
    stack = _stack_slices(ordered, flips)
    return Volume(stack, affine @ nib.orientations.inv_ornt_aff(transform, stack.shape), first.modality)


# Decoders that hold the GIL through a whole slice (two threads decoded no faster than one) and take
# far longer than a decoded slice takes to come back from a worker process, so worker processes
# decode JPEG 2000 and JPEG-LS series faster. RLE decodes about as fast as the pixels travel back,
# so it gained nothing and stays in this process (timings: docs/benchmarks.md, DICOM I/O).
_SLOW_TO_DECODE = frozenset(JPEG2000TransferSyntaxes) | frozenset(JPEGLSTransferSyntaxes)

#: Series with at least this many pixels in such slices are decoded in worker processes (four
#: 512x512 slices, where two workers already saved more than they cost to start; docs/benchmarks.md, DICOM I/O).
PARALLEL_DECODE_MIN_PIXELS = 2**20


def _decode_workers(headers: Sequence[Header]) -> int:
    """How many processes should decode the series' compressed slices (1: this one)."""
    slow = [h for h in headers if h.native is None and h.transfer_syntax in _SLOW_TO_DECODE]
    if len(slow) < 2 or sum(h.rows * h.cols for h in slow) < PARALLEL_DECODE_MIN_PIXELS:
        return 1
    if multiprocessing.current_process().daemon:  # e.g. a DataLoader worker, which may not start processes
        return 1
    return min(os.cpu_count() or 1, len(slow))


def _stack_slices(headers: Sequence[Header], flips: tuple[bool, bool, bool] = (False, False, False)) -> np.ndarray:
    """The series as a [col, row, slice] float32 array with rescale applied and ``flips`` done.

    Each slice is written, already flipped, into its own contiguous block of one buffer and the
    result is a view of it: stacking along the last axis and copying again into RAS order took
    several times longer (docs/benchmarks.md, DICOM I/O). Uncompressed slices are read at the offset
    their header recorded; the others are parsed and decoded by pydicom, in worker processes
    when ``_decode_workers`` says it pays (same slices, same order, same first error).
    """
    n, (flip_i, flip_j, flip_k) = len(headers), flips
    buffer = np.empty((n, headers[0].cols, headers[0].rows), np.float32)
    workers = _decode_workers(headers)
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        parsed = [h.path for h in headers if h.native is None]
        decoded = pool.map(_decode, parsed) if pool else map(_decode, parsed)
        for k, h in enumerate(headers):
            if h.native is None:
                pixels, slope, intercept = _next_decoded(decoded, h.path)
            else:  # a file changed since its header was read is parsed again
                pixels, slope, intercept = _read_native(h.path, h.native, h.rows, h.cols) or _decode(h.path)
            if pixels.shape != (h.rows, h.cols):
                raise DicomError(
                    f"pixel data is {pixels.shape}, the header says {h.rows} rows x {h.cols} columns of one sample",
                    path=h.path,
                )
            plane = pixels.T[:: -1 if flip_i else 1, :: -1 if flip_j else 1]  # [col, row]
            target = buffer[n - 1 - k if flip_k else k]
            np.multiply(plane, np.float32(slope), out=target)
            target += np.float32(intercept)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)  # after an error, decode no further slices
    return buffer.transpose(1, 2, 0)


def _next_decoded(decoded: Iterator[tuple[np.ndarray, float, float]], path: Path) -> tuple[np.ndarray, float, float]:
    """The next decoded slice; a worker process that died is reported as a one-line DicomError."""
    try:
        return next(decoded)
    except BrokenProcessPool:
        raise DicomError(
            "a pixel decoder process died while decoding the series (out of memory, or a crash in a decoder plugin)",
            path=path,
            hint="load the series again; if it keeps failing, convert it to an uncompressed transfer syntax",
        ) from None


def folder_key(folder: str, salt: str) -> str:
    """The pseudonym of a folder path relative to the scanned root (``dir-...``); ``.`` (the root
    itself) stays ``.``. Export folders are often named after the patient."""
    return folder if folder in ("", ".") else pseudonym(folder, salt, "dir")


def pseudonymous_path(path: str, salt: str) -> str:
    """A relative POSIX file path with its folder replaced by ``folder_key``; the file name is kept."""
    folder, _, name = path.rpartition("/")
    return f"{folder_key(folder, salt)}/{name}" if folder else name


def pseudonymous_index(index: dict[str, Any], salt: str) -> dict[str, Any]:
    """``index`` with every folder name replaced by its salted key (files keep their names), as
    ``medtl scan`` writes it by default; ``index_with_folder_names`` turns it back, given the data."""
    series = [
        {
            **s,
            "folders": [folder_key(f, salt) for f in s["folders"]],
            "files": [pseudonymous_path(f, salt) for f in s["files"]],
        }
        for s in index["series"]
    ]
    skipped = [{**item, "path": pseudonymous_path(item["path"], salt)} for item in index["skipped"]]
    return {**index, "series": series, "skipped": skipped, "folder_names": "pseudonymous"}


def index_with_folder_names(index: dict[str, Any], root: str | Path, salt: str) -> dict[str, Any]:
    """A scan index written with folder keys, its paths put back by walking ``root`` (the folder it
    indexed) and keying every folder there with the same salt. A series whose folder is no longer
    there (moved or renamed since the scan) gets the blocking ``folder_missing`` problem."""
    if index.get("folder_names") != "pseudonymous":
        return index
    root = Path(root)
    names = {".": "."}
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for d in dirnames:
            rel = _rel(Path(dirpath) / d, root)
            names[folder_key(rel, salt)] = rel
    series = []
    for record in index["series"]:
        missing = [f for f in record["folders"] if f not in names]
        if missing:
            lost = problem(
                "folder_missing",
                f"folder {missing[0]} of the scan index is not in {root.name} any more "
                "(moved or renamed since the scan?)",
            )
            series.append({**record, "problems": [*record["problems"], lost], "loadable": False})
            continue
        files = [_on_disk(f, names) for f in record["files"]]
        series.append({**record, "folders": [names[f] for f in record["folders"]], "files": files})
    return {**index, "series": series, "folder_names": "real"}


def _on_disk(path: str, names: dict[str, str]) -> str:
    """A ``pseudonymous_path`` with its folder key replaced by the folder it keys in ``names``."""
    key, _, name = path.rpartition("/")
    return f"{names[key]}/{name}" if key and names[key] != "." else name


def write_scan_index(
    root: str | Path, out: str | Path, *, real_ids: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Scan ``root`` and write the index atomically to ``out``, salted with the project salt.

    The salt lives beside ``out`` (created on first use). ``scan_root`` records where ``root`` is
    relative to the index file, so the index stays portable and free of absolute paths. Folder
    names, which PACS exports often make from patient names, are written as salted keys
    (``dir-...``) unless ``real_ids``; ``medtl manifest build`` finds the folders again with the
    same salt. Returns the index as written.
    """
    out = Path(out)
    scan_root = _rel(Path(root).resolve(), out.parent.resolve())
    if not _is_utf8(scan_root):
        raise DicomError("the scanned folder's path is not valid UTF-8", path=_printable(str(root)), hint="rename it")
    out.parent.mkdir(parents=True, exist_ok=True)
    salt = load_or_create_salt(out.parent)
    index = scan_dicom(root, salt, progress=progress)
    index = {**index, "folder_names": "real"} if real_ids else pseudonymous_index(index, salt)
    index["scan_root"] = scan_root
    atomic_write_json(out, index)
    return index
