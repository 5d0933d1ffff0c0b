"""Bad-input corpus: every way a user's files can be wrong, and exactly what medtl does about it.

Each ``Case`` builds one bad input in a temporary folder (generated here, nothing committed) and
runs the medtl function a user would run on it. The behaviour is one of:

* ``error``: a ``MedtlError`` whose one-line message names the file and the problem (never a
  traceback from a library);
* ``skipped``: a batch operation (folder scan, inference over a folder) listed the bad item with
  its reason and still processed everything else;
* ``flagged``: the input is usable, and the scan index says what is unusual about it;
* ``escaped``: a value a spreadsheet would run as a formula is written as text;
* ``pseudonymized``: a folder name (often the patient's) is written as a salted key.

``scripts/robustness_table.py`` runs the same table to write ``docs/robustness.md``. The
hypothesis tests at the end feed random bytes, headers and label tables to the same entry points.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medtl.dicom import read_header, scan_dicom, write_scan_index
from medtl.dicomwrite import SeriesInfo, make_uid, write_ct_series
from medtl.errors import MedtlError
from medtl.manifest import build_manifest, build_manifest_file, load_manifest, read_label_table
from medtl.networks import create_network
from medtl.nifti import read_nifti
from medtl.privacy import pseudonym
from medtl.reader import LoadVolumed, load_volume
from medtl.weights import load_weights, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
SALT = "robustness-salt-0123456789"
CLASSES = ("benign", "malignant")
TINY = {"widen_factor": 0.25}

pytestmark = [
    pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom"),
]


@dataclass(frozen=True)
class Behaviour:
    """What medtl did: ``kind`` (error, skipped, flagged) and the message a user reads."""

    kind: str
    message: str


@dataclass(frozen=True)
class Case:
    """One bad input: ``build(tmp)`` writes it, ``run(built)`` feeds it to medtl.

    ``run`` returns a Behaviour for batch and flagged outcomes (after asserting the good items
    were processed); an ``error`` case simply raises. The message must contain ``names`` (the
    bad file, relative to the temporary folder) and ``phrase`` (the problem).
    """

    id: str
    area: str
    description: str
    build: Callable[[Path], Any]
    run: Callable[[Any], Behaviour | None]
    kind: str
    names: str
    phrase: str


def observe(case: Case, tmp: Path) -> Behaviour:
    """Run a case; only ``MedtlError`` is caught, so any other exception fails the test with its traceback."""
    built = case.build(tmp)
    try:
        outcome = case.run(built) or Behaviour("accepted", "")
    except MedtlError as exc:
        outcome = Behaviour("error", str(exc))
    message = outcome.message
    for root in {str(tmp.resolve()), str(tmp)}:
        message = message.replace(root + os.sep, "").replace(root, ".")
    return Behaviour(outcome.kind, message)


# ------------------------------------------------------------------------------------ builders


def pydicom_file(name: str) -> Path:
    """A pydicom reference file (never downloaded: tests run offline)."""
    path = get_testdata_file(name, download=False)
    if path is None:  # pragma: no cover - these ship with pydicom
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(path)


def ct_series(
    folder: Path,
    n: int = 4,
    *,
    shape: tuple[int, int] = (12, 10),
    positions: Sequence[Sequence[float]] | None = None,
    series: str = "s1",
    number: int = 1,
    prefix: str = "IM",
    patient: str = "P1",
) -> list[Path]:
    """A small generated CT series (2.5 mm axial slices unless ``positions`` says otherwise)."""
    hu = np.random.default_rng(number).integers(-1000, 1000, size=(*shape, n)).astype(np.float64)
    info = SeriesInfo(
        patient_id=patient,
        patient_name="Test^Robust",
        study_uid=make_uid("study"),
        series_uid=make_uid(series),
        series_number=number,
        series_description=f"series {series}",
    )
    if positions is None:
        positions = [(0.0, 0.0, 2.5 * k) for k in range(n)]
    return write_ct_series(folder, hu, (0.7, 0.8, 2.5), info, positions_lps=positions, file_prefix=prefix)


def good_plus(tmp: Path, name: str, write: Callable[[Path], Any]) -> Path:
    """A folder with a good 4-slice series and one bad file ``name`` written by ``write(path)``."""
    folder = tmp / "scans"
    ct_series(folder)
    write(folder / name)
    return folder


def edited_dicom(src: Path, dst: Path, **tags: Any) -> Path:
    ds = pydicom.dcmread(src)
    for key, value in tags.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def write_nii(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def file_with(name: str, data: bytes | str) -> Callable[[Path], Path]:
    """Builder of one file ``name`` holding ``data`` (text is written as UTF-8)."""

    def write(tmp: Path) -> Path:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return path

    return write


def non_finite(tmp: Path) -> Path:
    array = np.ones((4, 4, 4), np.float32)
    array[0, 0, 0], array[1, 1, 1], array[2, 2, 2] = np.nan, np.inf, -np.inf
    return write_nii(tmp / "ct.nii.gz", array)


def truncated_nifti(tmp: Path) -> Path:
    path = write_nii(tmp / "cut.nii", np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32))
    path.write_bytes(path.read_bytes()[:1000])
    return path


def empty_folder(tmp: Path) -> Path:
    (tmp / "scans").mkdir()
    return tmp / "scans"


def nifti_table(
    tmp: Path, rows: Sequence[str], header: str = "patient_id,label,image,split", n_images: int = 4
) -> Path:
    """A data folder with small NIfTI images and a labels.csv holding ``rows``."""
    root = tmp / "data"
    root.mkdir()
    for i in range(n_images):
        write_nii(root / f"img{i}.nii.gz", np.full((4, 4, 4), i, np.float32))
    labels = root / "labels.csv"
    labels.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return labels


GOOD_ROWS = ["p0,benign,img0.nii.gz,", "p1,malignant,img1.nii.gz,", "p2,benign,img2.nii.gz,"]


def build(labels: Path) -> None:
    build_manifest_file(labels=labels, classes=CLASSES, out=labels.parent / "manifest.json", site="S1", progress=False)
    raise AssertionError("manifest built although the table is bad")


def tiny_resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_network("resnet10", in_channels=1, num_classes=2, **TINY)


class _Payload:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return os.system, ("touch PWNED",)


# ------------------------------------------------------------------------------------ runners


def scan_skips(bad: str, *, good_series: int = 1) -> Callable[[Path], Behaviour]:
    """Scan a folder: ``bad`` is listed as skipped with a reason and the good series is indexed."""

    def run(folder: Path) -> Behaviour:
        index = scan_dicom(folder, SALT, progress=False)
        skipped = {s["path"]: s["reason"] for s in index["skipped"]}
        assert list(skipped) == [bad], index["skipped"]
        assert index["summary"]["loadable_series"] == good_series and index["series"][0]["num_instances"] == 4
        assert load_volume(folder).shape == (12, 10, 4)  # loading the folder ignores the bad file
        return Behaviour("skipped", f"{bad}: {skipped[bad]}")

    return run


def scan_flags(code: str, shape: tuple[int, int, int]) -> Callable[[Path], Behaviour]:
    """Scan a folder holding one usable series with an unusual geometry: flagged, still loaded."""

    def run(folder: Path) -> Behaviour:
        index = scan_dicom(folder, SALT, progress=False)
        (series,) = index["series"]
        problems = {p["code"]: p["message"] for p in series["problems"]}
        assert series["loadable"] and code in problems, series["problems"]
        assert load_volume(folder).shape == shape
        return Behaviour("flagged", f"{folder.name}: {problems[code]}")

    return run


def refused_write(out: Path) -> None:
    """Re-scan with the disk full while the new index is written: old index intact, no temporary left."""
    old = out.read_bytes()

    def full_disk(self: Path, data: bytes) -> int:
        with open(self, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    try:
        with mock.patch.object(Path, "write_bytes", full_disk):
            write_scan_index(out.parent / "scans", out, progress=False)
    finally:
        assert out.read_bytes() == old
        assert sorted(p.name for p in out.parent.iterdir()) == [".medtl-salt", "index.json", "scans"]


def infer_folder(folder: Path) -> Behaviour:
    """Bundle inference input: scan the folder, preprocess each series; bad ones skipped, good one kept
    (folders by name, ``real_ids``, so the table reads the same every run; keys: tests/test_bundles.py)."""
    from medtl.bundle.components import inference_cases, prepare_cases

    found = inference_cases(folder, output_dir=folder.parent / "out", real_ids=True)
    prepared = prepare_cases(found, LoadVolumed(keys=["image"]), progress=False)
    assert [tuple(item["image"].shape) for item in prepared["items"]] == [(1, 12, 10, 4)]
    reasons = {s["id"]: s["reason"] for s in prepared["skipped"]}
    assert set(reasons) == {"junk.dcm", "damaged#7"}, reasons
    return Behaviour("skipped", reasons["damaged#7"])


def damaged_jpeg_ls(tmp: Path) -> Path:
    """A folder with a good series, a junk file and a JPEG-LS file whose compressed stream is damaged."""
    folder = tmp / "scans"
    ct_series(folder / "good")
    (folder / "junk.dcm").write_text("not a DICOM file\n")
    ds = pydicom.dcmread(pydicom_file("MR_small_jpeg_ls_lossless.dcm"))
    data = bytearray(ds.PixelData)
    data[len(data) // 3 : len(data) // 3 + 200] = b"\xff" * 200
    ds.PixelData, ds.SeriesNumber = bytes(data), 7
    (folder / "damaged").mkdir()
    ds.save_as(folder / "damaged" / "x.dcm")
    return folder


def unreadable(tmp: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("running as root: root reads any file, so permissions cannot be tested")
    folder = good_plus(tmp, "locked.dcm", lambda p: shutil.copy(pydicom_file("CT_small.dcm"), p))
    (folder / "locked.dcm").chmod(0)
    return folder


def planted_bundle(tmp: Path) -> Path:
    bundle = Path(shutil.copytree(REPO / "bundles" / "tumor_cls_source", tmp / "tumor_cls_source"))
    (bundle / "models").mkdir(exist_ok=True)
    torch.save({"w": torch.zeros(2)}, bundle / "models" / "model.pt")  # keep every other check green
    config = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    config["initialize"] = ["$__import__('os').system('touch PWNED')", *config.get("initialize", [])]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    return bundle


def import_refused(archive: Path) -> None:
    from medtl.bundle.share import import_bundle

    try:
        with contextlib.chdir(archive.parent):  # a planted command would leave PWNED here
            import_bundle(archive, archive.parent / "site2")
    finally:
        assert not (archive.parent / "site2").exists() and not (archive.parent / "PWNED").exists()
        assert not (archive.parent.parent / "outside.txt").exists()


def zip_slip(tmp: Path) -> Path:
    evil = tmp / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("b/configs/metadata.json", "{}")
        zf.writestr("../../outside.txt", "x")
    return evil


def checkpoint_file(tmp: Path, name: str, obj: Any, *, cut: bool = False) -> Path:
    path = tmp / name
    torch.save(obj, path)
    if cut:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def stale_manifest(tmp: Path) -> Path:
    labels = nifti_table(tmp, GOOD_ROWS + ["p3,malignant,img3.nii.gz,"])
    out = tmp / "data" / "manifest.json"
    build_manifest_file(labels=labels, classes=CLASSES, out=out, site="S1", progress=False)
    manifest = json.loads(out.read_text(encoding="utf-8"))
    manifest["cases"][0]["label"] = "malignant" if manifest["cases"][0]["label"] == "benign" else "benign"
    out.write_text(json.dumps(manifest))
    return out


def old_index(tmp: Path) -> Path:
    ct_series(tmp / "scans")
    out = tmp / "index.json"
    write_scan_index(tmp / "scans", out, progress=False)
    return out


def enhanced_multiframe(tmp: Path) -> Path:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    ds.NumberOfFrames, ds.PixelData = 3, ds.PixelData * 3
    (tmp / "ct").mkdir()
    ds.save_as(tmp / "ct" / "enhanced.dcm", enforce_file_format=True)
    return tmp / "ct" / "enhanced.dcm"


def dicomdir(path: Path) -> None:
    from pydicom.fileset import FileSet

    fs = FileSet()
    fs.add(pydicom.dcmread(pydicom_file("CT_small.dcm")))
    fs.write(path.parent / "media")
    shutil.move(path.parent / "media" / "DICOMDIR", path)
    shutil.rmtree(path.parent / "media")


def mixed_sizes(tmp: Path) -> Path:
    """One series whose last two slices have fewer rows (each slice its own SOPInstanceUID)."""
    ct_series(tmp / "ct", n=2)
    for f in ct_series(tmp / "ct", n=2, shape=(8, 10), prefix="B", positions=z_positions([5.0, 7.5])):
        edited_dicom(f, f, SOPInstanceUID=make_uid(f.name))
    return tmp / "ct"


def edited_series(tmp: Path, **tags: Any) -> Path:
    """A 4-slice series in ``tmp/ct`` with ``tags`` changed in every file."""
    for f in ct_series(tmp / "ct"):
        edited_dicom(f, f, **tags)
    return tmp / "ct"


def beside_good(tmp: Path, **tags: Any) -> Path:
    """``scans/good`` holds a good series, ``scans/bad`` one with ``tags`` changed in every file."""
    ct_series(tmp / "scans" / "good")
    for f in ct_series(tmp / "scans" / "bad", series="s2"):
        edited_dicom(f, f, **tags)
    return tmp / "scans"


def reused_uid(tmp: Path) -> Path:
    """Slices 2 and 3 carry one SOPInstanceUID (a writer reusing UIDs): same instance, other content."""
    files = ct_series(tmp / "ct")
    edited_dicom(files[2], files[2], SOPInstanceUID=pydicom.dcmread(files[1]).SOPInstanceUID)
    return tmp / "ct"


def copied_slice(tmp: Path) -> Path:
    """Slice 2 exported twice: a second, byte-identical file."""
    files = ct_series(tmp / "ct")
    shutil.copy(files[1], files[1].with_name("IM0002_copy.dcm"))
    return tmp / "ct"


def latin1_name(tmp: Path) -> Path:
    """A good series and a file named ``Müller.dcm`` in Latin-1 bytes (not UTF-8), as old Windows tools write it."""
    folder = tmp / "scans"
    ct_series(folder)
    (Path(os.fsdecode(os.fsencode(folder) + b"/M\xfcller.dcm"))).write_text("export log\n")
    return folder


def infer_skips(bad: str) -> Callable[[Path], Behaviour]:
    """Bundle inference over a folder: the series ``bad`` is skipped with its reason, ``good#1`` kept
    (folders by name, ``real_ids``, so the table reads the same every run)."""

    def run(folder: Path) -> Behaviour:
        from medtl.bundle.components import inference_cases

        found = inference_cases(folder, output_dir=folder.parent / "out", real_ids=True)
        assert [c["id"] for c in found["cases"]] == ["good#1"], found
        reasons = {s["id"]: s["reason"] for s in found["skipped"]}
        assert list(reasons) == [bad], reasons
        return Behaviour("skipped", f"{bad}: {reasons[bad]}")

    return run


FORMULA_FOLDER = "=cmd|' /C calc'!A0"  # run by a spreadsheet that opens the CSV, if written as is
PATIENT_FOLDER = "DOE^JANE"


def named_folders(tmp: Path) -> tuple[Path, Path, Path]:
    """Two series in folders named like a formula and like a patient, a tiny bundle, and an output folder
    with a fixed salt."""
    from monai.networks.nets import resnet10

    from medtl.bundle.export import export_bundle

    ct_series(tmp / "scans" / FORMULA_FOLDER)
    ct_series(tmp / "scans" / PATIENT_FOLDER, series="s2", number=2)
    torch.manual_seed(0)
    network = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.5)
    bundle = export_bundle(
        network, tmp / "tumor_cls_finetune", template="tumor_cls_finetune", torchscript=False, onnx=False
    )["path"]
    (tmp / "out").mkdir()
    (tmp / "out" / ".medtl-salt").write_text(SALT + "\n")  # fixed keys, so the table in the docs stays the same
    return tmp / "scans", bundle, tmp / "out"


def predicted_with_real_ids(built: tuple[Path, Path, Path]) -> Behaviour:
    """``medtl predict --real-ids``: the formula folder's id is text in predictions.csv, the probabilities numbers."""
    from medtl.predict import predict

    scans, bundle, out = built
    predict(scans, bundle, out, real_ids=True, progress=False)
    lines = (out / "predictions.csv").read_text(encoding="utf-8").splitlines()
    (line,) = [line for line in lines if "cmd" in line]
    assert line.startswith("'=cmd") and all(not cell.startswith("'") for line in lines for cell in line.split(",")[2:])
    return Behaviour("escaped", f"predictions.csv: {line}")


