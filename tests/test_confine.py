"""Run-time confinement of a received bundle (``medtl.bundle.confine``, ``medtl bundle run``, predict):
what its components do is checked when they do it, whatever text the audit let through."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medtl.bundle.confine import ConfinementError, confined, retarget
from medtl.bundle.run import declared_paths, parse_arguments, run_bundle
from medtl.cli import main
from medtl.errors import MedtlError, medtl_cause
from medtl.predict import predict


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """A bundle folder, an input and an output folder, and the site's other files beside them."""
    folders = {name: tmp_path / name for name in ("bundle", "inputs", "out", "outside")}
    for folder in folders.values():
        folder.mkdir()
    (folders["outside"] / "manifest.json").write_text('{"patient": "DOE^JANE"}', encoding="utf-8")
    (folders["inputs"] / "case.txt").write_text("image", encoding="utf-8")
    return folders


def _refused(action, match: str) -> None:
    with pytest.raises(ConfinementError, match=match) as caught:
        action()
    assert "\n" not in str(caught.value)


def test_a_confined_run_reads_and_writes_only_its_folders(site):
    outside = site["outside"]
    (site["inputs"] / "stored.txt").symlink_to(outside / "manifest.json")  # the site's own link: its input
    with pytest.raises(ConfinementError, match="reads '.../manifest.json'"):  # the first refusal, at the end too
        with confined(site["bundle"], inputs=[site["inputs"]], outputs=[site["out"]]):
            (site["out"] / "ok.txt").write_text("written", encoding="utf-8")
            (site["bundle"] / "cache").mkdir()
            assert (site["inputs"] / "case.txt").read_text(encoding="utf-8") == "image"
            assert "DOE" in (site["inputs"] / "stored.txt").read_text(encoding="utf-8")
            assert torch.zeros(2).sum() == 0 and json.dumps([1])  # the installation itself stays readable
            _refused(lambda: (outside / "manifest.json").read_text(encoding="utf-8"), "reads '.../manifest.json'")
            _refused(lambda: (outside / "planted.pth").write_text("import os", encoding="utf-8"), "writes")
            _refused(lambda: (site["inputs"] / "new.txt").write_text("x", encoding="utf-8"), "writes")  # read only
            _refused(lambda: os.listdir(outside), "os.listdir: reads")
            _refused(lambda: os.replace(site["out"] / "ok.txt", outside / "moved.txt"), "os.rename: writes")
            _refused(lambda: shutil.rmtree(outside), "writes")
            link = site["out"] / "link"
            link.symlink_to(outside / "manifest.json")  # a link inside names its real target
            _refused(lambda: link.read_text(encoding="utf-8"), "reads")
            try:  # a library that swallows the error does not hide it: confined raises it at the end
                (outside / "manifest.json").read_bytes()
            except OSError:
                pass
            with tempfile.NamedTemporaryFile() as tmp:  # the private temporary folder, not the shared one
                assert not Path(tmp.name).is_relative_to(outside)
    assert sorted(p.name for p in outside.iterdir()) == ["manifest.json"]
    assert (site["out"] / "ok.txt").is_file() and not (outside / "moved.txt").exists()


def test_a_confined_run_starts_no_program_and_opens_no_connection(site, tmp_path):
    marker = site["outside"] / "marker"
    with pytest.raises(ConfinementError):
        with confined(site["bundle"], outputs=[site["out"]]):
            _refused(lambda: subprocess.run(["touch", str(marker)], check=False), "subprocess.Popen starts a program")
            _refused(lambda: os.system(f"touch {marker}"), "os.system starts a program")
            _refused(lambda: socket.create_connection(("127.0.0.1", 9), timeout=1), "network")
    assert not marker.exists()
    (tmp_path / "after.txt").write_text("free again", encoding="utf-8")  # nothing stays confined after the run


def test_monai_writers_and_readers_are_checked_when_built(site):
    outside = site["outside"]
    config = {
        "saver": {"_target_": "monai.handlers.CheckpointSaver", "save_dir": str(outside), "save_dict": {}},
        "loader": {"_target_": "monai.handlers.CheckpointLoader", "load_path": str(outside / "m.pt"), "load_dict": {}},
        "cache": {"_target_": "monai.data.PersistentDataset", "data": [], "transform": None, "cache_dir": str(outside)},
        "load": {"_target_": "monai.transforms.LoadImaged", "keys": "image"},
        "inside": {
            "_target_": "monai.handlers.CheckpointSaver",
            "save_dir": str(site["out"]),
            "save_dict": {"net": "$torch.nn.Linear(1, 1)"},
        },
    }
    parser = ConfigParser(retarget(config))
    assert parser["saver"]["_target_"] == "medtl.bundle.confine.CheckpointSaver"
    with pytest.raises(ConfinementError):
        with confined(site["bundle"], outputs=[site["out"]]):
            for key, what in (("saver", "CheckpointSaver"), ("loader", "CheckpointLoader"), ("cache", "cache_dir")):
                with pytest.raises(Exception) as caught:
                    parser.get_parsed_content(key)
                assert what in str(medtl_cause(caught.value))
            parser.get_parsed_content("inside")
            with pytest.raises(ConfinementError, match="LoadImaged: reads"):  # ITK reads in C: checked per file
                parser.get_parsed_content("load")({"image": str(outside / "manifest.json")})
    assert sorted(p.name for p in outside.iterdir()) == ["manifest.json"]


