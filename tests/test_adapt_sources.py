"""The networks people have as sources of ``medtl adapt``: a received bundle adapted as itself (the
shipped LIDC bundle: two input channels, width 0.25), and a MedicalNet-layout ResNet-18 checkpoint;
each exported bundle runs under ``python -m monai.bundle run``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.networks.nets import resnet18

from medtl.adapt.source import open_source
from medtl.bundle.components import class_names
from medtl.bundle.provenance import describe_source
from medtl.bundle.templates import TEMPLATES
from medtl.cli import main
from medtl.errors import MedtlError
from medtl.manifest import datalist, load_manifest
from tests.conftest import RUN_INFERENCE, monai_bundle

LIDC = TEMPLATES / "lidc_nodule_malignancy"
LIDC_MAP = {"benign": "Benign", "malignant": "Malign"}  # the demo's class names to the LIDC bundle's
TINY = ["--epochs", "1", "--head-epochs", "1", "--folds", "2"]


def _adapt(source: Path | str, manifest: Path, root: Path, out: Path, *extra: str) -> None:
    argv = ["-q", "adapt", "--source", str(source), "--manifest", str(manifest), "--root", str(root)]
    assert main([*argv, "--out", str(out), *TINY, *extra]) == 0


def _cases_csv(manifest: Path, root: Path, dest: Path, *, masks: bool) -> Path:
    """The manifest's test cases as the bundles' ``--input_csv`` table (image, and mask)."""
    items = datalist(load_manifest(manifest), root, "test")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask"] if masks else ["image"])
        for item in items:  # a DICOM series is listed by its files in the manifest, by its folder here
            image = Path(item["image"][0]).parent if isinstance(item["image"], list) else item["image"]
            writer.writerow([image, item["mask"]] if masks else [image])
    return dest


def _predictions(bundle: Path, table: Path, out: Path) -> list[dict[str, str]]:
    monai_bundle(*RUN_INFERENCE, "--input_csv", str(table), "--output_dir", str(out), cwd=bundle)
    with (out / "predictions.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _medicalnet_resnet18(path: Path) -> Path:
    """A checkpoint laid out as MedicalNet ships ``resnet_18_23dataset.pth``: shortcut A, DataParallel
    ``module.`` names, a segmentation head ``conv_seg`` and no classifier, under ``state_dict``."""
    net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, shortcut_type="A", bias_downsample=True)
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    state["module.conv_seg.0.weight"] = torch.randn(32, 512, 3, 3, 3)
    state["module.conv_seg.1.weight"] = torch.ones(32)
    torch.save({"state_dict": state}, path)
    return path


@pytest.mark.slow
def test_the_lidc_bundle_adapts_as_itself_and_its_export_runs_in_monai(demo_with_unlabeled, tmp_path):
    """The shipped LIDC bundle on another site's cases: its own network (2 channels: CT + lesion mask,
    width 0.25) and inputs, exported from its own configs as its next minor version."""
    demo = demo_with_unlabeled
    manifest, root, out = Path(demo["sites"]["B"]["manifest"]), Path(demo["out"]), tmp_path / "adapted"
    _adapt(LIDC, manifest, root, out, "--class-map", "benign=Benign,malignant=Malign")

    bundle = out / "lidc_nodule_malignancy"
    source_meta = json.loads((LIDC / "configs" / "metadata.json").read_text(encoding="utf-8"))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    major, minor, _ = (int(v) for v in source_meta["version"].split("."))
    assert meta["version"] == f"{major}.{minor + 1}.0"
    assert list(meta["changelog"])[:2] == [meta["version"], source_meta["version"]]
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == class_names(manifest)
    inference = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert inference["network_def"]["n_input_channels"] == 2 and inference["network_def"]["widen_factor"] == 0.25
    assert inference["mask_channel"] is True and inference["crop_mm"] == [32, 32, 32]
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert state["conv1.weight"].shape[:2] == (16, 2)
    record = json.loads((bundle / "provenance.json").read_text(encoding="utf-8"))
    assert record["adapted_from"] == describe_source(LIDC)
    assert record["adapted_from"]["name"] == "lidc_nodule_malignancy" and record["adapted_from"]["version"]
    assert not (bundle / "SHA256SUMS").exists()  # the source's checksums do not vouch for new weights

    table = _cases_csv(manifest, root, tmp_path / "cases.csv", masks=True)
    rows = _predictions(bundle, table, tmp_path / "pred")
    assert len(rows) == sum(1 for _ in datalist(load_manifest(manifest), root, "test")) and all(
        r["pred"] in class_names(manifest) for r in rows
    )


@pytest.mark.slow
def test_a_medicalnet_resnet18_adapts_and_exports_a_bundle_that_builds_resnet18(demo_with_unlabeled, tmp_path):
    demo = demo_with_unlabeled
    manifest, root, out = Path(demo["sites"]["B"]["manifest"]), Path(demo["out"]), tmp_path / "adapted"
    checkpoint = _medicalnet_resnet18(tmp_path / "resnet_18_23dataset.pth")
    _adapt(checkpoint, manifest, root, out, "--arch", "resnet18")

    bundle = out / "tumor_cls_finetune"
    for name in ("inference.json", "evaluate.json", "train.json"):
        config = json.loads((bundle / "configs" / name).read_text(encoding="utf-8"))
        assert config["network_def"]["_target_"] == "monai.networks.nets.resnet18", name
        assert config["network_def"]["shortcut_type"] == "A" and config["network_def"]["num_classes"] == "@num_classes"
    record = json.loads((bundle / "provenance.json").read_text(encoding="utf-8"))
    assert record["adapted_from"]["name"] == checkpoint.name
    rows = _predictions(bundle, _cases_csv(manifest, root, tmp_path / "cases.csv", masks=False), tmp_path / "pred")
    assert rows and all(r["pred"] in class_names(manifest) for r in rows)


def test_mismatches_are_found_before_any_training(demo_with_unlabeled, tmp_path):
    """Width, channels and options that do not fit are refused by open_source, naming the source."""
    manifest = Path(demo_with_unlabeled["sites"]["B"]["manifest"])
    names = class_names(manifest)
    checkpoint = _medicalnet_resnet18(tmp_path / "resnet_18_23dataset.pth")
    with pytest.raises(MedtlError, match="do not fit") as caught:  # a ResNet-18 is not medtl's ResNet10
        open_source(checkpoint, target_classes=names, workdir=tmp_path / "w1")
    assert "resnet_18_23dataset.pth" in str(caught.value)
    with pytest.raises(MedtlError, match="--widen-factor"):  # a bundle builds its own network_def
        open_source(LIDC, target_classes=names, workdir=tmp_path / "w2", network_options={"widen_factor": 0.5})
    with pytest.raises(MedtlError, match="--modality mr"):
        open_source(LIDC, target_classes=names, workdir=tmp_path / "w3", modality="mr")


def test_a_source_bundle_builds_its_own_network_and_inputs(demo_with_unlabeled, tmp_path):
    manifest, root = Path(demo_with_unlabeled["sites"]["B"]["manifest"]), Path(demo_with_unlabeled["out"])
    src = open_source(LIDC, target_classes=class_names(manifest), workdir=tmp_path, class_map=LIDC_MAP)
    assert (src.in_channels, src.spatial_dims, src.bundle) == (2, 3, tmp_path / "source" / "lidc_nodule_malignancy")
    item = src.preprocessing(dict(datalist(load_manifest(manifest), root, "train")[0]))
    assert tuple(item["image"].shape) == (2, 32, 32, 32)
    assert src.load_report["class_mapping"] == LIDC_MAP
    assert not src.load_report["missing"] and not src.load_report["mismatched"]


def test_a_zipped_source_bundle_is_imported_and_audited_first(tmp_path):
    """A zip is unpacked and verified as ``medtl bundle import`` does it; a config outside the
    allow-list is refused before anything of it is built."""
    hostile = tmp_path / "hostile"
    shutil.copytree(LIDC, hostile)
    config = json.loads((hostile / "configs" / "inference.json").read_text(encoding="utf-8"))
    config["network_def"]["_target_"] = "os.system"
    (hostile / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    archive = shutil.make_archive(str(tmp_path / "hostile"), "zip", tmp_path, "hostile")
    with pytest.raises(MedtlError, match="refused"):
        open_source(archive, target_classes=["benign", "malignant"], workdir=tmp_path / "w")
    assert not (tmp_path / "w" / "source" / "hostile").exists()


def _segmentation_checkpoints(tmp_path: Path) -> dict[str, Path]:
    """Tiny segmentation networks saved as users hold them: a SegResNet state dict, and a Swin-ViT in
    the layout of MONAI's self-supervised ``model_swinvit.pt`` (``module.`` names under ``state_dict``)."""
    from monai.networks.nets import SegResNet, SwinUNETR

    segresnet = SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=(1, 1, 1, 1))
    torch.save(segresnet.state_dict(), tmp_path / "segresnet.pt")
    swin = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, spatial_dims=3)
    ssl = {f"module.{k}": v for k, v in swin.swinViT.state_dict().items()}
    ssl["module.rotation_head.weight"] = torch.randn(4, 12 * 16)
    torch.save({"state_dict": ssl}, tmp_path / "model_swinvit.pt")
    return {"segresnet-encoder": tmp_path / "segresnet.pt", "swinunetr-encoder": tmp_path / "model_swinvit.pt"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["segresnet-encoder", "swinunetr-encoder"])
