"""Transform presets: intensity, resampling, the lesion-centred crop, augmentation levels, bundle use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, RandomizableTrait, Spacingd

from medtl.errors import MedtlError
from medtl.nifti import write_nifti
from medtl.transforms import (
    CropAroundLesion,
    CropAroundLesiond,
    augmentation,
    eval_transforms,
    mask_center_mm,
    preprocessing,
    train_transforms,
)
from medtl.volume import Volume

SMALL = {"spatial_size": (16, 16, 16), "crop_mm": (16, 16, 16)}  # 1 mm spacing: crop needs no resize


def _affine(spacing, origin=(-20.0, 10.0, 30.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _lung_with_nodule(shape, spacing, center_vox, radius_mm=3.0):
    """Lung background (-850 HU) with a 40 HU ball; returns HU, the ball's mask and the affine."""
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), axis=-1).astype(float)
    dist = np.linalg.norm((grid - np.asarray(center_vox, dtype=float)) * np.asarray(spacing), axis=-1)
    ball = dist <= radius_mm
    return np.where(ball, 40.0, -850.0).astype(np.float32), ball, _affine(spacing)


def _case(tmp_path: Path, shape=(48, 48, 48), spacing=(1.0, 1.0, 1.0), center_vox=(12, 32, 20), *, mask=True):
    hu, ball, affine = _lung_with_nodule(shape, spacing, center_vox)
    case = {"image": str(write_nifti(Volume(hu, affine), tmp_path / "ct.nii.gz")), "label": 1}
    if mask:
        case["mask"] = str(write_nifti(Volume(ball.astype(np.uint8), affine), tmp_path / "mask.nii.gz", dtype=np.uint8))
    world = (affine @ np.append(np.asarray(center_vox, dtype=float), 1.0))[:3]
    return case, world


def _bright_center(image: torch.Tensor) -> np.ndarray:
    return np.argwhere(image[0].numpy() > 0.5).mean(axis=0)


def test_ct_output_shape_dtype_range_and_label(tmp_path):
    case, _ = _case(tmp_path)
    out = eval_transforms(modality="ct")(case)
    assert out["image"].shape == (1, 32, 32, 32)
    assert out["image"].dtype == torch.float32
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert out["label"] == 1
    assert set(out) == {"image", "label"}  # mask and ROI entries are dropped so cases batch together


def test_ct_window_is_configurable(tmp_path):
    case, _ = _case(tmp_path)
    out = preprocessing(modality="ct", ct_window=(-900, 100), **SMALL)(case)["image"]
    assert float(out.min()) == pytest.approx(50 / 1000, abs=1e-4)  # -850 HU in a -900..100 window
    assert float(out.max()) == pytest.approx(940 / 1000, abs=1e-4)


def test_mr_z_scores_nonzero_voxels(tmp_path):
    rng = np.random.default_rng(0)
    t1 = rng.normal(300.0, 40.0, size=(16, 16, 16)).astype(np.float32)
    t1[:4] = 0.0  # background outside the body
    path = write_nifti(Volume(t1, _affine((1.0, 1.0, 1.0))), tmp_path / "t1.nii.gz")
    out = eval_transforms(modality="mr", **SMALL)({"image": str(path), "label": 0})["image"]
    assert out.shape == (1, 16, 16, 16) and out.dtype == torch.float32
    body = out[0, 4:]
    assert float(body.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(body.std()) == pytest.approx(1.0, abs=1e-2)
    assert torch.all(out[0, :4] == 0)


def test_crop_is_centred_on_mask_centre_of_mass(tmp_path):
    case, _ = _case(tmp_path, center_vox=(12, 32, 20))
    out = preprocessing(**SMALL)(case)["image"]
    np.testing.assert_allclose(_bright_center(out), [7.5] * 3, atol=0.6)


def test_mask_on_another_grid_is_placed_through_millimetres(tmp_path):
    case, world = _case(tmp_path, center_vox=(12, 32, 20), mask=False)
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = world - 2.0 * np.array([3, 4, 5])  # the ball's centre at voxel (3, 4, 5) of a 2 mm grid
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:5, 3:6, 4:7] = 1
    case["mask"] = str(write_nifti(Volume(mask, coarse), tmp_path / "coarse.nii.gz", dtype=np.uint8))
    out = preprocessing(**SMALL)(case)["image"]
    np.testing.assert_allclose(_bright_center(out), [7.5] * 3, atol=0.6)


