"""The embedded demo cohort: real DICOM, deterministic, classes and sites differ realistically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medtl.cohort import generate_cohort
from medtl.nifti import read_nifti
from medtl.reader import load_volume


def _tree_hash(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_cohort_is_deterministic_for_any_number_of_worker_processes(tmp_path):
    generate_cohort(tmp_path / "a", seed=5, sites=("B",), scale=0.03, progress=False, workers=2)
    generate_cohort(tmp_path / "b", seed=5, sites=("B",), scale=0.03, progress=False, workers=1)  # in this process
    generate_cohort(tmp_path / "c", seed=6, sites=("B",), scale=0.03, progress=False)
    a, b, c = (_tree_hash(tmp_path / x) for x in "abc")
    assert a == b
    assert a != c and a.keys() == c.keys()


def test_cohort_files_are_real_ct_series(small_demo):
    out = small_demo["out"]
    files = sorted((out / "site_A" / "dicom").rglob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID.name == "CT Image Storage"
    for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
        assert uid.is_valid
    assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
    assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
    # one folder per patient; some folders hold a second series, which the scan splits
    scan = json.loads(small_demo["sites"]["A"]["scan"].read_text(encoding="utf-8"))
    folders = [s["folders"][0] for s in scan["series"]]
    assert len(set(folders)) == len(list((out / "site_A" / "dicom").iterdir()))
    assert any(folders.count(f) == 2 for f in folders)


def _lung_and_lesion(out: Path, site: str, subject: str) -> tuple[np.ndarray, np.ndarray]:
    image = load_volume(out / f"site_{site}" / "dicom" / subject, series=2)
    mask = read_nifti(out / f"site_{site}" / "masks" / f"{subject}.nii.gz")
    assert np.allclose(image.affine, mask.affine, atol=1e-3) and image.shape == mask.shape
    inside = mask.array > 0.5
    lesion = image.array[inside]
    # background well away from the lesion and below vessel density
    far = ~inside & (image.array < -600)
    return lesion, image.array[far]


def test_masks_cover_lesions_and_sites_differ_like_scanners(small_demo):
    out = small_demo["out"]
    stats = {}
    for site in "AB":
        lung_medians, lung_noise = [], []
        for subject in sorted(p.name for p in (out / f"site_{site}" / "dicom").iterdir())[:4]:
            lesion, lung = _lung_and_lesion(out, site, subject)
            assert np.median(lesion) > -300, "the mask marks solid lesion tissue"
            lung_medians.append(np.median(lung))
            lung_noise.append(np.std(lung))
        stats[site] = (np.median(lung_medians), np.median(lung_noise))
    offset = stats["B"][0] - stats["A"][0]
    assert 40 < offset < 80, f"site B HU calibration offset should be about +60, got {offset:.1f}"
    assert stats["B"][1] > 1.5 * stats["A"][1], "site B is noisier"
    scans = {s: json.loads(small_demo["sites"][s]["scan"].read_text(encoding="utf-8"))["series"] for s in "AB"}
    for site, spacing in (("A", (0.75, 0.75, 1.25)), ("B", (0.9, 0.9, 2.5))):
        found = np.array([r["spacing"] for r in scans[site] if r["series_number"] == 2])
        np.testing.assert_allclose(found, np.broadcast_to(spacing, found.shape), atol=1e-4)


@pytest.mark.slow
def test_class_features_overlap_but_differ(tmp_path):
    generate_cohort(tmp_path, seed=0, sites=("A",), scale=0.5, progress=False)
    truth = json.loads((tmp_path / "site_A" / "truth.json").read_text(encoding="utf-8"))
    size = {lab: np.array([t["diameter_mm"] for t in truth if t["label"] == lab]) for lab in ("benign", "malignant")}
    spic = {lab: np.array([t["spicules"] > 0 for t in truth if t["label"] == lab]) for lab in ("benign", "malignant")}
    assert size["malignant"].mean() > size["benign"].mean() + 0.5
    assert np.percentile(size["benign"], 75) > np.percentile(size["malignant"], 25), (
        "sizes overlap: size alone is a weak cue"
    )
    assert spic["malignant"].mean() > 0.5 > spic["benign"].mean() > 0.0, "spiculation is typical, not exclusive"
    assert not any(t["calcified"] for t in truth if t["label"] == "malignant")
    assert not any(t["cavitated"] for t in truth if t["label"] == "benign")
