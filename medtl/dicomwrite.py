"""Write a volume as a real CT DICOM series (one file per slice).

Used by the demo cohort and by tests that need series with known geometry. Files carry valid UIDs,
ImagePositionPatient/ImageOrientationPatient, PixelSpacing, RescaleSlope/Intercept and can be
written compressed (RLE, JPEG-LS, JPEG 2000) through pydicom's encoders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_dataset, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Deterministic UIDs need a root; this is pydicom's documented example root for generated UIDs.
UID_ROOT = "1.2.826.0.1.3680043.8.498."


def make_uid(seed: str) -> str:
    """A valid UID derived from ``seed`` so a seeded cohort is byte-reproducible."""
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[seed])


@dataclass
class SeriesInfo:
    """Identifiers and acquisition values stamped into every slice of a series."""

    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    series_number: int = 1
    series_description: str = ""
    accession: str = ""
    study_date: str = "20240101"
    birth_date: str = ""
    sex: str = "O"
    manufacturer: str = "medtl"
    model: str = "synthetic"
    institution: str = ""
    kernel: str = "STANDARD"
    kvp: float = 120.0
    extra: dict[str, object] = field(default_factory=dict)


def write_ct_series(
    folder: str | Path,
    hu: np.ndarray,
    spacing: Sequence[float],
    info: SeriesInfo,
    *,
    origin_lps: Sequence[float] = (0.0, 0.0, 0.0),
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    positions_lps: Sequence[Sequence[float]] | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    slice_thickness: float | None = None,
    file_prefix: str = "IM",
) -> list[Path]:
    """Write ``hu`` (indexed [column, row, slice], in HU) as one CT Image Storage file per slice.

    ``spacing`` is (column spacing, row spacing, slice spacing) in mm. Slice k sits at
    ``origin + k * slice_spacing * normal`` unless ``positions_lps`` gives every position
    (for tilted or irregular test series). Returns the written paths in slice order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    orient = np.asarray(orientation, dtype=float)
    normal = np.cross(orient[:3], orient[3:])
    stored = np.round((np.asarray(hu, dtype=np.float64) - rescale_intercept) / rescale_slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError("HU values do not fit unsigned 16-bit with this slope/intercept")
    stored = stored.astype(np.uint16)
    ds = _series_dataset(info, spacing, orient, rescale_slope, rescale_intercept, slice_thickness, stored.shape)
    native = transfer_syntax == ExplicitVRLittleEndian
    encoder = _NativeSlices(ds) if native else None
    paths = []
    for k in range(stored.shape[2]):
        pos = positions_lps[k] if positions_lps is not None else np.asarray(origin_lps) + k * spacing[2] * normal
        sop_uid = make_uid(f"{info.series_uid}/{k}")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6g}" for v in pos]
        ds.SliceLocation = f"{float(np.dot(pos, normal)):.6g}"
        if "PixelData" in ds:  # a compressed previous slice left an encapsulated element behind
            del ds.PixelData
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"{file_prefix}{k + 1:04d}.dcm"
        if encoder is not None:
            path.write_bytes(encoder.encode(ds))
        else:
            ds.compress(UID(transfer_syntax), generate_instance_uid=False)
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class _NativeSlices:
    """The bytes ``Dataset.save_as(enforce_file_format=True)`` writes for one slice of an
    uncompressed series, with the elements every slice shares encoded once.

    pydicom encodes a dataset element by element in tag order, so the shared elements between two
    per-slice ones form fixed runs of bytes; each slice then costs its file meta and its own few
    elements instead of some sixty (the demo cohort writes about 15,000 slices).
    ``tests/test_dicom.py`` checks the bytes against pydicom's own writer.
    """

    PER_SLICE = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)  # SOPInstanceUID ... PixelData

    def __init__(self, template: Dataset) -> None:
        self.runs: list[bytes] = []
        shared = sorted(tag for tag in template.keys() if tag not in self.PER_SLICE)
        bounds = [-1, *self.PER_SLICE, 0xFFFFFFFF]
        for low, high in zip(bounds, bounds[1:], strict=False):
            run = Dataset()
            for tag in shared:
                if low < tag < high:
                    run.add(template[tag])
            self.runs.append(self._body(run, template._character_set))

    @staticmethod
    def _body(dataset: Dataset, encodings: str | list[str]) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, dataset, parent_encoding=encodings)
        return buffer.getvalue()

    def encode(self, ds: Dataset) -> bytes:
        meta = FileMetaDataset(ds.file_meta)
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        head = DicomBytesIO()
        head.is_little_endian, head.is_implicit_VR = True, False
        head.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=True)
        parts = [head.getvalue(), self.runs[0]]
        for tag, run in zip(self.PER_SLICE, self.runs[1:], strict=True):
            one = Dataset()
            one.add(correct_ambiguous_vr_element(ds[tag], ds, True))  # PixelData: OW, as BitsAllocated says
            parts += [self._body(one, ds._character_set), run]
        return b"".join(parts)


def _series_dataset(
    info: SeriesInfo,
    spacing: Sequence[float],
    orient: np.ndarray,
    slope: float,
    intercept: float,
    thickness: float | None,
    shape: tuple[int, ...],
) -> Dataset:
    """Everything shared by the slices of a series; per-slice values are set by the caller."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = info.study_date
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = info.accession
    ds.Modality = "CT"
    ds.Manufacturer = info.manufacturer
    ds.ManufacturerModelName = info.model
    ds.InstitutionName = info.institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST CT"
    ds.SeriesDescription = info.series_description
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.birth_date
    ds.PatientSex = info.sex
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{thickness if thickness is not None else spacing[2]:.4g}"
    ds.KVP = f"{info.kvp:g}"
    ds.ConvolutionKernel = info.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = info.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = info.series_number
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in orient]
    ds.FrameOfReferenceUID = make_uid(f"{info.study_uid}/for")
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Columns, ds.Rows = shape[:2]
    ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]  # row spacing, column spacing
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleType = "HU"
    for keyword, value in info.extra.items():
        setattr(ds, keyword, value)
    return ds
