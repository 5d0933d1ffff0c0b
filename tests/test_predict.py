"""`medtl predict`: a bundle's own inference on a DICOM folder, confidence flags, DICOM SR and Secondary Capture."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import RUN_INFERENCE, monai_bundle
from pydicom.uid import SecondaryCaptureImageStorage

from medtl.cli import main
from medtl.dicom import folder_key
from medtl.dicomwrite import SeriesInfo, make_uid, write_ct_series
from medtl.errors import MedtlError
from medtl.fileio import utf8_child_env
from medtl.predict import confidence_flag, format_predictions, predict, top_probability

PLANTED = ("Zzplanted^Secretname", "PLANTED-PID-778899")  # PatientName, PatientID of every generated series


@pytest.fixture(scope="module")
def bundle(untrained_bundle) -> Path:
    return untrained_bundle


def _series(folder: Path, name: str, *, positions_lps: np.ndarray | None = None) -> list[Path]:
    """A tiny CT series (40 x 40 x 12 voxels) of one patient carrying the planted identifiers."""
    info = SeriesInfo(
        patient_id=PLANTED[1],
        patient_name=PLANTED[0],
        study_uid=make_uid(f"study-{name}"),
        series_uid=make_uid(f"series-{name}"),
        series_number=2,
    )
    hu = np.random.default_rng(len(name)).integers(-1000, 400, size=(40, 40, 12)).astype(np.float64)
    return write_ct_series(folder, hu, (0.9, 0.9, 2.5), info, positions_lps=positions_lps)


@pytest.fixture(scope="module")
def incoming(tmp_path_factory) -> dict[str, object]:
    """Two good series (one nested deeper), one with duplicate slice positions and a stray text file."""
    root = tmp_path_factory.mktemp("incoming") / "scans"
    good = {"a": _series(root / "a", "a"), "b": _series(root / "b" / "ct", "b")}
    duplicates = np.zeros((12, 3))
    duplicates[:, 2] = np.arange(12) * 2.5
    duplicates[5] = duplicates[4]
    _series(root / "broken", "broken", positions_lps=duplicates)
    (root / "notes.txt").write_text("export log\n", encoding="utf-8")
    return {"root": root, "good": good}


@pytest.fixture(scope="module")
def predicted(bundle, incoming, tmp_path_factory) -> dict[str, object]:
    """One run with both DICOM outputs, shared by the tests that read its files."""
    out = tmp_path_factory.mktemp("predicted") / "out"
    result = predict(incoming["root"], bundle, out, sr=True, secondary_capture=True, progress=False)
    return {"out": out, "result": result}


def _salt(out: Path) -> str:
    return (out / ".medtl-salt").read_text(encoding="utf-8").strip()


def _key(folder: str, salt: str, number: int = 2) -> str:
    """The id of series ``number`` in ``folder`` (relative to the input) as the bundle writes it by default."""
    return f"{folder_key(folder, salt)}#{number}"


def _source(incoming, row, salt: str) -> list[pydicom.Dataset]:
    """The source slices of a prediction row (its id is the key of the series' relative folder, and its number)."""
    folder = next(f for f in ("a", "b/ct") if _key(f, salt) == row["id"])
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((incoming["root"] / folder).glob("*.dcm"))]


def test_predictions_are_the_bundles_own_with_a_confidence_flag(bundle, incoming, predicted, tmp_path):
    out = predicted["out"]
    rows = list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))
    assert [r["id"] for r in rows] == [_key(f, _salt(out)) for f in ("a", "b/ct")]  # the bundle's order: the folders'
    assert all(r["id"].startswith("dir-") and r["id"].endswith("#2") for r in rows)
    assert list(rows[0]) == ["id", "series", "prob_benign", "prob_malignant", "pred", "model_version", "confidence"]
    report = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    assert (
        report["model"] == {"name": "tumor_cls_finetune", "version": "0.1.0"} and report["confidence_threshold"] == 0.8
    )
    for row in report["predictions"]:
        assert row["series"].startswith("ser-") and row["pred"] == max(
            ("benign", "malignant"), key=lambda c: row[f"prob_{c}"]
        )
        assert row["confidence"] == confidence_flag(top_probability(row), 0.8)

    # the same bundle through MONAI's own CLI, with the same salt: the same ids, keyed once, by the bundle
    reference = tmp_path / "reference"
    reference.mkdir()
    shutil.copy(out / ".medtl-salt", reference / ".medtl-salt")
    done = monai_bundle(
        *RUN_INFERENCE, "--input_dir", str(incoming["root"]), "--output_dir", str(reference), cwd=bundle
    )
    own = json.loads((reference / "predictions.json").read_text(encoding="utf-8"))
    assert [{k: v for k, v in r.items() if k != "confidence"} for r in report["predictions"]] == own["predictions"]
    assert report["skipped"] == own["skipped"]
    assert [r["id"] for r in csv.DictReader((reference / "predictions.csv").open(encoding="utf-8"))] == [
        r["id"] for r in rows
    ]
    for text in (
        (reference / "predictions.csv").read_text(encoding="utf-8"),
        (reference / "predictions.json").read_text(encoding="utf-8"),
    ):
        assert "b/ct" not in text and "broken" not in text and str(incoming["root"]) not in text
    assert (
        "b/ct" not in done.stdout + done.stderr and "broken" not in done.stdout + done.stderr
    )  # (MONAI logs its arguments)