def test_a_segmentation_network_adapts_as_an_encoder_and_its_bundle_runs_in_monai(demo_with_unlabeled, tmp_path, arch):
    """Most pretrained 3D networks are segmentation models: their encoder, pooled, under a new head."""
    demo = demo_with_unlabeled
    manifest, root, out = Path(demo["sites"]["B"]["manifest"]), Path(demo["out"]), tmp_path / "adapted"
    checkpoint = _segmentation_checkpoints(tmp_path)[arch]
    _adapt(checkpoint, manifest, root, out, "--arch", arch)

    bundle = out / "tumor_cls_finetune"
    inference = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert inference["network_def"]["_target_"].startswith("medtl.encoders.")
    summary = json.loads((out / "adapt_summary.json").read_text(encoding="utf-8"))
    assert summary["stages"]
    rows = _predictions(bundle, _cases_csv(manifest, root, tmp_path / "cases.csv", masks=False), tmp_path / "pred")
    assert rows and all(r["pred"] in class_names(manifest) for r in rows)


def test_encoder_sizes_come_from_the_checkpoint(tmp_path):
    """The encoder is built at the checkpoint's sizes (SegResNet's init_filters and blocks_down,
    Swin-ViT's feature size) and takes every encoder tensor; the decoder is left out, reported."""
    names = ["benign", "malignant"]
    for arch, checkpoint in _segmentation_checkpoints(tmp_path).items():
        src = open_source(checkpoint, target_classes=names, workdir=tmp_path / arch, arch=arch)
        assert src.network_def["_target_"].startswith("medtl.encoders.") and not src.load_report["mismatched"]
        assert set(src.load_report["missing"]) == {"fc.weight", "fc.bias"}
        assert src.load_report["unexpected"]  # the decoder (or the pre-training heads)
    assert open_source(
        _segmentation_checkpoints(tmp_path)["segresnet-encoder"],
        target_classes=names,
        workdir=tmp_path / "s",
        arch="segresnet-encoder",
    ).network_def["blocks_down"] == [1, 1, 1, 1]


