"""Exporting a trained network as a bundle: metadata from the evaluation, TorchScript and ONNX parity,
atomic replace."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from monai.networks.nets import resnet10

from medtl.bundle.export import export_bundle
from medtl.errors import MedtlError
from medtl.evaluate import classification_metrics

SCHEMA = Path(__file__).resolve().parents[1] / "medtl" / "schemas" / "meta_schema_20240725.json"


def test_export_writes_a_valid_bundle_with_checked_exports(tmp_path):
    torch.manual_seed(0)
    net = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.5)
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20)
    metrics = {
        "site B test": classification_metrics(
            rng.integers(0, 2, 20), np.stack([1 - p, p], 1), class_names=["benign", "malignant"], n_boot=50
        )
    }
    dest = tmp_path / "bundles" / "tumor_cls_finetune"
    info = export_bundle(net, dest, template="tumor_cls_finetune", metrics=metrics, changelog="adapted in a test")
    assert info["torchscript_max_abs_diff"] < 1e-4 and info["onnx_max_abs_diff"] < 1e-4
    meta = json.loads((dest / "configs" / "metadata.json").read_text(encoding="utf-8"))
    jsonschema.validate(meta, json.loads(SCHEMA.read_text(encoding="utf-8")))
    assert meta["eval_metrics"]["site_B_test_n"] == 20
    assert meta["eval_metrics"]["site_B_test_auc"] == pytest.approx(
        metrics["site B test"]["metrics"]["auc"]["value"], abs=1e-4
    )
    assert (
        meta["changelog"][meta["version"]] == "adapted in a test"
        and meta["pytorch_version"] == torch.__version__.split("+")[0]
    )
    state = torch.load(dest / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert {f.name for f in (dest / "models").iterdir()} == {"model.pt", "model.ts", "model.onnx"}
    assert (dest / "docs" / "README.md").is_file() and (dest / "LICENSE").is_file()

    # a network the template cannot hold is refused, and the bundle already there stays as it was
    before = (dest / "models" / "model.pt").read_bytes()
    with pytest.raises(MedtlError, match="do not fit"):
        export_bundle(
            resnet10(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.25),
            dest,
            template="tumor_cls_finetune",
        )
    assert (dest / "models" / "model.pt").read_bytes() == before
    assert [p.name for p in dest.parent.iterdir()] == ["tumor_cls_finetune"]  # no temporary folders left

    with pytest.raises(MedtlError, match="template 'nope' not found"):
        export_bundle(net, tmp_path / "x", template="nope")