def test_skipped_series_are_listed_and_the_good_ones_predicted(predicted):
    result = predicted["result"]
    skipped = {s["id"]: s["reason"] for s in result["skipped"]}
    broken = _key("broken", _salt(predicted["out"]))
    assert set(skipped) == {broken, "notes.txt"}  # a file in the input folder itself has no folder to key
    assert "share a position" in skipped[broken] and "not a DICOM file" in skipped["notes.txt"]
    table = format_predictions(result)
    assert f"skipped {broken}: " in table and "skipped notes.txt: " in table
    assert table.splitlines()[-1].startswith("2 series predicted (") and table.splitlines()[-1].endswith(", 2 skipped")


def test_confidence_flag_asks_for_review_below_the_threshold():
    assert confidence_flag(0.8, 0.8) == "ok" and confidence_flag(0.95, 0.8) == "ok"
    assert confidence_flag(0.79, 0.8) == "review" and confidence_flag(0.5, 0.0) == "ok"
    row = {
        "id": "a#1",
        "series": "ser-1",
        "prob_benign": 0.3,
        "prob_malignant": 0.7,
        "pred": "malignant",
        "confidence": "review",
    }
    table = format_predictions({"predictions": [row], "skipped": [], "confidence_threshold": 0.8})
    assert table.splitlines()[1].split() == ["ser-1", "malignant", "0.700", "review"]
    assert "1 to review: top probability below 0.8" in table


def test_every_flag_follows_the_threshold(bundle, incoming, tmp_path):
    for threshold, flag in ((0.0, "ok"), (1.0, "review")):
        result = predict(incoming["root"], bundle, tmp_path / str(threshold), confidence=threshold, progress=False)
        assert {row["confidence"] for row in result["predictions"]} == {flag}
    with pytest.raises(MedtlError, match="between 0 and 1"):
        predict(incoming["root"], bundle, tmp_path / "bad", confidence=80)


def test_secondary_capture_files_with_the_source_study(incoming, predicted):
    out, result = predicted["out"], predicted["result"]
    for row in result["predictions"]:
        path = out / "dicom" / f"{row['series']}_gradcam_sc.dcm"
        assert f"dicom/{path.name}" in result["dicom"]
        sc, source = pydicom.dcmread(path), _source(incoming, row, _salt(out))[0]
        assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.Modality == "OT"
        assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
        assert sc.PatientName == source.PatientName
        assert sc.SeriesInstanceUID != source.SeriesInstanceUID and sc.SOPInstanceUID != source.SOPInstanceUID
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BurnedInAnnotation == "NO"
        pixels = sc.pixel_array
        assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8  # the 32-voxel crop, upscaled 8x
        assert pixels.std() > 0
        assert {r.ReferencedSOPInstanceUID for r in sc.SourceImageSequence} == {
            s.SOPInstanceUID for s in _source(incoming, row, _salt(out))
        }
        assert (
            str(incoming["root"].parent).encode() not in path.read_bytes()
            and str(out).encode() not in path.read_bytes()
        )


