"""DICOM ingest: header scan (grouping, ordering, problems, skipped files, privacy) and series loading.

Expected values come from the DICOM tags' meaning (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, RescaleSlope/Intercept) computed here independently, from pydicom's reference files
and from SimpleITK, never from medtl's own geometry code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import write_jpeg_lossless
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medtl.dicom import assemble_series, read_header, read_series, scan_dicom, slice_geometry
from medtl.errors import DicomError, ImageError, MedtlError
from medtl.reader import load_volume
from medtl.volume import Volume

SALT = "test-salt-0123456789abcdef"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


# ---------------------------------------------------------------------------------------------
# helpers


def scan(root: Path, salt: str = SALT) -> dict:
    return scan_dicom(root, salt, progress=False)


def only_series(index: dict) -> dict:
    assert len(index["series"]) == 1, [s["files"] for s in index["series"]]
    return index["series"][0]


def codes(record: dict) -> list[str]:
    return [p["code"] for p in record["problems"]]


def voxel_indices(volume: Volume, world_ras: np.ndarray) -> np.ndarray:
    """Integer voxel indices of ``volume`` at RAS points (asserting they fall on voxel centres)."""
    pts = world_ras.reshape(-1, 3)
    idx = (np.linalg.inv(volume.affine) @ np.c_[pts, np.ones(len(pts))].T)[:3].T
    rounded = np.round(idx)
    np.testing.assert_allclose(
        idx, rounded, atol=2e-3, err_msg="DICOM voxel centres are not voxel centres of the volume"
    )
    rounded = rounded.astype(int)
    assert (rounded >= 0).all() and (rounded < np.array(volume.shape)).all(), "DICOM voxels fall outside the volume"
    return rounded


def assert_same_world(volume: Volume, world_ras: np.ndarray, values: np.ndarray) -> None:
    """Every DICOM voxel's value is found at the same world point in ``volume``."""
    idx = voxel_indices(volume, world_ras)
    np.testing.assert_array_equal(volume.array[idx[:, 0], idx[:, 1], idx[:, 2]], values.reshape(-1).astype(np.float32))


def assert_canonical(volume: Volume) -> None:
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert volume.array.dtype == np.float32 and volume.array.ndim == 3


def sitk_world(path_or_files) -> tuple[np.ndarray, np.ndarray]:
    """(RAS world coordinates [i, j, k, 3], values [i, j, k]) of an image read by SimpleITK (LPS)."""
    if isinstance(path_or_files, (list, tuple)):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(p) for p in path_or_files])
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path_or_files))
    values = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float64)  # [k,j,i] -> [i,j,k]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing, origin = np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin())
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij"), axis=-1)
    lps = origin + (grid * spacing) @ direction.T
    return lps * np.array([-1.0, -1.0, 1.0]), values


def rewrite(path: Path, out: Path | None = None, **tags) -> Path:
    """Change header tags of one file (optionally saving under another name)."""
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(out or path, enforce_file_format=True)
    return out or path


