"""The privacy scan: which shapes of patient data ``find_identifiers`` reports, which look-alikes it
leaves alone, and how ``file_texts`` reads what a bundle file holds (UTF-16, gzip, zips, pickles)."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from medtl.bundle import textscan
from medtl.bundle.textscan import file_texts
from medtl.bundle.verify import verify_bundle
from medtl.privacy import find_identifiers


def _labels(text: str) -> set[str]:
    return {found.rsplit(" '", 1)[0] for found in find_identifiers(text)}


@pytest.mark.parametrize(
    "text",
    [
        "DOB: 03/14/1951",
        "date of birth 3/4/1951",
        "born on 12/31/1960",
        "D.O.B. 14.3.1951",
        "birth date 1951-03-14",
        "dob 19510314",
    ],
)
def test_birth_dates_in_us_iso_and_dicom_form(text):
    assert "birth date" in _labels(text)


@pytest.mark.parametrize(
    "text", ["MRN 12345", "MRN: 0012345", "mrn#123456", "MRN-774411", "medical record number: 998877"]
)
def test_medical_record_numbers(text):
    assert _labels(text) == {"medical record number"}


@pytest.mark.parametrize(
    "text",
    [
        "the patient John Smith was scanned twice",
        "Patient: Jane Doe",
        "pt. Maria Garcia",
        "Name: José Álvarez-Núñez",
        "patient's name: Mary O'Brien",
        '{"patient": "John Smith"}',
        "Patient Name: John Smith",
        "seen with pt J. Smith",
        "Patient data name: Jane Doe",
    ],
)
def test_person_names_after_patient_words(text):
    found = find_identifiers(text)
    assert [f.rsplit(" '", 1)[0] for f in found] == ["person name after a patient word"]
    assert not any(part in found[0] for part in ("John", "Jane", "Maria", "Smith", "Doe"))  # masked


@pytest.mark.parametrize(
    "text",
    [
        "medtl 1.2.2024 adds the mask channel",  # a version string
        "sensitivity 12/31 at the chosen threshold",  # a ratio
        "released 12/31/2024",  # a date, but no birth word: dates alone are not flagged (as ISO dates are not)
        "the DOB field was 12/31",  # no year
        "with patient-level bootstrap CIs",
        "## Patient Selection Criteria",
        "Patient Data Sheet",
        "Patient CT Scan",
        "patient MRI Findings",
        "Patient\nJohn Smith",  # a heading, not a sentence
        "set in 12 pt Arial Bold",
        "model_name: Tumor Classifier",
        '"name": "Lung Nodule Detection"',
        "name: tumor_cls_finetune",
        "MRN mapping",
        "mrn 12",
        "patient key pat-3f2a9c",
        "ratio 3/4",
    ],
)
def test_look_alikes_are_not_reported(text):
    assert find_identifiers(text) == []


def test_known_identifiers_are_found_in_any_case():
    assert find_identifiers("case ab1234 reviewed", known=["AB1234"]) == ["identifier from the training data 'AB1***'"]


# what file_texts reads


def _scanned(path: Path) -> dict[str, str]:
    """``{part: text or 'PROBLEM: ...'}`` of a file as the privacy scan reads it."""
    return {t.part: f"PROBLEM: {t.problem}" if t.problem else t.text for t in file_texts(path)}


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])  # "utf-16" writes a byte-order mark
def test_utf16_text_files_are_decoded(tmp_path, encoding):
    path = tmp_path / "notes.txt"
    path.write_bytes("Reviewed by the team.\nPatient: Jane Doe, DOB 03/14/1951\n".encode(encoding))
    text = _scanned(path)[""]
    assert "Patient: Jane Doe" in text
    assert _labels(text) == {"person name after a patient word", "birth date"}


def test_gzip_files_are_decompressed(tmp_path):
    path = tmp_path / "log.txt.gz"
    path.write_bytes(gzip.compress(b"epoch 3 done\nMRN 0012345 excluded\n"))
    assert _labels(_scanned(path)[""]) == {"medical record number"}


def test_zip_members_and_nested_zips_are_read(tmp_path):
    inner = _zip_bytes(
        {"cases.csv": b"mrn,label\nMRN 556677,benign\n", "more.txt.gz": gzip.compress(b"pt. Maria Garcia")}
    )
    path = tmp_path / "examples.zip"
    path.write_bytes(_zip_bytes({"docs/readme.md": "Patient: Jane Doe".encode("utf-16"), "inner.zip": inner}))
    parts = _scanned(path)
    assert set(parts) == {"", "#docs/readme.md", "#inner.zip", "#inner.zip#cases.csv", "#inner.zip#more.txt.gz"}
    assert parts[""] == "docs/readme.md\ninner.zip" and parts["#inner.zip"] == "cases.csv\nmore.txt.gz"
    assert (
        _labels(parts["#docs/readme.md"])
        == _labels(parts["#inner.zip#more.txt.gz"])
        == {"person name after a patient word"}
    )
    assert _labels(parts["#inner.zip#cases.csv"]) == {"medical record number"}


def test_archives_nested_too_deep_are_reported_not_opened(tmp_path):
    data = b"Patient: Jane Doe"
    for depth in range(textscan.MAX_NESTING + 1):
        data = _zip_bytes({f"level{depth}.zip" if depth else "notes.txt": data})
    path = tmp_path / "deep.zip"
    path.write_bytes(data)
    problems = {part: text for part, text in _scanned(path).items() if text.startswith("PROBLEM")}
    too_deep = f"PROBLEM: not scanned: an archive nested more than {textscan.MAX_NESTING} deep"
    assert problems == {"#level3.zip#level2.zip#level1.zip": too_deep}


@pytest.mark.parametrize("kind", ["zip", "gzip", "nested zip"])
def test_a_zip_bomb_is_reported_not_inflated(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(textscan, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    zeros = bytes(2 << 20)  # 2 MiB of zeros deflate to a few KiB
    data = {
        "zip": lambda: _zip_bytes({"a.txt": b"fine", "zeros.bin": zeros, "b.txt": b"not reached"}),
        "gzip": lambda: gzip.compress(zeros),
        "nested zip": lambda: _zip_bytes({"inner.zip": _zip_bytes({"zeros.bin": zeros})}),
    }[kind]()
    path = tmp_path / "bomb"
    path.write_bytes(data)
    parts = list(file_texts(path))
    assert parts[-1].problem == "not scanned: decompresses to more than 1 MiB (a zip bomb?)"
    assert parts[-1].part == {"zip": "#zeros.bin", "gzip": "", "nested zip": "#inner.zip#zeros.bin"}[kind]
    assert sum(bool(p.problem) for p in parts) == 1  # reading the file stops there


def test_the_default_cap_stops_a_real_bomb(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("zeros.bin", "w", force_zip64=True) as fh:
        for _ in range(65):
            fh.write(bytes(1 << 20))
    assert [p.problem for p in file_texts(path)][-1].startswith("not scanned: decompresses to more than 64 MiB")


def test_torch_checkpoints_give_pickle_strings_not_tensor_bytes(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"fc.weight": torch.zeros(4, 4), "note": "scan of DOE^JANE"}, path)
    parts = _scanned(path)
    assert "#data.pkl" in parts and not any(part.startswith("#data/") for part in parts)
    assert _labels(parts["#data.pkl"]) == {"DICOM person name"}


def test_pickles_are_read_never_run(tmp_path):
    class Boom:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'PWNED'}",)

    path = tmp_path / "state.zip"
    path.write_bytes(_zip_bytes({"state.pkl": pickle.dumps({"who": "Patient: Jane Doe", "run": Boom()})}))
    text = _scanned(path)["#state.pkl"]
    assert "Patient: Jane Doe" in text and "touch" in text
    assert not (tmp_path / "PWNED").exists()


def test_verify_fails_the_privacy_scan_on_what_it_could_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(textscan, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    bundle = tmp_path / "b"
    (bundle / "docs").mkdir(parents=True)
    (bundle / "docs" / "samples.zip").write_bytes(_zip_bytes({"zeros.bin": bytes(2 << 20)}))
    (bundle / "docs" / "notes.txt").write_bytes("pt. Maria Garcia".encode("utf-16"))
    row = next(c for c in verify_bundle(bundle).checks if c.name == "privacy scan")
    assert row.status == "fail"
    assert "docs/samples.zip#zeros.bin: not scanned: decompresses to more than 1 MiB" in row.detail
    assert "docs/notes.txt: person name after a patient word" in row.detail and "Garcia" not in row.detail
