"""Hostile ingest inputs: header geometry that would place voxels wrongly, duplicated instances, file
names that are not UTF-8, oversized CSV cells, spreadsheet formulas in names, and folder names that
name patients.

Each refusal is a ``MedtlError`` naming the file and the reason; in a batch (scan, inference over a
folder) the bad item is listed and everything else kept. ``tests/test_robustness.py`` holds the
one-line corpus these cases also appear in (and ``docs/robustness.md`` shows).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medtl.cli import main
from medtl.dicom import orientation_problem, pseudonymous_path, scan_dicom, write_scan_index
from medtl.dicomwrite import SeriesInfo, make_uid, write_ct_series
from medtl.errors import DicomError, ManifestError, MedtlError
from medtl.fileio import csv_cell, csv_text, csv_value
from medtl.importers import import_lidc_vois
from medtl.manifest import build_manifest_file, read_label_table
from medtl.privacy import pseudonym
from medtl.reader import load_volume

SALT = "hostile-salt-0123456789abcdef"
SHEARED = (1.0, 0.0, 0.0, 0.0998, 0.995, 0.0)  # row . column = 0.0998: 84.27 degrees apart

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")


def _series(folder: Path, *, series: str = "s1", number: int = 1, **tags) -> list[Path]:
    """A 12 x 10 x 4 CT series with ``tags`` set in every file (values pydicom would write as given)."""
    info = SeriesInfo(
        patient_id="P1",
        patient_name="Test^Hostile",
        study_uid=make_uid("study"),
        series_uid=make_uid(series),
        series_number=number,
    )
    hu = np.random.default_rng(number).integers(-1000, 1000, size=(12, 10, 4)).astype(np.float64)
    files = write_ct_series(folder, hu, (0.7, 0.8, 2.5), info, positions_lps=[(0.0, 0.0, 2.5 * k) for k in range(4)])
    for f in files if tags else []:
        ds = pydicom.dcmread(f)
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(f, enforce_file_format=True)
    return files


def _scan(root: Path) -> dict:
    return scan_dicom(root, SALT, progress=False)


# ------------------------------------------------------------------------------------ geometry tags

BAD_GEOMETRY = {
    "negative-spacing": (
        {"PixelSpacing": [-0.7, 0.8]},
        "bad_pixel_spacing",
        "PixelSpacing must be positive: IM0001.dcm has (-0.7, 0.8)",
    ),
    "zero-spacing": (
        {"PixelSpacing": [0.7, 0]},
        "bad_pixel_spacing",
        "PixelSpacing must be positive: IM0001.dcm has (0.7, 0)",
    ),
    "zero-vector": (
        {"ImageOrientationPatient": [1, 0, 0, 0, 0, 0]},
        "bad_orientation",
        "of IM0001.dcm: its column direction is a zero vector",
    ),
    "parallel": (
        {"ImageOrientationPatient": [0, 1, 0, 0, -1, 0]},
        "bad_orientation",
        "of IM0001.dcm: its row and column directions are parallel",
    ),
    "sheared": (
        {"ImageOrientationPatient": list(SHEARED)},
        "bad_orientation",
        "of IM0001.dcm: its row and column directions are 84.27 degrees apart",
    ),
}


@pytest.mark.parametrize("kind", BAD_GEOMETRY)
def test_bad_geometry_refused_with_the_file_and_the_reason(kind, tmp_path, capsys):
    tags, code, phrase = BAD_GEOMETRY[kind]
    _series(tmp_path / "scans" / "good")
    _series(tmp_path / "scans" / "bad", series="s2", number=2, **tags)

    index = _scan(tmp_path / "scans")  # a batch: the bad series is listed as not loadable, the good one kept
    by_folder = {s["folders"][0]: s for s in index["series"]}
    assert by_folder["good"]["loadable"] and not by_folder["bad"]["loadable"]
    problems = {p["code"]: p for p in by_folder["bad"]["problems"]}
    assert problems[code]["blocking"] and phrase in problems[code]["message"]

    with pytest.raises(DicomError) as refused:
        load_volume(tmp_path / "scans" / "bad")
    assert str(refused.value).startswith(str(tmp_path / "scans" / "bad")) and phrase in str(refused.value)

    assert main(["-q", "convert", str(tmp_path / "scans" / "bad"), "-o", str(tmp_path / "bad.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "unexpected" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.nii.gz").exists()


def test_the_file_with_the_bad_spacing_is_the_one_named(tmp_path):
    files = _series(tmp_path / "ct")
    ds = pydicom.dcmread(files[2])
    ds.PixelSpacing = [-0.7, 0.8]
    ds.save_as(files[2], enforce_file_format=True)
    with pytest.raises(DicomError, match=r"PixelSpacing must be positive: IM0003\.dcm has \(-0\.7, 0\.8\)$"):
        load_volume(tmp_path / "ct")


@pytest.mark.parametrize(
    "orientation, expected",
    [
        ((1, 0, 0, 0, 1, 0), None),
        ((0.7071, 0.7071, 0, -0.7071, 0.7071, 0), None),  # cosines rounded to 4 decimals
        ((1, 0, 0, 0.0005, 1, 0), None),  # |cos| 5e-4: within the tolerance, a rounding, not a shear
        ((1, 0, 0, 0.002, 1, 0), "89.89 degrees apart, not 90"),
        (SHEARED, "84.27 degrees apart, not 90"),
        ((1, 0, 0, -1, 0, 0), "parallel"),
        ((0, 0, 0, 0, 1, 0), "row direction is a zero vector"),
        ((2, 0, 0, 0, 1, 0), "row direction has length 2"),
    ],
)
def test_orientation_problem_names_the_angle(orientation, expected):
    found = orientation_problem(orientation)
    assert found is None if expected is None else expected in found


def test_orientation_within_tolerance_loads_as_before(tmp_path):
    _series(tmp_path / "ct", ImageOrientationPatient=[1, 0, 0, 0.0005, 1, 0])
    index = _scan(tmp_path / "ct")
    assert index["series"][0]["loadable"] and index["series"][0]["problems"] == []
    assert load_volume(tmp_path / "ct").shape == (12, 10, 4)


# ------------------------------------------------------------------------------------ duplicated instances


def test_an_export_merged_twice_is_read_once(tmp_path):
    files = _series(tmp_path / "scans" / "ct")
    shutil.copytree(tmp_path / "scans" / "ct", tmp_path / "scans" / "ct_again")  # byte-identical copies of every file
    index = _scan(tmp_path / "scans")
    (series,) = index["series"]
    assert series["loadable"] and series["num_instances"] == 4 and series["files"] == [f"ct/{f.name}" for f in files]
    (flag,) = series["problems"]
    assert flag["code"] == "duplicate_files" and not flag["blocking"] and "4 byte-identical copies" in flag["message"]
    assert {s["path"] for s in index["skipped"]} == {f"ct_again/{f.name}" for f in files}
    assert all("byte-identical copy" in s["reason"] for s in index["skipped"])
    np.testing.assert_array_equal(load_volume(tmp_path / "scans").array, load_volume(tmp_path / "scans" / "ct").array)


def test_different_files_with_one_sop_instance_uid_refuse_the_series_only(tmp_path):
    _series(tmp_path / "scans" / "good")
    files = _series(tmp_path / "scans" / "reused", series="s2", number=2)
    ds = pydicom.dcmread(files[3])
    ds.SOPInstanceUID = pydicom.dcmread(files[0]).SOPInstanceUID
    ds.save_as(files[3], enforce_file_format=True)
    index = _scan(tmp_path / "scans")
    by_folder = {s["folders"][0]: s for s in index["series"]}
    assert by_folder["good"]["loadable"] and not by_folder["reused"]["loadable"]
    assert [p["code"] for p in by_folder["reused"]["problems"]] == ["duplicate_instances"]
    with pytest.raises(
        DicomError, match=r"reused: 2 files share a SOPInstanceUID but differ.*: IM0001\.dcm, IM0004\.dcm"
    ):
        load_volume(tmp_path / "scans" / "reused")


# ------------------------------------------------------------------------------------ file names


def test_folder_name_that_is_not_utf8_is_skipped_and_the_rest_indexed(tmp_path, capsys):
    root = tmp_path / "scans"
    _series(root / "good")
    bad = Path(os.fsdecode(os.fsencode(root) + b"/M\xfcller"))  # Latin-1 bytes of "Müller"
    _series(bad, series="s2", number=2)
    out = tmp_path / "project" / "scan.json"
    assert main(["-q", "scan", str(root), "-o", str(out), "--real-ids"]) == 0
    printed = capsys.readouterr().out
    index = json.loads(out.read_text(encoding="utf-8"))
    assert [s["folders"] for s in index["series"]] == [["good"]] and index["series"][0]["loadable"]
    assert {s["path"] for s in index["skipped"]} == {f"M\\xfcller/IM000{k}.dcm" for k in range(1, 5)}
    assert all("not valid UTF-8" in s["reason"] for s in index["skipped"])
    assert "skipped M\\xfcller/IM0001.dcm: file or folder name is not valid UTF-8" in printed


# ------------------------------------------------------------------------------------ CSV tables


@pytest.mark.parametrize(
    "value, written",
    [
        ("=cmd|' /C calc'!A0#1", "'=cmd|' /C calc'!A0#1"),
        ("+SUM(A1:A9)", "'+SUM(A1:A9)"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("-0.5", "-0.5"),
        ("+3", "+3"),
        ("-1e-3", "-1e-3"),
        (-0.25, -0.25),
        ("dir-3f2a#2", "dir-3f2a#2"),
        ("", ""),
    ],
)
def test_csv_cells_that_start_a_formula_are_text_and_numbers_stay_numbers(value, written):
    assert csv_cell(value) == written
    assert csv_value(str(written)) == str(value)


def test_a_label_table_medtl_writes_reads_back_as_written(tmp_path):
    rows = [
        {"patient_id": '=HYPERLINK("x")', "label": "benign", "roi_center_mm": "-12.5 30 4"},
        {"patient_id": "-007", "label": "malignant", "roi_center_mm": "1 2 3"},
    ]
    text = csv_text(rows, ["patient_id", "label", "roi_center_mm"])
    first, second = text.splitlines()[1:]
    assert first.startswith(""""'=HYPERLINK""") and first.endswith(
        ",benign,'-12.5 30 4"
    )  # the cell holds quotes, so it is quoted
    assert second.startswith("-007,")  # a number to a spreadsheet
    (tmp_path / "labels.csv").write_text(text, encoding="utf-8")
    assert read_label_table(tmp_path / "labels.csv") == rows


