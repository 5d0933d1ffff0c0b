"""Manifests: joining labels with a scan index, patient-level splits, refusals, checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from medtl.errors import ManifestError
from medtl.manifest import (
    build_manifest_file,
    check_manifest,
    datalist,
    leakage,
    load_manifest,
    manifest_schema,
    read_label_table,
)
from medtl.nifti import write_nifti
from medtl.volume import Volume

CLASSES = ("benign", "malignant")


def _labels(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def _site_a_rows(demo: dict) -> list[str]:
    return (demo["out"] / "site_A" / "labels.csv").read_text(encoding="utf-8").splitlines()


def test_demo_manifests_valid_and_split_by_patient(small_demo):
    for name, site in small_demo["sites"].items():
        manifest = load_manifest(site["manifest"])
        jsonschema.validate(manifest, manifest_schema())
        assert site["check_ok"]
        assert leakage(manifest["cases"]) == []
        splits = {c["split"] for c in manifest["cases"]}
        assert {"train", "test"} <= splits
        unlabeled = [c for c in manifest["cases"] if c["split"] == "unlabeled"]
        assert all(c["label"] is None for c in unlabeled)
        if name == "B":
            assert unlabeled, "site B withholds labels for the distillation pool"
        # every DICOM file of the case is listed with its checksum, in slice order
        case = manifest["cases"][0]
        assert case["image"]["type"] == "dicom" and len(case["image"]["files"]) > 10
        assert all(len(f["sha256"]) == 64 for f in case["image"]["files"])
        assert case["roi"]["mask"]["path"].endswith(".nii.gz")


def test_manifest_has_no_identifiers_or_absolute_paths(small_demo):
    out = small_demo["out"]
    rows = [line.split(",") for line in _site_a_rows(small_demo)[1:]]
    text = small_demo["sites"]["A"]["manifest"].read_text(encoding="utf-8") + small_demo["sites"]["A"][
        "scan"
    ].read_text(encoding="utf-8")
    for patient_id, series_uid, *_ in rows:
        assert patient_id not in text
        assert series_uid not in text
    assert str(out) not in text and "DEMO^" not in text


def test_split_is_seeded_and_stratified(small_demo, tmp_path):
    out = small_demo["out"]
    scan = small_demo["sites"]["A"]["scan"]
    labels = out / "site_A" / "labels.csv"
    a = build_manifest_file(
        labels=labels, classes=CLASSES, out=tmp_path / "a.json", scan=scan, root=out, seed=3, progress=False
    )
    build_manifest_file(
        labels=labels, classes=CLASSES, out=tmp_path / "b.json", scan=scan, root=out, seed=3, progress=False
    )
    c = build_manifest_file(
        labels=labels, classes=CLASSES, out=tmp_path / "c.json", scan=scan, root=out, seed=4, progress=False
    )
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    split_a = {x["patient_key"]: x["split"] for x in a["cases"]}
    split_c = {x["patient_key"]: x["split"] for x in c["cases"]}
    assert split_a != split_c
    for label in CLASSES:  # both classes reach train and test
        assert {x["split"] for x in a["cases"] if x["label"] == label} >= {"train", "test"}


def test_refuses_bad_rows_naming_them(small_demo, tmp_path):
    out = small_demo["out"]
    header, first, second, *rest = _site_a_rows(small_demo)
    bad_label = first.replace(",benign,", ",malignent,").replace(",malignant,", ",malignent,")
    unknown_series = second.split(",")
    unknown_series[1] = "1.2.3.4.5"
    text = "\n".join([header, bad_label, ",".join(unknown_series), *rest, rest[0]]) + "\n"
    labels = _labels(out / "site_A" / "bad_labels.csv", text)
    with pytest.raises(ManifestError) as err:
        build_manifest_file(
            labels=labels,
            classes=CLASSES,
            out=tmp_path / "m.json",
            scan=small_demo["sites"]["A"]["scan"],
            root=out,
            progress=False,
        )
    msg = str(err.value)
    assert "bad_labels.csv" in msg
    assert "row 2: unknown label 'malignent'" in msg
    assert "row 3: series_uid not found in the scan index" in msg
    assert f"row {len(rest) + 4}: duplicate of row 4" in msg
    assert not (tmp_path / "m.json").exists()


def test_refuses_fixed_split_leakage(small_demo, tmp_path):
    out = tmp_path / "copy"  # a lesion file is added: the session's cohort stays as built
    shutil.copytree(small_demo["out"], out)
    header, first, *rest = _site_a_rows(small_demo)
    # the same patient twice (two lesions, one in a NIfTI file) with contradicting fixed splits
    patient = first.split(",")[0]
    nii = out / "site_A" / "extra_lesion.nii.gz"
    write_nifti(Volume(np.zeros((8, 8, 8), np.float32), np.eye(4)), nii)
    text = (
        "\n".join([header + ",image,split", first + ",,train", f"{patient},,benign,A,,extra_lesion.nii.gz,test"]) + "\n"
    )
    labels = _labels(out / "site_A" / "leak.csv", text)
    with pytest.raises(ManifestError, match="leakage"):
        build_manifest_file(
            labels=labels,
            classes=CLASSES,
            out=tmp_path / "m.json",
            scan=out / "scans" / "site_A.json",
            root=out,
            progress=False,
        )


def test_label_table_errors(tmp_path):
    with pytest.raises(ManifestError, match="missing column"):
        read_label_table(_labels(tmp_path / "a.csv", "pid,diagnosis\nx,benign\n"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_label_table(_labels(tmp_path / "b.csv", "patient_id,label\nMüller,benign\n", encoding="latin-1"))
    with pytest.raises(ManifestError, match="no rows"):
        read_label_table(_labels(tmp_path / "c.csv", "patient_id,label\n"))
    rows = read_label_table(_labels(tmp_path / "d.csv", "\ufeffpatient_id;label;site\np1;benign;X\n"))
    assert rows == [{"patient_id": "p1", "label": "benign", "site": "X"}]


def test_nifti_only_manifest_and_datalist(tmp_path):
    root = tmp_path / "data"
    lines = ["patient_id,label,image,roi_center_mm,roi_size_mm"]
    for i in range(12):
        write_nifti(Volume(np.full((6, 6, 6), i, np.float32), np.eye(4)), root / f"img{i}.nii.gz")
        lines.append(f"p{i},{CLASSES[i % 2]},img{i}.nii.gz,1 2 3,10;10;10")
    labels = _labels(root / "labels.csv", "\n".join(lines) + "\n")
    out = tmp_path / "manifests" / "m.json"
    manifest = build_manifest_file(
        labels=labels,
        classes=CLASSES,
        out=out,
        site="S1",
        fractions={"train": 0.5, "val": 0.25, "test": 0.25},
        progress=False,
    )
    assert (tmp_path / "manifests" / ".medtl-salt").exists()
    assert manifest["counts"]["cases"] == 12
    items = datalist(load_manifest(out), root, ("train", "val", "test"))
    assert len(items) == 12
    assert all(Path(i["image"]).is_file() and i["roi_center_mm"] == [1.0, 2.0, 3.0] for i in items)
    assert sorted({i["label"] for i in items}) == [0, 1]


def test_check_detects_changed_and_missing_files_and_edits(small_demo, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(small_demo["out"], out)
    manifest_path = out / "manifests" / "demo_site_A.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    first = manifest["cases"][0]["image"]["files"][0]["path"]
    second = manifest["cases"][1]["roi"]["mask"]["path"]
    with open(out / first, "ab") as fh:
        fh.write(b"\0")
    (out / second).unlink()
    report = check_manifest(manifest_path, out, progress=False)
    assert not report["ok"]
    assert any(first in item for item in report["changed"])
    assert any(second in item for item in report["missing"])
    manifest["cases"][0]["label"] = "malignant" if manifest["cases"][0]["label"] == "benign" else "benign"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="edited after it was built"):
        load_manifest(manifest_path)


@pytest.mark.slow
def test_committed_demo_manifests_are_reproduced(tmp_path):
    """data_manifests/ holds exactly what `medtl demo` builds for the seed-0 cohort."""
    from medtl.demo import prepare_demo_data

    committed = Path(__file__).resolve().parents[1] / "data_manifests"
    result = prepare_demo_data(tmp_path, seed=0, progress=False)
    for name, site in result["sites"].items():
        assert site["manifest"].read_bytes() == (committed / f"demo_site_{name}.json").read_bytes(), name
        assert check_manifest(committed / f"demo_site_{name}.json", tmp_path, progress=False)["ok"]
