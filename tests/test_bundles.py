"""The bundles in bundles/ run through MONAI's own bundle CLI: train, evaluate, infer, export."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from conftest import monai_bundle

from medtl.bundle.components import datalist, inference_cases, require_inputs
from medtl.errors import MedtlError, medtl_cause
from medtl.fileio import utf8_child_env

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
SCHEMA = REPO / "medtl" / "schemas" / "meta_schema_20240725.json"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_metadata_validates_against_the_official_schema(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    jsonschema.validate(meta, json.loads(SCHEMA.read_text(encoding="utf-8")))
    assert meta["version"] in meta["changelog"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert sorted(pred["channel_def"]) == [str(i) for i in range(pred["num_channels"])]
    for name in ("train.json", "evaluate.json", "inference.json", "logging.conf"):
        assert (bundle / "configs" / name).is_file(), name
    assert (bundle / "LICENSE").is_file() and (bundle / "docs" / "README.md").is_file()
    text = "".join(p.read_text(encoding="utf-8") for p in (bundle / "configs").iterdir())
    assert "/work" not in text and "/home" not in text and "C:\\" not in text  # paths stay relative to bundle_root
    monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        ".",
        cwd=bundle,
    )


@pytest.fixture(scope="module")
def trained_source(demo_with_unlabeled, tmp_path_factory):
    """tumor_cls_source trained for one epoch on the demo's site A, in a copy of the bundle."""
    demo = demo_with_unlabeled
    bundle = tmp_path_factory.mktemp("bundles") / "tumor_cls_source"
    shutil.copytree(
        REPO / "bundles" / "tumor_cls_source", bundle, ignore=shutil.ignore_patterns("models", "runs", "eval")
    )
    root = Path(demo["out"])
    monai_bundle(
        "run",
        "--config_file",
        "configs/train.json",
        "--bundle_root",
        ".",
        "--manifest",
        demo["sites"]["A"]["manifest"],
        "--dataset_dir",
        str(root),
        "--max_epochs",
        "1",
        "--batch_size",
        "4",
        "--data_cache",
        "disk",
        "--channels_last",
        "True",
        cwd=bundle,
    )  # checkpoints keep their usual names and layout-free values
    return bundle, demo


@pytest.mark.slow
def test_source_bundle_trains_evaluates_and_exports(trained_source):
    bundle, demo = trained_source
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert "fc.weight" in state and state["fc.weight"].shape[0] == 2
    assert list((bundle / "runs").glob("events.out.tfevents.*"))  # TensorBoard logs

    monai_bundle(
        "run",
        "--config_file",
        "configs/evaluate.json",
        "--bundle_root",
        ".",
        "--manifest",
        demo["sites"]["B"]["manifest"],
        "--dataset_dir",
        str(demo["out"]),
        "--split",
        "['train', 'val', 'test']",
        "--n_boot",
        "50",
        cwd=bundle,
    )
    metrics = json.loads((bundle / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["class_names"] == ["benign", "malignant"] and set(metrics["per_site"]) == {"B"}
    assert metrics["n"] == sum(metrics["class_counts"].values()) and metrics["metrics"]["auc"]["ci95"] is not None
    # every output names its seed, data (manifest content hash) and weights
    assert (
        metrics["run"]["manifest"]["name"] == "demo_site_B" and len(metrics["run"]["manifest"]["content_sha256"]) == 64
    )
    assert len(metrics["run"]["weights_sha256"]) == 64
    cached = list(
        (bundle / "cache" / "data").glob("*/*.pt")
    )  # --data_cache disk: each preprocessed case once, by preset
    cases = json.loads(Path(demo["sites"]["A"]["manifest"]).read_text(encoding="utf-8"))["cases"]
    assert len(cached) == sum(c["split"] in ("train", "val") for c in cases)
    trained = json.loads((bundle / "runs" / "run.json").read_text(encoding="utf-8"))
    assert trained["seed"] == 0 and trained["manifest"]["name"] == "demo_site_A" and trained["resume"] is False

    monai_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        "models/model.ts",
        "--ckpt_file",
        "models/model.pt",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        ".",
        cwd=bundle,
    )
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"))
    from monai.networks.nets import resnet10

    eager = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.5)
    eager.load_state_dict(state)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert (scripted.eval()(x) - eager.eval()(x)).abs().max() < 1e-4