def predicted_by_default(built: tuple[Path, Path, Path]) -> Behaviour:
    """``medtl predict``: neither folder name is in its outputs, the ids are the folders' keys."""
    from medtl.predict import predict

    scans, bundle, out = built
    result = predict(scans, bundle, out, progress=False)
    for name in ("predictions.csv", "predictions.json"):
        text = (out / name).read_text(encoding="utf-8")
        assert "cmd" not in text and "JANE" not in text, text
    return Behaviour(
        "pseudonymized", "predictions.csv id column: " + ", ".join(row["id"] for row in result["predictions"])
    )


def scanned_by_default(tmp: Path) -> Behaviour:
    """``medtl scan``: the folder's name is not in scan.json, and a manifest built from it finds the folder."""
    ct_series(tmp / "scans" / PATIENT_FOLDER)
    (tmp / ".medtl-salt").write_text(SALT + "\n")
    index = write_scan_index(tmp / "scans", tmp / "scan.json", progress=False)
    assert "JANE" not in (tmp / "scan.json").read_text(encoding="utf-8")
    (tmp / "labels.csv").write_text("patient_id,label\nP1,benign\n", encoding="utf-8")
    manifest = build_manifest_file(
        labels=tmp / "labels.csv", classes=CLASSES, out=tmp / "m.json", scan=tmp / "scan.json", site="S", progress=False
    )
    assert manifest["cases"][0]["image"]["files"][0]["path"] == f"scans/{PATIENT_FOLDER}/IM0001.dcm"
    return Behaviour("pseudonymized", f"scan.json folders: {index['series'][0]['folders'][0]}")