def value_offset(path: Path, tag: int) -> int:
    """Byte offset of the value of top-level element ``tag`` in the file."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.get_item(tag).value_tell


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:  # pragma: no cover - pydicom ships these; never download
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(path)


# ---------------------------------------------------------------------------------------------
# geometry


def test_generated_series_loads_with_shape_spacing_and_ras_affine(make_series):
    s = make_series("ct")
    record = only_series(scan(s.folder.parent))
    assert record["shape"] == [64, 48, 6] and record["num_instances"] == 6
    assert record["spacing"] == [0.7, 0.8, 2.5]
    assert record["orientation_label"] == "axial" and record["orientation"] == list(AXIAL)
    assert record["modality"] == "CT" and record["sop_class"] == "CT Image Storage"
    assert record["problems"] == [] and record["loadable"]
    assert record["files"] == [f"ct/IM{k:04d}.dcm" for k in range(1, 7)] and record["folders"] == ["ct"]

    vol = load_volume(s.folder)
    assert_canonical(vol)
    assert vol.shape == (64, 48, 6)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 2.5), rtol=1e-6)
    # axial LPS: columns run to the patient's left and rows to posterior, so RAS flips i and j
    np.testing.assert_allclose(np.diag(vol.affine)[:3], (0.7, 0.8, 2.5), rtol=1e-6)
    np.testing.assert_array_equal(vol.array, s.hu[::-1, ::-1, :].astype(np.float32))
    # stored voxel (i=5, j=7, k=3) sits at LPS origin + (5*0.7, 7*0.8, 3*2.5) = (13.5, 25.6, 37.5)
    lps = np.array([10 + 5 * 0.7, 20 + 7 * 0.8, 30 + 3 * 2.5])
    idx = np.linalg.inv(vol.affine) @ np.r_[-lps[0], -lps[1], lps[2], 1.0]
    np.testing.assert_allclose(idx[:3], (63 - 5, 47 - 7, 3), atol=1e-6)
    assert vol.array[63 - 5, 47 - 7, 3] == np.float32(s.hu[5, 7, 3])
    assert_same_world(vol, s.world_ras(), s.hu)


def test_read_series_matches_simpleitk_world_coordinates(make_series):
    s = make_series("ct", shape=(32, 40, 5), spacing=(0.9, 0.6, 3.0), seed=4)
    world, values = sitk_world(s.files)
    assert values.shape == (32, 40, 5)
    np.testing.assert_array_equal(values, s.hu)  # our writer wrote what we think it wrote
    vol = read_series(s.files)
    assert_same_world(vol, world, values)


def test_read_header_fields(make_series):
    s = make_series("ct", shape=(64, 48, 2))
    h = read_header(s.files[1])
    assert (h.rows, h.cols) == (48, 64)
    assert h.pixel_spacing == (0.8, 0.7)  # (row spacing, column spacing) as stored in the tag
    assert h.position == (10.0, 20.0, 32.5) and h.orientation == AXIAL
    assert h.series_uid == s.info.series_uid and h.modality == "CT" and h.instance_number == 2
    assert h.transfer_syntax == ExplicitVRLittleEndian and h.has_pixels and h.frames == 1


def test_order_comes_from_positions_not_names_or_instance_numbers(make_series, tmp_path):
    s = make_series("ct", seed=1)
    reference = load_volume(s.folder).array
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    # file names sort as k = 3, 0, 5, 1, 4, 2 and InstanceNumber runs backwards against position
    names = {3: "a.dcm", 0: "b.dcm", 5: "c.dcm", 1: "d.dcm", 4: "e.dcm", 2: "f.dcm"}
    for k, name in names.items():
        rewrite(s.files[k], shuffled / name, InstanceNumber=6 - k)
    shutil.rmtree(s.folder)
    record = only_series(scan(tmp_path))
    assert record["files"] == [f"shuffled/{names[k]}" for k in range(6)]
    assert record["problems"] == []
    np.testing.assert_array_equal(load_volume(shuffled).array, reference)
    # a file list in any order gives the same volume
    files = sorted(shuffled.iterdir(), reverse=True)
    np.testing.assert_array_equal(load_volume(files).array, reference)


def test_descending_positions_are_ordered_by_position(make_series):
    # InstanceNumber increases while positions go down (foot-first export), as in real scanners
    positions = [(0.0, 0.0, 50.0 - 2.5 * k) for k in range(6)]
    s = make_series("ct", positions_lps=positions, seed=2)
    record = only_series(scan(s.folder))
    assert record["files"] == [f"IM{k:04d}.dcm" for k in range(6, 0, -1)]
    assert record["spacing"][2] == 2.5 and record["problems"] == []
    vol = load_volume(s.folder)
    assert_canonical(vol)
    np.testing.assert_allclose(vol.affine[2, 3], 50.0 - 12.5)  # lowest slice first
    assert_same_world(vol, s.world_ras(), s.hu)


OBLIQUE = tuple(
    np.round(
        np.r_[
            np.array([np.cos(0.5), np.sin(0.5), 0.0]),
            np.array([-np.sin(0.5) * np.cos(0.3), np.cos(0.5) * np.cos(0.3), -np.sin(0.3)]),
        ],
        6,
    )
)


@pytest.mark.parametrize(
    "orientation, label",
    [
        (CORONAL, "coronal"),
        ((0.0, 1.0, 0.0, 0.0, 0.0, -1.0), "sagittal"),
        (OBLIQUE, "axial"),
        ((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), "axial"),  # columns run to the right: normal points feet-ward
    ],
    ids=["coronal", "sagittal", "oblique", "axial-flipped"],
)
def test_non_axial_orientation_gives_canonical_ras_with_same_world_points(make_series, orientation, label):
    s = make_series("ct", shape=(24, 20, 5), spacing=(1.1, 0.9, 2.0), orientation=orientation, seed=3)
    record = only_series(scan(s.folder))
    assert record["orientation_label"] == label and record["loadable"], record["problems"]
    assert record["problems"] == []
    vol = load_volume(s.folder)
    assert_canonical(vol)
    assert sorted(vol.spacing) == pytest.approx(sorted((1.1, 0.9, 2.0)), rel=1e-5)
    assert_same_world(vol, s.world_ras(), s.hu)
    # and SimpleITK agrees on where every voxel is
    world, values = sitk_world(s.files)
    assert_same_world(vol, world, values)


@pytest.mark.parametrize("slope, intercept", [(2.0, -1000.0), (0.5, -1024.0), (1.0, 0.0)])
def test_rescale_slope_and_intercept_applied_as_float32(make_series, slope, intercept):
    rng = np.random.default_rng(7)
    stored = rng.integers(0, 3000, size=(16, 12, 3))
    hu = stored * slope + intercept
    s = make_series("ct", hu=hu, rescale_slope=slope, rescale_intercept=intercept)
    raw = pydicom.dcmread(s.files[0])
    assert float(raw.RescaleSlope) == slope and float(raw.RescaleIntercept) == intercept
    np.testing.assert_array_equal(raw.pixel_array.T, stored[:, :, 0])  # stored values really differ from HU
    vol = load_volume(s.folder)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, hu[::-1, ::-1, :].astype(np.float32))


def test_single_file_loads_as_one_slice_with_thickness(make_series):
    s = make_series("ct", shape=(16, 16, 3), slice_thickness=1.5)
    vol = load_volume(s.files[1])
    assert vol.shape == (16, 16, 1)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 1.5), rtol=1e-6)
    assert_same_world(vol, s.world_ras()[:, :, 1:2], s.hu[:, :, 1:2])


def test_slice_geometry_reports_spacing_and_step(make_series):
    s = make_series("ct", shape=(8, 8, 4), orientation=CORONAL, spacing=(1.0, 1.0, 3.0))
    headers = [read_header(f) for f in reversed(s.files)]
    geom = slice_geometry(headers)
    assert geom.order == [3, 2, 1, 0]
    assert geom.slice_spacing == pytest.approx(3.0)
    np.testing.assert_allclose(geom.slice_step, (0.0, 3.0, 0.0), atol=1e-9)  # coronal normal is +y (posterior)
    assert geom.problems == []


# ---------------------------------------------------------------------------------------------
# problems found by the scan


def test_missing_slice_detected_and_interpolated(make_series):
    s = make_series("ct", seed=5)
    s.files[2].unlink()
    record = only_series(scan(s.folder))
    assert codes(record) == ["missing_slices"] and record["loadable"]
    assert "1 slice(s) missing" in record["problems"][0]["message"]
    assert record["num_instances"] == 5 and record["shape"] == [64, 48, 6]
    assert record["spacing"][2] == 2.5
    vol = load_volume(s.folder)
    assert vol.shape == (64, 48, 6)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 2.5), rtol=1e-6)
    keep = [0, 1, 3, 4, 5]
    assert_same_world(vol, s.world_ras()[:, :, keep], s.hu[:, :, keep])
    expected = (s.hu[::-1, ::-1, 1] + s.hu[::-1, ::-1, 3]) / 2
    np.testing.assert_allclose(vol.array[:, :, 2], expected, atol=1e-3)


def test_nonuniform_spacing_detected_and_resampled(make_series):
    z = np.array([0.0, 2.5, 5.0, 8.2, 10.7, 13.2])
    s = make_series("ct", shape=(12, 10, 6), positions_lps=[(0.0, 0.0, v) for v in z], seed=6)
    record = only_series(scan(s.folder))
    assert codes(record) == ["nonuniform_spacing"] and record["loadable"]
    assert record["spacing"][2] == 2.5 and record["shape"] == [12, 10, 6]
    vol = load_volume(s.folder)
    assert vol.shape == (12, 10, 6)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 2.5), rtol=1e-6)
    np.testing.assert_allclose(vol.affine[2, 3], 0.0, atol=1e-9)
    # each output slice is the linear interpolation of the acquired slices at its own position
    target = np.minimum(2.5 * np.arange(6), z[-1])
    flipped = s.hu[::-1, ::-1, :]
    expected = np.stack([np.apply_along_axis(lambda v, t=t: np.interp(t, z, v), 2, flipped) for t in target], axis=-1)
    np.testing.assert_allclose(vol.array[..., :5], expected[..., :5], atol=1e-3)


def test_resampling_never_extrapolates_past_the_last_slice(make_series):
    # gaps 2.5, 2.5, 2.5, 3.9: the 2.5 mm grid is rounded to 6 slices, the last one 1.1 mm past the data
    z = [0.0, 2.5, 5.0, 7.5, 11.4]
    hu = np.zeros((4, 4, 5))
    hu[..., :3], hu[..., 3], hu[..., 4] = -1000.0, 0.0, 1000.0
    s = make_series("ct", hu=hu, spacing=(1.0, 1.0, 2.5), positions_lps=[(0.0, 0.0, v) for v in z])
    record = only_series(scan(s.folder))
    assert codes(record) == ["nonuniform_spacing"] and record["shape"] == [4, 4, 6]
    vol = load_volume(s.folder)
    assert vol.shape == (4, 4, 6)
    np.testing.assert_allclose(vol.array[0, 0, :4], [-1000, -1000, -1000, 0])
    assert vol.array[0, 0, 4] == pytest.approx(2.5 / 3.9 * 1000, rel=1e-5)  # z = 10 between 7.5 and 11.4
    assert vol.array.max() <= 1000.0 and vol.array.min() >= -1000.0  # nothing invented beyond the data


def test_duplicate_positions_block_loading(make_series):
    positions = [(0.0, 0.0, v) for v in (0.0, 2.5, 2.5, 5.0)]
    s = make_series("ct", shape=(16, 16, 4), positions_lps=positions)
    record = only_series(scan(s.folder))
    assert "duplicate_positions" in codes(record) and not record["loadable"]
    assert all(p["blocking"] for p in record["problems"] if p["code"] == "duplicate_positions")
    with pytest.raises(DicomError) as exc:
        load_volume(s.folder)
    assert str(exc.value).startswith(str(s.folder)) and "share a position" in str(exc.value)


def test_mixed_orientation_blocks_loading(make_series):
    s = make_series("ct", shape=(16, 16, 4))
    rewrite(s.files[2], ImageOrientationPatient=list(CORONAL))
    record = only_series(scan(s.folder))
    assert codes(record) == ["mixed_orientation"] and not record["loadable"]
    with pytest.raises(DicomError, match="ImageOrientationPatient"):
        load_volume(s.folder)


def test_mixed_sizes_block_loading(make_series, tmp_path):
    a = make_series("ct", shape=(16, 16, 3), series_seed="same")
    make_series("ct", shape=(12, 16, 3), series_seed="same", origin_lps=(10.0, 20.0, 37.5), file_prefix="B", seed=9)
    record = only_series(scan(a.folder))
    assert record["num_instances"] == 6
    assert "mixed_size" in codes(record) and not record["loadable"]
    with pytest.raises(DicomError, match="different sizes"):
        load_volume(a.folder)


def test_gantry_tilt_flagged_and_loaded_sheared(make_series):
    angle = np.radians(15.0)
    positions = [(0.0, 2.5 * k * np.tan(angle), 2.5 * k) for k in range(5)]
    s = make_series("ct", shape=(20, 16, 5), positions_lps=positions, seed=8)
    record = only_series(scan(s.folder))
    assert codes(record) == ["gantry_tilt"] and record["loadable"]
    assert "15.0 degrees" in record["problems"][0]["message"]
    assert record["spacing"][2] == 2.5  # distance along the normal, not between positions
    vol = load_volume(s.folder)
    assert_canonical(vol)
    assert_same_world(vol, s.world_ras(), s.hu)


def test_no_tilt_for_straight_stack(make_series):
    record = only_series(scan(make_series("ct", shape=(8, 8, 5), orientation=OBLIQUE).folder))
    assert "gantry_tilt" not in codes(record)


def test_two_series_in_one_folder_are_split(make_series):
    a = make_series("a", shape=(16, 12, 4), series_number=3, seed=1)
    b = make_series("b", shape=(10, 14, 3), series_number=7, seed=2, folder=a.folder, file_prefix="SE7_")
    index = scan(a.folder)
    assert len(index["series"]) == 2 and index["summary"]["series"] == 2
    by_number = {r["series_number"]: r for r in index["series"]}
    assert by_number[3]["files"] == [f"IM{k:04d}.dcm" for k in range(1, 5)]
    assert by_number[7]["files"] == [f"SE7_{k:04d}.dcm" for k in range(1, 4)]
    assert by_number[3]["shape"] == [16, 12, 4] and by_number[7]["shape"] == [10, 14, 3]
    assert by_number[3]["patient_key"] == by_number[7]["patient_key"]
    assert by_number[3]["series_key"] != by_number[7]["series_key"]
    with pytest.raises(DicomError) as exc:
        load_volume(a.folder)
    text = str(exc.value)
    assert text.startswith(str(a.folder))
    assert "2 image series" in text and "series number 3" in text and "series number 7" in text
    assert load_volume(a.folder, series=7).shape == (10, 14, 3)
    assert load_volume(a.folder, series="3").shape == (16, 12, 4)
    assert load_volume(a.folder, series=b.info.series_uid).shape == (10, 14, 3)
    with pytest.raises(DicomError, match="not found"):
        load_volume(a.folder, series=99)


def test_one_series_over_two_folders_is_joined(make_series, tmp_path):
    s = make_series("ct", shape=(16, 12, 6), seed=3)
    second = tmp_path / "ct_part2"
    second.mkdir()
    for f in s.files[3:]:
        f.rename(second / f.name)
    index = scan(tmp_path)
    record = only_series(index)
    assert record["folders"] == ["ct", "ct_part2"]
    assert record["files"] == [f"ct/IM{k:04d}.dcm" for k in (1, 2, 3)] + [f"ct_part2/IM{k:04d}.dcm" for k in (4, 5, 6)]
    assert record["num_instances"] == 6 and record["problems"] == []
    vol = load_volume([tmp_path / f for f in record["files"]])
    assert vol.shape == (16, 12, 6)
    assert_same_world(vol, s.world_ras(), s.hu)


@pytest.mark.parametrize("name, sop", [("rtplan.dcm", "RT Plan Storage"), ("test-SR.dcm", "Comprehensive SR Storage")])
def test_non_image_sop_class_flagged_and_not_picked(make_series, tmp_path, name, sop):
    s = make_series("ct", shape=(16, 16, 3))
    shutil.copy(pydicom_file(name), s.folder / "other.dcm")
    index = scan(s.folder)
    assert len(index["series"]) == 2 and index["skipped"] == []
    other = next(r for r in index["series"] if r["files"] == ["other.dcm"])
    assert other["sop_class"] == sop
    assert "non_image" in codes(other) and not other["loadable"]
    assert index["summary"]["loadable_series"] == 1
    # the folder holds one image series: load_volume picks it and ignores the plan/report
    np.testing.assert_array_equal(load_volume(s.folder).array, s.hu[::-1, ::-1, :].astype(np.float32))
    with pytest.raises(DicomError, match="non-image"):
        load_volume(s.folder / "other.dcm")


def test_multi_frame_flagged(make_series, tmp_path):
    s = make_series("ct", shape=(16, 12, 3))
    ds = pydicom.dcmread(s.files[0])
    ds.NumberOfFrames = 3
    ds.SeriesInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=["multi"])
    ds.PixelData = b"".join(pydicom.dcmread(f).PixelData for f in s.files)
    out = tmp_path / "mf"
    out.mkdir()
    ds.save_as(out / "multiframe.dcm", enforce_file_format=True)
    record = only_series(scan(out))
    assert "multi_frame" in codes(record) and not record["loadable"]
    assert record["shape"] == [16, 12, 3] and record["num_instances"] == 1
    with pytest.raises(DicomError, match="multi-frame"):
        load_volume(out)


@pytest.mark.parametrize(
    ("keyword", "code", "message"),
    [("ImagePositionPatient", "no_geometry", "geometry"), ("PixelSpacing", "no_pixel_spacing", "PixelSpacing")],
)
def test_series_without_geometry_tags_is_not_loadable(make_series, keyword, code, message):
    s = make_series("ct", shape=(8, 8, 2))
    for f in s.files:
        ds = pydicom.dcmread(f)
        delattr(ds, keyword)
        ds.save_as(f, enforce_file_format=True)
    record = only_series(scan(s.folder))
    assert code in codes(record)
    if keyword == "PixelSpacing":
        assert record["spacing"] is None
    # the scan must not promise what the loader refuses
    assert not record["loadable"]
    with pytest.raises(DicomError, match=message):
        load_volume(s.folder)


# ---------------------------------------------------------------------------------------------
# files that are skipped with a reason


def _cut(src: Path, dst: Path, at: int) -> Path:
    dst.write_bytes(src.read_bytes()[:at])
    return dst


@pytest.mark.parametrize(
    "kind",
    [
        "empty",
        "text",
        "cut_pixels",
        "cut_header_value",
        "cut_header_spacing",
        "cut_element_header",
        "dicomdir",
        "binary_junk",
    ],
)
def test_bad_file_is_skipped_with_reason_and_good_series_kept(make_series, tmp_path, kind):
    s = make_series("ct", shape=(16, 16, 4))
    donor = make_series("donor", shape=(16, 16, 2), series_seed="donor").files[0]
    bad = s.folder / "bad.dcm"
    if kind == "empty":
        bad.write_bytes(b"")
        reason = "empty file"
    elif kind == "text":
        bad.write_text("PatientName=Doe^Jane\nthis is a text export log, not DICOM\n" * 20)
        reason = "not a DICOM file"
    elif kind == "binary_junk":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
        reason = ""
    elif kind == "cut_pixels":
        _cut(donor, bad, donor.stat().st_size - 100)
        reason = "truncated"
    elif kind == "cut_header_value":  # inside ImagePositionPatient, after SeriesInstanceUID
        _cut(donor, bad, value_offset(donor, 0x00200032) + 5)
        reason = "truncated"
    elif kind == "cut_header_spacing":  # inside PixelSpacing
        _cut(donor, bad, value_offset(donor, 0x00280030) + 3)
        reason = "truncated"
    elif kind == "cut_element_header":  # in the middle of the tag/VR/length of Columns
        _cut(donor, bad, value_offset(donor, 0x00280011) - 5)
        reason = "truncated"
    else:  # a minimal DICOMDIR written by pydicom's FileSet
        from pydicom.fileset import FileSet

        fs = FileSet()
        fs.add(pydicom.dcmread(donor))
        media = tmp_path / "media"
        fs.write(media)
        shutil.copy(media / "DICOMDIR", s.folder / "DICOMDIR")
        bad = s.folder / "DICOMDIR"
        reason = "DICOMDIR"
    shutil.rmtree(donor.parent)
    index = scan(s.folder)  # never raises
    assert index["skipped"] == [{"path": bad.name, "reason": index["skipped"][0]["reason"]}]
    assert reason in index["skipped"][0]["reason"]
    record = only_series(index)
    assert record["num_instances"] == 4 and record["loadable"] and record["problems"] == []
    assert index["summary"] == {"files": 5, "series": 1, "loadable_series": 1, "skipped_files": 1}
    with pytest.raises(DicomError) as exc:
        read_header(bad)
    assert str(exc.value).startswith(str(bad))
    # loading the folder ignores the bad file; loading the bad file names it
    np.testing.assert_array_equal(load_volume(s.folder).array, s.hu[::-1, ::-1, :].astype(np.float32))


def test_scan_survives_many_bad_files_at_once(make_series, tmp_path):
    s = make_series("ct", shape=(16, 16, 4))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "empty.dcm").write_bytes(b"")
    (junk / "notes.dcm").write_text("not dicom")
    (junk / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    data = s.files[0].read_bytes()
    (junk / "cut_pixels.dcm").write_bytes(data[:-50])
    (junk / "cut_head.dcm").write_bytes(data[: value_offset(s.files[0], 0x00200037) + 4])
    (junk / "preamble_only.dcm").write_bytes(data[:132])
    (junk / ".hidden").write_bytes(b"ignored")
    index = scan(tmp_path)
    skipped = {x["path"]: x["reason"] for x in index["skipped"]}
    assert set(skipped) == {
        f"junk/{n}"
        for n in ("empty.dcm", "notes.dcm", "image.png", "cut_pixels.dcm", "cut_head.dcm", "preamble_only.dcm")
    }
    assert "truncated" in skipped["junk/cut_pixels.dcm"] and "truncated" in skipped["junk/cut_head.dcm"]
    record = only_series(index)
    assert record["num_instances"] == 4 and record["loadable"]


def test_truncated_file_in_series_fails_load_naming_the_file(make_series):
    s = make_series("ct", shape=(16, 16, 3))
    data = s.files[1].read_bytes()
    s.files[1].write_bytes(data[:-200])
    with pytest.raises(DicomError) as exc:
        read_series(s.files)
    assert str(exc.value).startswith(str(s.files[1])) and "truncated" in str(exc.value)


def test_deflated_series_loads_like_uncompressed(make_series):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    s = make_series("ct", shape=(16, 12, 3))
    for f in s.files:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(f, enforce_file_format=True)
    assert read_header(s.files[0]).has_pixels
    record = only_series(scan(s.folder))
    assert record["transfer_syntax"] == ["Deflated Explicit VR Little Endian"]
    assert record["problems"] == [] and record["loadable"]
    np.testing.assert_array_equal(load_volume(s.folder).array, s.hu[::-1, ::-1, :].astype(np.float32))


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg.dcm",  # explicit VR dataset whose pixel data element is written implicit VR
        "SC_ybr_full_422_uncompressed.dcm",  # 4:2:2 subsampled: 2/3 of Rows x Columns x 3 bytes
    ],
)
@pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")
def test_valid_colour_files_are_listed_not_skipped(tmp_path, name):
    shutil.copy(pydicom_file(name), tmp_path / "image.dcm")
    assert pydicom.dcmread(tmp_path / "image.dcm").pixel_array.size  # pydicom decodes it: the file is fine
    index = scan(tmp_path)
    assert index["skipped"] == []
    record = only_series(index)
    assert "color" in codes(record) and not record["loadable"]


def test_shared_dicomdir_skipped(shared_data, tmp_path):
    dicomdir = shared_data / "pydicom_test_files" / "dicomdirtests" / "DICOMDIR"
    if not dicomdir.exists():
        pytest.skip("shared DICOMDIR test file absent")
    with pytest.raises(DicomError, match="DICOMDIR"):
        read_header(dicomdir)


def test_scan_refuses_missing_folder(tmp_path):
    with pytest.raises(DicomError) as exc:
        scan(tmp_path / "nope")
    assert str(exc.value).startswith(str(tmp_path / "nope"))


def test_load_volume_errors_name_the_input(tmp_path):
    with pytest.raises(ImageError) as exc:
        load_volume(tmp_path / "missing")
    assert str(exc.value).startswith(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DicomError, match="empty folder"):
        load_volume(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    with pytest.raises(DicomError, match="none of the 1 file"):
        load_volume(junk)
    assert issubclass(DicomError, MedtlError) and issubclass(ImageError, MedtlError)


# ---------------------------------------------------------------------------------------------
# privacy


def test_scan_output_has_no_identifiers_or_absolute_paths(make_series, tmp_path):
    a = make_series("a", shape=(16, 16, 3), patient_id="MRN-774411", patient_name="Secretname^Person")
    make_series("b", shape=(16, 16, 3), patient_id="MRN-990022", patient_name="Other^Patient", study_seed="study-2")
    index = scan(tmp_path)
    text = json.dumps(index)
    headers = [pydicom.dcmread(f) for f in sorted(tmp_path.rglob("*.dcm"))]
    secrets = {str(tmp_path), str(tmp_path.resolve()), "MRN-774411", "MRN-990022", "Secretname", "Other^Patient"}
    for ds in headers:
        secrets |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientName)}
    for secret in secrets:
        assert secret not in text, secret
    assert a.info.series_uid not in text and all(not f.startswith("/") for r in index["series"] for f in r["files"])
    keys = [r["patient_key"] for r in index["series"]]
    assert len(set(keys)) == 2 and all(k.startswith("pat-") for k in keys)


def test_keys_are_stable_per_salt_and_differ_across_salts(make_series, tmp_path):
    make_series("a", shape=(8, 8, 2))
    make_series("b", shape=(8, 8, 2))  # same patient and study, other series

    def keys(index):
        return [(r["patient_key"], r["study_key"], r["series_key"]) for r in index["series"]]

    first, again, other = (
        keys(scan(tmp_path, SALT)),
        keys(scan(tmp_path, SALT)),
        keys(scan(tmp_path, "another-salt-987654321")),
    )
    assert first == again
    assert first[0][0] == first[1][0] and first[0][1] == first[1][1] and first[0][2] != first[1][2]
    assert {k for t in first for k in t}.isdisjoint({k for t in other for k in t})
    assert scan(tmp_path, SALT) == scan(tmp_path, SALT)  # the whole index is deterministic


# ---------------------------------------------------------------------------------------------
# uncompressed pixels read at the offset the header scan recorded (no second parse)


def write_slices(
    folder: Path,
    stored: np.ndarray,
    *,
    syntax: str = ExplicitVRLittleEndian,
    bits_stored: int | None = None,
    rescale: tuple[float, float] | None = None,
    trailing: bytes = b"",
    photometric: str = "MONOCHROME2",
) -> list[Path]:
    """One axial file per slice of ``stored`` ([row, column, slice], written byte for byte in the
    transfer syntax's byte order, so bits above ``bits_stored`` keep whatever they hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols, n = stored.shape
    bits = stored.dtype.itemsize * 8
    big = syntax == ExplicitVRBigEndian
    series, files = generate_uid(), []
    for k in range(n):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
            syntax,
            CTImageStorage,
            generate_uid(),
        )
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = (
            "1.2.826.0.1.3680043.8.498.1",
            series,
            "CT",
            "PAT-N",
        )
        ds.ImageOrientationPatient, ds.ImagePositionPatient = list(AXIAL), [0.0, 0.0, 2.0 * k]
        ds.PixelSpacing, ds.InstanceNumber = [0.5, 0.75], k + 1
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, photometric
        ds.BitsAllocated, ds.BitsStored = bits, bits_stored or bits
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(stored.dtype.kind == "i")
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:.10g}", f"{rescale[1]:.10g}"
        ds.PixelData = stored[:, :, k].astype(stored.dtype.newbyteorder(">" if big else "<")).tobytes() + trailing
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
        files.append(folder / f"IM{k:03d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


def expected_from_pydicom(files: list[Path]) -> np.ndarray:
    """[column, row, slice] in RAS order from pydicom's own pixel_array and rescale tags (axial: i and j flip)."""
    planes = []
    for f in files:
        ds = pydicom.dcmread(f)
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        planes.append(ds.pixel_array.T[::-1, ::-1] * slope + intercept)
    return np.stack(planes, axis=-1)


def assert_bit_identical(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))  # also tells -0.0 from 0.0