@pytest.mark.slow
def test_inference_on_a_dicom_folder_gives_one_row_per_series(trained_source, tmp_path):
    bundle, demo = trained_source
    site_b = Path(demo["out"]) / "site_B" / "dicom"
    patients = sorted(p for p in site_b.iterdir() if p.is_dir())[:2]
    folder = tmp_path / "incoming" / "study"
    folder.mkdir(parents=True)
    for i, patient in enumerate(patients):  # two series mixed in one folder
        for f in sorted(patient.rglob("*.dcm")):
            shutil.copy(f, folder / f"p{i}_{f.parent.name}_{f.name}")
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "broken.dcm").write_bytes(b"\0" * 10)
    expected_series = len(inference_cases(folder.parent, output_dir=tmp_path / "probe")["cases"])
    assert expected_series >= 2

    out = tmp_path / "out"
    monai_bundle(
        "run",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        ".",
        "--input_dir",
        str(folder.parent),
        "--output_dir",
        str(out),
        cwd=bundle,
    )
    rows = list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))
    assert len(rows) == expected_series and len({r["id"] for r in rows}) == expected_series
    for row in rows:
        assert row["pred"] in ("benign", "malignant") and row["model_version"] == "0.1.0"
        assert abs(float(row["prob_benign"]) + float(row["prob_malignant"]) - 1) < 1e-4
    report = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    assert {s["id"].split("/")[-1] for s in report["skipped"]} == {"notes.txt", "broken.dcm"}
    assert str(tmp_path) not in (out / "predictions.json").read_text(encoding="utf-8")  # no absolute paths in outputs


def test_components_say_which_option_is_missing(tmp_path):
    with pytest.raises(MedtlError, match="no manifest given.*--manifest"):
        datalist("", tmp_path, "train")
    with pytest.raises(MedtlError, match="exactly one of input_dir"):
        inference_cases()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedtlError, match="no loadable image series"):
        inference_cases(empty, output_dir=tmp_path / "o")


def test_require_inputs_names_every_empty_value_at_once():
    examples = {"source": "../tumor_cls_source", "manifest": "DATA/manifests/target.json"}
    with pytest.raises(
        MedtlError, match="configs/train.json: this workflow needs source, manifest, not given"
    ) as failed:
        require_inputs(
            {"source": "", "manifest": [], "dataset_dir": "DATA"}, examples=examples, config="configs/train.json"
        )
    assert "--source ../tumor_cls_source --manifest DATA/manifests/target.json" in failed.value.hint
    assert "workflow_type='inference'" in failed.value.hint
    require_inputs({"source": "src", "manifest": ["a.json", "b.json"]}, examples=examples, config="configs/train.json")


@pytest.mark.parametrize(("name", "first"), [("tumor_cls_finetune", "source"), ("tumor_cls_distill", "teacher")])
def test_train_run_without_its_inputs_stops_before_any_work(name, first, tmp_path):
    """``python -m monai.bundle run`` of train.json given only a dataset_dir: the first step of
    ``initialize`` names what is missing, before seeding, loading or writing the run record."""
    copy = tmp_path / name
    shutil.copytree(REPO / "bundles" / name, copy, ignore=shutil.ignore_patterns("models", "runs", "eval", "cache"))
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--bundle_root", "."]
        + ["--dataset_dir", "DATA"],
        cwd=copy,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=utf8_child_env(),
        timeout=300,
    )
    assert done.returncode != 0
    assert f"MedtlError: configs/train.json: this workflow needs {first}, manifest, not given" in done.stderr
    assert f"pass --{first} {first.upper()}_BUNDLE --manifest DATA/manifests/target.json;" in done.stderr
    assert not (copy / "runs").exists()


