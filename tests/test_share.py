"""Sharing bundles: pack -> verify -> import, and verify catching each way a bundle can be unsafe."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from medtl.bundle.audit import audit_expression, audit_logging_conf
from medtl.bundle.components import load_bundle_network
from medtl.bundle.export import bump_version, export_bundle
from medtl.bundle.files import extract_zip
from medtl.bundle.share import diff_bundles, format_diff, import_bundle, pack_bundle
from medtl.bundle.verify import verify_bundle
from medtl.cli import main
from medtl.errors import MedtlError
from medtl.evaluate import classification_metrics
from medtl.networks import resnet
from medtl.privacy import find_identifiers, identifiers_from_dicom

MANIFEST = {
    "name": "site_B",
    "content_sha256": "ab" * 32,
    "counts": {
        "by_site_split_label": {
            "B": {"train": {"benign": 18, "malignant": 11}, "test": {"benign": 30, "malignant": 19}}
        }
    },
}


def _metrics(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=30)
    return {
        "site B test": classification_metrics(
            rng.integers(0, 2, 30), np.stack([1 - p, p], 1), class_names=["benign", "malignant"], n_boot=50
        )
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A fine-tuned bundle as medtl exports it (ResNet10 width 0.5, the finetune template), adapted from a
    source bundle."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    source = export_bundle(resnet(0.5), root / "tumor_cls_source", template="tumor_cls_source", onnx=False)["path"]
    return export_bundle(
        resnet(0.5),
        root / "tumor_cls_finetune",
        template="tumor_cls_finetune",
        source=source,
        manifests=[MANIFEST],
        metrics=_metrics(0),
        recipe={"fine-tuning": {"epochs": 30, "lr": 1e-4}},
        changelog="adapted in a test",
    )["path"]


@pytest.fixture(scope="module")
def packed(exported, tmp_path_factory) -> Path:
    return pack_bundle(exported, tmp_path_factory.mktemp("pack") / "b.zip")["path"]


def _failed(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if c.status == "fail"}


def _unpacked(packed: Path, tmp_path: Path) -> Path:
    return extract_zip(packed, tmp_path / "unpacked")


def test_pack_verify_import_round_trip(exported, packed, tmp_path):
    again = pack_bundle(exported, tmp_path / "again.zip")
    assert again["path"].read_bytes() == packed.read_bytes()  # reproducible: same bundle, same bytes
    with zipfile.ZipFile(packed) as zf:
        names = zf.namelist()
        provenance = json.loads(zf.read("tumor_cls_finetune/provenance.json"))
        sums = zf.read("tumor_cls_finetune/SHA256SUMS").decode()
    assert all(n.startswith("tumor_cls_finetune/") for n in names) and "tumor_cls_finetune/models/model.ts" in names
    assert not any("/runs/" in n or "/eval/" in n for n in names)
    assert provenance["bundle"] == {"name": "tumor_cls_finetune", "version": "0.1.0"}
    assert provenance["adapted_from"]["name"] == "tumor_cls_source" and len(provenance["adapted_from"]["sha256"]) == 64
    assert provenance["data"]["manifests"][0]["sha256"] == MANIFEST["content_sha256"]
    assert set(provenance["training_config_sha256"]) == {"configs/train.json", "configs/multi_gpu_train.json"}
    assert (
        provenance["metrics"]["site_B_test_n"] == 30
        and provenance["software"]["torch"] == torch.__version__.split("+")[0]
    )
    assert len(sums.splitlines()) == len(names) - 1  # every file but the list itself

    report = verify_bundle(packed)
    assert report.ok, report.table()
    assert {c.name: c.status for c in report.checks}["checksums"] == "pass"
    assert {c.status for c in report.checks} <= {"pass", "skip"}

    site2 = import_bundle(packed, tmp_path / "site2" / "tumor_cls_finetune")["path"]
    assert (site2 / "models" / "model.pt").read_bytes() == (exported / "models" / "model.pt").read_bytes()
    assert verify_bundle(site2).ok
    with pytest.raises(MedtlError, match="destination exists"):
        import_bundle(packed, site2)
    assert import_bundle(packed, site2, replace=True)["version"] == "0.1.0"
    assert [p.name for p in site2.parent.iterdir()] == ["tumor_cls_finetune"]  # nothing half-written left beside it


def test_model_card_and_data_license_come_from_metadata_and_provenance(exported):
    card = (exported / "docs" / "README.md").read_text(encoding="utf-8")
    assert card.startswith("# tumor_cls_finetune 0.1.0")
    for text in (
        "### Intended use",
        "Research only",
        "| site_B | B | train | 29 | benign 18, malignant 11 |",
        "Adapted from `tumor_cls_source`",
        "fine-tuning: epochs=30",
        "| site B test | 30 |",
        "## MONAI Bundle Commands",
        "## Limits",
        "docs/data_license.txt",
    ):
        assert text in card
    assert (exported / "docs" / "data_license.txt").read_text(encoding="utf-8").startswith("Terms of use")
    assert find_identifiers(card) == []


def test_edited_weights_fail_the_checksums(packed, tmp_path):
    bundle = _unpacked(packed, tmp_path)
    weights = bundle / "models" / "model.pt"
    state = torch.load(weights, weights_only=True)
    state["fc.bias"] += 1
    torch.save(state, weights)
    failed = _failed(verify_bundle(bundle))
    assert "models/model.pt: content changed since packing" in failed["checksums"]
    assert "TorchScript parity" not in failed  # model.ts is a program: not run before trust
    failed = _failed(verify_bundle(bundle, trust=True))
    assert "TorchScript parity" in failed and "differs from models/model.pt" in failed["TorchScript parity"]
    (bundle / "docs" / "extra.txt").write_text("added later\n")
    assert "docs/extra.txt: not listed" in _failed(verify_bundle(bundle))["checksums"]


def test_metadata_missing_a_required_field(exported, tmp_path):
    bundle = Path(shutil.copytree(exported, tmp_path / "b"))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    del meta["task"]
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    assert "'task' is a required property" in _failed(verify_bundle(bundle))["metadata schema"]


def test_absolute_path_in_a_config(exported, tmp_path):
    bundle = Path(shutil.copytree(exported, tmp_path / "b"))
    config = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    config["output_dir"] = "/data/site/predictions"
    config["ckpt_path"] = "$'/data/site/models/model.pt'"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    failed = _failed(verify_bundle(bundle))["portable paths"]
    assert "configs/inference.json output_dir: '/data/site/predictions': a path outside the bundle" in failed
    assert (
        "configs/inference.json ckpt_path: \"$'/data/site/models/model.pt'\": "
        "'/data/site/models/model.pt' starts a path outside"
    ) in failed


def test_patient_identifiers_planted_in_docs(exported, tmp_path):
    bundle = Path(shutil.copytree(exported, tmp_path / "b"))
    with (bundle / "docs" / "README.md").open("a", encoding="utf-8") as fh:
        fh.write(
            "\nReviewed with the scan of DOE^JANE (PatientID: 0042-17), born 1951-02-03; files in /home/jdoe/scans.\n"
        )
    failed = _failed(verify_bundle(bundle))["privacy scan"]
    for label in ("DICOM person name 'DOE", "identifying DICOM attribute with a value", "user home path"):
        assert f"docs/README.md: {label}" in failed
    assert "JANE" not in failed  # the report masks what it found

    # names written the ordinary way are found through the training data's own headers
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), dicom / "ct.dcm")
    known = identifiers_from_dicom(dicom)
    clean = Path(shutil.copytree(exported, tmp_path / "c"))
    patient_id = next(v for v in known if v.isalnum() and not v[0].isalpha() or v.startswith("1CT"))
    (clean / "docs" / "notes.txt").write_text(f"case {patient_id} looked benign\n")
    assert verify_bundle(clean).ok  # nothing shaped like an identifier
    assert "identifier from the training data" in _failed(verify_bundle(clean, identifiers=known))["privacy scan"]


def test_planted_expression_is_refused_and_never_run(exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundle = Path(shutil.copytree(exported, tmp_path / "b"))
    marker = tmp_path / "PWNED"
    config = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    config["initialize"] = ["$__import__('os').system('touch PWNED')", *config.get("initialize", [])]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    report = verify_bundle(bundle)
    assert "__import__" in _failed(report)["expression audit"] and "not allowed" in _failed(report)["expression audit"]
    assert {c.name: c.status for c in report.checks}["network matches metadata"] == "skip"
    with pytest.raises(MedtlError, match="import refused: .*expression audit"):
        import_bundle(bundle, tmp_path / "site2")
    assert not marker.exists() and not (tmp_path / "site2").exists()
    trusted = verify_bundle(bundle, trust=True)  # the sender is known: reported, not failed
    assert trusted.ok and {c.name: c.status for c in trusted.checks}["expression audit"] == "warn"


class _Payload:
    def __reduce__(self):
        return os.system, ("touch PWNED",)


def test_pickle_payload_checkpoint_is_refused_unless_trusted(exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundle = Path(shutil.copytree(exported, tmp_path / "b"))
    marker = tmp_path / "PWNED"
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save({**state, "extra": _Payload()}, bundle / "models" / "model.pt")
    failed = _failed(verify_bundle(bundle))
    assert (
        "models/model.pt: holds pickled code" in failed["weights load (weights_only)"]
        and "system" in failed["weights load (weights_only)"]
    )
    with pytest.raises(MedtlError, match="import refused"):
        import_bundle(bundle, tmp_path / "site2")
    assert import_bundle(bundle, tmp_path / "site3", trust=True)["path"].is_dir()
    assert not marker.exists()  # verification never unpickles it, trusted or not


def test_zip_slip_and_logging_conf_code_are_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("b/configs/metadata.json", "{}")
        zf.writestr("../../outside.txt", "x")
    report = verify_bundle(evil)
    assert not report.ok and "would be written outside the bundle folder" in _failed(report)["archive"]
    with pytest.raises(MedtlError, match="outside the bundle folder"):
        import_bundle(evil, tmp_path / "site2")
    assert not (tmp_path.parent / "outside.txt").exists()

    conf = tmp_path / "logging.conf"
    conf.write_text(
        "[loggers]\nkeys=root\n[handlers]\nkeys=h\n[formatters]\nkeys=\n[logger_root]\nlevel=INFO\nhandlers=h\n"
        "[handler_h]\nclass=StreamHandler\nargs=(__import__('os').system('id'),)\n"
    )
    assert "handler args must be (sys.stdout,), (sys.stderr,) or ()" in str(audit_logging_conf(conf)[0])


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('id')",
        "open('/etc/passwd').read()",
        "eval('1+1')",
        "getattr(torch, 'load')(@p)",
        "torch.load(@p)",
        "@network.__class__.__init__.__globals__",
        "monai.utils.instantiate('os.system', 'id')",
        "import subprocess",
        "from os import system",
        "[c for c in ().__class__.__base__.__subclasses__()]",
        "os.system('id')",
        "numpy.load(@p, allow_pickle=True)",
        "import torch.distributed as dist",
        "lambda engine: float(engine.state.metrics['val_auc'])",
        "os.environ['LOCAL_RANK']",
        "[h for h in @handlers if type(h).__name__ == 'EarlyStopHandler']",
        'f"{@name}-{@value:.2f}"',  # a format spec builds text (f'{47:c}' is '/')
    ],
)
def test_audit_refuses_code_outside_the_allow_list(expression):
    assert audit_expression(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "@bundle_root + '/models/model.pt'",
        "torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "monai.handlers.from_engine(['pred', 'label'])",
        "monai.handlers.stopping_fn_from_metric('val_auc')",
        "@train#handlers[: -2 if torch.distributed.get_rank() > 0 else None]",
        "None if @resume_state.resuming else @validate#evaluator.run()",
        "{'image': 'csv_image', 'mask': 'csv_mask'} if @input_csv else ['id', 'series']",
        "len(@class_names)",
    ],
)
def test_audit_accepts_what_bundles_need(expression):
    assert audit_expression(expression) == []


def test_every_shipped_bundle_passes_the_audit_and_path_checks():
    for bundle in sorted((Path(__file__).resolve().parents[1] / "bundles").iterdir()):
        if not bundle.is_dir():
            continue
        checks = {c.name: c for c in verify_bundle(bundle).checks}
        for name in ("metadata schema", "configs parse", "portable paths", "expression audit", "privacy scan"):
            assert checks[name].status == "pass", f"{bundle.name}: {checks[name]}"


def test_reexport_bumps_the_version_and_diff_shows_what_changed(exported, tmp_path):
    bundle = Path(shutil.copytree(exported, tmp_path / "tumor_cls_finetune"))
    info = export_bundle(
        resnet(0.5),
        bundle,
        template="tumor_cls_finetune",
        metrics=_metrics(1),
        changelog="re-adapted with more labels",
        bump="minor",
        onnx=False,
    )
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert info["version"] == "0.2.0" and set(meta["changelog"]) == {"0.2.0", "0.1.0"}
    assert meta["changelog"]["0.1.0"] == "adapted in a test"
    diff = diff_bundles(exported, bundle)
    assert diff["changelog_added"] == {"0.2.0": "re-adapted with more labels"} and diff["weights_changed"]
    assert ("version", "0.1.0", "0.2.0") in diff["metadata"]
    auc = next(m for m in diff["metrics"] if m[0] == "site_B_test_auc")
    assert auc[1] != auc[2]
    text = format_diff(diff)
    assert "tumor_cls_finetune 0.1.0 -> tumor_cls_finetune 0.2.0" in text and "site_B_test_auc" in text
    assert bump_version("1.2.3") == "1.2.4" and bump_version("1.2.3", "major") == "2.0.0"
    with pytest.raises(MedtlError, match="MAJOR.MINOR.PATCH"):
        bump_version("v1")


def test_reexporting_the_same_weights_reads_as_identical_weights(exported, tmp_path):
    """Equal tensors can be written as different bytes (another torch version or format); diff compares the tensors."""
    bundle = Path(shutil.copytree(exported, tmp_path / "tumor_cls_finetune"))
    export_bundle(
        load_bundle_network(exported), bundle, template="tumor_cls_finetune", changelog="configs only", onnx=False
    )
    weights = bundle / "models" / "model.pt"
    torch.save(
        torch.load(weights, weights_only=True), weights, _use_new_zipfile_serialization=False
    )  # the legacy format
    assert weights.read_bytes() != (exported / "models" / "model.pt").read_bytes()
    diff = diff_bundles(exported, bundle)
    assert not diff["weights_changed"] and diff["changelog_added"] == {"0.1.1": "configs only"}
    assert "weights: identical" in format_diff(diff)


def test_cli_verify_pack_import_diff(exported, tmp_path, capsys):
    assert main(["bundle", "pack", str(exported), "-o", str(tmp_path / "b.zip")]) == 0
    # 15: configs (6), LICENSE, docs (2), models (3), provenance.json, large_files.yml, SHA256SUMS
    assert "packed 15 files" in capsys.readouterr().out
    assert main(["bundle", "verify", str(tmp_path / "b.zip")]) == 0
    out = capsys.readouterr().out
    assert "bundle tumor_cls_finetune 0.1.0: PASS" in out and "PASS  privacy scan" in out
    assert main(["bundle", "import", str(tmp_path / "b.zip"), "--to", str(tmp_path / "site2")]) == 0
    bad = Path(shutil.copytree(exported, tmp_path / "bad"))
    (bad / "docs" / "README.md").write_text("scan of DOE^JOHN\n")
    assert main(["bundle", "verify", str(bad)]) == 1
    assert "FAIL  privacy scan" in capsys.readouterr().out
    assert main(["bundle", "pack", str(bad)]) == 2  # a user error: one line naming the failed check, no zip
    assert "packing refused" in capsys.readouterr().err and not list(Path.cwd().glob("tumor_cls_finetune_*.zip"))
    assert main(["bundle", "diff", str(exported), str(tmp_path / "site2")]) == 0
    assert "weights: identical" in capsys.readouterr().out
