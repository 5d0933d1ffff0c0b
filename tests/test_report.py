"""Run records, Grad-CAM and the HTML/Markdown report rendered from a tiny run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medtl.cli import main
from medtl.errors import MedtlError
from medtl.evaluate import classification_metrics, roc_auc_ovr
from medtl.explain import central_slices, gradcam, overlay, target_layer
from medtl.report import reliability_bins, render_report, roc_curve
from medtl.runlog import load_run, record_curve, record_explanations, record_features, record_intensities, run_folder

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["benign", "malignant"]


class BrightSpot(nn.Module):
    """Class 1's logit is the mean of a 1x1 convolution's (identity) output: its Grad-CAM is the image."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 1, 1, bias=False), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(1.0)
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _blob(shape=(12, 12, 12), at=(3, 8, 6)) -> torch.Tensor:
    image = torch.zeros(1, 1, *shape)
    image[0, 0, at[0], at[1], at[2]] = 1.0
    return image


def test_roc_curve_area_is_the_auc_and_ties_move_together():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) * 0.5 + y * 0.3, 1)  # many ties
    fpr, tpr = roc_curve(y == 1, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    probs = np.stack([1 - scores, scores], 1)
    assert trapezoid == pytest.approx(roc_auc_ovr(y, probs), abs=1e-12)
    assert len(fpr) == len(np.unique(scores)) + 1


def test_reliability_bins_count_every_case_once():
    y = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.95, 0.05], [0.4, 0.6], [0.3, 0.7], [0.45, 0.55], [0.05, 0.95]])
    bins = reliability_bins(y, probs, n_bins=10)
    assert sum(b[2] for b in bins) == 5
    top = [b for b in bins if b[0] > 0.9][0]
    assert top == (pytest.approx(0.95), 1.0, 2)  # both 0.95 cases are right
    assert (pytest.approx(0.575), 0.5, 2) in bins  # 0.6 (right) and 0.55 (wrong) share the right-closed bin (0.5, 0.6]


def test_gradcam_finds_the_evidence_and_leaves_the_model_alone():
    network = BrightSpot()
    network.features.requires_grad_(False)  # a frozen backbone must still be explainable
    network.train()
    maps = gradcam(network, _blob(), layer="features")
    assert maps.shape == (1, 12, 12, 12) and maps.min() == 0.0 and maps.max() == 1.0
    assert np.unravel_index(maps[0].argmax(), maps[0].shape) == (3, 8, 6)
    assert network.training and not network.features[0].weight.requires_grad
    assert not network.features[0]._forward_hooks and not network.features[0]._backward_hooks
    with pytest.raises(MedtlError, match="2 class indices for 1 images"):
        gradcam(network, _blob(), class_index=[0, 1])


def test_target_layer_prefers_a_block_whose_map_is_still_wide():
    from medtl.networks import resnet

    network = resnet(0.25)
    assert target_layer(network) == "layer4"
    assert target_layer(network, torch.zeros(1, 1, 32, 32, 32)) != "layer4"  # layer4 is 1 voxel wide there
    assert target_layer(network, torch.zeros(1, 1, 128, 128, 128)) == "layer4"
    with pytest.raises(MedtlError, match="no convolutional block"):
        target_layer(nn.Linear(3, 2))


def test_central_slices_are_in_radiological_orientation():
    volume = np.zeros((5, 7, 9))
    volume[4, 6, 4] = 1.0  # patient right-most, anterior-most, on the central axial slice
    axial = central_slices(volume)["axial"]
    assert axial.shape == (7, 5) and axial[0, 0] == 1.0  # top left of the screen: anterior, patient right
    volume[:] = 0
    volume[2, 3, 8] = 1.0  # superior-most, on the central coronal and sagittal planes
    planes = central_slices(volume)
    assert planes["coronal"][0, 2] == 1.0 and planes["sagittal"][0, 3] == 1.0
    assert set(central_slices(np.zeros((4, 4)))) == {"axial"}
    rgb = overlay(np.arange(16.0).reshape(4, 4), np.eye(4))
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    assert rgb[0, 1, 0] == rgb[0, 1, 1] == rgb[0, 1, 2]  # no heat: plain grey