def _mlflow_runs(store: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    return [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]


@pytest.mark.slow
def test_finetune_then_distill_bundles_adapt_the_source_to_site_b(trained_source, tmp_path):
    source, demo = trained_source
    data = ["--manifest", demo["sites"]["B"]["manifest"], "--dataset_dir", str(demo["out"])]
    finetune = tmp_path / "tumor_cls_finetune"
    shutil.copytree(REPO / "bundles" / "tumor_cls_finetune", finetune)
    done = monai_bundle(
        "run",
        "--config_file",
        "configs/train.json",
        "--bundle_root",
        ".",
        "--source",
        str(source),
        *data,
        "--max_epochs",
        "3",
        "--head_epochs",
        "1",
        "--unfreeze_every",
        "1",
        "--loader",
        "process",
        "--num_workers",
        "1",
        cwd=finetune,
    )  # augmentation in a worker process
    log = done.stdout + done.stderr
    assert "Loaded 77 of 77 ResNet tensors" in log and "exact match" in log
    assert "AdaBN: BatchNorm statistics of 12 layers" in log
    assert "epoch 1: training head" in log and "epoch 2: training layer4, head" in log
    assert str(source) not in log.replace(f"> source: '{source}'", "")  # the load report names the bundle, not its path
    tuned = torch.load(finetune / "models" / "model.pt", weights_only=True)
    original = torch.load(source / "models" / "model.pt", weights_only=True)
    assert not torch.equal(tuned["bn1.running_mean"], original["bn1.running_mean"])  # AdaBN
    assert torch.equal(tuned["conv1.weight"], original["conv1.weight"])  # the stem never unfroze in 3 epochs

    distill = tmp_path / "tumor_cls_distill"
    shutil.copytree(REPO / "bundles" / "tumor_cls_distill", distill)
    monai_bundle(
        "run",
        "--config_file",
        "configs/train.json",
        "--bundle_root",
        ".",
        "--teacher",
        str(finetune),
        *data,
        "--max_epochs",
        "2",
        "--threshold",
        "0.5",
        "--tracking",
        "mlflow",
        "--augment_on_device",
        "True",
        cwd=distill,
    )  # the device is the CPU here: the same path as on a GPU
    assert list((distill / "runs").glob("events.out.tfevents.*"))  # TensorBoard, always
    runs = _mlflow_runs(distill / "runs" / "mlruns.db")  # MLflow, asked for with --tracking mlflow: a local store
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert {"train_loss", "val_auc"} <= set(runs[0].data.metrics)
    report = json.loads((distill / "runs" / "pseudo_labels.json").read_text(encoding="utf-8"))
    n_unlabeled = sum(
        1
        for c in json.loads(Path(demo["sites"]["B"]["manifest"]).read_text(encoding="utf-8"))["cases"]
        if c["split"] == "unlabeled"
    )
    assert (
        report["unlabeled"] == n_unlabeled and sum(report["pseudo_labels_kept"].values()) == n_unlabeled
    )  # p >= 0.5 always holds
    assert len(list((distill / "cache").glob("teacher-*.npz"))) == 1
    student = torch.load(distill / "models" / "model.pt", weights_only=True)
    assert sum(t.numel() for t in student.values()) < sum(t.numel() for t in tuned.values()) / 3

    monai_bundle(
        "run", "--config_file", "configs/evaluate.json", "--bundle_root", ".", *data, "--n_boot", "20", cwd=distill
    )
    assert json.loads((distill / "eval" / "metrics.json").read_text(encoding="utf-8"))["n"] > 0


@pytest.mark.slow
def test_lidc_bundle_scores_nodules_listed_in_a_csv(shared_data, tmp_path):
    from medtl.dicom import pseudonymous_path

    bundle = REPO / "bundles" / "lidc_nodule_malignancy"
    if not (bundle / "models" / "model.pt").is_file():
        pytest.skip("lidc_nodule_malignancy has no trained weights yet (benchmarks/lidc_model.py --export)")
    vois = shared_data / "lidc_nodule_vois"
    rows = list(csv.DictReader((vois / "labels.csv").open(encoding="utf-8")))[:4]
    table = tmp_path / "cases.csv"
    lines = ["image,mask"] + [
        f"{Path(os.path.relpath(vois / r['image'], tmp_path)).as_posix()},"
        f"{Path(os.path.relpath(vois / r['mask'], tmp_path)).as_posix()}"
        for r in rows
    ]
    lines.append("missing.nii.gz,missing_mask.nii.gz")  # skipped and reported, the others still scored
    lines.append(
        lines[1].split(",")[0] + ","
    )  # no mask: this model takes it as a channel, so the row is skipped with that reason
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    monai_bundle(
        "run",
        "--config_file",
        str(bundle / "configs" / "inference.json"),
        "--bundle_root",
        str(bundle),
        "--input_csv",
        str(table),
        "--output_dir",
        str(out),
        cwd=tmp_path,
    )
    predictions = list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))
    assert [p["image"] for p in predictions] == [line.split(",")[0] for line in lines[1:5]]
    assert [p["mask"] for p in predictions] == [line.split(",")[1] for line in lines[1:5]]
    assert set(predictions[0]) == {"image", "mask", "prob_Benign", "prob_Malign", "pred", "model_version"}
    assert all(p["pred"] in ("Benign", "Malign") for p in predictions)
    skipped = json.loads((out / "predictions.json").read_text(encoding="utf-8"))["skipped"]
    salt = (
        (out / ".medtl-salt").read_text(encoding="utf-8").strip()
    )  # ids key the image's folder; the image column is as written
    assert [s["id"] for s in skipped] == ["missing.nii.gz", pseudonymous_path(lines[1].split(",")[0], salt)]
    assert "takes the lesion mask as an input channel" in skipped[1]["reason"]

    # MONAI's run equals medtl's Python path: the same two-channel preprocessing, flip TTA over the same weights
    from medtl.bundle.components import load_bundle_network
    from medtl.inferers import FlipAveraged
    from medtl.transforms import eval_transforms

    config = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    pre = eval_transforms(modality="ct", mask_channel=config["mask_channel"], crop_mm=config["crop_mm"])
    x = torch.stack([pre({"image": str(vois / r["image"]), "mask": str(vois / r["mask"])})["image"] for r in rows])
    assert x.shape[1] == 2
    with torch.no_grad():
        malign = torch.softmax(FlipAveraged(load_bundle_network(bundle))(x), 1)[:, 1].numpy()
    assert np.allclose([float(p["prob_Malign"]) for p in predictions], malign, atol=1e-4)
    weights = sum(f.stat().st_size for f in (bundle / "models").glob("model.pt"))
    assert weights <= 10 * 2**20


