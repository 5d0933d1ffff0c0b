"""The 2D path: a MedMNIST-style .npz imported, preprocessed as (1, H, W) images, trained and
scored through the same recipe as volumes; the 3D defaults stay as they were."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.utils import set_determinism

from medtl.adapt.recipe import loader, preprocess_splits, train
from medtl.errors import MedtlError
from medtl.evaluate import collect_predictions
from medtl.importers import import_medmnist
from medtl.manifest import SPLITS, load_manifest
from medtl.networks import resnet
from medtl.nifti import write_nifti
from medtl.recipes import TrainRecipe
from medtl.stages import evaluate_items
from medtl.transforms import augmentation, preprocessing, train_transforms
from medtl.volume import Volume

CLASSES = ("plain", "square")


def _pattern_npz(path: Path, sizes=(24, 8, 8)) -> Path:
    """28x28 uint8 noise; class 1 carries a bright 8x8 square in the upper left, easy to learn."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(SPLITS, sizes, strict=True):
        labels = np.arange(n) % 2
        images = rng.integers(0, 100, size=(n, 28, 28)).astype(np.uint8)
        images[labels == 1, 2:10, 2:10] = 250
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("mnist2d")
    summary = import_medmnist(_pattern_npz(out / "squaresmnist.npz"), out / "imported", classes=CLASSES, progress=False)
    assert summary["preprocessing"]["spatial_dims"] == 2 and summary["preprocessing"]["spatial_size"] == [28, 28]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return preprocess_splits(
            load_manifest(out / "imported" / summary["manifest"]),
            out / "imported",
            SPLITS,
            preprocessing(**summary["preprocessing"]),
            progress=False,
        )


def test_imported_2d_images_arrive_channel_first_and_upright(items):
    image = next(i["image"] for i in items["train"] if i["label"] == 1)
    assert image.shape == (1, 28, 28) and image.affine.shape == (3, 3)
    # i runs along the columns, j up the rows: the square in the picture's upper left (rows 2..9)
    # sits at low i and high j
    bright = np.argwhere(np.asarray(image[0]) > 0.9)
    assert bright[:, 0].min() == 2 and bright[:, 0].max() == 9
    assert bright[:, 1].min() == 27 - 9 and bright[:, 1].max() == 27 - 2


def test_a_2d_resnet_learns_through_the_recipe(items):
    set_determinism(0)
    torch.manual_seed(0)
    network = resnet(0.25, len(CLASSES), spatial_dims=2, depth=18, small_input=True)
    fitted = train(
        network, items["train"], items["val"], TrainRecipe(epochs=2, batch_size=8, augment="light"), progress=False
    )
    assert len(fitted["val_auc"]) == 2
    _, probs, ids = collect_predictions(network, loader(items["test"], batch_size=4))
    assert probs.shape == (8, 2) and len(ids) == 8
    result = evaluate_items(network, items["test"], class_names=CLASSES)
    assert result["metrics"]["auc"]["value"] > 0.8  # the square is unmissable; chance is 0.5


def test_2d_augmentation_keeps_the_image_size(items):
    image = items["train"][0]["image"]
    for level in ("light", "strong"):
        out = augmentation(level=level, spatial_dims=2, spatial_size=(28, 28), seed=0)({"image": image.clone()})[
            "image"
        ]
        assert out.shape == (1, 28, 28)
    batch = next(iter(loader(items["train"], augment="strong", batch_size=4)))
    assert batch["image"].shape == (4, 1, 28, 28)


def test_2d_crop_around_a_mask(tmp_path):
    """A lesion mask places the crop in 2D as it does in 3D: through millimetres, (x, y)."""
    picture = np.zeros((40, 40, 1), np.float32)
    picture[28:32, 6:10] = 1000.0
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    case = {
        "image": str(write_nifti(Volume(picture, affine), tmp_path / "us.nii.gz")),
        "mask": str(
            write_nifti(Volume((picture > 0).astype(np.uint8), affine), tmp_path / "mask.nii.gz", dtype=np.uint8)
        ),
    }
    out = preprocessing(
        spatial_dims=2, ct_window=(0, 1000), target_spacing=(0.5, 0.5), crop_mm=(8, 8), spatial_size=(16, 16)
    )(case)
    assert out["image"].shape == (1, 16, 16) and set(out) == {"image"}
    bright = np.argwhere(np.asarray(out["image"][0]) > 0.5).mean(axis=0)
    np.testing.assert_allclose(bright, (7.5, 7.5), atol=0.6)  # the square sits in the middle of the crop


def test_2d_refuses_volumes_and_3d_sizes(tmp_path):
    path = write_nifti(Volume(np.zeros((8, 8, 4), np.float32), np.eye(4)), tmp_path / "ct.nii.gz")
    with pytest.raises(
        MedtlError, match=r"spatial_dims=2 reads single-slice images, but 'image' has shape \(8, 8, 4\)"
    ):
        preprocessing(spatial_dims=2)({"image": str(path)})
    with pytest.raises(MedtlError, match=r"spatial_size must be two positive integers \(x, y\)"):
        preprocessing(spatial_dims=2, spatial_size=(28, 28, 28))
    with pytest.raises(MedtlError, match="spatial_dims must be 2 .* or 3"):
        train_transforms(spatial_dims=1)
    with pytest.raises(MedtlError, match="depth 10 or 18"):
        resnet(1.0, depth=50)


def test_3d_defaults_are_unchanged():
    pre = preprocessing()
    names = [type(t).__name__ for t in pre.transforms]
    assert "_SingleSliced" not in names
    from monai.transforms import Orientationd, Spacingd

    orientation = next(t for t in pre.transforms if isinstance(t, Orientationd))
    spacing = next(t for t in pre.transforms if isinstance(t, Spacingd))  # medtl's subclass
    assert orientation.ornt_transform.axcodes == "RAS"
    assert tuple(spacing.spacing_transform.pixdim) == (1.0, 1.0, 1.0)
    crop, resize = pre.transforms[-3], pre.transforms[-2]
    assert crop.cropper.size_mm == (32.0, 32.0, 32.0) and crop.cropper.spatial_dims == 3
    assert tuple(resize.resizer.spatial_size) == (32, 32, 32) and resize.mode == ("trilinear",)
    net = resnet(0.25)
    assert net.conv1.kernel_size == (7, 7, 7) and net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2)
