"""Pretrained weights: every checkpoint layout users have, key matching, adaptation, safety, the report."""

from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from monai.networks import nets
from torch import nn

from medtl.cli import main
from medtl.errors import MedtlError
from medtl.networks import create_network, list_networks, network_options_for
from medtl.weights import (
    LoadReport,
    UntrustedCheckpointWarning,
    adapt_input_conv,
    inflate_conv_2d_to_3d,
    inspect_checkpoint,
    load_weights,
    match_keys,
    read_checkpoint,
)

TINY = {"widen_factor": 0.25}  # resnet10 with 16..128 channels: fast on 2 CPU cores


class PickledConfig:
    """A custom object as training scripts store beside the weights (needs pickled code to load)."""

    def __init__(self, lr: float):
        self.lr = lr


def tiny(in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_network(
        "resnet10", spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **TINY
    ).eval()


@pytest.fixture(scope="module")
def source() -> nn.Module:
    return tiny(seed=1)


def assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    ref = reference.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, ref[name]), name


def assert_exact(report: LoadReport, model: nn.Module) -> None:
    assert report.loaded == list(model.state_dict())
    assert report.missing == report.unexpected == report.mismatched == report.adapted == []
    assert report.exact and "exact match" in report.summary()


# ---------------------------------------------------------------- registry


def test_registry_builds_known_networks_and_names_them_on_error():
    names = list_networks()
    for name in ("resnet10", "resnet18", "resnet34", "resnet50", "densenet121", "efficientnet-b0"):
        assert name in names
    model = create_network("resnet18", in_channels=2, num_classes=3, widen_factor=0.25)
    assert model.conv1.in_channels == 2 and model.fc.out_features == 3 and model.conv1.out_channels == 16
    medicalnet = create_network("resnet18", medicalnet=True, widen_factor=0.25)
    assert not any("downsample" in k for k in medicalnet.state_dict())  # shortcut type A: no conv
    b50 = create_network("resnet50", medicalnet=True, widen_factor=0.25)
    assert "layer1.0.downsample.0.weight" in b50.state_dict() and "layer1.0.downsample.0.bias" not in b50.state_dict()
    eff = create_network("efficientnet-b0", spatial_dims=2, in_channels=1, num_classes=4).eval()
    assert eff(torch.zeros(1, 1, 32, 32)).shape == (1, 4)
    with pytest.raises(MedtlError, match="unknown network 'vit-huge'.*densenet121.*resnet10"):
        create_network("vit-huge")
    with pytest.raises(MedtlError, match="cannot build 'resnet10'"):
        create_network("resnet10", no_such_option=1)


# ---------------------------------------------------------------- layouts


def test_plain_state_dict(tmp_path, source):
    path = tmp_path / "plain.pth"
    torch.save(source.state_dict(), path)
    model = tiny()
    report = load_weights(model, path, strict=True)
    assert_exact(report, model)
    assert_same_weights(model, source)


@pytest.mark.parametrize("layout", ["state_dict", "model", "network", "lightning"])
def test_training_checkpoint_containers(tmp_path, source, layout):
    sd = source.state_dict()
    if layout == "lightning":
        obj = {
            "epoch": 3,
            "global_step": 30,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "optimizer_states": [],
            "lr_schedulers": [],
        }
    else:
        obj = {layout: sd, "epoch": 7, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}
    path = tmp_path / "ckpt.ckpt"
    torch.save(obj, path)
    assert list(read_checkpoint(path)) == list(obj["state_dict"] if layout == "lightning" else sd)
    model = tiny()
    assert_exact(load_weights(model, path, strict=True), model)
    assert_same_weights(model, source)


def test_dataparallel_prefix(tmp_path, source):
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": nn.DataParallel(source).state_dict()}, path)
    assert all(k.startswith("module.") for k in read_checkpoint(path))
    model = tiny()
    assert_exact(load_weights(model, path, strict=True), model)
    assert_same_weights(model, source)