def _items(dataset: pydicom.Dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _item(dataset: pydicom.Dataset, code: str) -> pydicom.Dataset:
    """The first SR content item whose concept name has code value ``code``."""
    return next(i for i in _items(dataset) if i.ConceptNameCodeSequence[0].CodeValue == code)


def test_sr_holds_the_class_probability_model_and_evidence(incoming, predicted):
    out, result = predicted["out"], predicted["result"]
    for row in result["predictions"]:
        sr, sources = pydicom.dcmread(out / "dicom" / f"{row['series']}_sr.dcm"), _source(incoming, row, _salt(out))
        assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and sr.Modality == "SR"
        assert sr.StudyInstanceUID == sources[0].StudyInstanceUID and sr.PatientID == PLANTED[1]
        assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID
        finding = _item(sr, "121071").ConceptCodeSequence[0]  # DCM Finding
        assert finding.CodeMeaning == row["pred"] and finding.CodeValue == str(result["class_names"].index(row["pred"]))
        assert float(_item(sr, "122157").MeasuredValueSequence[0].NumericValue) == pytest.approx(
            top_probability(row)
        )  # DCM Probability
        assert (
            _item(sr, "111001").TextValue == "tumor_cls_finetune" and _item(sr, "111003").TextValue == "0.1.0"
        )  # algorithm
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == sources[0].StudyInstanceUID
        assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
        assert {r.ReferencedSOPInstanceUID for r in evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence} == {
            s.SOPInstanceUID for s in sources
        }


def test_real_ids_name_the_folders_and_spreadsheet_formulas_stay_text(bundle, incoming, tmp_path, capsys):
    formula = tmp_path / "formula"
    shutil.copytree(incoming["root"] / "a", formula / "=cmd|' /C calc'!A0")  # relative folder a spreadsheet would run
    out = tmp_path / "out"
    assert main(["-q", "predict", str(formula), "--bundle", str(bundle), "-o", str(out), "--real-ids"]) == 0
    capsys.readouterr()
    text = (out / "predictions.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["id"] for r in rows] == ["'=cmd|' /C calc'!A0#2"] and text.splitlines()[1].startswith("'=cmd")
    assert 0.0 <= float(rows[0]["prob_benign"]) <= 1.0  # numbers stay numbers
    assert (
        json.loads((out / "predictions.json").read_text(encoding="utf-8"))["predictions"][0]["id"]
        == "=cmd|' /C calc'!A0#2"
    )

    result = predict(incoming["root"], bundle, tmp_path / "real", real_ids=True, progress=False)
    assert [r["id"] for r in result["predictions"]] == ["a#2", "b/ct#2"]
    assert {s["id"] for s in result["skipped"]} == {"broken#2", "notes.txt"}


def test_monai_bundle_run_keys_folders_unless_real_ids_and_writes_formulas_as_text(bundle, incoming, tmp_path):
    """The bundle's own path, without medtl predict: ``--real_ids true`` names the folders as they
    are, and a folder a spreadsheet would run is text in the predictions.csv it writes."""
    formula = tmp_path / "formula"
    shutil.copytree(incoming["root"] / "a", formula / "=cmd|' /C calc'!A0")
    (formula / "=cmd|' /C calc'!A0" / "notes.txt").write_text("export log\n", encoding="utf-8")
    keyed, real = tmp_path / "keyed", tmp_path / "real"
    monai_bundle(
        *RUN_INFERENCE, "--input_dir", str(formula), "--output_dir", str(keyed), "--real_ids", "false", cwd=bundle
    )
    key = folder_key("=cmd|' /C calc'!A0", _salt(keyed))
    assert [r["id"] for r in csv.DictReader((keyed / "predictions.csv").open(encoding="utf-8"))] == [f"{key}#2"]
    skipped = json.loads((keyed / "predictions.json").read_text(encoding="utf-8"))["skipped"]
    assert [s["id"] for s in skipped] == [f"{key}/notes.txt"] and "cmd" not in (keyed / "predictions.json").read_text(
        encoding="utf-8"
    )

    monai_bundle(
        *RUN_INFERENCE, "--input_dir", str(formula), "--output_dir", str(real), "--real_ids", "true", cwd=bundle
    )
    text = (real / "predictions.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["id"] for r in rows] == ["'=cmd|' /C calc'!A0#2"] and text.splitlines()[1].startswith("'=cmd")
    assert 0.0 <= float(rows[0]["prob_benign"]) <= 1.0  # numbers stay numbers
    report = json.loads((real / "predictions.json").read_text(encoding="utf-8"))
    assert report["predictions"][0]["id"] == "=cmd|' /C calc'!A0#2"  # JSON is no spreadsheet: the name as it is
    assert [s["id"] for s in report["skipped"]] == ["=cmd|' /C calc'!A0/notes.txt"]


def test_predictions_and_logs_name_no_patient_and_no_path(bundle, incoming, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    predict(incoming["root"], bundle, out, sr=True, progress=False)
    logs = caplog.text
    assert "predict: tumor_cls_finetune 0.1.0" in logs and "2 predictions, 2 skipped" in logs
    for path in (out / "predictions.csv", out / "predictions.json"):
        text = path.read_text(encoding="utf-8")
        for secret in (*PLANTED, "Zzplanted", str(incoming["root"].parent), str(tmp_path)):
            assert secret not in text, (path.name, secret)
    for secret in (*PLANTED, "Zzplanted", str(incoming["root"].parent), str(tmp_path)):
        assert secret not in logs, secret


def test_cli_prints_the_table_and_writes_the_files(bundle, incoming, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                str(incoming["root"]),
                "--bundle",
                str(bundle),
                "-o",
                str(out),
                "--confidence",
                "0.5",
                "--sr",
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].split() == ["series", "prediction", "probability", "confidence"]
    rows = list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))
    for row in rows:
        assert (
            f"{row['series']}" in printed and "ok" == row["confidence"]
        )  # every top probability of two classes is >= 0.5
    assert "2 series predicted (0 to review" in printed and "2 skipped" in printed and "2 DICOM objects" in printed
    assert PLANTED[0] not in printed and PLANTED[1] not in printed
    assert sorted(p.name for p in (out / "dicom").iterdir()) == sorted(f"{r['series']}_sr.dcm" for r in rows)


def test_user_errors_are_one_line_messages(bundle, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "medtl.cli", "predict", str(empty), "--bundle", str(tmp_path / "nothing")],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=utf8_child_env(),
    )
    assert proc.returncode == 2 and proc.stderr.startswith("medtl: error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "configs/inference.json" in proc.stderr

    assert main(["-q", "predict", str(empty), "--bundle", str(bundle), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medtl: error: empty: no loadable image series found") and len(err.strip().splitlines()) == 1
    assert main(["-q", "predict", str(tmp_path / "missing"), "--bundle", str(bundle)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_bundle_missing_weights_or_failing_the_audit_is_refused(bundle, incoming, tmp_path, caplog):
    broken = shutil.copytree(bundle, tmp_path / "no_weights")
    (broken / "models" / "model.pt").unlink()
    with pytest.raises(MedtlError, match="models/model.pt missing"):
        predict(incoming["root"], broken, tmp_path / "out")
    torch.save({"fc.weight": torch.zeros(3, 3)}, broken / "models" / "model.pt")  # weights of another network
    with pytest.raises(MedtlError, match=r"the bundle's inference.json failed \(RuntimeError: .*--debug"):
        predict(incoming["root"], broken, tmp_path / "out", progress=False)

    unsafe = shutil.copytree(bundle, tmp_path / "unsafe")
    config = json.loads((unsafe / "configs" / "inference.json").read_text(encoding="utf-8"))
    config["notes"] = "$__import__('os').getcwd()"  # outside the allow-list, though harmless and never referenced
    (unsafe / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(MedtlError, match=r"refusing to run: 1 config value.*__import__.*--trust"):
        predict(incoming["root"], unsafe, tmp_path / "out")
    assert not (tmp_path / "out" / "predictions.csv").exists()
    result = predict(incoming["root"], unsafe, tmp_path / "out", trust=True, progress=False)
    assert len(result["predictions"]) == 2 and "__import__" in caplog.text


def test_dicom_output_without_highdicom_says_what_to_install(bundle, incoming, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom now raises ImportError
    for option in ({"sr": True}, {"secondary_capture": True}):
        with pytest.raises(MedtlError, match=r"needs highdicom.*pip install medtl\[dicom-out\]"):
            predict(incoming["root"], bundle, tmp_path / "out", **option)
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_help_says_what_the_confidence_flag_means(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "'review' when it is lower, meaning the model is unsure and a person should look at the series" in text
    assert "--sr" in text and "--secondary-capture" in text and "pip install medtl[dicom-out]" in text
    assert "--masks CSV lesion masks as NIfTI files" in text and "read from the DICOM SEG in DICOM_DIR" in text