def through_pydicom(headers: list) -> list:
    """The same headers with the recorded pixel layout dropped: every slice is decoded by pydicom."""
    return [dataclasses.replace(h, native=None) for h in headers]


def no_second_parse(path: Path):
    raise AssertionError(f"{path} was parsed again although its pixel layout was recorded")


def _random(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


NATIVE_CASES = {
    # name: (stored values [row, col, slice], write_slices keyword arguments)
    "int16-signed-ct": (
        lambda: _random("int16", (6, 5, 3)) // 16,
        {"syntax": ExplicitVRLittleEndian, "rescale": (1.0, -1024.0)},
    ),
    "int16-12-bits-stored-garbage-above": (
        lambda: _random("int16", (6, 5, 3), 1),
        {"bits_stored": 12, "rescale": (1.0, 0.0)},
    ),
    "uint16-12-bits-stored-garbage-above": (
        lambda: _random("uint16", (6, 5, 3), 2),
        {"bits_stored": 12, "rescale": (2.0, -1000.0)},
    ),
    "uint16-implicit-vr": (
        lambda: _random("uint16", (8, 4, 3), 3),
        {"syntax": ImplicitVRLittleEndian, "rescale": (1.0, -1024.0)},
    ),
    "uint8-odd-length": (lambda: _random("uint8", (5, 7, 3), 4), {"rescale": (1.0, 0.0)}),
    "int8-implicit-vr": (
        lambda: _random("int8", (5, 7, 3), 5),
        {"syntax": ImplicitVRLittleEndian, "rescale": (2.0, -3.0)},
    ),
    "uint32-fractional-rescale": (lambda: _random("uint32", (4, 6, 3), 6), {"rescale": (0.5, -10.25)}),
    "int16-inexact-rescale": (lambda: _random("int16", (6, 5, 3), 7), {"rescale": (0.3333333, -1000.7)}),
    "uint16-no-rescale-tags": (lambda: _random("uint16", (6, 5, 3), 8), {}),
    "uint16-trailing-bytes": (lambda: _random("uint16", (6, 5, 3), 9), {"trailing": b"\x01\x02\x03\x04\x05\x06"}),
    "uint8-odd-length-trailing-byte": (lambda: _random("uint8", (5, 7, 3), 10), {"trailing": b"\xff"}),
    "monochrome1": (
        lambda: _random("uint16", (6, 5, 3), 11),
        {"photometric": "MONOCHROME1", "rescale": (1.0, -1024.0)},
    ),
}


@pytest.mark.filterwarnings("ignore:The pixel data is:UserWarning")  # pydicom's note on excess padding
@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_uncompressed_pixels_read_directly_are_bit_identical_to_pydicom(tmp_path, monkeypatch, case):
    import medtl.dicom

    make, options = NATIVE_CASES[case]
    files = write_slices(tmp_path / case, make(), **options)
    headers = [read_header(f) for f in files]
    assert all(h.native is not None for h in headers)
    reference = assemble_series(through_pydicom(headers))
    monkeypatch.setattr(medtl.dicom, "_decode", no_second_parse)
    direct = assemble_series(headers)
    assert_bit_identical(direct.array, reference.array)
    np.testing.assert_array_equal(direct.affine, reference.affine)
    np.testing.assert_allclose(direct.array, expected_from_pydicom(files), rtol=1e-6)


def test_load_volume_reads_each_uncompressed_file_once(make_series, monkeypatch):
    import medtl.dicom

    s = make_series("ct", shape=(16, 12, 4))
    reference = load_volume(s.folder)
    monkeypatch.setattr(medtl.dicom, "_decode", no_second_parse)
    assert_bit_identical(load_volume(s.folder).array, reference.array)
    np.testing.assert_array_equal(reference.array, s.hu[::-1, ::-1, :].astype(np.float32))


def _implicit_pixel_element(files: list[Path]) -> None:
    """Rewrite each file's explicit VR PixelData element header as implicit VR (a writer quirk)."""
    for f in files:
        data = bytearray(f.read_bytes())
        at = data.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
        data[at + 4 : at + 12] = data[at + 8 : at + 12]  # tag, VR, reserved, length -> tag, length
        f.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["big-endian", "implicit-vr-pixel-element-in-explicit-dataset", "rle"])
