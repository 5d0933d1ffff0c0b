"""One network registry: every architecture's declared first convolution and classifier exist where
they are declared, and every place medtl builds a ResNet (the registry, bundles, NVIDIA FLARE's
server) builds the same one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from monai.networks.nets import ResNet
from torch import nn

from medtl.adapt.head import replace_head
from medtl.errors import MedtlError
from medtl.networks import (
    FAMILIES,
    create_network,
    family_of,
    find_classifier,
    first_conv,
    layer_patterns,
    list_networks,
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
