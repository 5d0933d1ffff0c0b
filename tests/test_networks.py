"""One network registry: every architecture's declared first convolution and classifier exist where
they are declared, ``create_network`` builds exactly the ``network_def`` a bundle holds, and every
place medtl builds a ResNet (the registry, bundles, NVIDIA FLARE's server) builds the same one."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import ResNet
from torch import nn

from medtl.adapt.head import replace_head
from medtl.errors import MedtlError
from medtl.networks import (
    FAMILIES,
    classes_argument,
    create_network,
    family_of,
    find_classifier,
    first_conv,
    layer_patterns,
    list_networks,
    network_def,
    network_options_for,
    network_spec,
    resnet,
    resnet_config,
)
from medtl.weights import load_weights

REPO = Path(__file__).resolve().parents[1]
# one of each family, small: a 2D build is enough to check module paths
SAMPLES = {
    "resnet10": {"widen_factor": 0.25},
    "resnet50": {"widen_factor": 0.25},
    "densenet121": {},
    "efficientnet-b0": {},
}


@pytest.mark.parametrize("arch", SAMPLES)
def test_declared_modules_exist_and_are_what_they_claim(arch):
    model = create_network(arch, spatial_dims=2, in_channels=3, num_classes=4, **SAMPLES[arch])
    spec = network_spec(arch)
    modules = dict(model.named_modules())
    assert family_of(model) is spec.family
    stem = modules[spec.family.first_conv]
    assert isinstance(stem, nn.Conv2d) and stem.in_channels == 3
    assert first_conv(model) == spec.family.first_conv
    name, head = find_classifier(model)
    assert name == spec.family.classifier and head.out_features == 4
    patterns = layer_patterns(model)
    assert patterns is not None and list(patterns)[0] == "stem"


def test_every_registered_name_has_a_family():
    names = list_networks()
    assert {"resnet10", "resnet18", "densenet121", "efficientnet-b0"} <= set(names)
    assert {network_spec(name).family for name in names} == set(FAMILIES)
    with pytest.raises(MedtlError, match="unknown network 'vit'.*resnet10"):
        create_network("vit")


def test_a_new_head_with_a_hidden_layer_is_still_found():
    model = resnet(0.25, 2)
    replace_head(model, 3, hidden=8, dropout=0.1)
    name, head = find_classifier(model)
    assert name.startswith("fc.") and head.out_features == 3


def test_a_network_of_no_family_falls_back_to_first_conv_and_last_linear():
    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))
    assert family_of(model) is None and layer_patterns(model) is None
    assert first_conv(model) == "0" and find_classifier(model)[0] == "3"


def test_input_channels_are_adapted_at_the_declared_first_conv():
    """A 1-channel checkpoint into the 2-channel (image + lesion mask) network: the stem is adapted,
    nothing else changes shape."""
    source = resnet(0.25, 2).state_dict()
    report = load_weights(resnet(0.25, 2, in_channels=2), source)
    assert [a.name for a in report.adapted] == ["conv1.weight"] and not report.mismatched


def test_nvflare_server_builds_the_registrys_resnet():
    config = resnet_config(0.5, 3, in_channels=2)
    assert config["path"] == "monai.networks.nets.ResNet"
    built = ResNet(**config["args"]).state_dict()
    expected = resnet(0.5, 3, in_channels=2).state_dict()
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in expected.items()}


@pytest.mark.parametrize(
    "bundle", ["tumor_cls_source", "tumor_cls_finetune", "tumor_cls_distill", "lidc_nodule_malignancy"]
)
def test_bundle_network_def_is_the_registrys_resnet(bundle):
    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config(configs / "inference.json")
    parser.read_meta(configs / "metadata.json")
    network = parser.get_parsed_content("network_def")
    args = json.loads((configs / "inference.json").read_text(encoding="utf-8"))["network_def"]
    expected = resnet(args["widen_factor"], network.fc.out_features, in_channels=args["n_input_channels"])
    assert family_of(network) is family_of(expected)
    assert {k: v.shape for k, v in network.state_dict().items()} == {
        k: v.shape for k, v in expected.state_dict().items()
    }


# ---------------------------------------------------------------- network_def: one definition per architecture

REGISTERED = {
    *(f"resnet{d}" for d in (10, 18, 34, 50, 101, 152, 200)),
    *(f"densenet{d}" for d in (121, 169, 201)),
    *(f"efficientnet-b{b}" for b in range(8)),
    "segresnet-encoder",
    "unet-encoder",
    "monai-unet-encoder",
    "swinunetr-encoder",
}


def test_the_registry_holds_every_architecture_users_hold():
    assert set(list_networks()) == REGISTERED


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("arch", sorted(REGISTERED))
def test_create_network_builds_what_a_bundle_builds_from_network_def(arch, spatial_dims):
    """``create_network`` and MONAI's ConfigParser on ``network_def`` give the same tensors. Built on
    the meta device (no memory, no initialisation), except SwinUNETR, whose constructor reads values."""
    config = network_def(arch, spatial_dims=spatial_dims, in_channels=2, num_classes=3)
    assert json.loads(json.dumps(config)) == config  # plain JSON, as a bundle config holds it
    assert config.get("pretrained", False) is False
    assert config[classes_argument(config)] == 3
    device = contextlib.nullcontext() if arch == "swinunetr-encoder" else torch.device("meta")
    with device:
        built = create_network(arch, spatial_dims=spatial_dims, in_channels=2, num_classes=3)
        parsed = ConfigParser({"network_def": config}).get_parsed_content("network_def")
    assert type(built) is type(parsed) and family_of(built) is network_spec(arch).family
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in parsed.state_dict().items()}
    assert find_classifier(built)[1].out_features == 3
    stem = built.get_submodule(first_conv(built))
    assert stem.in_channels == 2 and stem.weight.ndim == spatial_dims + 2


def test_network_def_spells_each_constructors_arguments():
    assert network_def("resnet18", in_channels=2, medicalnet=True) == {
        "_target_": "monai.networks.nets.resnet18",
        "spatial_dims": 3,
        "n_input_channels": 2,
        "num_classes": 2,
        "shortcut_type": "A",
        "bias_downsample": True,
        "pretrained": False,
    }
    assert network_def("resnet50", medicalnet=True)["shortcut_type"] == "B"
    assert network_def("resnet50", medicalnet=True)["bias_downsample"] is False
    assert network_def("densenet201", num_classes=4)["out_channels"] == 4
    assert network_def("efficientnet-b7", spatial_dims=2)["model_name"] == "efficientnet-b7"
    assert network_def("segresnet-encoder", blocks_down=(1, 2))["blocks_down"] == [1, 2]  # tuples as JSON lists
    with pytest.raises(MedtlError, match="pretrained=True downloads"):
        network_def("resnet10", pretrained=True)
    with pytest.raises(MedtlError, match=r"options \['n_input_channels'\]: the registry sets them"):
        network_def("resnet10", n_input_channels=3)
    with pytest.raises(MedtlError, match="model_name"):
        network_def("efficientnet-b0", model_name="efficientnet-b7")
    with pytest.raises(MedtlError, match="option norm: a type cannot be written"):
        network_def("segresnet-encoder", norm=nn.BatchNorm3d)
    with pytest.raises(MedtlError, match="spatial_dims must be 2 or 3"):
        create_network("resnet10", spatial_dims=1)


def test_classes_argument_is_found_from_the_target():
    assert classes_argument(network_def("resnet10")) == "num_classes"
    assert classes_argument(network_def("densenet121")) == "out_channels"
    assert classes_argument(network_def("swinunetr-encoder")) == "num_classes"
    assert classes_argument({"_target_": "DenseNet169"}) == "out_channels"  # MONAI's short name
    assert classes_argument({"_target_": "monai.networks.nets.ResNet"}) == "num_classes"  # a MONAI class
    assert classes_argument({"_target_": "os.system"}) is None
    assert classes_argument({"_target_": "$print(1)"}) is None and classes_argument({}) is None


def _medicalnet_state(depth: int, **layout) -> dict:
    net = create_network(f"resnet{depth}", widen_factor=0.25, **layout)
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    return state | {"module.conv_seg.0.weight": torch.zeros(2, 8, 1, 1, 1)}


def test_medicalnet_layout_is_told_from_the_tensors():
    assert network_options_for("resnet18", _medicalnet_state(18, medicalnet=True)) == {"medicalnet": True}
    assert network_options_for("resnet10", _medicalnet_state(10, medicalnet=True)) == {"medicalnet": True}
    assert network_options_for("resnet18", _medicalnet_state(18)) == {}  # MONAI's own shortcut B with bias
    assert network_options_for("resnet10", _medicalnet_state(10)) == {}
    # a MedicalNet ResNet-18 is no ResNet-10: its shortcut A does not make resnet10 fit it
    assert network_options_for("resnet10", _medicalnet_state(18, medicalnet=True)) == {}
    assert network_options_for("resnet18", {"features.conv0.weight": torch.zeros(1)}) == {}
    assert network_options_for("densenet121", _medicalnet_state(18)) == {}
    # what a caller sets explicitly wins, also over an implied option that spells it another way
    state = _medicalnet_state(18, medicalnet=True)
    assert network_options_for("resnet18", state, given={"widen_factor": 0.25}) == {"medicalnet": True}
    assert network_options_for("resnet18", state, given={"shortcut_type": "B"}) == {}
    assert network_options_for("resnet18", state, given={"medicalnet": False}) == {}


def test_monai_unet_encoder_finds_its_first_convolution_inside_the_first_block():
    for units, stem in ((0, "model.0.conv"), (2, "model.0.conv.unit0.conv")):
        model = create_network("monai-unet-encoder", channels=(4, 8, 16), strides=(2, 2), num_res_units=units)
        assert first_conv(model) == stem
        assert list(layer_patterns(model)) == ["stem", "down1", "bottom"]
