"""Lesion masks for `medtl predict`: the DICOM SEG that references a series (``medtl.seg``, shared with the
MONAI Deploy app), a ``--masks`` table of NIfTI files, and the refusal of series a mask-channel model cannot score."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from monai.bundle import ConfigParser

from medtl.bundle.components.masks import NO_MASK, UNUSED_SEG, series_grid
from medtl.cli import main
from medtl.dicom import read_header
from medtl.dicomwrite import SeriesInfo, make_uid, write_ct_series
from medtl.errors import DicomError, MedtlError
from medtl.nifti import write_nifti
from medtl.predict import predict
from medtl.reader import load_volume
from medtl.seg import find_seg, mask_volume, seg_mask
from medtl.transforms import requires_mask
from medtl.volume import Volume

REPO = Path(__file__).resolve().parents[1]
LIDC = REPO / "bundles" / "lidc_nodule_malignancy"
PLANTED = ("Zzplanted^Secretname", "PLANTED-PID-4411")
SPACING = (0.8, 0.8, 2.0)  # column, row, slice (mm)
SHAPE = (48, 40, 16)
#: CT series and the DICOM SEG made on it in ../shared/data (as tests/test_deploy.py runs the app on them).
REAL_CASES = {
    "uneven_4_slices": ("monai_testing_data/CT_DICOM", "highdicom_test_files/seg_image_ct_binary.dcm"),
    "even_512x512": ("dcmqi_data/segmentations/ct-3slice", "dcmqi_data/segmentations/liver.dcm"),
}


def _ball(center: tuple[int, int, int], radius_mm: float = 6.0) -> np.ndarray:
    """A [column, row, slice] ball of ``radius_mm`` around voxel ``center``."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    c = np.asarray(center)
    return ((x - c[0]) * SPACING[0]) ** 2 + ((y - c[1]) * SPACING[1]) ** 2 + (
        (z - c[2]) * SPACING[2]
    ) ** 2 < radius_mm**2


def _series(folder: Path, name: str, *, prefix: str = "IM") -> list[Path]:
    """A small CT series (lung-like noise, a soft-tissue nodule off centre) carrying the planted identifiers."""
    info = SeriesInfo(
        patient_id=PLANTED[1],
        patient_name=PLANTED[0],
        study_uid=make_uid("study"),
        series_uid=make_uid(f"series-{name}"),
        series_number=3,
    )
    hu = np.clip(np.random.default_rng(len(name)).normal(-800.0, 60.0, size=SHAPE), -1000, 0)
    hu[_ball((20, 22, 8))] = 30.0
    return write_ct_series(folder, hu, SPACING, info, origin_lps=(-20.0, -15.0, 40.0), file_prefix=prefix)


def _segment(label: str, number: int = 1) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=hd.sr.CodedConcept("27925004", "SCT", "Nodule"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


def _write_seg(files: list[Path], mask: np.ndarray, dest: Path, *, segments: int = 1) -> Path:
    """A DICOM SEG (highdicom) of a [column, row, slice] mask on the series' files (in slice order);
    with ``segments`` > 1 the mask holds segment numbers."""
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(f) for f in files],
        pixel_array=np.transpose(mask, (2, 1, 0)).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(f"nodule {n}", n) for n in range(1, segments + 1)],
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medtl tests",
        manufacturer_model_name="tests",
        software_versions="1",
        device_serial_number="1",
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(dest)
    return dest


@pytest.fixture(scope="module")
def incoming(tmp_path_factory) -> dict[str, object]:
    """Series ``a`` with the SEG of its nodule (in a folder of its own), series ``b`` without one."""
    root = tmp_path_factory.mktemp("incoming") / "scans"
    files = _series(root / "DOE_JANE" / "a", "a")
    _series(root / "b", "b")
    seg = _write_seg(files, _ball((20, 22, 8)), root / "segs" / "nodule_seg.dcm")
    return {"root": root, "a": files, "seg": seg}


