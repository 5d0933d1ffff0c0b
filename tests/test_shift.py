"""Domain-shift report: unbiased MMD and its permutation test, penultimate features, image statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medtl.adapt.shift import (
    extract_features,
    feature_shift,
    format_shift_report,
    median_bandwidth,
    mmd2,
    mmd_permutation_test,
    network_from_checkpoint,
    shift_report,
)
from medtl.cli import main
from medtl.errors import MedtlError
from medtl.manifest import build_manifest_file, load_manifest
from medtl.nifti import write_nifti
from medtl.volume import Volume


def test_mmd2_matches_the_unbiased_estimator_by_hand():
    x = np.array([[0.0, 1.0], [1.0, 0.5], [2.0, -1.0]])
    y = np.array([[0.5, 0.0], [3.0, 1.0]])

    def k(a, b, sigma):
        return math.exp(-sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True)) / (2 * sigma**2))

    def by_hand(sigma):
        m, n = len(x), len(y)
        xx = sum(k(x[i], x[j], sigma) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(k(y[i], y[j], sigma) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        xy = sum(k(x[i], y[j], sigma) for i in range(m) for j in range(n)) / (m * n)
        return xx + yy - 2 * xy

    assert mmd2(x, y, bandwidth=1.5) == pytest.approx(by_hand(1.5), rel=1e-12)
    pooled = [*x, *y]
    distances = sorted(math.dist(pooled[i], pooled[j]) for i in range(5) for j in range(i + 1, 5))
    median = (distances[4] + distances[5]) / 2  # 10 pairs
    assert median_bandwidth(np.concatenate([x, y])) == pytest.approx(median, rel=1e-12)
    assert mmd2(torch.as_tensor(x), y) == pytest.approx(by_hand(median), rel=1e-12)


def test_mmd_same_distribution_near_zero_shifted_clearly_positive():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.normal(size=(60, 5))
    same = mmd_permutation_test(x, y, n_permutations=200, seed=1)
    assert abs(same["mmd2"]) < 0.02 and same["p_value"] > 0.2
    shifted = mmd_permutation_test(x, y + 0.8, n_permutations=200, seed=1)
    assert shifted["mmd2"] > 0.1 and shifted["p_value"] == pytest.approx(1 / 201)
    assert mmd_permutation_test(x, y, n_permutations=200, seed=1) == same  # seeded
    with pytest.raises(MedtlError, match="same number of features"):
        mmd2(x, y[:, :3])
    with pytest.raises(MedtlError, match="at least 2 samples"):
        mmd2(x[:1], y)
    with pytest.raises(MedtlError, match="bandwidth"):
        mmd2(x, y, bandwidth=0.0)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 3, 3),
        nn.BatchNorm3d(3),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(3, 7),
        nn.ReLU(),
        nn.Linear(7, 2),
    )


def test_features_are_the_classifier_input():
    model = _net().train()
    images = torch.rand(5, 1, 6, 6, 6)
    feats = extract_features(model, [{"image": images[:3]}, images[3:]])
    assert feats.shape == (5, 7) and model.training  # mode restored
    model.eval()
    np.testing.assert_allclose(feats, model[:7](images).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not model[7]._forward_pre_hooks  # hook removed
    shift = feature_shift(model, [images[:3]], [images[3:] * 4], n_permutations=10)
    assert shift["layer"] == "7" and shift["feature_dim"] == 7 and (shift["n_source"], shift["n_target"]) == (3, 2)
    with pytest.raises(MedtlError, match="no features"):
        extract_features(model, [])


def _site(root: Path, name: str, spacing: tuple[float, float, float], n: int, offset: float, seed: int) -> Path:
    """n tiny CT volumes with a lesion mask each; the volume covers the same 20 mm whatever the spacing."""
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    shape = tuple(int(round(20 / s)) for s in spacing)
    lines = ["patient_id,label,image,mask"]
    for i in range(n):
        hu = rng.normal(-800 + offset, 30, size=shape).astype(np.float32)
        mask = np.zeros(shape, np.float32)
        centre = [s // 2 for s in shape]
        mask[centre[0] - 2 : centre[0] + 2, centre[1] - 2 : centre[1] + 2, centre[2] - 1 : centre[2] + 1] = 1
        hu[mask > 0] = 40 + offset
        write_nifti(Volume(hu, affine), root / name / f"img{i}.nii.gz")
        write_nifti(Volume(mask, affine), root / name / f"mask{i}.nii.gz")
        lines.append(f"{name}-p{i},{('benign', 'malignant')[i % 2]},img{i}.nii.gz,mask{i}.nii.gz")
    labels = root / name / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    out = root / "manifests" / f"{name}.json"
    build_manifest_file(labels=labels, classes=["benign", "malignant"], out=out, root=root, site=name, progress=False)
    return out


@pytest.fixture
def two_sites(tmp_path):
    root = tmp_path / "data"
    source = _site(root, "A", (1.0, 1.0, 1.0), 4, 0.0, seed=0)
    target = _site(root, "B", (1.0, 1.0, 2.5), 5, 150.0, seed=1)
    return root, source, target


def test_report_counts_spacing_and_broken_case(two_sites, tmp_path):
    root, source, target = two_sites
    broken = next(c for c in load_manifest(target)["cases"] if c["image"]["path"] == "B/img2.nii.gz")
    (root / "B" / "img2.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "reports" / "shift.json"
    report = shift_report(
        source, target, root, model={"source-only": _net()}, n_permutations=20, out=out, progress=False
    )
    src, tgt = report["source"], report["target"]
    assert (src["cases"], src["loaded"], src["sites"], src["labels"]) == (4, 4, {"A": 4}, {"benign": 2, "malignant": 2})
    assert (tgt["cases"], tgt["loaded"], tgt["sites"], tgt["labels"]) == (5, 4, {"B": 5}, {"benign": 3, "malignant": 2})
    assert src["spacing_mm"]["median"] == [1.0, 1.0, 1.0] and tgt["spacing_mm"]["median"] == pytest.approx(
        [1.0, 1.0, 2.5]
    )
    assert tgt["shape"] == {"min": [20, 20, 8], "max": [20, 20, 8]}
    # the planted 150 HU offset shows in the raw statistics, and the crop is in [0, 1] units
    assert tgt["image_intensity"]["p50"] - src["image_intensity"]["p50"] == pytest.approx(150, abs=10)
    assert (
        src["image_intensity"]["unit"] == "HU" and 0 <= src["crop_intensity"]["p1"] <= src["crop_intensity"]["p99"] <= 1
    )
    assert [s["case_id"] for s in tgt["skipped"]] == [broken["case_id"]] and src["skipped"] == []
    assert "not a readable NIfTI file" in tgt["skipped"][0]["reason"]
    shift = report["feature_shift"]["source-only"]
    assert (shift["n_source"], shift["n_target"], shift["feature_dim"]) == (4, 4, 7)
    text = out.read_text(encoding="utf-8")
    assert json.loads(text) == report
    assert str(tmp_path) not in text and "img2" not in text and "A-p0" not in text  # no paths, no patient ids
    table = format_shift_report(report)
    assert "1 x 1 x 2.5" in table and f"skipped target {broken['case_id']}" in table and "source-only" in table


def test_report_refuses_bad_input(two_sites):
    root, source, target = two_sites
    with pytest.raises(MedtlError, match="unknown split"):
        shift_report(source, target, root, splits=["training"], progress=False)
    with pytest.raises(MedtlError, match="no cases in split"):
        shift_report(source, target, root, splits=["unlabeled"], progress=False)


def test_checkpoint_must_fit_beyond_the_classifier(tmp_path):
    from medtl.networks import create_network

    ckpt = tmp_path / "net.pt"
    torch.save(create_network("resnet10", num_classes=3, widen_factor=0.25).state_dict(), ckpt)
    model = network_from_checkpoint(ckpt, arch="resnet10", widen_factor=0.25)  # 2-class head: mismatch allowed
    assert not model.training and model.fc.in_features == 128
    with pytest.raises(MedtlError, match="beyond its classifier"):
        network_from_checkpoint(ckpt, arch="resnet10", widen_factor=0.5)


def test_cli_writes_report_and_prints_table(two_sites, tmp_path, capsys):
    from medtl.networks import create_network

    root, source, target = two_sites
    ckpt = tmp_path / "net.pt"
    torch.save(create_network("resnet10", widen_factor=0.25).state_dict(), ckpt)
    out = tmp_path / "shift.json"
    args = [
        "-q",
        "shift",
        "--source",
        str(source),
        "--target",
        str(target),
        "--root",
        str(root),
        "--checkpoint",
        str(ckpt),
        "--arch",
        "resnet10",
        "--widen-factor",
        "0.25",
        "--split",
        "train",
        "val",
        "test",
        "--permutations",
        "20",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["splits"] == ["train", "val", "test"] and report["feature_shift"]["net.pt"]["feature_dim"] == 128
    assert "cases loaded / selected" in printed and "net.pt" in printed and str(out) in printed
    assert (
        main(
            [
                "-q",
                "shift",
                "--source",
                str(source),
                "--target",
                str(target),
                "--root",
                str(root),
                "--checkpoint",
                str(ckpt),
                "-o",
                str(out),
            ]
        )
        == 2
    )
    assert "--arch" in capsys.readouterr().err