def test_crop_uses_roi_center_mm_without_mask(tmp_path):
    case, world = _case(tmp_path, center_vox=(34, 14, 28), mask=False)
    out = preprocessing(**SMALL)({**case, "roi_center_mm": world.tolist(), "roi_size_mm": [6, 6, 6]})
    np.testing.assert_allclose(_bright_center(out["image"]), [7.5] * 3, atol=0.6)
    assert set(out) == {"image", "label"}


def test_crop_pads_with_air_near_the_border(tmp_path):
    case, _ = _case(tmp_path, center_vox=(2, 24, 24))
    out = preprocessing(**SMALL)(case)["image"][0]
    np.testing.assert_allclose(_bright_center(out[None]), [7.5] * 3, atol=0.6)
    assert torch.all(out[:5] == 0.0)  # outside the image: air, 0 after the CT window
    assert torch.all(out[7:] > 0.1)  # inside: lung (-850 HU) or nodule


def test_no_roi_crops_the_image_centre():
    image = MetaTensor(torch.arange(9.0**3).reshape(1, 9, 9, 9), affine=torch.as_tensor(_affine((1.0, 1.0, 1.0))))
    out = CropAroundLesiond("image", size_vox=(3, 3, 3))({"image": image})["image"]
    assert torch.equal(out, image[:, 3:6, 3:6, 3:6])
    np.testing.assert_allclose(out.affine[:3, 3], np.asarray(image.affine[:3, 3]) + 3)


def test_crop_uses_the_current_affine_after_spacing():
    affine = _affine((0.5, 0.5, 2.0), origin=(0.0, 0.0, 0.0))
    image = MetaTensor(torch.zeros(1, 40, 40, 10), affine=torch.as_tensor(affine))
    resampled = Spacingd("image", pixdim=(1.0, 1.0, 1.0))({"image": image})["image"]
    crop = CropAroundLesion(size_mm=(4, 4, 4))
    start, end = crop.box(resampled, center_mm=(10.0, 5.0, 8.0))
    assert start.tolist() == [9, 4, 7] and (end - start).tolist() == [4, 4, 4]  # 1 mm voxels, not 0.5/2 mm


def test_resampling_anisotropic_input_to_target_spacing(tmp_path):
    case, _ = _case(tmp_path, shape=(40, 40, 8), spacing=(0.8, 0.8, 2.5), center_vox=(20, 20, 4))
    pre = preprocessing(target_spacing=(1.0, 1.0, 1.0), **SMALL)
    upto_spacing = pre.get_index_of_first(lambda t: isinstance(t, Spacingd)) + 1
    resampled = Compose(pre.transforms[:upto_spacing])(case)["image"]
    assert resampled.shape == (1, 32, 32, 18)  # 40 x 0.8 = 32 mm; 7 gaps x 2.5 = 17.5 mm -> 18 voxels
    np.testing.assert_allclose(resampled.pixdim, [1.0, 1.0, 1.0])
    out = pre(case)["image"]
    assert out.shape == (1, 16, 16, 16)
    np.testing.assert_allclose(_bright_center(out), [7.5] * 3, atol=0.6)


def test_dicom_series_input(make_series):
    series = make_series(shape=(24, 20, 6))
    out = eval_transforms(**SMALL)({"image": [str(f) for f in series.files], "label": 0})
    assert out["image"].shape == (1, 16, 16, 16) and out["image"].dtype == torch.float32


def test_empty_mask_raises(tmp_path):
    case, _ = _case(tmp_path, mask=False)
    empty = write_nifti(
        Volume(np.zeros((48, 48, 48), np.uint8), _affine((1.0, 1.0, 1.0))), tmp_path / "empty.nii.gz", dtype=np.uint8
    )
    with pytest.raises(MedtlError, match="mask is empty") as info:
        preprocessing(**SMALL)({**case, "mask": str(empty)})
    assert "empty.nii.gz" in str(info.value)


def test_roi_outside_the_image_raises(tmp_path):
    case, _ = _case(tmp_path, mask=False)
    with pytest.raises(MedtlError, match="outside the image"):
        preprocessing(**SMALL)({**case, "roi_center_mm": [500.0, 0.0, 0.0]})
    with pytest.raises(MedtlError, match="three finite numbers"):
        preprocessing(**SMALL)({**case, "roi_center_mm": [1.0, 2.0]})