def test_run_arguments_are_read_as_monai_reads_them(tmp_path):
    args = parse_arguments(["--config_file", "['configs/a.json', 'configs/b.json']", "--epochs=3", "--flag", "true"])
    assert args == {"config_file": ["configs/a.json", "configs/b.json"], "epochs": 3, "flag": True}
    (tmp_path / "m.json").write_text("{}", encoding="utf-8")
    inputs, outputs = declared_paths(
        {"manifest": str(tmp_path / "m.json"), "dataset_dir": str(tmp_path), "output_dir": "o", "lr": 0.1}
    )
    assert outputs == [Path("o")] and set(inputs) == {tmp_path / "m.json", tmp_path}
    with pytest.raises(MedtlError, match="expected --KEY VALUE"):
        parse_arguments(["stray"])


@pytest.fixture(scope="module")
def bundle(untrained_bundle) -> Path:
    return untrained_bundle


def test_bundle_run_runs_a_workflow_confined_and_refuses_what_reaches_out(bundle, make_series, tmp_path):
    scans = tmp_path / "scans"
    make_series("a", shape=(40, 40, 12), folder=scans / "a")
    out = tmp_path / "out"
    run_bundle(bundle, ["--config_file", "configs/inference.json", "--input_dir", str(scans), "--output_dir", str(out)])
    assert (out / "predictions.csv").is_file()

    with pytest.raises(MedtlError, match="bundle_root cannot be overridden"):
        run_bundle(bundle, ["--bundle_root", str(tmp_path)])
    (tmp_path / "other.json").write_text("{}", encoding="utf-8")
    with pytest.raises(MedtlError, match="not inside the bundle"):
        run_bundle(bundle, ["--config_file", str(tmp_path / "other.json")])
    assert main(["bundle", "run", str(bundle), "--input_dir", str(scans), "--output_dir", str(tmp_path / "cli")]) == 0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("$open({outside!r} + '/marker', 'w').write('ran')", "writes '.../marker'"),
        ("$open({outside!r} + '/manifest.json').read()", "reads '.../manifest.json'"),
        ("$__import__('subprocess').run(['touch', {outside!r} + '/marker'])", "starts a program"),
        ("$__import__('shutil').copy({outside!r} + '/manifest.json', {outside!r} + '/copy.json')", "shutil.copyfile"),
    ],
)
def test_a_trusted_bundle_still_runs_confined(bundle, make_series, tmp_path, payload, reason):
    """--trust lets any expression through the audit; what it then does is still confined, in
    ``medtl bundle run`` and in ``medtl predict``."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text("site data", encoding="utf-8")
    scans = tmp_path / "scans"
    make_series("a", shape=(40, 40, 12), folder=scans / "a")
    hostile = shutil.copytree(bundle, tmp_path / "hostile")
    config_path = hostile / "configs" / "inference.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["initialize"] = [payload.format(outside=str(outside)), *config.get("initialize", [])]
    config_path.write_text(json.dumps(config), encoding="utf-8")

    with pytest.raises(MedtlError, match=reason):
        run_bundle(hostile, ["--input_dir", str(scans), "--output_dir", str(tmp_path / "out")], trust=True)
    with pytest.raises(MedtlError, match=reason):
        predict(scans, hostile, tmp_path / "predicted", trust=True, progress=False)
    assert sorted(p.name for p in outside.iterdir()) == ["manifest.json"]
    assert (hostile / "models" / "model.pt").is_file()


def test_verify_confines_its_child_to_the_bundle_named_by_a_relative_path(bundle, monkeypatch):
    """The child works in its own folder: a bundle named relative to the caller's is still its input."""
    from medtl.bundle.verify import verify_bundle

    monkeypatch.chdir(bundle.parent)
    report = verify_bundle(bundle.name)
    assert report.ok, report.table()


def test_dataloader_workers_run_confined_and_hand_their_batches_back(site):
    """Forked workers inherit the confinement; they send tensors back over a local socket in
    multiprocessing's own temporary folder, which is not a network connection."""
    from monai.data import DataLoader, Dataset

    data = [{"x": torch.full((3,), float(i))} for i in range(4)]
    with confined(site["bundle"], outputs=[site["out"]]):
        batches = list(DataLoader(Dataset(data), batch_size=2, num_workers=2))
    assert [b["x"][:, 0].tolist() for b in batches] == [[0.0, 1.0], [2.0, 3.0]]