def test_other_encodings_fall_back_to_pydicom(tmp_path, case):
    stored = _random("int16", (6, 5, 3), 12)
    if case == "big-endian":
        files = write_slices(tmp_path / case, stored, syntax=ExplicitVRBigEndian, rescale=(1.0, -1024.0))
    else:
        files = write_slices(tmp_path / case, stored, rescale=(1.0, -1024.0))
        if case == "rle":
            for f in files:
                ds = pydicom.dcmread(f)
                ds.compress(RLELossless)
                ds.save_as(f, enforce_file_format=True)
        else:
            _implicit_pixel_element(files)
    headers = [read_header(f) for f in files]
    assert all(h.has_pixels and h.native is None for h in headers)
    vol = assemble_series(headers)
    np.testing.assert_array_equal(vol.array, stored.transpose(1, 0, 2)[::-1, ::-1, :].astype(np.float32) - 1024)
    np.testing.assert_array_equal(vol.array, expected_from_pydicom(files))


@pytest.mark.filterwarnings("ignore:The number of bytes of pixel data is sufficient:UserWarning")
@pytest.mark.parametrize(
    "case, message",
    [("bits-allocated-12", "Bits Allocated"), ("a-whole-extra-frame", "the header says 6 rows x 5 columns")],
)
def test_pixel_data_pydicom_refuses_gives_the_same_error(tmp_path, case, message):
    stored = _random("uint16", (6, 5, 2), 13)
    files = write_slices(
        tmp_path / case, stored, trailing=stored[:, :, 0].tobytes() if case == "a-whole-extra-frame" else b""
    )
    if case == "bits-allocated-12":
        for f in files:
            rewrite(f, BitsAllocated=12, BitsStored=12, HighBit=11)
    headers = [read_header(f) for f in files]
    assert all(h.native is None for h in headers)
    with pytest.raises(DicomError, match=message) as exc:
        assemble_series(headers)
    assert str(exc.value).startswith(str(files[0]))