@pytest.mark.slow
def test_lidc_bundle_configs_train_on_pooled_sites_and_infer_with_the_mask_channel(demo_with_unlabeled, tmp_path):
    """The shipped LIDC configs through MONAI's CLI on generated data: train.json pools two sites'
    manifests into one two-channel training run, evaluate.json and inference.json score with flip TTA."""
    bundle = tmp_path / "lidc_nodule_malignancy"
    shutil.copytree(
        REPO / "bundles" / "lidc_nodule_malignancy", bundle, ignore=shutil.ignore_patterns("models", "runs", "eval")
    )
    (bundle / "models").mkdir()
    sites, root = demo_with_unlabeled["sites"], str(demo_with_unlabeled["out"])
    pooled = f"['{sites['A']['manifest']}', '{sites['B']['manifest']}']"
    monai_bundle(
        "run",
        "--config_file",
        "configs/train.json",
        "--bundle_root",
        ".",
        "--manifest",
        pooled,
        "--dataset_dir",
        root,
        "--max_epochs",
        "1",
        "--batch_size",
        "4",
        cwd=bundle,
    )
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert state["conv1.weight"].shape[1] == 2  # CT crop and lesion mask
    trained = json.loads((bundle / "runs" / "run.json").read_text(encoding="utf-8"))
    assert [m["name"] for m in trained["manifest"]] == ["demo_site_A", "demo_site_B"]

    monai_bundle(
        "run",
        "--config_file",
        "configs/evaluate.json",
        "--bundle_root",
        ".",
        "--manifest",
        sites["B"]["manifest"],
        "--dataset_dir",
        root,
        "--n_boot",
        "20",
        cwd=bundle,
    )
    assert json.loads((bundle / "eval" / "metrics.json").read_text(encoding="utf-8"))["n"] > 0

    from medtl.nifti import write_nifti
    from medtl.reader import load_volume

    # a site lists its cases as a CT in NIfTI or as the folder of one DICOM series, each with its nodule mask
    cases = datalist(sites["B"]["manifest"], root, "test")
    single = next(
        c for c in cases if {p.name for p in Path(c["image"][0]).parent.iterdir()} == {Path(f).name for f in c["image"]}
    )
    write_nifti(load_volume(cases[0]["image"]), tmp_path / "ct0.nii.gz")
    rows = [
        f"ct0.nii.gz,{os.path.relpath(cases[0]['mask'], tmp_path)}",
        f"{os.path.relpath(Path(single['image'][0]).parent, tmp_path)},{os.path.relpath(single['mask'], tmp_path)}",
    ]
    table = tmp_path / "cases.csv"
    table.write_text("image,mask\n" + "\n".join(rows) + "\n", encoding="utf-8")
    monai_bundle(
        "run",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        ".",
        "--input_csv",
        str(table),
        "--output_dir",
        str(tmp_path / "out"),
        cwd=bundle,
    )
    predicted = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open(encoding="utf-8")))
    assert [p["image"] for p in predicted] == [r.split(",")[0] for r in rows]