def test_torchscript_file(tmp_path, source):
    path = tmp_path / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(source, torch.zeros(1, 1, 16, 16, 16)), path)
    with pytest.raises(MedtlError, match="TorchScript is a program .* refused without --trust"):
        load_weights(tiny(), path)
    model = tiny()
    assert_exact(load_weights(model, path, strict=True, trust=True), model)
    assert_same_weights(model, source)


def _bundle(root: Path, source: nn.Module, name: str = "model.pt") -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
    if name == "model.pt":
        torch.save(source.state_dict(), root / "models" / name)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(source, torch.zeros(1, 1, 16, 16, 16)), root / "models" / name)
    return root


@pytest.mark.parametrize("name", ["model.pt", "model.ts"])
def test_monai_bundle_folder_and_zip(tmp_path, source, name):
    bundle = _bundle(tmp_path / "tumor_cls", source, name)
    trust = name == "model.ts"  # TorchScript alone is a program: read only with trust
    model = tiny()
    assert_exact(load_weights(model, bundle, strict=True, trust=trust), model)
    assert_same_weights(model, source)
    archive = Path(shutil.make_archive(str(tmp_path / "tumor_cls"), "zip", tmp_path, "tumor_cls"))
    assert any(n.endswith(f"tumor_cls/models/{name}") for n in zipfile.ZipFile(archive).namelist())
    if trust:
        with pytest.raises(MedtlError, match="refused without --trust"):
            load_weights(tiny(), archive)
    model = tiny()
    assert_exact(load_weights(model, archive, strict=True, trust=trust), model)
    assert_same_weights(model, source)


def test_bundle_folder_without_weights_is_a_user_error(tmp_path):
    (tmp_path / "b" / "configs").mkdir(parents=True)
    with pytest.raises(MedtlError, match=r"b: folder holds no weights.*models/model.pt"):
        read_checkpoint(tmp_path / "b")
    with pytest.raises(MedtlError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pth")


def test_medicalnet_checkpoint_loads_backbone_and_reports_seg_head(tmp_path, source):
    """Med3D layout: {"state_dict": {"module.conv1.weight", ..., "module.conv_seg.*"}}, no fc."""
    backbone = {f"module.{k}": v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    seg = {
        "module.conv_seg.0.weight": torch.randn(32, 128, 2, 2, 2),
        "module.conv_seg.1.weight": torch.ones(32),
        "module.conv_seg.4.weight": torch.randn(2, 32, 1, 1, 1),
    }
    path = tmp_path / "resnet_10_23dataset.pth"
    torch.save({"state_dict": {**backbone, **seg}}, path)
    model = tiny()
    report = load_weights(model, path)
    assert report.loaded == [k for k in model.state_dict() if not k.startswith("fc.")]
    assert report.missing == ["fc.weight", "fc.bias"]
    assert report.unexpected == ["conv_seg.0.weight", "conv_seg.1.weight", "conv_seg.4.weight"]
    assert report.mismatched == [] and report.adapted == []
    assert "conv_seg.0.weight" in report.summary() and "fc.weight" in report.summary()
    sd, ref = model.state_dict(), source.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in report.loaded)
    assert not torch.equal(sd["fc.weight"], ref["fc.weight"])  # kept its own initialisation
    with pytest.raises(MedtlError, match="conv_seg"):
        load_weights(tiny(), path, strict=True)


def _medicalnet_checkpoint(path: Path, depth: int) -> dict[str, torch.Tensor]:
    """``resnet_{depth}.pth`` as MedicalNet ships it, at its full width: a MONAI ResNet with MedicalNet's
    shortcut (A: no downsample convolutions at 18/34; B: convolutions without bias otherwise), names
    under DataParallel's ``module.``, its segmentation head ``conv_seg`` and no classifier, under
    ``state_dict``. Returns the backbone tensors by model name."""
    basic = depth in (18, 34)
    torch.manual_seed(depth)
    net = getattr(nets, f"resnet{depth}")(
        spatial_dims=3, n_input_channels=1, shortcut_type="A" if basic else "B", bias_downsample=basic
    )
    seg = nn.Sequential(  # MedicalNet's conv_seg for 2 segmentation classes
        nn.ConvTranspose3d(net.fc.in_features, 32, 2, stride=2),
        nn.BatchNorm3d(32),
        nn.ReLU(inplace=True),
        nn.Conv3d(32, 32, 3, padding=1, bias=False),
        nn.BatchNorm3d(32),
        nn.ReLU(inplace=True),
        nn.Conv3d(32, 2, 1, bias=False),
    )
    backbone = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    state = {f"module.{k}": v for k, v in backbone.items()}
    state.update({f"module.conv_seg.{k}": v for k, v in seg.state_dict().items()})
    torch.save({"state_dict": state}, path)
    return backbone


@pytest.mark.parametrize("depth", [10, 18, 50])
def test_medicalnet_checkpoints_of_every_shortcut_layout_load_whole_backbones(tmp_path, depth):
    path = tmp_path / f"resnet_{depth}.pth"
    backbone = _medicalnet_checkpoint(path, depth)
    assert not any(".downsample." in k for k in backbone) == (depth == 18)  # shortcut A has no tensors

    report = inspect_checkpoint(path, arch=f"resnet{depth}")

    assert report.loaded == list(backbone) and report.missing == ["fc.weight", "fc.bias"]
    assert not report.mismatched and not report.adapted
    assert report.unexpected and all(k.startswith("conv_seg.") for k in report.unexpected)
    shortcut = "A, bias_downsample=True" if depth == 18 else "B, bias_downsample=False"
    assert report.notes == [
        f"resnet{depth} built with medicalnet=True (MedicalNet's shortcut type {shortcut}) "
        "as the checkpoint's tensors imply"
    ]

    state = read_checkpoint(path)
    model = create_network(f"resnet{depth}", **network_options_for(f"resnet{depth}", state))
    report = load_weights(model, state)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in backbone.items())
    if depth == 18:  # what the weights were trained with stays: the report of an explicit layout
        wrong = inspect_checkpoint(path, arch="resnet18", network_kwargs={"shortcut_type": "B"})
        assert any(".downsample." in k for k in wrong.missing) and not wrong.notes


