"""The `medtl` command line: help for every verb, scan report, convert, manifest, clean errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from conftest import write_jpeg_lossless
from pydicom.data import get_testdata_file

from medtl.bundle.share import import_bundle, pack_bundle
from medtl.bundle.verify import verify_bundle
from medtl.cli import build_parser, main
from medtl.demo import run_bundle_inference
from medtl.fileio import utf8_child_env
from medtl.nifti import read_nifti
from medtl.privacy import pseudonym
from medtl.reader import load_volume

VERBS = ["scan", "convert", "manifest", "demo-data", "demo", "shift", "import", "adapt", "bundle"]


def test_help_describes_every_verb_and_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for verb in VERBS:
        assert verb in text
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    for verb in VERBS + [
        "manifest build",
        "manifest check",
        "bundle verify",
        "bundle pack",
        "bundle import",
        "bundle diff",
    ]:
        with pytest.raises(SystemExit):
            main([*verb.split(), "--help"])
        help_text = capsys.readouterr().out
        assert "usage: medtl" in help_text
        assert len(help_text.splitlines()) > 3
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            assert action.help, f"option {action.dest} of `medtl {name}` has no help text"


def _mixed_folder(root: Path) -> Path:
    """Real pydicom test files in several transfer syntaxes, plus junk, in nested folders."""
    (root / "a").mkdir(parents=True)
    (root / "b" / "c").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "a" / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), root / "b" / "mr_plain.dcm")
    shutil.copy(get_testdata_file("MR_small_RLE.dcm"), root / "b" / "mr_rle.dcm")
    shutil.copy(get_testdata_file("MR_small_jp2klossless.dcm"), root / "b" / "c" / "mr_j2k.dcm")
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), root / "b" / "c" / "mr_jls.dcm")
    write_jpeg_lossless(get_testdata_file("MR_small.dcm"), root / "b" / "mr_jpeg_lossless.dcm")
    (root / "a" / "notes.txt").write_text("scanner export log\n")
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (root / "a" / "cut.dcm").write_bytes(data[: len(data) // 2])
    return root


def test_scan_mixed_folder_report(tmp_path, capsys):
    root = _mixed_folder(tmp_path / "in")
    out = tmp_path / "project" / "scan.json"
    assert main(["-q", "scan", str(root), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    index = json.loads(out.read_text(encoding="utf-8"))
    assert (out.parent / ".medtl-salt").exists()
    assert index["scan_root"] == "../in" and index["folder_names"] == "pseudonymous"
    salt = (out.parent / ".medtl-salt").read_text(encoding="utf-8").strip()
    a, b, c = (
        pseudonym(folder, salt, "dir") for folder in ("a", "b", "b/c")
    )  # folders named by salted keys, files by name
    skipped = {s["path"]: s["reason"] for s in index["skipped"]}
    assert set(skipped) == {f"{a}/notes.txt", f"{a}/cut.dcm"}
    assert "not a DICOM file" in skipped[f"{a}/notes.txt"] and "truncated" in skipped[f"{a}/cut.dcm"]
    assert f"skipped {a}/cut.dcm: truncated" in printed and "--real-ids" in printed
    # the MR files all carry the same SeriesInstanceUID: one series over two folders, 5 instances,
    # with duplicate instances and positions flagged (they are one slice in five encodings)
    mr = next(s for s in index["series"] if s["modality"] == "MR")
    assert mr["num_instances"] == 5 and mr["folders"] == [b, c]
    assert set(mr["transfer_syntax"]) == {
        "Explicit VR Little Endian",
        "RLE Lossless",
        "JPEG 2000 Image Compression (Lossless Only)",
        "JPEG-LS Lossless Image Compression",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
    }
    assert [p["code"] for p in mr["problems"]] == ["duplicate_instances", "duplicate_positions"] and not mr["loadable"]
    ct = next(s for s in index["series"] if s["modality"] == "CT")
    assert ct["shape"] == [128, 128, 1] and ct["loadable"] and ct["files"] == [f"{a}/ct.dcm"]

    # the site's own folder names, when asked for
    assert main(["-q", "scan", str(root), "-o", str(out), "--real-ids"]) == 0
    printed = capsys.readouterr().out
    index = json.loads(out.read_text(encoding="utf-8"))
    assert index["folder_names"] == "real" and {s["path"] for s in index["skipped"]} == {"a/notes.txt", "a/cut.dcm"}
    assert "skipped a/cut.dcm: truncated" in printed and "--real-ids" not in printed
    assert next(s for s in index["series"] if s["modality"] == "MR")["folders"] == ["b", "b/c"]


def test_compressed_files_decode_like_uncompressed(tmp_path):
    root = _mixed_folder(tmp_path / "in")
    reference = load_volume(root / "b" / "mr_plain.dcm").array
    for name in ["b/mr_rle.dcm", "b/c/mr_j2k.dcm", "b/c/mr_jls.dcm", "b/mr_jpeg_lossless.dcm"]:
        np.testing.assert_array_equal(load_volume(root / name).array, reference, err_msg=name)


def test_convert_writes_nifti(tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    assert main(["-q", "convert", get_testdata_file("CT_small.dcm"), "-o", str(out)]) == 0
    assert "spacing (0.661, 0.661, 5) mm" in capsys.readouterr().out
    written, direct = read_nifti(out), load_volume(get_testdata_file("CT_small.dcm"))
    np.testing.assert_array_equal(written.array, direct.array)
    np.testing.assert_allclose(written.affine, direct.affine, atol=1e-5)


def test_user_errors_are_one_line_without_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "x.nii.gz")],
        ["convert", str(empty), "-o", str(tmp_path / "x.nii.gz")],
        ["scan", str(tmp_path / "missing"), "-o", str(tmp_path / "s.json")],
        [
            "manifest",
            "build",
            "--labels",
            str(tmp_path / "nope.csv"),
            "--classes",
            "a,b",
            "-o",
            str(tmp_path / "m.json"),
        ],
    ]
    for args in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "medtl.cli", "-q", *args],
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            env=utf8_child_env(),
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("medtl: error: ") and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_manifest_build_and_check_via_cli(small_demo, tmp_path, capsys):
    out = small_demo["out"]
    manifest = tmp_path / "m.json"
    args = [
        "-q",
        "manifest",
        "build",
        "--scan",
        str(small_demo["sites"]["B"]["scan"]),
        "--labels",
        str(out / "site_B" / "labels.csv"),
        "--classes",
        "benign,malignant",
        "--root",
        str(out),
        "--split",
        "0.5,0.25,0.25",
        "-o",
        str(manifest),
    ]
    assert main(args) == 0
    assert main(["-q", "manifest", "check", str(manifest), "--root", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    assert main(["-q", "manifest", "check", str(manifest), "--root", str(tmp_path)]) == 1
    assert "missing:" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_the_whole_job_and_prints_where_everything_is(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "-q",
                "demo",
                "--out",
                str(out),
                "--scale",
                "0.1",
                "--source-epochs",
                "2",
                "--target-epochs",
                "3",
                "--student-epochs",
                "2",
                "--seeds",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "medtl demo: ingest" in printed
    assert "over 2 seeds" in printed  # the second seed's fine-tuning and student ran and are in the spread
    rows = [line.split() for line in printed.splitlines() if line[:2] in ("A ", "B ")]
    assert [r[0] for r in rows] == ["A", "B"] and all(r[-1] == "OK" for r in rows)
    for name in "AB":
        assert (out / "manifests" / f"demo_site_{name}.json").is_file()
        assert f"scans/site_{name}.json" in printed
    stages = [
        line.split()[:4]
        for line in printed.splitlines()
        if line.split()[:1] in (["source-only"], ["AdaBN"], ["fine-tuned"], ["student"])
    ]
    assert [s[0] for s in stages] == ["source-only", "source-only", "AdaBN", "fine-tuned", "student"], printed
    assert [" ".join(s[1:3]) for s in stages] == ["site A", "site B"] + ["site B"] * 3

    summary = json.loads((out / "demo_summary.json").read_text(encoding="utf-8"))
    # the report is rendered at the end and its path printed
    assert f"report: {out / 'report' / 'report.html'}" in printed and summary["report"] == "report/report.html"
    figures = {p.name for p in (out / "report" / "figures").glob("*.png")}
    assert {
        "roc.png",
        "calibration.png",
        "learning_curves.png",
        "features.png",
        "gradcam_fine-tuned-on-site-b.png",
    } <= figures
    report_text = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert report_text.count("data:image/png;base64,") == len(figures) and str(tmp_path) not in report_text
    # whether adaptation helped is said plainly, with the paired CI, in the printed table's wake and in the report
    finding = summary["finding"]
    assert finding["text"] in printed and finding["text"] in report_text
    said = (
        "beats"
        if finding["difference"] > 0 and finding["ci95"][0] > 0
        else "scores above"
        if finding["difference"] > 0
        else "did NOT beat"
    )
    assert finding["text"].startswith(f"result: fine-tuned {said} source-only on site B test")
    b_test = sum(
        1
        for c in json.loads((out / "manifests" / "demo_site_B.json").read_text(encoding="utf-8"))["cases"]
        if c["split"] == "test"
    )
    assert len(summary["predictions"]) == min(6, b_test)  # one per unseen series, through python -m monai.bundle run
    truths = [
        line.split("truth: ")[1] for line in printed.splitlines() if "truth: " in line
    ]  # found by the folders' keys
    assert len(truths) == len(summary["predictions"]) and set(truths) <= {"benign", "malignant"}
    assert all(row["id"].startswith("dir-") for row in summary["predictions"])
    assert (out / "predictions" / "predictions.csv").is_file()
    schema = json.loads(
        (Path(__file__).resolve().parents[1] / "medtl" / "schemas" / "meta_schema_20240725.json").read_text(
            encoding="utf-8"
        )
    )
    for name in ("tumor_cls_source", "tumor_cls_finetune"):
        bundle = out / "bundles" / name
        meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
        jsonschema.validate(meta, schema)
        assert meta["eval_metrics"]["site_B_test_n"] == b_test and "site_B_test_auc_ci95" in meta["eval_metrics"]
        assert (bundle / "models" / "model.pt").is_file() and (bundle / "models" / "model.ts").is_file()
        assert str(tmp_path) not in "".join(p.read_text(encoding="utf-8") for p in (bundle / "configs").iterdir())
        assert verify_bundle(bundle).ok

    # another site: the packed fine-tuned bundle passes verification, imports into its own folder and
    # gives the same predictions there through python -m monai.bundle run
    packed = pack_bundle(out / "bundles" / "tumor_cls_finetune", tmp_path / "share" / "tumor_cls_finetune.zip")
    provenance = json.loads((out / "bundles" / "tumor_cls_finetune" / "provenance.json").read_text(encoding="utf-8"))
    assert (
        provenance["adapted_from"]["name"] == "tumor_cls_source"
        and provenance["data"]["manifests"][0]["name"] == "demo_site_B"
    )
    site2 = import_bundle(packed["path"], tmp_path / "site2" / "tumor_cls_finetune")["path"]
    (tmp_path / "site2" / "predictions").mkdir()  # the same salt, so the same folders get the same keys
    shutil.copy(out / "predictions" / ".medtl-salt", tmp_path / "site2" / "predictions" / ".medtl-salt")
    again = run_bundle_inference(site2, out / "incoming_site_B", tmp_path / "site2" / "predictions")
    assert all(r["id"].startswith("dir-") for r in again)  # the bundle's default: folders by salted keys
    assert [(r["id"], r["pred"]) for r in again] == [(r["id"], r["pred"]) for r in summary["predictions"]]


@pytest.mark.slow
def test_adapt_runs_the_steps_on_a_target_manifest_and_exports_a_bundle(demo_with_unlabeled, tmp_path, capsys):
    """medtl adapt: source bundle weights -> scored, AdaBN, fine-tuned on the target -> exported bundle."""
    from monai.networks.nets import resnet10

    from medtl.bundle.export import export_bundle

    demo = demo_with_unlabeled
    source = export_bundle(
        resnet10(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.5),
        tmp_path / "source",
        template="tumor_cls_source",
        onnx=False,
    )["path"]
    manifest = json.loads(Path(demo["sites"]["B"]["manifest"]).read_text(encoding="utf-8"))
    out = tmp_path / "adapted"
    assert (
        main(
            [
                "-q",
                "adapt",
                "--source",
                str(source),
                "--manifest",
                str(demo["sites"]["B"]["manifest"]),
                "--root",
                str(demo["out"]),
                "--out",
                str(out),
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert [line.split()[0] for line in printed.splitlines() if "target test" in line] == [
        "source-only",
        "AdaBN",
        "fine-tuned",
    ]
    # the source bundle adapts as itself: its own configs, its next minor version
    meta = json.loads((out / "tumor_cls_source" / "configs" / "metadata.json").read_text(encoding="utf-8"))
    source_meta = json.loads((source / "configs" / "metadata.json").read_text(encoding="utf-8"))
    major, minor, _ = source_meta["version"].split(".")
    assert meta["version"] == f"{major}.{int(minor) + 1}.0" and meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "benign", "1": "malignant"}
    assert meta["eval_metrics"]["target_test_n"] == sum(1 for c in manifest["cases"] if c["split"] == "test")
    summary = json.loads((out / "adapt_summary.json").read_text(encoding="utf-8"))
    # k-fold selection over --epochs 2: the folds' mean curve has epochs 0..2, and the final run trains the chosen count
    assert (
        len(summary["finetune"]["val_auc"]) == 3
        and summary["finetune"]["epochs_run"] == summary["finetune"]["best_epoch"] <= 2
    )
    assert summary["report"] == "report/report.html" and summary["finding"]["text"].startswith("result: fine-tuned ")
    assert summary["bundle"] == "tumor_cls_source"
    assert f"report: {out / 'report' / 'report.html'}" in printed
    figures = {p.name for p in (out / "report" / "figures").glob("*.png")}
    assert {
        "roc.png",
        "learning_curves.png",
        "gradcam_fine-tuned-on-the-target.png",
        "gradcam_source-only-on-the-target.png",
    } <= figures


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    assert main(["scan", str(tmp_path), "-o", str(blocker / "index.json")]) == 2  # a file where a folder must be
    error = capsys.readouterr().err
    assert error.startswith("medtl: error:") and error.count("\n") == 1 and "Traceback" not in error

    import medtl.report

    def broken(*_args, **_kwargs):
        raise ValueError("something inside went wrong\nsecond line")

    monkeypatch.setattr(medtl.report, "render_report", broken)
    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error == (
        "medtl: error: unexpected ValueError: something inside went wrong (run again with --debug "
        "for the traceback, and please report it)\n"
    )
    with pytest.raises(ValueError):
        main(["--debug", "report", str(tmp_path)])


def test_demo_seed_spread_says_mean_sd_range_and_the_fine_tune_gain():
    from medtl.demo import seed_spread_text

    one = seed_spread_text({"source-only": [0.78], "AdaBN": [0.83], "fine-tuned": [0.80], "student": [0.82]})
    assert "one seed ran" in one and "--seeds 3" in one
    three = seed_spread_text(
        {"source-only": [0.78], "AdaBN": [0.83], "fine-tuned": [0.80, 0.75, 0.82], "student": [0.82, 0.81, 0.86]}
    )
    assert (
        "over 3 seeds" in three
        and "fine-tuned 0.790 ± 0.036 (0.750-0.820)" in three
        and "source-only 0.780 (one model)" in three
    )
    assert three.endswith("fine-tuned minus source-only in the mean: +0.010")