def test_mask_center_mm_goes_through_the_affine():
    mask = np.zeros((1, 10, 10, 10))
    mask[0, 2:5, 6, 8] = 1
    affine = torch.as_tensor(_affine((2.0, 1.0, 3.0), origin=(100.0, -50.0, 0.0)))
    np.testing.assert_allclose(mask_center_mm(MetaTensor(mask, affine=affine)), [106.0, -44.0, 24.0])


@pytest.fixture
def preprocessed(tmp_path):
    case, _ = _case(tmp_path)
    return preprocessing(**SMALL)(case)


@pytest.mark.parametrize("level", ["light", "strong"])
def test_augmentation_is_reproducible_by_seed(preprocessed, level):
    def run(seed):
        aug = augmentation(level=level, spatial_size=(16, 16, 16), seed=seed)
        return torch.stack([aug(dict(preprocessed))["image"] for _ in range(4)])

    first = run(0)
    assert first.shape == (4, 1, 16, 16, 16)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))


def test_none_level_is_identity_and_train_matches_eval(tmp_path, preprocessed):
    assert torch.equal(augmentation(level="none", seed=0)(dict(preprocessed))["image"], preprocessed["image"])
    case, _ = _case(tmp_path)
    train = train_transforms(level="none", **SMALL)(dict(case))["image"]
    assert torch.equal(train, eval_transforms(**SMALL)(dict(case))["image"])


def test_randomness_only_after_the_deterministic_prefix():
    pre = preprocessing(**SMALL)
    train = train_transforms(level="strong", **SMALL)
    assert pre.get_index_of_first(lambda t: isinstance(t, RandomizableTrait)) is None
    assert train.get_index_of_first(lambda t: isinstance(t, RandomizableTrait)) == len(pre.transforms)


def test_augmentation_on_a_device_draws_the_same_and_caches_after_the_move(tmp_path):
    """``device`` moves crops before augmentation: the same seed gives the same crops (here the CPU
    stands in for the GPU), and the cacheable prefix now ends with the move."""
    from medtl.cache import cached_dataset, deterministic_prefix, transform_fingerprint

    case, _ = _case(tmp_path)
    assert torch.equal(*(train_transforms(level="strong", seed=3, **SMALL)(dict(case))["image"] for _ in range(2)))
    on_host = train_transforms(level="strong", seed=3, **SMALL)
    on_device = train_transforms(level="strong", seed=3, device="cpu", **SMALL)
    for _ in range(3):
        assert torch.equal(on_host(dict(case))["image"], on_device(dict(case))["image"])
    prefix = deterministic_prefix(on_device)
    assert len(prefix) == len(preprocessing(**SMALL).transforms) + 1
    assert prefix[-1].converter.device == torch.device("cpu")
    assert transform_fingerprint(on_device) != transform_fingerprint(on_host)  # a disk cache keeps them apart
    item = cached_dataset([case], on_device, progress=False)[0]
    assert item["image"].device.type == "cpu" and item["image"].dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: preprocessing(modality="pet"), "unknown modality 'pet'; allowed: ct, mr"),
        (lambda: augmentation(level="extreme"), "unknown augmentation level 'extreme'; allowed: none, light, strong"),
        (lambda: train_transforms(spatial_size=(32, 32)), r"spatial_size must be three positive integers .*\(32, 32\)"),
        (lambda: eval_transforms(spatial_size=(32, 32, 31.5)), "spatial_size must be three positive integers"),
        (lambda: preprocessing(crop_mm=(40, -1, 40)), "crop_mm must be three positive numbers"),
        (lambda: preprocessing(target_spacing="1.0"), "target_spacing must be three positive numbers"),
        (lambda: preprocessing(ct_window=(400, -1000)), "lowest < highest"),
        (lambda: preprocessing(keys=[]), "keys must be one or more"),
        (lambda: CropAroundLesion(size_mm=(4, 4, 4), size_vox=(4, 4, 4)), "exactly one of size_mm and size_vox"),
    ],
)
def test_invalid_arguments_raise(call, message):
    with pytest.raises(MedtlError, match=message):
        call()