def test_a_bundle_given_an_arch_lends_its_weights_and_sizes(tmp_path):
    """``--source BUNDLE --arch NAME``: the bundle's weights as a checkpoint for NAME, built with the
    size arguments of its network_def that NAME shares (the LIDC bundle's width and two channels)."""
    src = open_source(LIDC, target_classes=["normal", "hyperplasia"], workdir=tmp_path, arch="resnet10")
    assert src.network_def["widen_factor"] == 0.25 and src.network_def["n_input_channels"] == 2
    assert src.template == "tumor_cls_finetune" and src.settings["mask_channel"] is True
    assert set(src.load_report["mismatched"]) <= {"fc.weight", "fc.bias"} and not src.load_report["missing"]


def test_a_mask_channel_bundle_on_cases_without_masks_is_refused_naming_the_case(small_demo, tmp_path, capsys):
    """The LIDC bundle takes the lesion mask as its second channel: a target manifest without masks
    stops before any training, naming a case and what to give."""
    from medtl.demo import CLASSES
    from medtl.manifest import build_manifest_file

    out = Path(small_demo["out"])
    table = (out / "site_B" / "labels.csv").read_text(encoding="utf-8").splitlines()
    header = table[0].split(",")
    keep = [i for i, column in enumerate(header) if column != "mask"]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(",".join(row.split(",")[i] for i in keep) for row in table) + "\n", encoding="utf-8")
    shutil.copytree(out / "site_B", tmp_path / "site_B", ignore=shutil.ignore_patterns("labels.csv"))
    shutil.copy(labels, tmp_path / "site_B" / "labels.csv")
    manifest = tmp_path / "manifest.json"
    build_manifest_file(
        labels=tmp_path / "site_B" / "labels.csv",
        classes=CLASSES,
        out=manifest,
        scan=small_demo["sites"]["B"]["scan"],
        root=out,
        progress=False,
    )
    argv = ["-q", "adapt", "--source", str(LIDC), "--manifest", str(manifest), "--root", str(out)]
    assert main([*argv, "--out", str(tmp_path / "run"), "--class-map", "benign=Benign,malignant=Malign"]) == 2
    error = capsys.readouterr().err
    assert "mask" in error and "Traceback" not in error
    assert not (tmp_path / "run" / "training_state.pt").exists()