# ---------------------------------------------------------------- matching


def test_match_keys_rules():
    model_keys = ["conv1.weight", "model.head.weight", "backbone.fc.bias"]
    mapping = match_keys(["module.model.conv1.weight", "model.head.weight", "net.fc.bias"], model_keys, add_prefix="")
    # model.head.weight is a model name as is, so its "model." is not stripped
    assert mapping == {
        "module.model.conv1.weight": "conv1.weight",
        "model.head.weight": "model.head.weight",
        "net.fc.bias": "fc.bias",
    }
    assert match_keys(["fc.bias"], model_keys, add_prefix="backbone.") == {"fc.bias": "backbone.fc.bias"}
    assert match_keys(["module.conv1.weight"], model_keys, strip_prefixes=()) == {
        "module.conv1.weight": "module.conv1.weight"
    }
    ordered = match_keys(["a.x"], [], key_map={r"^a\.": "b.", r"^b\.": "c."})
    assert ordered == {"a.x": "c.x"}  # applied in order, each on the previous result


def test_unmatched_names_stay_in_the_models_namespace():
    """MONAI UNet's own top-level module is ``model``: a decoder tensor it does not hold keeps that
    name instead of losing it as if it were a wrapper prefix."""
    model_keys = ["model.0.conv.weight", "fc.weight"]
    mapping = match_keys(["model.2.0.conv.weight", "module.model.2.1.weight", "net.head.bias"], model_keys)
    assert mapping == {
        "model.2.0.conv.weight": "model.2.0.conv.weight",
        "module.model.2.1.weight": "model.2.1.weight",
        "net.head.bias": "head.bias",
    }