def test_an_unclosed_quote_is_named_with_its_line(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text('patient_id,label\np1,"benign\n' + "p2,malignant\n" * 12_000, encoding="utf-8")
    with pytest.raises(ManifestError) as refused:
        read_label_table(table)
    message = str(refused.value)
    assert message.startswith(f"{table}: line ") and "a field is longer than 131,072 characters" in message
    assert "a quote that is never closed" in message


def test_lidc_table_with_an_oversized_field_is_named(tmp_path):
    (tmp_path / "vois").mkdir()
    (tmp_path / "vois" / "labels.csv").write_text(
        "patient_id,image,mask,diagnosis,diameter_mm\nLIDC-1," + "x" * 140_000 + ",m,Benign,5\n", encoding="utf-8"
    )
    with pytest.raises(MedtlError, match=r"labels\.csv: line 2: a field is longer than 131,072 characters"):
        import_lidc_vois(tmp_path / "vois", tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------ folder names


def test_scan_index_names_folders_by_key_and_the_manifest_finds_them(tmp_path):
    root = tmp_path / "data" / "dicom"
    _series(root / "DOE^JANE" / "CT")
    index = write_scan_index(root, tmp_path / "data" / "scan.json", progress=False)
    salt = (tmp_path / "data" / ".medtl-salt").read_text(encoding="utf-8").strip()
    text = (tmp_path / "data" / "scan.json").read_text(encoding="utf-8")
    assert "JANE" not in text and index["folder_names"] == "pseudonymous"
    assert index["series"][0]["folders"] == [pseudonym("DOE^JANE/CT", salt, "dir")]
    assert index["series"][0]["files"][0] == pseudonymous_path("DOE^JANE/CT/IM0001.dcm", salt)

    (tmp_path / "data" / "labels.csv").write_text("patient_id,label\nP1,benign\n", encoding="utf-8")
    build = {
        "labels": tmp_path / "data" / "labels.csv",
        "classes": ("benign", "malignant"),
        "scan": tmp_path / "data" / "scan.json",
        "site": "S",
        "progress": False,
    }
    manifest = build_manifest_file(out=tmp_path / "data" / "m.json", **build)
    assert [f["path"] for f in manifest["cases"][0]["image"]["files"]] == [
        f"dicom/DOE^JANE/CT/IM000{k}.dcm" for k in range(1, 5)
    ]

    (root / "DOE^JANE").rename(root / "renamed")  # the data moved after the scan
    with pytest.raises(
        ManifestError,
        match=r"row 2: the patient's series in the scan index cannot be loaded: folder dir-\w+ "
        r"of the scan index is not in dicom any more",
    ):
        build_manifest_file(out=tmp_path / "data" / "m2.json", **build)