def test_fl_opens_sources_as_adapt_does_and_refuses_networks_its_sites_cannot_build(tmp_path):
    """``medtl fl`` loads the source through ``open_source``; its sites build medtl's one-channel 3D
    ResNet10, so any other network is refused before the job starts, naming the source."""
    from medtl.fl.job import _sites_resnet10
    from medtl.networks import resnet

    names = ["benign", "malignant"]
    torch.save(resnet(0.25, 2).state_dict(), tmp_path / "resnet10.pt")
    own = open_source(
        tmp_path / "resnet10.pt", target_classes=names, workdir=tmp_path, network_options={"widen_factor": 0.25}
    )
    assert _sites_resnet10(own) == 0.25
    medicalnet = _medicalnet_resnet18(tmp_path / "resnet_18_23dataset.pth")
    for src in (
        open_source(medicalnet, target_classes=names, workdir=tmp_path, arch="resnet18"),
        open_source(LIDC, target_classes=names, workdir=tmp_path, class_map=LIDC_MAP),
    ):
        with pytest.raises(MedtlError, match="one-channel 3D ResNet10") as caught:
            _sites_resnet10(src)
        assert src.label in str(caught.value)


@pytest.mark.slow
def test_a_2d_imagenet_style_checkpoint_adapts_and_its_bundle_runs_on_2d_images(tmp_path):
    """``--spatial-dims 2``: a 3-channel 2D ResNet-18 (ImageNet's layout) into a 1-channel 2D network
    (its stem summed over channels), and the exported bundle reads single-slice NIfTI images."""
    from monai.networks.nets import resnet18 as resnet18_nets

    from medtl.importers import import_medmnist
    from tests.test_importers import _fake_npz

    npz = _fake_npz(tmp_path / "fake.npz", (28, 28), sizes=(16, 8, 8))
    summary = import_medmnist(npz, tmp_path / "data", classes=("normal", "lesion"), progress=False)
    torch.save(resnet18_nets(spatial_dims=2, n_input_channels=3, num_classes=1000).state_dict(), tmp_path / "rgb.pt")
    manifest, root = tmp_path / "data" / summary["manifest"], tmp_path / "data"
    _adapt(tmp_path / "rgb.pt", manifest, root, tmp_path / "run", "--arch", "resnet18", "--spatial-dims", "2")
    bundle = tmp_path / "run" / "tumor_cls_finetune"
    inference = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert inference["spatial_dims"] == 2 and inference["network_def"]["spatial_dims"] == 2
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"]) == 2
    table = tmp_path / "cases.csv"
    images = [str(item["image"]) for item in datalist(load_manifest(manifest), root, "test")]
    table.write_text("image\n" + "\n".join(images) + "\n", encoding="utf-8")
    rows = _predictions(bundle, table, tmp_path / "pred")
    assert len(rows) == len(images) and all(r["pred"] in ("normal", "lesion") for r in rows)