def test_layout_rules_only_turn_names_into_model_names():
    model_keys = ["swinViT.patch_embed.proj.weight", "fc.weight"]
    rules = [(r"^(patch_embed|layers\dc?)\.", r"swinViT.\1.")]
    mapping = match_keys(
        ["module.patch_embed.proj.weight", "module.layers9.0.x", "swinViT.patch_embed.proj.weight"],
        model_keys,
        layout_rules=rules,
    )
    assert mapping == {
        "module.patch_embed.proj.weight": "swinViT.patch_embed.proj.weight",
        "module.layers9.0.x": "layers9.0.x",  # no such model tensor: reported under its own name
        "swinViT.patch_embed.proj.weight": "swinViT.patch_embed.proj.weight",
    }


def test_regex_key_map(tmp_path, source):
    renamed = {k.replace("layer", "stage").replace("fc.", "classifier."): v for k, v in source.state_dict().items()}
    path = tmp_path / "renamed.pth"
    torch.save({"model": renamed}, path)
    report = load_weights(tiny(), path)
    assert report.missing and all(k.startswith(("layer", "fc.")) for k in report.missing)
    assert sorted(report.unexpected) == sorted(k for k in renamed if k.startswith(("stage", "classifier.")))
    model = tiny()
    report = load_weights(model, path, strict=True, key_map={r"^stage(\d)\.": r"layer\1.", r"^classifier\.": "fc."})
    assert_exact(report, model)
    assert_same_weights(model, source)


def test_report_lists_are_exact_and_disjoint(source):
    sd = dict(source.state_dict())
    del sd["layer4.0.bn2.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["fc.weight"] = torch.zeros(5, 128)  # another class count: reported, never adapted
    sd["fc.bias"] = torch.zeros(5)
    sd["layer1.0.conv1.weight"] = torch.zeros(16, 8, 3, 3, 3)  # not the input conv: no channel adaptation
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_weights(model, sd)
    names = list(model.state_dict())
    bad = {"layer4.0.bn2.bias", "fc.weight", "fc.bias", "layer1.0.conv1.weight"}
    assert report.loaded == [k for k in names if k not in bad]
    assert report.missing == ["layer4.0.bn2.bias"]
    assert report.unexpected == ["extra.weight"]
    assert [(m.name, m.checkpoint_shape, m.model_shape) for m in report.mismatched] == [
        ("layer1.0.conv1.weight", (16, 8, 3, 3, 3), (16, 16, 3, 3, 3)),
        ("fc.weight", (5, 128), (2, 128)),
        ("fc.bias", (5,), (2,)),
    ]
    assert report.adapted == []
    d = report.to_dict()
    assert list(d) == ["loaded", "missing", "unexpected", "mismatched", "adapted", "notes"]
    assert d["mismatched"] == ["layer1.0.conv1.weight", "fc.weight", "fc.bias"]
    json.dumps(d)
    after = model.state_dict()
    for k in bad:
        assert torch.equal(after[k], before[k]), k  # kept initialisation
    text = report.summary()
    assert (
        f"Loaded {len(names) - 4} of {len(names)} ResNet tensors" in text
        and "fc.weight (checkpoint [5, 128] vs model [2, 128])" in text
    )


def test_strict_raises_with_report_before_touching_model(source):
    sd = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MedtlError) as exc:
        load_weights(model, sd, strict=True)
    assert "2 missing (kept initialisation): fc.weight, fc.bias" in str(exc.value)
    assert "Missing key(s)" not in str(exc.value)  # not PyTorch's raw error
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_other_architecture_loads_nothing_and_strict_refuses(tmp_path):
    densenet = create_network("densenet121", spatial_dims=2, in_channels=1, num_classes=2)
    path = tmp_path / "densenet121.pth"
    torch.save(densenet.state_dict(), path)
    model = tiny()
    report = load_weights(model, path)
    assert report.loaded == [] and report.missing == list(model.state_dict())
    assert len(report.unexpected) == len(densenet.state_dict())
    n = len(model.state_dict())
    assert report.summary().startswith(f"Loaded 0 of {n} ResNet tensors")
    with pytest.raises(MedtlError, match=f"do not match ResNet exactly: Loaded 0 of {n}"):
        load_weights(tiny(), path, strict=True)