@pytest.fixture(scope="module")
def seg_run(incoming, tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("seg_run") / "out"
    return {"out": out, "result": predict(incoming["root"], LIDC, out, progress=False)}


def _salt(out: Path) -> str:
    return (out / ".medtl-salt").read_text(encoding="utf-8").strip()


def _probabilities(result: dict) -> list[float]:
    return [row[f"prob_{name}"] for row in result["predictions"] for name in result["class_names"]]


def _mask_nifti(series: Path, dest: Path, shift: tuple[int, int, int] = (0, 0, 0)) -> Path:
    """The nodule of a series as a NIfTI mask on its own grid (the voxels above -200 HU, as medtl
    loads them), optionally moved by ``shift`` voxels."""
    ct = load_volume(series)
    return write_nifti(Volume(np.roll(ct.array > -200, shift, axis=(0, 1, 2)).astype(np.float32), ct.affine), dest)


def _table(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([("series", "mask"), *rows])
    return path


# ------------------------------------------------------------------------------------------ medtl.seg


def test_seg_mask_lies_on_the_grid_the_reader_builds(incoming):
    """The SEG's segment lands on the voxels of the CT's nodule, on the shape and affine medtl loads the series with."""
    headers = [read_header(f) for f in incoming["a"]]
    seg = find_seg([pydicom.dcmread(incoming["seg"])], headers[0].series_uid)
    mask, ct = mask_volume(seg, headers), load_volume(incoming["a"][0].parent)
    assert mask.shape == ct.shape and np.allclose(mask.affine, ct.affine)
    assert np.array_equal(mask.array > 0.5, ct.array > -200)
    shape, affine = series_grid(headers)  # the same grid from the headers alone, as --masks rows are checked
    assert shape == ct.shape and np.allclose(affine, ct.affine)


def test_seg_mask_follows_the_ct_onto_a_uniform_grid_when_slices_are_missing(tmp_path):
    """Two missing slices: the reader interpolates the CT onto the uniform grid, and the SEG's mask
    goes through the same interpolation (slice 5 is 2/3 of slice 4 and 1/3 of slice 7)."""
    files = _series(tmp_path / "gap", "gap")
    for k in (5, 6):
        files[k].unlink()
    kept = [k for k in range(SHAPE[2]) if k not in (5, 6)]
    files = [files[k] for k in kept]
    seg = _write_seg(files, _ball((20, 22, 8))[:, :, kept], tmp_path / "seg.dcm")
    headers = [read_header(f) for f in files]
    mask, ct = mask_volume(pydicom.dcmread(seg), headers), load_volume(tmp_path / "gap")
    assert mask.shape == ct.shape == SHAPE and np.allclose(mask.affine, ct.affine)
    shape, affine = series_grid(headers)
    assert shape == SHAPE and np.allclose(affine, ct.affine)
    inner = mask.array[:, :, 5]
    assert inner.max() > 0 and np.allclose(inner, mask.array[:, :, 4] * 2 / 3 + mask.array[:, :, 7] / 3, atol=1e-6)


def test_seg_problems_name_the_seg_and_the_fix(incoming, tmp_path):
    headers = [read_header(f) for f in incoming["a"]]
    seg = pydicom.dcmread(incoming["seg"])
    with pytest.raises(DicomError, match="0 DICOM SEG instance"):
        find_seg([seg], "1.2.3.4")
    with pytest.raises(DicomError, match="another frame of reference"):
        seg_mask(seg, headers, frame_of_reference="1.2.3.4", name="seg.dcm")
    moved = pydicom.dcmread(incoming["seg"])
    moved.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient[2] += 1.0
    with pytest.raises(DicomError, match=r"seg.dcm: SEG frame 1 at .* lies on no slice of the series"):
        seg_mask(moved, headers, name="seg.dcm")
    with pytest.raises(DicomError, match="frames are 40x48, the CT's slices 20x48"):
        seg_mask(seg, [replace(h, rows=20) for h in headers])
    labels = _ball((20, 22, 8)).astype(np.uint8) + 2 * _ball((34, 10, 8), 3.0).astype(np.uint8)
    two = pydicom.dcmread(_write_seg(incoming["a"], labels, tmp_path / "two.dcm", segments=2))
    with pytest.raises(DicomError, match=r"several segments.*--masks.*1 \(nodule 1\), 2 \(nodule 2\)"):
        seg_mask(two, headers)
    assert seg_mask(two, headers, 2).sum() == _ball((34, 10, 8), 3.0).sum()


def test_requires_mask_reads_the_bundles_preprocessing():
    for name, expected in (("lidc_nodule_malignancy", True), ("tumor_cls_source", False)):
        parser = ConfigParser()
        parser.read_config(REPO / "bundles" / name / "configs" / "inference.json")
        assert requires_mask(parser.get_parsed_content("preprocessing")) is expected, name


# ------------------------------------------------------------------------------------------ medtl predict


def test_predict_scores_a_series_with_its_seg_and_skips_the_one_without(incoming, seg_run):
    out, result = seg_run["out"], seg_run["result"]
    assert [row["id"] for row in result["predictions"]] == [f"{_key('DOE_JANE/a', out)}#3"]
    skipped = {item["id"]: item["reason"] for item in result["skipped"]}
    assert skipped == {f"{_key('b', out)}#3": NO_MASK}  # the SEG serves as a mask, not skipped input
    series = result["predictions"][0]["series"]
    assert (out / "masks" / f"{series}.nii.gz").is_file()  # the mask the network saw, on the series' grid
    for path in (out / "predictions.csv", out / "predictions.json"):
        text = path.read_text(encoding="utf-8")
        for secret in (*PLANTED, "DOE_JANE", str(incoming["root"])):
            assert secret not in text, (path.name, secret)


def _key(folder: str, out: Path) -> str:
    from medtl.dicom import folder_key

    return folder_key(folder, _salt(out))


def test_a_masks_table_gives_the_segs_prediction_and_a_moved_mask_another(incoming, seg_run, tmp_path):
    """The same mask as NIfTI through --masks scores exactly as the SEG did; the mask moved 6 voxels does not."""
    reference = seg_run["result"]
    same = _table(
        tmp_path / "same.csv", [("DOE_JANE/a", str(_mask_nifti(incoming["a"][0].parent, tmp_path / "a.nii.gz")))]
    )
    by_table = predict(incoming["root"], LIDC, tmp_path / "same", masks=same, progress=False)
    assert _probabilities(by_table) == pytest.approx(_probabilities(reference), abs=1e-6)
    moved = _mask_nifti(incoming["a"][0].parent, tmp_path / "moved.nii.gz", shift=(6, 0, 0))
    by_moved = predict(
        incoming["root"],
        LIDC,
        tmp_path / "moved",
        masks=_table(tmp_path / "m.csv", [("DOE_JANE/a#3", str(moved))]),
        progress=False,
    )
    assert np.abs(np.subtract(_probabilities(by_moved), _probabilities(reference))).max() > 1e-3


def test_masks_table_names_series_by_id_uid_or_folder_and_takes_a_mask_stored_in_lps(incoming, seg_run, tmp_path):
    import nibabel as nib

    out = tmp_path / "out"
    shutil.copytree(seg_run["out"], out)  # the same salt: the ids predict printed
    mask = _mask_nifti(incoming["a"][0].parent, tmp_path / "a.nii.gz")
    image = nib.load(str(mask))  # the same voxels stored with x and y reversed, as LPS tools write them
    nib.save(
        nib.Nifti1Image(np.asarray(image.dataobj)[::-1, ::-1], _flipped_affine(image)), str(tmp_path / "lps.nii.gz")
    )
    b_uid = str(pydicom.dcmread(sorted((incoming["root"] / "b").glob("*.dcm"))[0]).SeriesInstanceUID)
    row_a = (seg_run["result"]["predictions"][0]["id"], "lps.nii.gz")
    result = predict(
        incoming["root"], LIDC, out, masks=_table(tmp_path / "masks.csv", [row_a, (b_uid, "a.nii.gz")]), progress=False
    )
    assert len(result["predictions"]) == 2 and result["skipped"] == []
    assert result["predictions"][0]["prob_Malign"] == pytest.approx(seg_run["result"]["predictions"][0]["prob_Malign"])


def _flipped_affine(image) -> np.ndarray:
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = SHAPE[0] - 1, SHAPE[1] - 1
    return image.affine @ flip


def test_bad_masks_table_rows_are_named_before_any_work(incoming, tmp_path, monkeypatch):
    shutil.copytree(incoming["root"], tmp_path / "in")
    _series(tmp_path / "in" / "b", "b2", prefix="B2_")  # folder b now holds two series
    _mask_nifti(incoming["a"][0].parent, tmp_path / "good.nii.gz")
    write_nifti(Volume(np.zeros((10, 10, 10), np.float32), np.eye(4)), tmp_path / "small.nii.gz")
    table = _table(
        tmp_path / "masks.csv",
        [
            ("elsewhere", "good.nii.gz"),  # row 2: no such series
            ("DOE_JANE/a", "missing.nii.gz"),  # row 3
            ("DOE_JANE/a", "small.nii.gz"),  # row 4: another grid
            ("b", "good.nii.gz"),  # row 5: two series in that folder
            ("DOE_JANE/a#3", "good.nii.gz"),  # row 6: fine
            ("DOE_JANE/a", "good.nii.gz"),  # row 7: a second mask for it
            ("", "good.nii.gz"),  # row 8
        ],
    )
    monkeypatch.setattr("medtl.reader.load_volume", _no_image_read)
    with pytest.raises(MedtlError) as caught:
        predict(tmp_path / "in", LIDC, tmp_path / "out", masks=table, progress=False)
    text = str(caught.value)
    assert text.startswith("masks.csv: 6 bad row(s) in the masks table: row 2: its series is none of the loadable")
    for expected in (
        "row 3: missing.nii.gz: file not found",
        "row 4: small.nii.gz: its grid is [10, 10, 10] voxels, the series' [48, 40, 16]",
        "row 5: its folder holds 2 series",
        "row 7: a second mask",
        "row 8: the series cell is empty",
    ):
        assert expected in text
    assert "row 6" not in text and not (tmp_path / "out" / "predictions.csv").exists()
    assert (
        main(["-q", "predict", str(tmp_path / "in"), "--bundle", str(LIDC), "--masks", str(tmp_path / "no.csv")]) == 2
    )


def _no_image_read(*args, **kwargs):
    raise AssertionError("an image was read")


def test_a_batch_where_no_series_has_a_mask_is_refused_before_any_image_is_read(
    incoming, tmp_path, monkeypatch, capsys
):
    inbox = tmp_path / "in"
    shutil.copytree(incoming["root"] / "b", inbox / "PATIENT_NAME_FOLDER")
    monkeypatch.setattr("medtl.reader.load_volume", _no_image_read)
    assert main(["-q", "predict", str(inbox), "--bundle", str(LIDC), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    key = _key("PATIENT_NAME_FOLDER", tmp_path / "out")
    assert err.startswith(
        f"medtl: error: in: none of the 1 series has a usable lesion mask, which this model takes as an input "
        f"channel ({key}#3)"
    )
    assert "--masks" in err and "DICOM SEG" in err and len(err.strip().splitlines()) == 1
    assert (
        "PATIENT_NAME_FOLDER" not in err
        and PLANTED[0] not in err
        and not (tmp_path / "out" / "predictions.csv").exists()
    )


def test_seg_problems_skip_their_series_and_a_seg_of_no_series_is_listed(incoming, tmp_path):
    inbox = tmp_path / "in"
    shutil.copytree(incoming["root"], inbox)
    _write_seg(incoming["a"], _ball((20, 22, 8)), inbox / "segs" / "second_seg.dcm")  # a second SEG of a
    _write_seg(_series(tmp_path / "elsewhere", "elsewhere"), _ball((20, 22, 8)), inbox / "stray" / "stray_seg.dcm")
    c = _series(inbox / "c", "c")
    _write_seg(c, _ball((20, 22, 8)), inbox / "c_seg" / "seg.dcm")
    out = tmp_path / "out"
    result = predict(inbox, LIDC, out, progress=False)
    assert [row["id"] for row in result["predictions"]] == [f"{_key('c', out)}#3"]
    reasons = {item["id"]: item["reason"] for item in result["skipped"]}
    assert reasons[f"{_key('DOE_JANE/a', out)}#3"].startswith(
        f"2 DICOM SEGs reference this series ({_key('segs', out)}/nodule_seg.dcm, {_key('segs', out)}/second_seg.dcm)"
    )
    assert reasons[f"{_key('b', out)}#3"] == NO_MASK and reasons[f"{_key('stray', out)}#100"] == UNUSED_SEG
    assert len(reasons) == 3


def test_cli_passes_the_masks_table(incoming, tmp_path, capsys):
    table = _table(tmp_path / "masks.csv", [("b", str(_mask_nifti(incoming["root"] / "b", tmp_path / "b.nii.gz")))])
    assert (
        main(
            [
                "-q",
                "predict",
                str(incoming["root"]),
                "--bundle",
                str(LIDC),
                "-o",
                str(tmp_path / "out"),
                "--masks",
                str(table),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "2 series predicted" in printed and "0 skipped" in printed
    report = json.loads((tmp_path / "out" / "predictions.json").read_text(encoding="utf-8"))
    assert len(report["predictions"]) == 2


# ------------------------------------------------------------------------------------------ real DICOM SEGs


@pytest.mark.parametrize("case", sorted(REAL_CASES))
def test_predict_reads_real_segs_made_on_real_ct(case, shared_data, tmp_path):
    """MONAI's 4-slice test CT with highdicom's SEG of it, and dcmqi's 3-slice CT with its liver SEG: each
    series gets a prediction from the LIDC bundle, its mask read from the SEG onto the series' grid."""
    ct_folder, seg_path = (shared_data / rel for rel in REAL_CASES[case])
    inbox = tmp_path / "in"
    inbox.mkdir()
    for path in sorted(p for p in ct_folder.iterdir() if p.is_file()):
        (inbox / path.name).symlink_to(path)
    (inbox / "seg.dcm").symlink_to(seg_path)
    assert main(["-q", "predict", str(inbox), "--bundle", str(LIDC), "-o", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "predictions.json").read_text(encoding="utf-8"))
    assert len(result["predictions"]) == 1 and result["skipped"] == []
    series = result["predictions"][0]["series"]
    mask = load_volume(tmp_path / "out" / "masks" / f"{series}.nii.gz")
    ct = load_volume(inbox)
    assert mask.shape == ct.shape and np.allclose(mask.affine, ct.affine, atol=1e-4) and mask.array.max() == 1.0