def test_file_changed_after_its_header_was_read_is_parsed_again(tmp_path):
    stored = _random("uint16", (6, 5, 3), 14)
    files = write_slices(tmp_path / "ct", stored)
    headers = [read_header(f) for f in files]
    # a longer header moves the pixel data: the recorded offset now points elsewhere
    ds = pydicom.dcmread(files[1])
    ds.SeriesDescription = "rewritten by another tool, with a longer header than before"
    ds.PixelData = (stored[:, :, 1] // 2).astype("<u2").tobytes()
    ds.save_as(files[1], enforce_file_format=True)
    assert read_header(files[1]).native.offset != headers[1].native.offset
    vol = assemble_series(headers)
    np.testing.assert_array_equal(vol.array[:, :, 1], (stored[:, :, 1] // 2).T[::-1, ::-1].astype(np.float32))
    np.testing.assert_array_equal(vol.array, assemble_series([read_header(f) for f in files]).array)


def test_file_truncated_after_its_header_was_read_names_the_file(tmp_path):
    files = write_slices(tmp_path / "ct", _random("uint16", (6, 5, 3), 15))
    headers = [read_header(f) for f in files]
    files[2].write_bytes(files[2].read_bytes()[:-20])
    with pytest.raises(DicomError) as exc:
        assemble_series(headers)  # the size changed: pydicom parses it and finds the pixels short
    assert str(exc.value).startswith(str(files[2]))
    # cut between checking the file and reading it (size and time as recorded): the short read is caught
    stat = files[2].stat()
    layout = dataclasses.replace(headers[2].native, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    headers[2] = dataclasses.replace(headers[2], native=layout)
    with pytest.raises(DicomError, match="truncated file: pixel data needs 60 bytes, 40 present") as exc:
        assemble_series(headers)
    assert str(exc.value).startswith(str(files[2]))


def test_headers_with_pixel_layout_pickle_and_leave_the_index_unchanged(make_series):
    s = make_series("ct", shape=(16, 12, 3))
    h = read_header(s.files[0])
    assert h.native is not None and pickle.loads(pickle.dumps(h)) == h
    record = only_series(scan(s.folder))
    assert set(record) == {
        "series_key",
        "patient_key",
        "study_key",
        "series_number",
        "modality",
        "sop_class",
        "num_instances",
        "shape",
        "spacing",
        "slice_thickness",
        "orientation",
        "orientation_label",
        "transfer_syntax",
        "folders",
        "files",
        "problems",
        "loadable",
    }


# ---------------------------------------------------------------------------------------------
# compressed transfer syntaxes

PYDICOM_VARIANTS = [
    ("MR_small_RLE.dcm", RLELossless, "RLE Lossless"),
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, "JPEG-LS Lossless Image Compression"),
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless, "JPEG 2000 Image Compression (Lossless Only)"),
    (
        "sitk-jpeg",
        JPEGLosslessSV1,
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
    ),
]


@pytest.fixture(scope="module")
def mr_reference():
    return load_volume(pydicom_file("MR_small.dcm"))


@pytest.mark.parametrize("name, syntax, syntax_name", PYDICOM_VARIANTS, ids=[v[0] for v in PYDICOM_VARIANTS])
def test_compressed_reference_files_decode_like_uncompressed(tmp_path, mr_reference, name, syntax, syntax_name):
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "image.dcm"
    if name == "sitk-jpeg":
        write_jpeg_lossless(pydicom_file("MR_small.dcm"), path)
    else:
        shutil.copy(pydicom_file(name), path)
    assert read_header(path).transfer_syntax == syntax
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    record = only_series(scan(folder))
    assert record["transfer_syntax"] == [syntax_name] and record["loadable"]
    vol = load_volume(path)
    assert vol.shape == mr_reference.shape == (64, 64, 1)
    np.testing.assert_array_equal(vol.array, mr_reference.array)
    np.testing.assert_allclose(vol.affine[:, [0, 1, 3]], mr_reference.affine[:, [0, 1, 3]], atol=1e-4)
    # one slice: its thickness is SpacingBetweenSlices (SimpleITK writes 1) else SliceThickness (0.8)
    assert vol.spacing[2] == pytest.approx(1.0 if name == "sitk-jpeg" else 0.8)
    assert np.ptp(vol.array) > 0


@pytest.fixture(scope="module")
def ct_uncompressed(tmp_path_factory):
    from medtl.dicomwrite import SeriesInfo, make_uid, write_ct_series

    hu = np.random.default_rng(11).integers(-1024, 1500, size=(64, 64, 4)).astype(float)
    info = SeriesInfo("PAT-C", "Comp^Ress", make_uid("c-study"), make_uid("c-series"))
    folder = tmp_path_factory.mktemp("plain")
    write_ct_series(folder, hu, (0.6, 0.6, 2.0), info)
    return hu, info, load_volume(folder)


@pytest.mark.parametrize(
    "syntax, syntax_name",
    [
        (RLELossless, "RLE Lossless"),
        (JPEGLSLossless, "JPEG-LS Lossless Image Compression"),
        (JPEG2000Lossless, "JPEG 2000 Image Compression (Lossless Only)"),
    ],
    ids=["rle", "jpeg-ls", "jpeg2000"],
)
def test_generated_compressed_series_loads_identical(tmp_path, ct_uncompressed, syntax, syntax_name):
    from medtl.dicomwrite import write_ct_series

    hu, info, reference = ct_uncompressed
    files = write_ct_series(tmp_path / "ct", hu, (0.6, 0.6, 2.0), info, transfer_syntax=syntax)
    assert all(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax for f in files)
    assert sum(f.stat().st_size for f in files) != 0
    record = only_series(scan(tmp_path))
    assert record["transfer_syntax"] == [syntax_name] and record["loadable"] and record["problems"] == []
    vol = load_volume(tmp_path / "ct")
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_array_equal(vol.affine, reference.affine)
    np.testing.assert_array_equal(reference.array, hu[::-1, ::-1, :].astype(np.float32))


# ---------------------------------------------------------------------------------------------
# compressed slices decoded in worker processes


@pytest.fixture
def j2k_series(make_series):
    return make_series("j2k", shape=(64, 48, 5), transfer_syntax=JPEG2000Lossless)


@pytest.fixture
def pools(monkeypatch) -> list:
    """Worker counts of the decoder pools started, with every JPEG 2000 series big enough for one on a 2-CPU machine."""
    import medtl.dicom

    started = []

    class Recording(ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            started.append(kwargs["max_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(medtl.dicom, "ProcessPoolExecutor", Recording)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    return started


def corrupt_codestream(path: Path) -> None:
    """Break the JPEG 2000 start-of-codestream marker: the header still reads, decoding fails."""
    data = bytearray(path.read_bytes())
    at = data.find(b"\xff\x4f\xff\x51")
    data[at : at + 4] = bytes(4)
    path.write_bytes(bytes(data))


def _exit_abruptly(path: Path) -> None:
    """Stands in for the decoder in a worker process that dies (defined at module level so the worker finds it)."""
    os._exit(3)


def test_compressed_slices_decoded_in_worker_processes_match_serial(j2k_series, pools, monkeypatch):
    import medtl.dicom

    serial = load_volume(j2k_series.folder)
    assert pools == []  # 64x48x5 pixels: too few to start workers
    monkeypatch.setattr(medtl.dicom, "PARALLEL_DECODE_MIN_PIXELS", 1)
    parallel = load_volume(j2k_series.folder)
    assert pools == [2]
    assert_bit_identical(parallel.array, serial.array)
    np.testing.assert_array_equal(parallel.affine, serial.affine)
    np.testing.assert_array_equal(serial.array, j2k_series.hu[::-1, ::-1, :].astype(np.float32))


def test_uncompressed_and_rle_series_are_not_decoded_in_workers(make_series, pools, monkeypatch):
    import medtl.dicom

    monkeypatch.setattr(medtl.dicom, "PARALLEL_DECODE_MIN_PIXELS", 1)
    for name, options in [("plain", {}), ("rle", {"transfer_syntax": RLELossless})]:
        s = make_series(name, shape=(32, 24, 6), **options)
        np.testing.assert_array_equal(load_volume(s.folder).array, s.hu[::-1, ::-1, :].astype(np.float32))
    assert pools == []


def test_worker_decoding_raises_the_serial_error_of_the_first_bad_slice(j2k_series, pools, monkeypatch):
    import medtl.dicom

    for k in (4, 2):
        corrupt_codestream(j2k_series.files[k])
    with pytest.raises(DicomError) as serial:
        load_volume(j2k_series.folder)
    monkeypatch.setattr(medtl.dicom, "PARALLEL_DECODE_MIN_PIXELS", 1)
    with pytest.raises(DicomError) as parallel:
        load_volume(j2k_series.folder)
    assert pools == [2]
    assert parallel.value.path == serial.value.path == str(j2k_series.files[2])
    assert parallel.value.hint == serial.value.hint and "cannot decode pixel data" in serial.value.message
    # pillow's part of the message names a BytesIO object by its memory address
    assert re.sub(r"0x[0-9a-f]+", "0x…", str(parallel.value)) == re.sub(r"0x[0-9a-f]+", "0x…", str(serial.value))


def test_decoder_process_that_dies_gives_a_dicom_error(j2k_series, pools, monkeypatch):
    import medtl.dicom

    monkeypatch.setattr(medtl.dicom, "PARALLEL_DECODE_MIN_PIXELS", 1)
    monkeypatch.setattr(medtl.dicom, "_decode", _exit_abruptly)
    with pytest.raises(DicomError, match="decoder process died") as exc:
        load_volume(j2k_series.folder)
    assert str(exc.value).startswith(str(j2k_series.files[0]))


def test_no_worker_processes_inside_a_daemonic_process(j2k_series, pools, monkeypatch):
    """DataLoader workers are daemonic and may not start processes: decode in place."""
    import medtl.dicom

    monkeypatch.setattr(medtl.dicom, "PARALLEL_DECODE_MIN_PIXELS", 1)
    monkeypatch.setattr(medtl.dicom.multiprocessing, "current_process", lambda: SimpleNamespace(daemon=True))
    np.testing.assert_array_equal(load_volume(j2k_series.folder).array, j2k_series.hu[::-1, ::-1, :].astype(np.float32))
    assert pools == []


# ---------------------------------------------------------------------------------------------
# real DICOM written by other software (../shared/data)


def test_monai_ct_dicom_uneven_spacing(shared_data):
    folder = shared_data / "monai_testing_data" / "CT_DICOM"
    index = scan(folder)
    record = only_series(index)
    assert index["skipped"] == []
    assert record["num_instances"] == 4 and record["modality"] == "CT"
    assert record["files"] == ["7106", "7136", "7166", "7196"]  # no suffix, ordered by position
    assert codes(record) == ["missing_slices"] and record["loadable"]
    assert record["spacing"] == [0.488281, 0.488281, 1.25]
    vol = load_volume(folder)
    assert_canonical(vol)
    assert vol.shape[:2] == (16, 16) and vol.shape[2] == record["shape"][2]
    # every acquired slice, as SimpleITK reads it file by file, is found at its world position
    for f in record["files"]:
        world, values = sitk_world(folder / f)
        assert_same_world(vol, world, values)


def test_dcmqi_ct_3slice_matches_simpleitk(shared_data):
    folder = shared_data / "dcmqi_data" / "segmentations" / "ct-3slice"
    record = only_series(scan(folder))
    assert record["files"] == ["03.dcm", "02.dcm", "01.dcm"]  # InstanceNumber order is top-down
    assert record["problems"] == [] and record["shape"] == [512, 512, 3]
    assert record["transfer_syntax"] == ["Implicit VR Little Endian"]
    vol = load_volume(folder)
    assert_canonical(vol)
    np.testing.assert_allclose(vol.spacing, (0.810547, 0.810547, 1.0), rtol=1e-5)
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    world, values = sitk_world(list(names))
    assert_same_world(vol, world, values)
    np.testing.assert_array_equal(np.sort(vol.array, axis=None), np.sort(values, axis=None).astype(np.float32))


def test_pydicom_dicomdir_tree(shared_data):
    root = shared_data / "pydicom_test_files" / "dicomdirtests"
    index = scan(root)
    skipped = {x["path"]: x["reason"] for x in index["skipped"]}
    assert "DICOMDIR" in skipped and "DICOMDIR" in skipped["DICOMDIR"]
    # ground truth straight from pydicom: one record per SeriesInstanceUID among the image files
    uids = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ("DICOMDIR", "README.txt")):
        uids.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID), []).append(f)
    assert len(index["series"]) == len(uids) > 3
    assert sorted(r["num_instances"] for r in index["series"]) == sorted(len(v) for v in uids.values())
    assert {m for r in index["series"] for m in [r["modality"]]} >= {"CT", "MR"}
    ct5 = next(r for r in index["series"] if r["folders"] == ["98892001/CT5N"])
    assert ct5["loadable"] and ct5["num_instances"] == 5
    vol = load_volume([root / f for f in ct5["files"]])
    assert_canonical(vol)
    assert vol.shape == tuple(ct5["shape"])
    # a loadable flag must mean the loader accepts the series
    for r in index["series"]:
        if r["loadable"]:
            load_volume([root / f for f in r["files"]])
        else:
            with pytest.raises(DicomError):
                load_volume([root / f for f in r["files"]])


def test_parallel_header_scan_gives_the_same_index(make_series, monkeypatch):
    """Worker processes read the headers of large folders; the index must not depend on it."""
    import medtl.dicom

    a = make_series("a", shape=(16, 12, 6), series_number=3, seed=1)
    make_series("b", shape=(10, 14, 5), series_number=7, seed=2, folder=a.folder, file_prefix="SE7_")
    (a.folder / "junk.dcm").write_bytes(b"not dicom")
    sequential = scan_dicom(a.folder, "s" * 32, progress=False, workers=1)
    monkeypatch.setattr(medtl.dicom, "PARALLEL_MIN_FILES", 1)
    parallel = scan_dicom(a.folder, "s" * 32, progress=False, workers=2)
    assert parallel == sequential and parallel["summary"]["files"] == 12 and len(parallel["skipped"]) == 1


def test_uncompressed_slices_are_the_bytes_pydicom_writes(tmp_path, monkeypatch):
    """``write_ct_series`` encodes the elements a series shares once; every file must still be byte
    for byte what ``Dataset.save_as`` writes, non-ASCII names (ISO_IR 100) and extra tags included."""
    import io

    import medtl.dicomwrite as dicomwrite
    from medtl.dicomwrite import SeriesInfo, write_ct_series

    hu = np.random.default_rng(0).integers(-1000, 1500, (24, 20, 4)).astype(float)
    info = SeriesInfo(
        patient_id="X1",
        patient_name="MÜLLER^Jürgen",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        extra={"PatientAge": "050Y", "ContrastBolusAgent": "none"},
    )
    fast = write_ct_series(tmp_path / "fast", hu, (0.7, 0.8, 2.5), info, origin_lps=(1.0, -2.0, 3.5))

    class SaveAs:  # pydicom's own writer for every slice
        def __init__(self, template: Dataset) -> None:
            pass

        def encode(self, ds: Dataset) -> bytes:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            return buffer.getvalue()

    monkeypatch.setattr(dicomwrite, "_NativeSlices", SaveAs)
    reference = write_ct_series(tmp_path / "reference", hu, (0.7, 0.8, 2.5), info, origin_lps=(1.0, -2.0, 3.5))
    assert [p.read_bytes() for p in fast] == [p.read_bytes() for p in reference]
    assert str(pydicom.dcmread(fast[1]).PatientName) == "MÜLLER^Jürgen"