# ---------------------------------------------------------------- adaptation


def test_rgb_to_gray_sums_channels_and_keeps_outputs(source):
    rgb = tiny(in_channels=3, seed=2)
    gray = tiny(in_channels=1)
    report = load_weights(gray, rgb.state_dict(), strict=True)
    assert [(a.name, a.how) for a in report.adapted] == [("conv1.weight", "input channels 3->1: summed over channels")]
    assert torch.allclose(gray.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(gray.conv1(x), rgb.conv1(x.repeat(1, 3, 1, 1, 1)), atol=1e-5)
        assert torch.allclose(gray(x), rgb(x.repeat(1, 3, 1, 1, 1)), atol=1e-5)


def test_gray_to_multichannel_repeats_and_scales(source):
    three = tiny(in_channels=3)
    report = load_weights(three, source.state_dict())
    assert [(a.name, a.how) for a in report.adapted] == [
        ("conv1.weight", "input channels 1->3: repeated, scaled by 1/3")
    ]
    assert torch.allclose(three.conv1.weight, source.conv1.weight.repeat(1, 3, 1, 1, 1) / 3)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(three(x.repeat(1, 3, 1, 1, 1)), source(x), atol=1e-5)
    # other C -> N: cyclic repeat, scaled by C/N
    w = torch.randn(4, 2, 3, 3)
    new, how = adapt_input_conv(w, 5)
    assert how == "input channels 2->5: repeated cyclically, scaled by 2/5"
    assert torch.allclose(new, w[:, [0, 1, 0, 1, 0]] * 0.4)
    # without adapt the input conv is reported mismatched
    report = load_weights(tiny(in_channels=3), source.state_dict(), adapt=False)
    assert [m.name for m in report.mismatched] == ["conv1.weight"] and report.adapted == []


def test_2d_to_3d_inflation_reproduces_2d_output():
    torch.manual_seed(0)
    net2d = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
    net3d = nn.Sequential(nn.Conv3d(2, 4, 3, padding=(0, 1, 1)), nn.ReLU())
    report = load_weights(net3d, net2d.state_dict(), strict=True)
    assert [(a.name, a.how) for a in report.adapted] == [
        ("0.weight", "2D->3D: kernel inflated to depth 3, divided by 3")
    ]
    assert report.loaded == ["0.weight", "0.bias"]
    image = torch.randn(1, 2, 10, 12)
    volume = image.unsqueeze(2).repeat(1, 1, 7, 1, 1)  # constant along depth
    with torch.no_grad():
        out2d, out3d = net2d(image), net3d(volume)
    assert out3d.shape == (1, 4, 5, 10, 12)
    for d in range(out3d.shape[2]):
        assert torch.allclose(out3d[:, :, d], out2d, atol=1e-5)
    with pytest.raises(ValueError):
        inflate_conv_2d_to_3d(torch.zeros(4, 2, 3, 3, 3), 3)


def test_2d_network_into_3d_network_inflates_every_conv():
    net2d = tiny(spatial_dims=2, in_channels=3, seed=3)
    net3d = tiny()
    report = load_weights(net3d, net2d.state_dict(), strict=True)
    convs = [k for k, v in net3d.state_dict().items() if v.ndim == 5]
    assert [a.name for a in report.adapted] == convs
    assert (
        report.adapted[0].how
        == "2D->3D: kernel inflated to depth 7, divided by 7; input channels 3->1: summed over channels"
    )
    assert torch.allclose(
        net3d.layer1[0].conv1.weight, net2d.layer1[0].conv1.weight.unsqueeze(2).repeat(1, 1, 3, 1, 1) / 3
    )


# ---------------------------------------------------------------- safety


def test_pickled_code_refused_without_trust_and_loaded_with_it(tmp_path, source):
    path = tmp_path / "with_config.pth"
    torch.save({"state_dict": source.state_dict(), "config": PickledConfig(lr=0.01)}, path)
    with pytest.raises(MedtlError) as exc:
        read_checkpoint(path)
    message = str(exc.value)
    assert str(path) in message and "--trust" in message and "PickledConfig" in message
    model = tiny()
    with pytest.warns(UntrustedCheckpointWarning, match="trust=True"):
        report = load_weights(model, path, trust=True, strict=True)
    assert_exact(report, model)
    assert_same_weights(model, source)
    # a whole pickled module (torch.save(model)) also needs trust
    whole = tmp_path / "whole_model.pt"
    torch.save(source, whole)
    with pytest.raises(MedtlError, match="--trust"):
        read_checkpoint(whole)
    with pytest.warns(UntrustedCheckpointWarning):
        assert list(read_checkpoint(whole, trust=True)) == list(source.state_dict())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "legacy-truncated", "empty"])