def _items(n: int, seed: int, *, shift: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        label = i % 2
        image = rng.random((1, 16, 16, 16)).astype(np.float32) * 0.2 + shift
        image[0, 6:10, 6:10, 6:10] += 0.6 if label else 0.2
        items.append(
            {
                "image": torch.from_numpy(np.clip(image, 0, 1)),
                "label": label,
                "case_id": f"case_{seed}_{i:02d}",
                "patient": f"patient_{seed}_{i:02d}",
            }
        )
    return items


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder as medtl demo leaves it, from a tiny network on generated crops (a few seconds)."""
    from medtl.adapt.recipe import train
    from medtl.networks import resnet
    from medtl.recipes import TrainRecipe
    from medtl.stages import evaluate_items

    out = tmp_path_factory.mktemp("run")
    records = run_folder(out)
    torch.manual_seed(0)
    site_a, site_b = _items(12, 0), _items(12, 1, shift=0.15)
    network = resnet(0.125)
    fitted = train(network, site_a, site_a[:6], TrainRecipe(epochs=2, batch_size=4, patience=None), progress=False)
    for name, items in (("site A test", site_a), ("site B test", site_b)):
        evaluate_items(network, items, class_names=("benign", "malignant"), record=(records, "source-only", name))
    record_curve(records, "source-only", fitted)
    record_intensities(records, {"site A test": site_a, "site B test": site_b})
    record_features(records, "source-only", network, {"site A test": site_a, "site B test": site_b})
    record_explanations(records, "source-only on site B", network, site_b, CLASSES, per_group=2)
    (records / "run.json").write_text(
        json.dumps({"seed": 0, "manifests": {"demo_site_A": "ab" * 32}}), encoding="utf-8"
    )
    return out


def _valid_png(path: Path) -> tuple[int, int]:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)  # decodes every chunk: a truncated or corrupt file raises
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    return pixels.shape[:2]


def test_report_renders_every_figure_as_a_valid_png(tiny_run):
    written = render_report(tiny_run)
    names = sorted(p.name for p in written["figures"])
    assert names == sorted(
        [
            "roc.png",
            "confusion.png",
            "calibration.png",
            "learning_curves.png",
            "auc_by_set.png",
            "intensities.png",
            "features.png",
            "gradcam_source-only-on-site-b.png",
        ]
    )
    for path in written["figures"]:
        assert path.parent == tiny_run / "report" / "figures"
        _valid_png(path)
    page = written["html"].read_text(encoding="utf-8")
    assert page.count("src='data:image/png;base64,") == len(names)  # self-contained: every image inside the page
    assert not re.search(r"(src|href)=['\"](https?:|//)", page)  # no network resources
    markdown = written["markdown"].read_text(encoding="utf-8")
    for name in names:
        assert f"](figures/{name})" in markdown
    for text in (page, markdown):
        assert "source-only" in text and "site B test" in text and "AUC" in text
        assert str(tiny_run) not in text  # no absolute paths
    assert re.search(r"\| source-only \| site A test \| 12 \| \d\.\d{3}( \[\d\.\d\d, \d\.\d\d\])? \|", markdown)


def test_report_records_keep_cases_pseudonymous_and_in_run_order(tiny_run):
    run = load_run(run_folder(tiny_run))
    assert [(e["stage"], e["evaluated_on"]) for e in run["evaluations"]] == [
        ("source-only", "site A test"),
        ("source-only", "site B test"),
    ]
    cases = run["evaluations"][0]["cases"]
    assert len(cases) == 12 and all(set(c) == {"case_id", "label", "probs"} for c in cases)
    assert all(abs(sum(c["probs"]) - 1) < 1e-4 for c in cases)
    curve = run["curves"][0]
    assert [p["epoch"] for p in curve["train_loss"]] == [1, 2] and len(curve["val_auc"]) == 2
    explained = run["explanations"][0]
    assert {c["group"] for c in explained["cases"]} <= {"correct", "wrong"} and 1 <= len(explained["cases"]) <= 4
    assert explained["arrays"]["cam_0_axial"].max() <= 1.0


def test_metrics_in_the_report_are_the_evaluations_own(tiny_run):
    run = load_run(run_folder(tiny_run))
    for evaluation in run["evaluations"]:
        y = np.array([c["label"] for c in evaluation["cases"]])
        probs = np.array([c["probs"] for c in evaluation["cases"]])
        again = classification_metrics(y, probs, class_names=CLASSES, n_boot=0)
        assert again["metrics"]["auc"]["value"] == pytest.approx(evaluation["metrics"]["auc"]["value"], abs=1e-5)


def test_report_cli_and_its_errors(tiny_run, tmp_path, capsys):
    assert main(["report", str(tiny_run), "-o", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and (tmp_path / "r" / "report.html").is_file()
    assert main(["report", str(run_folder(tiny_run))]) == 0  # the run/ folder itself works too
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("medtl: error:") and "no evaluations" in error and "\n" not in error
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