@pytest.mark.slow
def test_multi_gpu_train_runs_under_torchrun_on_cpu(trained_source, tmp_path):
    """Two processes (gloo on CPU), DDP and a distributed sampler; only rank 0 saves and logs."""
    source, demo = trained_source
    bundle = tmp_path / "tumor_cls_finetune"
    shutil.copytree(REPO / "bundles" / "tumor_cls_finetune", bundle)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/multi_gpu_train.json']",
        "--bundle_root",
        ".",
        "--source",
        str(source),
        "--manifest",
        demo["sites"]["B"]["manifest"],
        "--dataset_dir",
        str(demo["out"]),
        "--max_epochs",
        "2",
        "--head_epochs",
        "1",
        "--batch_size",
        "2",
    ]
    done = subprocess.run(
        command, cwd=bundle, capture_output=True, encoding="utf-8", errors="replace", env=utf8_child_env(), timeout=600
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert log.count("epoch 2: training") == 2  # both ranks followed the schedule
    writers = list((bundle / "runs").glob("events.out.tfevents.*"))
    assert (bundle / "models" / "model.pt").is_file() and len(
        writers
    ) == 2  # rank 0 only: its train and validation writers


def test_csv_cases_take_a_mask_or_an_roi_centre_and_report_bad_rows(tmp_path):
    table = tmp_path / "cases.csv"
    table.write_text(
        "image,mask,roi_center_mm\na.nii.gz,a_mask.nii.gz,\nb.nii.gz,,1.5 -2 30\nc.nii.gz,,one two\n,,\nd.nii.gz,,1 2\n"
    )
    found = inference_cases(input_csv=table, output_dir=tmp_path / "out")
    a, b = found["cases"]
    assert (
        a["mask"] == str(tmp_path / "a_mask.nii.gz") and a["csv_mask"] == "a_mask.nii.gz" and "roi_center_mm" not in a
    )
    assert b["roi_center_mm"] == [1.5, -2.0, 30.0] and "mask" not in b and b["image"] == str(tmp_path / "b.nii.gz")
    assert [s["id"] for s in found["skipped"]] == ["c.nii.gz", "row 5", "d.nii.gz"]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nx.nii.gz,1\n")
    with pytest.raises(MedtlError, match="needs an 'image' column"):
        inference_cases(input_csv=bad)


@pytest.mark.slow
def test_killed_finetune_bundle_resumes_to_the_same_weights(trained_source, tmp_path):
    """kill -9 after the first epoch, then `--resume True`: the run ends where an uninterrupted one does."""
    source, demo = trained_source
    args = [
        "run",
        "--config_file",
        "configs/train.json",
        "--bundle_root",
        ".",
        "--source",
        str(source),
        "--manifest",
        demo["sites"]["B"]["manifest"],
        "--dataset_dir",
        str(demo["out"]),
        "--max_epochs",
        "3",
        "--head_epochs",
        "1",
        "--unfreeze_every",
        "1",
        "--patience",
        "50",
    ]
    runs = {}
    for name in ("whole", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(REPO / "bundles" / "tumor_cls_finetune", runs[name])
    monai_bundle(*args, cwd=runs["whole"])

    state = runs["killed"] / "runs" / "training_state.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=runs["killed"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not state.exists():
        assert proc.poll() is None, "training ended before saving its first state"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(state, weights_only=True)["trainer"]["epoch"]
    assert killed_at < 3
    log = monai_bundle(*args, "--resume", "True", cwd=runs["killed"])
    assert f"resumed from training_state.pt after epoch {killed_at} of 3" in log.stdout + log.stderr

    whole, resumed = (
        torch.load(r / "runs" / "training_state.pt", weights_only=True) for r in (runs["whole"], runs["killed"])
    )
    assert whole["trainer"]["epoch"] == resumed["trainer"]["epoch"] == 3
    assert all(torch.equal(whole["network"][k], resumed["network"][k]) for k in whole["network"])
    assert whole["objects"] == resumed["objects"] or all(
        str(whole["objects"][k]) == str(resumed["objects"][k]) for k in whole["objects"]
    )
    best = [torch.load(r / "models" / "model.pt", weights_only=True) for r in (runs["whole"], runs["killed"])]
    assert all(torch.equal(best[0][k], best[1][k]) for k in best[0])


def test_configure_torch_chooses_cudnn_autotuning_or_repeatable_kernels():
    from medtl.bundle.components import configure_torch

    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        configure_torch(3, deterministic=False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        first = torch.rand(3)
        configure_torch(3, deterministic=True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.equal(torch.rand(3), first)  # seeded either way
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before
    for name in ("tumor_cls_source", "tumor_cls_finetune", "tumor_cls_distill"):
        config = json.loads((REPO / "bundles" / name / "configs" / "train.json").read_text(encoding="utf-8"))
        assert (
            config["deterministic"] == "$not torch.cuda.is_available()"
        )  # cudnn.benchmark on GPUs, repeatable on CPUs
        assert config["determinism"]["_target_"] == "medtl.bundle.components.configure_torch"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_loader_augmentation_device_and_layout_are_settings(bundle, tmp_path):
    """``--loader``, ``--num_workers``, ``--augment_on_device`` and ``--channels_last`` reach the
    training loader, pipeline and network (a few entries stand in for a manifest's cases; the CPU
    for the GPU)."""
    from monai.bundle import ConfigParser
    from monai.data import DataLoader, ThreadDataLoader

    def parsed(**overrides):
        parser = ConfigParser()
        parser.read_config(bundle / "configs" / "train.json")
        parser.update(
            {
                "bundle_root": str(tmp_path),
                "train#dataset#data": [{"image": "case.nii.gz", "label": 0}] * 4,
                "train#dataset#cache": "none",
                "num_classes": 2,
                **overrides,
            }
        )
        return parser

    def moves(parser):
        return [
            t.converter.device.type
            for t in parser.get_parsed_content("train#preprocessing").transforms
            if getattr(getattr(t, "converter", None), "device", None) is not None
        ]

    default = parsed()
    assert type(default.get_parsed_content("train#dataloader")) is ThreadDataLoader and not moves(default)
    process = parsed(loader="process", num_workers=1).get_parsed_content("train#dataloader")
    assert type(process) is DataLoader and process.num_workers == 1
    on_device = parsed(augment_on_device=True)
    assert moves(on_device) == ["cpu"]  # @device: the GPU when there is one
    assert not on_device.get_parsed_content("train#dataloader").pin_memory

    def channels_last(network):  # a convolution with several input channels: one channel fits either layout
        weight = next(m.weight for m in network.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1)
        return weight.is_contiguous(memory_format=torch.channels_last_3d)

    assert not channels_last(default.get_parsed_content("network"))
    assert channels_last(parsed(channels_last=True).get_parsed_content("network"))
    with pytest.raises(RuntimeError) as failed:  # MONAI wraps a component's error
        parsed(augment_on_device=True, num_workers=2).get_parsed_content("train#dataloader")
    assert "augmentation on the device runs in the loading thread" in str(medtl_cause(failed.value))


def test_csv_case_ids_key_the_image_folder_unless_real_ids(tmp_path):
    """A CSV row's id names the image's folder by its salted key (the salt beside the output); the
    image and mask columns stay as the site wrote them; ``real_ids`` (also as MONAI's CLI passes
    it, ``"true"``) keeps the path."""
    from medtl.dicom import folder_key, pseudonymous_path

    (tmp_path / "DOE_JANE" / "CT").mkdir(parents=True)  # a DICOM series folder listed as the image
    table = tmp_path / "cases.csv"
    table.write_text(
        "image,mask,roi_center_mm\nDOE_JANE/ct.nii.gz,DOE_JANE/mask.nii.gz,\nDOE_JANE/CT,,1 2 3\n"
        "ct.nii.gz,,\nDOE_JANE/bad.nii.gz,,one\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    found = inference_cases(input_csv=table, output_dir=out)
    salt = (out / ".medtl-salt").read_text(encoding="utf-8").strip()
    assert [c["id"] for c in found["cases"]] == [
        pseudonymous_path("DOE_JANE/ct.nii.gz", salt),
        folder_key("DOE_JANE/CT", salt),
        "ct.nii.gz",
    ]
    assert [s["id"] for s in found["skipped"]] == [pseudonymous_path("DOE_JANE/bad.nii.gz", salt)]
    assert "DOE" not in json.dumps([c["id"] for c in found["cases"]] + found["skipped"])
    assert [(c["csv_image"], c["csv_mask"]) for c in found["cases"]] == [
        ("DOE_JANE/ct.nii.gz", "DOE_JANE/mask.nii.gz"),
        ("DOE_JANE/CT", ""),
        ("ct.nii.gz", ""),
    ]
    assert (
        found["salt_dir"] == str(out) and inference_cases(input_csv=table, output_dir=out)["cases"] == found["cases"]
    )  # one key per run folder

    for real_ids in (True, "true", "True"):
        real = inference_cases(input_csv=table, output_dir=out, real_ids=real_ids)
        assert [c["id"] for c in real["cases"]] == ["DOE_JANE/ct.nii.gz", "DOE_JANE/CT", "ct.nii.gz"] and real[
            "salt_dir"
        ] == ""
    assert inference_cases(input_csv=table, output_dir=out, real_ids="false")["cases"] == found["cases"]
    with pytest.raises(MedtlError, match="real_ids is true or false, got 'yes'"):
        inference_cases(input_csv=table, output_dir=out, real_ids="yes")


def test_dicom_case_ids_key_the_folders_unless_real_ids(tmp_path):
    from medtl.dicom import folder_key
    from medtl.dicomwrite import SeriesInfo, make_uid, write_ct_series

    root = tmp_path / "incoming"
    for folder, number in (("DOE_JANE/CT", 2), ("ROE_RICHARD", 3)):
        info = SeriesInfo(
            patient_id="P1",
            patient_name="Doe^Jane",
            study_uid=make_uid(f"st-{folder}"),
            series_uid=make_uid(f"se-{folder}"),
            series_number=number,
        )
        write_ct_series(root / folder, np.zeros((8, 8, 4)), (1.0, 1.0, 2.0), info)
    (root / "DOE_JANE" / "notes.txt").write_text("export log\n", encoding="utf-8")
    out = tmp_path / "out"
    found = inference_cases(root, output_dir=out)
    salt = (out / ".medtl-salt").read_text(encoding="utf-8").strip()
    assert [c["id"] for c in found["cases"]] == [
        f"{folder_key('DOE_JANE/CT', salt)}#2",
        f"{folder_key('ROE_RICHARD', salt)}#3",
    ]
    assert [s["id"] for s in found["skipped"]] == [f"{folder_key('DOE_JANE', salt)}/notes.txt"]
    assert all(c["series"].startswith("ser-") for c in found["cases"])
    real = inference_cases(root, output_dir=out, real_ids=True)
    assert [c["id"] for c in real["cases"]] == ["DOE_JANE/CT#2", "ROE_RICHARD#3"]  # the same order: the folders'
    assert [s["id"] for s in real["skipped"]] == ["DOE_JANE/notes.txt"]


def test_a_failing_case_is_named_by_its_key(tmp_path):
    """``prepare_cases`` names the file a case failed on relative to the input, its folder keyed as the ids are."""
    from medtl.bundle.components import prepare_cases
    from medtl.dicom import pseudonymous_path
    from medtl.reader import LoadVolumed

    table = tmp_path / "cases.csv"
    table.write_text("image\nDOE_JANE/ct.nii.gz\n", encoding="utf-8")
    (tmp_path / "DOE_JANE").mkdir()
    (tmp_path / "DOE_JANE" / "ct.nii.gz").write_bytes(b"not a NIfTI")
    out = tmp_path / "out"
    with pytest.raises(MedtlError) as failed:
        prepare_cases(inference_cases(input_csv=table, output_dir=out), LoadVolumed(keys="image"), progress=False)
    salt = (out / ".medtl-salt").read_text(encoding="utf-8").strip()
    assert f"{pseudonymous_path('DOE_JANE/ct.nii.gz', salt)}: " in failed.value.hint and "DOE" not in str(failed.value)
    with pytest.raises(MedtlError, match="DOE_JANE/ct.nii.gz: "):
        prepare_cases(
            inference_cases(input_csv=table, output_dir=out, real_ids=True), LoadVolumed(keys="image"), progress=False
        )


def test_an_oversized_csv_field_is_named_with_the_file_and_line(tmp_path):
    table = tmp_path / "cases.csv"
    table.write_text('image,mask\na.nii.gz,\n"b.nii.gz' + "x" * (csv.field_size_limit() + 10) + "\n", encoding="utf-8")
    with pytest.raises(
        MedtlError, match=r"^cases.csv: cannot read the case table: line \d+: a field is longer than [\d,]+ characters"
    ):
        inference_cases(input_csv=table, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before a salt was made


def test_prediction_writer_writes_formula_cells_as_text(tmp_path):
    from medtl.bundle.components import PredictionWriter

    writer = PredictionWriter(tmp_path, ["benign", "malignant"], model_version="0.1.0")
    writer.rows = [
        {
            "id": "=cmd|' /C calc'!A0#2",
            "series": "ser-1",
            "prob_benign": -0.0,
            "prob_malignant": 1.0,
            "pred": "malignant",
            "model_version": "0.1.0",
        }
    ]
    writer._write(None)
    lines = (tmp_path / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert lines == [
        "id,series,prob_benign,prob_malignant,pred,model_version",
        "'=cmd|' /C calc'!A0#2,ser-1,-0.0,1.0,malignant,0.1.0",
    ]
    assert (
        json.loads((tmp_path / "predictions.json").read_text(encoding="utf-8"))["predictions"][0]["id"]
        == "=cmd|' /C calc'!A0#2"
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically: no temporary file left