def test_corrupted_file_names_it(tmp_path, source, damage):
    good = tmp_path / "good.pth"
    torch.save(source.state_dict(), good, _use_new_zipfile_serialization=damage != "legacy-truncated")
    data = good.read_bytes()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "legacy-truncated": data[: len(data) // 2],
            "garbage": b"\x00not a checkpoint" * 50,
            "empty": b"",
        }[damage]
    )
    with pytest.raises(MedtlError) as exc:
        load_weights(tiny(), bad)
    assert str(exc.value).startswith(f"{bad}: cannot read checkpoint")
    assert "--trust" not in str(exc.value)


def test_non_weights_content_is_a_user_error(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(MedtlError, match="holds a list, not weights"):
        read_checkpoint(path)
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 1, "note": "no weights here"}, path)
    with pytest.raises(MedtlError, match="holds no tensors.*epoch"):
        read_checkpoint(path)


# ---------------------------------------------------------------- inspect + CLI


def test_inspect_checkpoint_and_cli_json(tmp_path, capsys, source):
    path = tmp_path / "medicalnet.pth"
    ref = create_network("resnet10", num_classes=2).state_dict()
    part = {f"module.{k}": v for k, v in ref.items() if k.startswith("layer1.")}
    part["module.conv_seg.0.weight"] = torch.zeros(2, 8, 1, 1, 1)
    torch.save({"state_dict": part}, path)
    report = inspect_checkpoint(path, arch="resnet10")
    assert report.loaded == [k for k in ref if k.startswith("layer1.")] and report.unexpected == ["conv_seg.0.weight"]

    medicalnet18 = tmp_path / "resnet_18.pth"
    torch.save(
        {
            "state_dict": {
                f"module.{k}": v
                for k, v in create_network("resnet18", medicalnet=True, widen_factor=0.25).state_dict().items()
                if not k.startswith("fc.")
            }
        },
        medicalnet18,
    )
    exact = inspect_checkpoint(medicalnet18, arch="resnet18", network_kwargs={"widen_factor": 0.25})
    assert exact.missing == ["fc.weight", "fc.bias"] and not exact.unexpected and not exact.mismatched
    assert main(["weights", "inspect", str(medicalnet18), "--arch", "resnet18", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert notes and "MedicalNet's shortcut type A" in notes[0]

    assert main(["weights", "inspect", str(path), "--arch", "resnet10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["loaded", "missing", "unexpected", "mismatched", "adapted", "notes"]
    assert out == report.to_dict()

    assert main(["weights", "inspect", str(path), "--arch", "resnet10", "--num-classes", "3"]) == 0
    assert capsys.readouterr().out.startswith(f"Loaded {len(report.loaded)} of")

    assert main(["weights", "inspect", str(path), "--arch", "nonet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medtl: error: unknown network 'nonet'") and len(err.strip().splitlines()) == 1

    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": part, "config": PickledConfig(0.1)}, pickled)
    assert main(["weights", "inspect", str(pickled), "--arch", "resnet10"]) == 2
    assert "--trust" in capsys.readouterr().err
    with pytest.warns(UntrustedCheckpointWarning):
        assert main(["weights", "inspect", str(pickled), "--arch", "resnet10", "--trust", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unexpected"] == ["conv_seg.0.weight"]