def test_bundle_config_instantiates_train_transforms(tmp_path):
    case, _ = _case(tmp_path)
    parser = ConfigParser(
        {
            "train_transforms": {
                "_target_": "medtl.transforms.train_transforms",
                "modality": "ct",
                "level": "light",
                "spatial_size": [16, 16, 16],
                "crop_mm": [16, 16, 16],
                "seed": 0,
            },
            "crop": {"_target_": "medtl.transforms.CropAroundLesiond", "keys": "image", "size_mm": [16, 16, 16]},
        }
    )
    transforms = parser.get_parsed_content("train_transforms")
    assert isinstance(transforms, Compose)
    out = transforms(case)
    assert out["image"].shape == (1, 16, 16, 16) and out["image"].dtype == torch.float32
    assert out["label"] == 1
    assert isinstance(parser.get_parsed_content("crop"), CropAroundLesiond)


def test_entries_named_after_the_image_key_pass_and_a_meta_dict_that_is_not_one_gets_a_clear_error(tmp_path):
    """MONAI's Spacingd updates every ``image_...`` entry of a NIfTI image as its meta dictionary;
    strings there (MONAI Label's ``image_path``, a table's ``image_id``) pass through unchanged."""
    case, _ = _case(tmp_path)
    plain = preprocessing(modality="ct", **SMALL)(case)["image"]
    out = preprocessing(modality="ct", **SMALL)({**case, "image_id": "scan 7", "image_path": case["image"]})
    assert out["image_id"] == "scan 7" and out["image_path"] == case["image"]
    assert torch.equal(out["image"], plain)
    with pytest.raises(MedtlError, match="'image_meta_dict' is a str, but MONAI's transforms take it for the meta"):
        preprocessing(modality="ct", **SMALL)({**case, "image_meta_dict": "scan 7"})


def test_mask_channel_follows_the_image_crop_even_from_another_grid(tmp_path):
    """The mask becomes channel 1 on the image's own crop: aligned with the nodule in channel 0, its
    volume kept (a 3 mm ball is ~113 mm³), whatever grid the mask file was stored on."""
    case, _ = _case(tmp_path, spacing=(0.8, 0.8, 2.5), center_vox=(24, 30, 9))
    coarse = tmp_path / "coarse"  # the same ball stored at 1.6 mm in-plane: a mask from another tool
    coarse.mkdir()
    case_coarse, _ = _case(coarse, shape=(24, 24, 48), spacing=(1.6, 1.6, 2.5), center_vox=(12, 15, 9))
    for mask in (case["mask"], case_coarse["mask"]):
        out = eval_transforms(modality="ct", mask_channel=True, crop_mm=(32, 32, 32))({**case, "mask": mask})
        image = out["image"]
        assert image.shape == (2, 32, 32, 32) and "mask" not in out
        lesion = image[1].numpy()
        assert (
            0 <= lesion.min() and lesion.max() <= 1 and 60 < lesion.sum() < 180
        )  # 1 mm voxels: about the ball's volume
        assert (
            np.abs(np.argwhere(lesion > 0.5).mean(axis=0) - _bright_center(image)).max() < 1.5
        )  # on the nodule of channel 0
    wide = eval_transforms(modality="ct", mask_channel=True, crop_mm=(64, 64, 64))(dict(case))
    assert wide["image"][1].sum() < lesion.sum() / 4  # 64 mm into 32 voxels: each voxel is 8 mm³


def test_mask_channel_refuses_a_case_without_a_mask_by_name(tmp_path):
    case, _ = _case(tmp_path, mask=False)
    with pytest.raises(MedtlError, match="takes the lesion mask as an input channel") as caught:
        eval_transforms(modality="ct", mask_channel=True)(case)
    assert "ct.nii.gz" in str(caught.value)
    with pytest.raises(MedtlError, match="one image entry"):
        preprocessing(modality="mr", keys=["t1", "t2"], mask_channel=True)


def test_strong_augmentation_turns_in_the_axial_plane_and_keeps_both_channels():
    crop = torch.zeros(2, 32, 32, 32)
    crop[0, 4:8, 10:12, 10:22] = 1.0
    crop[1] = crop[0]
    aug = augmentation(level="strong", seed=0)
    assert any(type(t).__name__ == "RandRotate90d" for t in aug.transforms)
    for _ in range(3):
        out = aug({"image": crop.clone()})["image"]
        assert out.shape == (2, 32, 32, 32)
    assert not any(type(t).__name__ == "RandRotate90d" for t in augmentation(level="light").transforms)