def z_positions(z: Sequence[float], drift: float = 0.0) -> list[tuple[float, float, float]]:
    return [(0.0, drift * v, v) for v in z]


def unsupported_compression(tmp: Path) -> Path:
    ds = pydicom.dcmread(pydicom_file("MR_small_RLE.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder for it
    (tmp / "mr").mkdir()
    ds.save_as(tmp / "mr" / "video.dcm")
    return tmp / "mr" / "video.dcm"


# ------------------------------------------------------------------------------------ the corpus


def _series_folder(tmp: Path, **kwargs: Any) -> Path:
    ct_series(tmp / "ct", **kwargs)
    return tmp / "ct"


CASES: list[Case] = [
    # --- ingest: DICOM files in a folder scan (skipped, listed, the rest indexed)
    Case(
        "zero-byte",
        "ingest",
        "zero-byte file among a series",
        lambda t: good_plus(t, "empty.dcm", lambda p: p.write_bytes(b"")),
        scan_skips("empty.dcm"),
        "skipped",
        "empty.dcm",
        "empty file (0 bytes)",
    ),
    Case(
        "truncated-pixels",
        "ingest",
        "DICOM file cut off inside its pixel data",
        lambda t: good_plus(t, "cut.dcm", lambda p: p.write_bytes(pydicom_file("CT_small.dcm").read_bytes()[:-1000])),
        scan_skips("cut.dcm"),
        "skipped",
        "cut.dcm",
        "truncated file: pixel data needs",
    ),
    Case(
        "truncated-header",
        "ingest",
        "DICOM file cut off inside its header",
        lambda t: good_plus(t, "cut.dcm", lambda p: p.write_bytes(pydicom_file("CT_small.dcm").read_bytes()[:900])),
        scan_skips("cut.dcm"),
        "skipped",
        "cut.dcm",
        "truncated file",
    ),
    Case(
        "not-dicom",
        "ingest",
        "text file with a .dcm suffix",
        lambda t: good_plus(t, "notes.dcm", lambda p: p.write_text("exported from PACS on Monday\n" * 20)),
        scan_skips("notes.dcm"),
        "skipped",
        "notes.dcm",
        "not a DICOM file (no DICM header)",
    ),
    Case(
        "dicomdir",
        "ingest",
        "DICOMDIR beside the images",
        lambda t: good_plus(t, "DICOMDIR", dicomdir),
        scan_skips("DICOMDIR"),
        "skipped",
        "DICOMDIR",
        "DICOMDIR (a directory of the media, not an image)",
    ),
    Case(
        "unreadable",
        "ingest",
        "file without read permission (chmod 000)",
        unreadable,
        scan_skips("locked.dcm"),
        "skipped",
        "locked.dcm",
        "permission denied",
    ),
    # --- ingest: one DICOM file loaded on its own
    Case(
        "no-pixel-data",
        "ingest",
        "DICOM image without pixel data",
        lambda t: edited_dicom(pydicom_file("CT_small.dcm"), t / "ct" / "nopixels.dcm", PixelData=None),
        load_volume,
        "error",
        "ct/nopixels.dcm",
        "have no pixel data",
    ),
    Case(
        "multi-frame",
        "ingest",
        "enhanced multi-frame CT (all slices in one file)",
        enhanced_multiframe,
        load_volume,
        "error",
        "ct/enhanced.dcm",
        "multi-frame instances (3 frames)",
    ),
    Case(
        "unsupported-compression",
        "ingest",
        "pixel data in a transfer syntax no decoder handles (MPEG2)",
        unsupported_compression,
        load_volume,
        "error",
        "mr/video.dcm",
        "MPEG2 Main Profile / Main Level, which medtl has no decoder for",
    ),
    Case(
        "rgb",
        "ingest",
        "RGB secondary capture where grayscale is expected",
        lambda t: Path(shutil.copy(pydicom_file("SC_rgb_small_odd.dcm"), t / "rgb.dcm")),
        load_volume,
        "error",
        "rgb.dcm",
        "colour (RGB) pixels where a grayscale CT/MR image is expected",
    ),
    Case(
        "damaged-compressed",
        "ingest",
        "JPEG-LS file whose compressed stream is damaged (only decoding finds it)",
        lambda t: damaged_jpeg_ls(t) / "damaged" / "x.dcm",
        load_volume,
        "error",
        "damaged/x.dcm",
        "cannot decode pixel data (JPEG-LS",
    ),
    # --- ingest: a DICOM folder loaded as one series
    Case(
        "mixed-series",
        "ingest",
        "two series in one folder",
        lambda t: (ct_series(t / "ct"), ct_series(t / "ct", series="s2", number=2, prefix="B"))[0][0].parent,
        load_volume,
        "error",
        "ct",
        "folder holds 2 image series",
    ),
    Case(
        "duplicate-positions",
        "ingest",
        "two slices at the same position",
        lambda t: _series_folder(t, positions=z_positions([0.0, 2.5, 2.5, 5.0])),
        load_volume,
        "error",
        "ct",
        "1 slice(s) share a position with another slice",
    ),
    Case(
        "mixed-size",
        "ingest",
        "slices of different rows/columns in one series",
        mixed_sizes,
        load_volume,
        "error",
        "ct",
        "slices of different sizes",
    ),
    Case(
        "mixed-orientation",
        "ingest",
        "one slice with another ImageOrientationPatient",
        lambda t: (
            edited_dicom(
                ct_series(t / "ct")[1], t / "ct" / "IM0002.dcm", ImageOrientationPatient=[1, 0, 0, 0, 0, -1]
            ).parent
        ),
        load_volume,
        "error",
        "ct",
        "2 different ImageOrientationPatient values",
    ),
    Case(
        "no-geometry",
        "ingest",
        "series without ImagePositionPatient",
        lambda t: [edited_dicom(f, f, ImagePositionPatient=None) for f in ct_series(t / "ct")][0].parent,
        load_volume,
        "error",
        "ct",
        "ImagePositionPatient/ImageOrientationPatient missing",
    ),
    Case(
        "empty-folder",
        "ingest",
        "empty folder",
        empty_folder,
        load_volume,
        "error",
        "scans",
        "empty folder: no files to load",
    ),
    Case(
        "only-junk",
        "ingest",
        "folder whose only file is not DICOM",
        lambda t: file_with("scans/readme.txt", "hi")(t).parent,
        load_volume,
        "error",
        "scans",
        "none of the 1 file(s) is a readable DICOM image",
    ),
    Case(
        "scan-missing-folder",
        "ingest",
        "scan of a folder that does not exist",
        lambda t: t / "nowhere",
        lambda p: scan_dicom(p, SALT, progress=False),
        "error",
        "nowhere",
        "not a folder",
    ),
    # --- ingest: usable series with an unusual geometry (flagged in the scan index, loaded)
    Case(
        "missing-slice",
        "ingest",
        "one slice missing from the stack",
        lambda t: _series_folder(t, n=4, positions=z_positions([0.0, 2.5, 7.5, 10.0])),
        scan_flags("missing_slices", (12, 10, 5)),
        "flagged",
        "ct",
        "1 slice(s) missing: gaps of 5 mm where 2.5 mm is expected",
    ),
    Case(
        "nonuniform-spacing",
        "ingest",
        "uneven slice gaps",
        lambda t: _series_folder(t, n=4, positions=z_positions([0.0, 2.5, 5.0, 8.2])),
        scan_flags("nonuniform_spacing", (12, 10, 4)),
        "flagged",
        "ct",
        "slice gaps range 2.5-3.2 mm",
    ),
    Case(
        "gantry-tilt",
        "ingest",
        "gantry tilt (positions drift in-plane)",
        lambda t: _series_folder(t, n=4, positions=z_positions([0.0, 2.5, 5.0, 7.5], drift=np.tan(np.radians(15)))),
        scan_flags("gantry_tilt", (12, 10, 4)),
        "flagged",
        "ct",
        "tilt about 15.0 degrees",
    ),
    Case(
        "identical-copy",
        "ingest",
        "one slice exported twice (byte-identical file, same SOPInstanceUID)",
        copied_slice,
        scan_flags("duplicate_files", (12, 10, 4)),
        "flagged",
        "ct",
        "1 byte-identical copy of an instance read once: IM0002_copy.dcm",
    ),
    # --- ingest: header values that would place the voxels wrongly (refused, naming the file)
    Case(
        "negative-pixel-spacing",
        "ingest",
        "negative PixelSpacing (would load mirrored)",
        lambda t: edited_series(t, PixelSpacing=[-0.7, 0.8]),
        load_volume,
        "error",
        "ct",
        "PixelSpacing must be positive: IM0001.dcm has (-0.7, 0.8)",
    ),
    Case(
        "zero-pixel-spacing",
        "ingest",
        "zero PixelSpacing",
        lambda t: edited_series(t, PixelSpacing=[0, 0.8]),
        load_volume,
        "error",
        "ct",
        "PixelSpacing must be positive: IM0001.dcm has (0, 0.8)",
    ),
    Case(
        "zero-orientation",
        "ingest",
        "ImageOrientationPatient with a zero row vector",
        lambda t: edited_series(t, ImageOrientationPatient=[0, 0, 0, 0, 1, 0]),
        load_volume,
        "error",
        "ct",
        "ImageOrientationPatient (0, 0, 0, 0, 1, 0) of IM0001.dcm: its row direction is a zero vector",
    ),
    Case(
        "parallel-orientation",
        "ingest",
        "ImageOrientationPatient with parallel row and column vectors",
        lambda t: edited_series(t, ImageOrientationPatient=[1, 0, 0, 1, 0, 0]),
        load_volume,
        "error",
        "ct",
        "ImageOrientationPatient (1, 0, 0, 1, 0, 0) of IM0001.dcm: its row and column directions are parallel",
    ),
    Case(
        "sheared-orientation",
        "ingest",
        "non-orthogonal ImageOrientationPatient (row . column = 0.1)",
        lambda t: edited_series(t, ImageOrientationPatient=[1, 0, 0, 0.0998, 0.995, 0]),
        load_volume,
        "error",
        "ct",
        "of IM0001.dcm: its row and column directions are 84.27 degrees apart, not 90",
    ),
    Case(
        "reused-sop-uid",
        "ingest",
        "two different slices with one SOPInstanceUID",
        reused_uid,
        load_volume,
        "error",
        "ct",
        "2 files share a SOPInstanceUID but differ, so which one is the instance is unknown: IM0002.dcm, IM0003.dcm",
    ),
    Case(
        "sheared-beside-good",
        "ingest",
        "inference over a folder: a sheared series beside a good one",
        lambda t: beside_good(t, ImageOrientationPatient=[1, 0, 0, 0.0998, 0.995, 0]),
        infer_skips("bad#1"),
        "skipped",
        "bad#1",
        "of IM0001.dcm: its row and column directions are 84.27 degrees apart",
    ),
    Case(
        "non-utf8-name",
        "ingest",
        "file name that is not UTF-8 (Latin-1 bytes)",
        latin1_name,
        scan_skips("M\\xfcller.dcm"),
        "skipped",
        "M\\xfcller.dcm",
        "file or folder name is not valid UTF-8",
    ),
    Case(
        "patient-named-folder",
        "ingest",
        f"folder named after the patient ({PATIENT_FOLDER}) scanned into scan.json",
        lambda t: t,
        scanned_by_default,
        "pseudonymized",
        "scan.json",
        f"folders: {pseudonym(PATIENT_FOLDER, SALT, 'dir')}",
    ),
    # --- ingest: NIfTI
    Case(
        "nifti-nan",
        "ingest",
        "NIfTI with NaN and Inf voxels",
        non_finite,
        read_nifti,
        "error",
        "ct.nii.gz",
        "3 voxel(s) are NaN or infinite",
    ),
    Case(
        "nifti-4d",
        "ingest",
        "4D NIfTI (time series)",
        lambda t: write_nii(t / "dyn.nii.gz", np.zeros((4, 4, 4, 3), np.float32)),
        read_nifti,
        "error",
        "dyn.nii.gz",
        "expected a 3D image, got shape (4, 4, 4, 3)",
    ),
    Case(
        "nifti-truncated",
        "ingest",
        "NIfTI file cut off in its voxel data",
        truncated_nifti,
        read_nifti,
        "error",
        "cut.nii",
        "not a readable NIfTI file",
    ),
    # --- manifests and label tables (a manifest is all or nothing: every bad row named in one error)
    Case(
        "unknown-label",
        "manifest",
        "label outside the class list",
        lambda t: nifti_table(t, GOOD_ROWS + ["p3,malignent,img3.nii.gz,"]),
        build,
        "error",
        "data/labels.csv",
        "row 5: unknown label 'malignent' (allowed: benign, malignant",
    ),
    Case(
        "missing-image",
        "manifest",
        "row pointing at an image that does not exist",
        lambda t: nifti_table(t, GOOD_ROWS + ["p3,benign,img9.nii.gz,"]),
        build,
        "error",
        "data/labels.csv",
        "row 5: image file 'img9.nii.gz' not found",
    ),
    Case(
        "duplicate-case",
        "manifest",
        "the same case (patient and image) twice",
        lambda t: nifti_table(t, GOOD_ROWS + [GOOD_ROWS[1]]),
        build,
        "error",
        "data/labels.csv",
        "row 5: duplicate of row 3",
    ),
    Case(
        "patient-two-splits",
        "manifest",
        "one patient placed in train and test",
        lambda t: nifti_table(
            t, ["p0,benign,img0.nii.gz,train", "p0,benign,img1.nii.gz,test", "p1,malignant,img2.nii.gz,"]
        ),
        build,
        "error",
        "data/labels.csv",
        "patient in rows 2, 3 is placed in several splits (test, train): leakage",
    ),
    Case(
        "labels-utf16",
        "manifest",
        "label table saved as UTF-16",
        file_with("labels.csv", "patient_id,label\np1,benign\n".encode("utf-16")),
        read_label_table,
        "error",
        "labels.csv",
        "not UTF-8 text (byte 0 is 0xff)",
    ),
    Case(
        "labels-latin1",
        "manifest",
        "label table with latin-1 bytes",
        file_with("labels.csv", "patient_id,label\nMüller,benign\n".encode("latin-1")),
        read_label_table,
        "error",
        "labels.csv",
        "not UTF-8 text (byte 18 is 0xfc)",
    ),
    Case(
        "labels-missing-column",
        "manifest",
        "label table without a label column",
        file_with("labels.csv", "pid,diagnosis\nx,benign\n"),
        read_label_table,
        "error",
        "labels.csv",
        "missing column(s) patient_id, label; found pid, diagnosis",
    ),
    Case(
        "labels-ragged",
        "manifest",
        "row with more fields than the header",
        file_with("labels.csv", "patient_id,label\np1,benign,extra\n"),
        read_label_table,
        "error",
        "labels.csv",
        "row 2 has more fields than the header",
    ),
    Case(
        "labels-empty",
        "manifest",
        "empty label table",
        file_with("labels.csv", b""),
        read_label_table,
        "error",
        "labels.csv",
        "empty label table",
    ),
    Case(
        "labels-huge-field",
        "manifest",
        "label table with a 131,073-character label",
        file_with("labels.csv", "patient_id,label\np1," + "x" * 131_073 + "\n"),
        read_label_table,
        "error",
        "labels.csv",
        "line 2: a field is longer than 131,072 characters",
    ),
    Case(
        "manifest-edited",
        "manifest",
        "manifest edited by hand after it was built",
        stale_manifest,
        load_manifest,
        "error",
        "data/manifest.json",
        "content hash does not match: the manifest was edited after it was built",
    ),
    Case(
        "manifest-not-json",
        "manifest",
        "manifest that is not JSON",
        file_with("m.json", "{'cases': ["),
        load_manifest,
        "error",
        "m.json",
        "not a readable JSON manifest",
    ),
    # --- training: checkpoints and writes
    Case(
        "other-architecture",
        "training",
        "checkpoint of another network (DenseNet into ResNet)",
        lambda t: checkpoint_file(
            t,
            "densenet121.pth",
            create_network("densenet121", spatial_dims=2, in_channels=1, num_classes=2).state_dict(),
        ),
        lambda p: load_weights(tiny_resnet(), p, strict=True),
        "error",
        "densenet121.pth",
        "weights do not match ResNet exactly: Loaded 0 of",
    ),
    Case(
        "truncated-checkpoint",
        "training",
        "checkpoint zip cut in half",
        lambda t: checkpoint_file(t, "model.pt", tiny_resnet().state_dict(), cut=True),
        read_checkpoint,
        "error",
        "model.pt",
        "cannot read checkpoint, it may be corrupted or truncated",
    ),
    Case(
        "empty-checkpoint",
        "training",
        "zero-byte checkpoint",
        file_with("model.pt", b""),
        read_checkpoint,
        "error",
        "model.pt",
        "cannot read checkpoint, it may be corrupted or truncated",
    ),
    Case(
        "pickle-payload",
        "training",
        "checkpoint carrying a pickled os.system call",
        lambda t: checkpoint_file(t, "model.pt", {"fc.bias": torch.zeros(2), "extra": _Payload()}),
        read_checkpoint,
        "error",
        "model.pt",
        "checkpoint needs pickled code to load (posix.system)",
    ),
    Case(
        "disk-full",
        "training",
        "disk full while an index is rewritten (ENOSPC)",
        old_index,
        refused_write,
        "error",
        "index.json",
        "cannot write (No space left on device); the previous file, if any, is unchanged",
    ),
    # --- bundles
    Case(
        "zip-slip",
        "bundle",
        "bundle zip with an entry escaping the folder",
        zip_slip,
        import_refused,
        "error",
        "evil.zip",
        "entry '../../outside.txt' would be written outside the bundle folder",
    ),
    Case(
        "planted-expression",
        "bundle",
        "bundle config with a planted $__import__('os') expression",
        planted_bundle,
        import_refused,
        "error",
        "tumor_cls_source",
        "import refused: 1 check(s) failed: expression audit: configs/inference.json "
        "initialize#0: \"$__import__('os').system('touch PWNED')\": ",
    ),
    Case(
        "not-a-zip",
        "bundle",
        "bundle zip that is not a zip",
        file_with("bundle.zip", b"PK\x03\x04 broken"),
        import_refused,
        "error",
        "bundle.zip",
        "not a readable zip archive",
    ),
    Case(
        "inference-folder",
        "bundle",
        "inference over a DICOM folder with a junk file and a damaged series",
        damaged_jpeg_ls,
        infer_folder,
        "skipped",
        "damaged/x.dcm: cannot decode pixel data (JPEG-LS",
        "cannot decode pixel data (JPEG-LS",
    ),
    Case(
        "formula-folder",
        "bundle",
        f"folder named {FORMULA_FOLDER} predicted with `medtl predict --real-ids`",
        named_folders,
        predicted_with_real_ids,
        "escaped",
        "predictions.csv",
        f"'{FORMULA_FOLDER}#1,ser-",
    ),
    Case(
        "patient-named-prediction",
        "bundle",
        f"folders named {FORMULA_FOLDER} and {PATIENT_FOLDER} predicted with `medtl predict`",
        named_folders,
        predicted_by_default,
        "pseudonymized",
        "predictions.csv",
        f"{pseudonym(FORMULA_FOLDER, SALT, 'dir')}#1, {pseudonym(PATIENT_FOLDER, SALT, 'dir')}#2",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    behaviour = observe(case, tmp_path)
    assert behaviour.kind == case.kind, behaviour
    message = behaviour.message
    assert "\n" not in message and "Traceback" not in message, message
    assert case.names in message and case.phrase in message, message
    assert str(tmp_path) not in message


def test_corpus_covers_every_area() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert {c.area for c in CASES} == {"ingest", "manifest", "training", "bundle"}


# ------------------------------------------------------------------------------------ fuzzing

FUZZ = settings(max_examples=50, deadline=None, derandomize=True)
_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)


@st.composite
def dicom_bytes(draw: st.DrawFn) -> bytes:
    """A pydicom dataset with random values for a few tags, written and then cut at a random byte."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = draw(
        st.sampled_from([ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.5", "1.2.3"])
    )
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = draw(
        st.sampled_from(["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.3.10", "1.2.3"])
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid(entropy_srcs=["fuzz"])
    series_uid = draw(st.sampled_from([make_uid("fuzz")] * 3 + ["", "not-a-uid", None]))
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    ds.PatientID = draw(_TEXT)
    for keyword, values in (
        ("Rows", st.integers(0, 65535)),
        ("Columns", st.integers(0, 65535)),
        ("SamplesPerPixel", st.integers(0, 4)),
        ("BitsAllocated", st.sampled_from([0, 1, 8, 16, 32])),
        ("NumberOfFrames", st.integers(0, 5)),
    ):
        if draw(st.booleans()):
            setattr(ds, keyword, draw(values))
    for tag, n in (
        (0x00200032, 3),
        (0x00280030, 2),
        (0x00200037, 6),
    ):  # ImagePositionPatient, PixelSpacing, ImageOrientationPatient
        if draw(st.booleans()):  # raw bytes, so values pydicom would refuse to write ("x", "nan") reach the reader
            value = "\\".join(
                draw(st.lists(st.sampled_from(["0", "1", "2.5", "-1e999", "nan", "x", ""]), max_size=n + 1))
            ).encode()
            ds[tag] = RawDataElement(
                Tag(tag), "DS", len(value + b" " * (len(value) % 2)), value + b" " * (len(value) % 2), 0, False, True
            )
    if draw(st.booleans()):
        pixels = draw(st.binary(min_size=2, max_size=64))
        compressed = ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian
        ds.add_new(0x7FE00010, "OB", encapsulate([pixels + b"\0" * (len(pixels) % 2)]) if compressed else pixels)
        ds["PixelData"].is_undefined_length = compressed
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=draw(st.booleans()))
    data = buffer.getvalue()
    return data[: draw(st.one_of(st.just(len(data)), st.integers(0, len(data))))]


def _only_medtl_errors(call: Callable[[], Any]) -> None:
    try:
        call()
    except MedtlError as exc:
        assert "\n" not in str(exc), str(exc)


@FUZZ
@given(data=st.one_of(st.binary(max_size=400), dicom_bytes()))
def test_fuzz_read_header_and_scan(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "x.dcm").write_bytes(data)
    _only_medtl_errors(lambda: read_header(folder / "x.dcm"))
    index = scan_dicom(folder, SALT, progress=False)  # a scan never raises for a bad file
    assert index["summary"]["files"] == 1
    assert len(index["skipped"]) + sum(s["num_instances"] for s in index["series"]) == 1
    _only_medtl_errors(lambda: load_volume(folder))


_COLUMNS = ["patient_id", "label", "image", "site", "split", "roi_center_mm", "mask", "extra"]
_CELLS = {
    "patient_id": st.sampled_from(["p1", "p2", "p3", "p4", "p5", "", "p1 "]),
    "label": st.sampled_from(["benign", "malignant"] * 3 + ["", "other", "BENIGN"]),
    "image": st.sampled_from(
        [f"img{i}.nii.gz" for i in range(4)] * 3 + ["missing.nii.gz", "", "../outside.nii.gz", "img0.dcm"]
    ),
    "site": st.sampled_from(["A", "B", ""]),
    "split": st.sampled_from(["train", "val", "test", "", "", "", "holdout"]),
    "roi_center_mm": st.sampled_from(["1 2 3", ""] * 3 + ["1;2", "x y z"]),
    "mask": st.sampled_from([""] * 4 + ["img1.nii.gz", "nomask.nii.gz"]),
    "extra": _TEXT,
}


@st.composite
def label_tables(draw: st.DrawFn) -> str:
    required = draw(
        st.sampled_from(
            [["patient_id", "label", "image"]] * 4 + [["patient_id", "label"], ["patient_id"], ["label", "image"], []]
        )
    )
    columns = required + draw(
        st.lists(st.sampled_from([c for c in _COLUMNS if c not in required]), max_size=3, unique=True)
    )
    delimiter = draw(st.sampled_from([",", ";", "\t"]))
    rows = [
        delimiter.join(draw(_CELLS[c]).replace(delimiter, " ").replace("\n", " ") for c in columns)
        for _ in range(draw(st.integers(0, 6)))
    ]
    if rows and draw(st.integers(0, 3)) == 0:
        rows.append(rows[0] + delimiter + "surplus")
    return "\n".join([delimiter.join(columns), *rows]) + "\n"


@FUZZ
@given(table=label_tables(), classes=st.sampled_from([CLASSES] * 8 + [("benign",), ("a", "a")]), seed=st.integers(0, 3))
def test_fuzz_manifest_builder(
    tmp_path_factory: pytest.TempPathFactory, table: str, classes: tuple[str, ...], seed: int
) -> None:
    root = tmp_path_factory.mktemp("manifest")
    for i in range(4):
        write_nii(root / f"img{i}.nii.gz", np.full((3, 3, 3), i, np.float32))
    (root / "labels.csv").write_text(table, encoding="utf-8")
    try:
        manifest = build_manifest(
            labels=root / "labels.csv", classes=classes, root=root, salt=SALT, site="S", seed=seed, progress=False
        )
    except MedtlError as exc:
        assert "\n" not in str(exc), str(exc)
    else:
        assert manifest["counts"]["cases"] == len(manifest["cases"]) >= 1
