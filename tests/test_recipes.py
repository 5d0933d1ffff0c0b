"""One recipe definition: the dataclasses in ``medtl.recipes`` are the defaults of the command line
(generated from them), of the Python API and of every bundle's ``train.json`` knobs; and a source's
classes keep their meaning when ``medtl adapt`` loads it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from medtl.adapt.head import class_mapping
from medtl.bundle.components import load_source
from medtl.cli import build_parser
from medtl.errors import MedtlError
from medtl.networks import resnet
from medtl.options import recipe_from_args
from medtl.recipes import DistillRecipe, FederatedRecipe, FineTuneRecipe, TrainRecipe

REPO = Path(__file__).resolve().parents[1]
#: recipe field -> the knob's name in train.json, where the names differ
KNOB_NAMES = {"epochs": "max_epochs", "lr": "learning_rate", "l2sp": "l2sp_beta"}
#: fields a bundle's train.json has no knob for, and why
PYTHON_ONLY = {
    "selection": (
        "a bundle run selects its epoch on the val split (CheckpointSaver on the key metric), which is selection='val'"
    ),
    "folds": "k-fold selection runs in Python only",
    "keep_source": "k-fold selection runs in Python only",
    "adabn_judged": "the bundle applies AdaBN whenever adabn is on, which is adabn_judged=False",
    "wise": "the bundle keeps its best validation epoch; WiSE-FT averaging runs in Python only",
    "patience": "early stopping is a fine-tuning and distillation knob; plain training runs every epoch",
    "bf16": "bundles use CUDA AMP (amp) on GPUs; bfloat16 autocast on CPUs is a Python option",
}
BUNDLES = {"tumor_cls_source": TrainRecipe, "tumor_cls_finetune": FineTuneRecipe, "tumor_cls_distill": DistillRecipe}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_train_json_knob_is_the_recipes_default(bundle):
    recipe = BUNDLES[bundle]
    knobs = json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text(encoding="utf-8"))
    for field in dataclasses.fields(recipe):
        knob = KNOB_NAMES.get(field.name, field.name)
        if knob not in knobs:
            assert field.name in PYTHON_ONLY, (
                f"{bundle}/configs/train.json has no knob for {recipe.__name__}.{field.name}"
            )
            continue
        assert knobs[knob] == field.default, (
            f"{bundle}: {knob} is {knobs[knob]!r}, {recipe.__name__}.{field.name} is {field.default!r}"
        )
    if recipe is TrainRecipe:
        assert TrainRecipe.selection == "val"  # as the bundle selects
    if recipe is FineTuneRecipe:
        assert knobs["adabn"] is True and FineTuneRecipe.adabn_judged is False  # AdaBN decided the same way in both


def test_the_command_line_defaults_are_the_recipes():
    parser = build_parser()
    adapt = parser.parse_args(["adapt", "--source", "s", "--manifest", "m", "--root", "r"])
    assert recipe_from_args(FineTuneRecipe, adapt) == FineTuneRecipe()
    assert recipe_from_args(DistillRecipe, adapt, prefix="student_") == DistillRecipe()
    fl = parser.parse_args(["fl", "--source", "s", "--manifest", "m", "--root", "r"])
    assert recipe_from_args(FederatedRecipe, fl) == FederatedRecipe()


def test_command_line_options_set_every_kind_of_field():
    args = build_parser().parse_args(
        [
            "adapt",
            "--source",
            "s",
            "--manifest",
            "m",
            "--root",
            "r",
            "--lr",
            "3e-4",
            "--no-adabn",
            "--patience",
            "none",
            "--selection",
            "val",
            "--student-epochs",
            "7",
            "--class-map",
            "low=benign, high=malignant",
        ]
    )
    recipe = recipe_from_args(FineTuneRecipe, args)
    assert (recipe.lr, recipe.adabn, recipe.patience, recipe.selection) == (3e-4, False, None, "val")
    assert recipe_from_args(DistillRecipe, args, prefix="student_").epochs == 7
    assert args.class_map == {"low": "benign", "high": "malignant"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["adapt", "--source", "s", "--manifest", "m", "--root", "r", "--unfreeze", "sometimes"]
        )


# ----------------------------------------------------------------------------------- class meaning


def test_classes_are_matched_by_name_and_ambiguity_is_refused():
    assert class_mapping(["malignant", "benign"], ["benign", "malignant"]) == {
        "malignant": "malignant",
        "benign": "benign",
    }
    assert class_mapping(["benign", "malignant", "metastasis"], ["benign", "malignant"])["metastasis"] is None
    assert class_mapping(["a", "b", "c"], ["x", "y"]) == {"a": None, "b": None, "c": None}  # another task: a new head
    with pytest.raises(MedtlError, match="same count, no name in common") as refused:
        class_mapping(["0", "1"], ["benign", "malignant"])
    assert "--class-map" in refused.value.hint
    assert class_mapping(["0", "1"], ["benign", "malignant"], {"0": "benign", "1": "malignant"}) == {
        "0": "benign",
        "1": "malignant",
    }
    with pytest.raises(MedtlError, match="do not exist"):
        class_mapping(["0", "1"], ["benign", "malignant"], {"0": "cyst"})
    with pytest.raises(MedtlError, match="two target classes map to one"):
        class_mapping(["0", "1"], ["benign", "malignant"], {"0": "benign", "1": "benign"})


def _source_bundle(tmp_path: Path, network: torch.nn.Module, classes: list[str]) -> Path:
    """The two files load_source reads from a bundle: the weights and the class names."""
    root = tmp_path / "source_bundle"
    (root / "models").mkdir(parents=True)
    (root / "configs").mkdir()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    channel_def = {str(i): c for i, c in enumerate(classes)}
    (root / "configs" / "metadata.json").write_text(
        json.dumps({"network_data_format": {"outputs": {"pred": {"channel_def": channel_def}}}}), encoding="utf-8"
    )
    return root


def _logits(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network.eval()(x)


def test_a_source_with_the_classes_in_another_order_keeps_their_meaning(tmp_path):
    torch.manual_seed(0)
    source = resnet(0.125, 2)
    bundle = _source_bundle(tmp_path, source, ["benign", "malignant"])
    x = torch.rand(2, 1, 16, 16, 16)
    target = resnet(0.125, 2)
    report = load_source(target, bundle, target_classes=["malignant", "benign"])
    assert report["class_mapping"] == {"malignant": "malignant", "benign": "benign"}
    assert torch.allclose(_logits(target, x), _logits(source, x).flip(1), atol=1e-6)  # malignant is output 0 now
    same = resnet(0.125, 2)
    load_source(same, bundle, target_classes=["benign", "malignant"])
    assert torch.allclose(_logits(same, x), _logits(source, x), atol=1e-6)


def test_unnamed_targets_need_a_class_map_and_a_checkpoint_cannot_take_one(tmp_path):
    torch.manual_seed(0)
    source = resnet(0.125, 2)
    bundle = _source_bundle(tmp_path, source, ["benign", "malignant"])
    with pytest.raises(MedtlError, match="cannot tell how the target classes"):
        load_source(resnet(0.125, 2), bundle, target_classes=["0", "1"])
    mapped = resnet(0.125, 2)
    load_source(mapped, bundle, target_classes=["0", "1"], class_map={"0": "malignant", "1": "benign"})
    x = torch.rand(2, 1, 16, 16, 16)
    assert torch.allclose(_logits(mapped, x), _logits(source, x).flip(1), atol=1e-6)
    fresh = resnet(0.125, 2)
    before = fresh.fc.weight.detach().clone()
    assert load_source(fresh, bundle, target_classes=["0", "1"], class_map="new")["class_mapping"] == {
        "0": None,
        "1": None,
    }
    assert torch.equal(fresh.fc.weight, before) and torch.equal(fresh.conv1.weight, source.conv1.weight)
    plain = tmp_path / "weights.pt"
    torch.save(source.state_dict(), plain)
    assert load_source(resnet(0.125, 2), plain, target_classes=["0", "1"])["class_mapping"] is None  # no names to check
    with pytest.raises(MedtlError, match="names no classes"):
        load_source(resnet(0.125, 2), plain, target_classes=["0", "1"], class_map={"0": "benign"})


def test_a_source_bundles_metadata_without_class_names_is_no_names(tmp_path):
    from medtl.bundle.components.source import source_class_names

    bundle = _source_bundle(tmp_path, resnet(0.125, 2), ["benign", "malignant"])
    for meta in ([1, 2], {"network_data_format": ["odd"]}, {"network_data_format": {"outputs": {"pred": {}}}}):
        (bundle / "configs" / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
        assert source_class_names(bundle) is None
    (bundle / "configs" / "metadata.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(MedtlError, match="cannot read the source bundle's metadata"):
        source_class_names(bundle)


def test_a_zipped_source_bundle_names_its_classes(tmp_path):
    import shutil

    from medtl.bundle.components.source import source_class_names

    bundle = _source_bundle(tmp_path, resnet(0.125, 2), ["benign", "malignant"])
    archive = shutil.make_archive(str(tmp_path / "source"), "zip", root_dir=tmp_path, base_dir=bundle.name)
    assert source_class_names(archive) == ["benign", "malignant"]
