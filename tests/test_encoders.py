"""Segmentation networks as pretrained encoders: a SegResNet/BasicUNet/UNet/SwinUNETR checkpoint's
encoder tensors load by name into medtl.encoders, its decoder is reported, and head swap, freezing
and discriminative learning rates work on them as on the classification networks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet, SegResNet, SwinUNETR, UNet
from monai.networks.utils import convert_to_torchscript
from torch import nn

from medtl.adapt.head import replace_head
from medtl.adapt.schedule import layer_groups, param_groups
from medtl.cli import main
from medtl.encoders import SwinUNETREncoder
from medtl.errors import MedtlError
from medtl.networks import create_network, family_of, find_classifier, first_conv, network_options_for
from medtl.weights import load_weights

SIZE = 32  # input edge: tiny volumes, every encoder downsamples it 16-32 times


def _segmentation(name: str, spatial_dims: int = 3, in_channels: int = 1) -> tuple[nn.Module, str, dict]:
    """A tiny segmentation network with random weights, the registered encoder name for it and the
    size arguments both take."""
    torch.manual_seed(7)
    if name == "segresnet":
        sizes = {"init_filters": 8, "blocks_down": [1, 2, 2]}
        return SegResNet(spatial_dims, in_channels=in_channels, out_channels=3, **sizes), "segresnet-encoder", sizes
    if name == "basicunet":
        sizes = {"features": [4, 4, 8, 8, 16, 4]}
        return BasicUNet(spatial_dims, in_channels, 3, **sizes), "unet-encoder", sizes
    if name == "unet":
        sizes = {"channels": [4, 8, 16, 32], "strides": [2, 2, 2], "num_res_units": 2}
        return UNet(spatial_dims, in_channels, 3, **sizes), "monai-unet-encoder", sizes
    sizes = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}
    return SwinUNETR(in_channels, 3, spatial_dims=spatial_dims, **sizes), "swinunetr-encoder", sizes


SEGMENTATION = ["segresnet", "basicunet", "unet", "swinunetr"]
# what of each segmentation network is its encoder (the rest is decoder)
ENCODER_PREFIXES = {
    "segresnet": ("convInit.", "down_layers."),
    "basicunet": ("conv_0.", "down_1.", "down_2.", "down_3.", "down_4."),
    "swinunetr": ("swinViT.",),
}


def _is_encoder(name: str, key: str) -> bool:
    if name == "unet":  # every level's up path is index 2 of its Sequential
        return ".2." not in f".{key.removeprefix('model.')}"
    return key.startswith(ENCODER_PREFIXES[name])


@pytest.mark.parametrize("name", SEGMENTATION)
def test_a_segmentation_checkpoint_fills_the_encoder_and_its_decoder_is_unexpected(tmp_path, name):
    seg, arch, sizes = _segmentation(name)
    state = seg.state_dict()
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    torch.manual_seed(0)
    model = create_network(arch, num_classes=3, **sizes)

    report = load_weights(model, path)

    body = [k for k in model.state_dict() if not k.startswith("fc.")]
    assert report.loaded == body and report.missing == ["fc.weight", "fc.bias"]
    assert not report.mismatched and not report.adapted
    assert report.unexpected == [k for k in state if not _is_encoder(name, k)]
    assert report.unexpected  # the decoder is there, and reported
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in body)
    out = model.eval()(torch.randn(2, 1, SIZE, SIZE, SIZE))
    assert out.shape == (2, 3)


@pytest.mark.parametrize("name", ["segresnet", "basicunet", "swinunetr"])
def test_an_encoders_sizes_are_read_from_the_checkpoint(name):
    seg, arch, sizes = _segmentation(name)
    options = network_options_for(arch, {f"module.{k}": v for k, v in seg.state_dict().items()})
    assert {k: options[k] for k in sizes} == sizes
    model = create_network(arch, **options)
    report = load_weights(model, seg.state_dict())
    assert report.missing == ["fc.weight", "fc.bias"] and not report.mismatched


def _swinvit_ssl(prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """MONAI's self-supervised ``model_swinvit.pt`` layout: the bare Swin-ViT under ``state_dict``,
    DataParallel's ``module.`` in front (``module.patch_embed.proj.weight``, ``module.layers1.0...``),
    with the pre-training heads beside it."""
    seg, _, _ = _segmentation("swinunetr")
    state = {f"{prefix}{k}": v for k, v in seg.swinViT.state_dict().items()}
    state["module.rotation_head.weight"] = torch.randn(4, 192)
    return {"state_dict": state}


@pytest.mark.parametrize("prefix", ["module.", "module.swin_vit.", "swinViT."])
def test_monai_self_supervised_swinvit_loads_into_the_swinunetr_encoder(tmp_path, prefix):
    checkpoint = _swinvit_ssl(prefix)
    path = tmp_path / "model_swinvit.pt"
    torch.save(checkpoint, path)
    seg, arch, sizes = _segmentation("swinunetr")
    model = create_network(arch, num_classes=2, **sizes)

    report = load_weights(model, path)

    assert report.missing == ["fc.weight", "fc.bias"] and not report.mismatched
    assert report.unexpected == ["rotation_head.weight"]
    assert report.loaded == [k for k in model.state_dict() if k.startswith("swinViT.")]
    reference, loaded = seg.swinViT.state_dict(), model.state_dict()
    assert all(torch.equal(loaded[k], reference[k.removeprefix("swinViT.")]) for k in report.loaded)


def test_swinvit_weights_for_another_feature_size_are_mismatched_not_silently_renamed():
    state = _swinvit_ssl("module.")["state_dict"]
    report = load_weights(SwinUNETREncoder(feature_size=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)), state)
    assert "swinViT.patch_embed.proj.weight" in [m.name for m in report.mismatched]


@pytest.mark.parametrize("name", SEGMENTATION)
def test_head_swap_freezing_groups_and_input_channels_work_on_every_encoder(name):
    seg, arch, sizes = _segmentation(name)
    model = create_network(arch, in_channels=2, num_classes=2, **sizes)
    family = family_of(model)
    assert family is not None and find_classifier(model)[0] == family.classifier == "fc"
    stem = model.get_submodule(first_conv(model))
    assert isinstance(stem, nn.Conv3d) and stem.in_channels == 2

    report = load_weights(model, seg.state_dict())  # a 1-channel checkpoint into the 2-channel (CT + mask) encoder
    assert [a.name for a in report.adapted] == [f"{first_conv(model)}.weight"]

    replace_head(model, 4, hidden=8)
    assert find_classifier(model)[1].out_features == 4
    groups = layer_groups(model)
    assert groups[0].name == "stem" and groups[-1].name == "head" and len(groups) >= 4
    params = [p for g in param_groups(model, lr=1e-3, lr_decay=0.5) for p in g["params"]]
    assert len(params) == len(list(model.parameters())) == len({id(p) for p in params})


@pytest.mark.parametrize("name", SEGMENTATION)
def test_every_encoder_runs_in_2d(name):
    seg, arch, sizes = _segmentation(name, spatial_dims=2)
    model = create_network(arch, spatial_dims=2, num_classes=3, **sizes)
    report = load_weights(model, seg.state_dict())
    assert report.missing == ["fc.weight", "fc.bias"] and not report.mismatched
    assert model.eval()(torch.randn(1, 1, SIZE, SIZE)).shape == (1, 3)


@pytest.mark.parametrize("name", ["segresnet", "basicunet", "unet"])
def test_cnn_encoders_script_to_torchscript_for_bundles(name):
    _, arch, sizes = _segmentation(name)
    model = create_network(arch, **sizes).eval()
    x = torch.randn(1, 1, SIZE, SIZE, SIZE)
    assert torch.allclose(convert_to_torchscript(model)(x), model(x), atol=1e-5)


def test_weights_inspect_reads_a_segresnet_checkpoint_into_its_encoder(tmp_path, capsys):
    seg, _, _ = _segmentation("segresnet")
    path = tmp_path / "segresnet.pt"
    torch.save({"state_dict": seg.state_dict()}, path)
    assert main(["weights", "inspect", str(path), "--arch", "segresnet-encoder"]) == 0
    out = capsys.readouterr().out
    assert "2 missing" in out and "unexpected checkpoint tensors ignored: up_layers" in out
    assert "init_filters=8, blocks_down=[1, 2, 2]" in out


def test_bad_encoder_sizes_are_a_user_error():
    with pytest.raises(MedtlError, match="cannot build 'swinunetr-encoder'.*feature_size"):
        create_network("swinunetr-encoder", feature_size=20)
