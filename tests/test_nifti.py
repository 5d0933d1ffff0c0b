"""NIfTI in and out, canonical orientation, refusals, and the MONAI LoadImaged path for NIfTI and DICOM."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImaged

from medtl.errors import ImageError
from medtl.nifti import is_nifti, read_nifti, write_nifti
from medtl.reader import VolumeReader, load_volume
from medtl.volume import Volume

# MONAI announces at import that an optional GPU decoder plugin is absent; irrelevant here
pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")


def world_values(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """(world coordinates [N, 3], values [N]) of every voxel."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = (volume.affine @ np.c_[grid, np.ones(len(grid))].T)[:3].T
    return world, volume.array.reshape(-1)


def assert_same_world_mapping(a: Volume, b: Volume) -> None:
    """Every voxel of ``a`` has the same value at the same world point in ``b``."""
    world, values = world_values(a)
    idx = (np.linalg.inv(b.affine) @ np.c_[world, np.ones(len(world))].T)[:3].T
    rounded = np.round(idx)
    np.testing.assert_allclose(idx, rounded, atol=1e-4)
    r = rounded.astype(int)
    np.testing.assert_array_equal(b.array[r[:, 0], r[:, 1], r[:, 2]], values)


def save_raw(array: np.ndarray, affine: np.ndarray, path) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


def test_roundtrip_keeps_values_and_affine(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(7, 6, 5)).astype(np.float32)
    affine = np.array([[0.8, 0, 0, -10.0], [0, 0.9, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    for name in ("vol.nii.gz", "vol.nii"):
        path = write_nifti(Volume(array, affine), tmp_path / name)
        assert path == tmp_path / name and path.exists()
        back = read_nifti(path)
        assert back.array.dtype == np.float32 and back.shape == (7, 6, 5)
        np.testing.assert_array_equal(back.array, array)
        np.testing.assert_allclose(back.affine, affine, atol=1e-6)
        assert back.spacing == pytest.approx((0.8, 0.9, 2.5))
    assert (tmp_path / "vol.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # really gzipped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.nii", "vol.nii.gz"]  # no temporaries left
    header = nib.load(str(tmp_path / "vol.nii.gz")).header
    assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1


def test_write_with_dtype_and_scaled_integers(tmp_path):
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 10 - 100
    path = write_nifti(Volume(array, np.eye(4)), tmp_path / "int.nii.gz", dtype=np.int16)
    assert nib.load(str(path)).get_data_dtype() == np.int16
    np.testing.assert_array_equal(read_nifti(path).array, array)
    # integer data with scl_slope/scl_inter is returned scaled, as float32
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, str(tmp_path / "scaled.nii"))
    back = read_nifti(tmp_path / "scaled.nii")
    assert back.array.dtype == np.float32
    np.testing.assert_allclose(back.array, np.arange(24).reshape(2, 3, 4) * 0.5 - 3.0)


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([-1.0, -1.0, 1.0, 1.0]),  # LPS, as DICOM-minded writers produce
        np.array([[0, 0, -2.0, 5], [-1.5, 0, 0, 6], [0, 1.0, 0, -7], [0, 0, 0, 1]]),  # permuted and flipped
        np.array([[0.9, -0.3, 0, 1], [0.3, 0.9, 0, 2], [0, 0, -3.0, 3], [0, 0, 0, 1]]),  # oblique in-plane
    ],
    ids=["lps", "permuted", "oblique"],
)
def test_non_ras_nifti_is_reoriented_keeping_world_to_value(tmp_path, affine):
    array = np.random.default_rng(1).normal(size=(5, 4, 3)).astype(np.float32)
    save_raw(array, affine, tmp_path / "in.nii.gz")
    original = Volume(array, affine)
    vol = read_nifti(tmp_path / "in.nii.gz")
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert sorted(vol.spacing) == pytest.approx(sorted(original.spacing), rel=1e-6)
    assert_same_world_mapping(original, vol)
    assert_same_world_mapping(vol, original)
    if np.allclose(affine, np.diag([-1.0, -1.0, 1.0, 1.0])):
        np.testing.assert_array_equal(vol.array, array[::-1, ::-1, :])
        np.testing.assert_allclose(vol.affine, [[1, 0, 0, -4], [0, 1, 0, -3], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_canonical_is_identity_for_ras():
    vol = Volume(np.zeros((2, 3, 4), np.float32), np.diag([1.0, 2.0, 3.0, 1.0]))
    assert vol.canonical() is vol


def test_4d_with_single_last_dim_accepted(tmp_path):
    array = np.random.default_rng(2).normal(size=(4, 5, 6, 1)).astype(np.float32)
    save_raw(array, np.eye(4), tmp_path / "one.nii.gz")
    vol = read_nifti(tmp_path / "one.nii.gz")
    assert vol.shape == (4, 5, 6)
    np.testing.assert_array_equal(vol.array, array[..., 0])


def test_real_4d_refused(tmp_path):
    path = tmp_path / "four.nii.gz"
    save_raw(np.zeros((4, 5, 6, 2), np.float32), np.eye(4), path)
    with pytest.raises(ImageError) as exc:
        read_nifti(path)
    assert str(exc.value).startswith(str(path))
    assert "expected a 3D image" in str(exc.value) and "(4, 5, 6, 2)" in str(exc.value)


def test_2d_refused(tmp_path):
    path = tmp_path / "flat.nii"
    save_raw(np.zeros((4, 5), np.float32), np.eye(4), path)
    with pytest.raises(ImageError, match="3D"):
        read_nifti(path)


def test_nan_and_inf_refused_naming_the_count(tmp_path):
    array = np.zeros((4, 4, 4), np.float32)
    array[0, 0, 0] = np.nan
    array[1, 2, 3] = np.inf
    array[3, 3, 3] = -np.inf
    path = tmp_path / "bad.nii.gz"
    save_raw(array, np.eye(4), path)
    with pytest.raises(ImageError) as exc:
        read_nifti(path)
    assert str(exc.value).startswith(str(path)) and "3 voxel(s) are NaN or infinite" in str(exc.value)


@pytest.mark.parametrize("damage", ["truncated_gzip", "garbage", "header_only", "empty"])
def test_corrupt_nifti_names_the_file(tmp_path, damage):
    good = tmp_path / "good.nii.gz"
    save_raw(np.random.default_rng(3).normal(size=(16, 16, 16)).astype(np.float32), np.eye(4), good)
    path = tmp_path / f"{damage}.nii.gz"
    data = good.read_bytes()
    if damage == "truncated_gzip":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a nifti file at all" * 20)
    elif damage == "header_only":
        path.write_bytes(gzip.compress(gzip.decompress(data)[:352]))
    else:
        path.write_bytes(b"")
    with pytest.raises(ImageError) as exc:
        read_nifti(path)
    assert str(exc.value).startswith(str(path))
    assert "not a readable NIfTI file" in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        read_nifti(tmp_path / "nope.nii.gz")
    with pytest.raises(ImageError) as exc:
        load_volume(tmp_path / "nope.nii.gz")
    assert str(exc.value).startswith(str(tmp_path / "nope.nii.gz"))


def test_is_nifti_and_load_volume_dispatch(tmp_path):
    assert is_nifti("a/b.nii") and is_nifti("B.NII.GZ") and not is_nifti("x.dcm") and not is_nifti("x.gz")
    array = np.random.default_rng(4).normal(size=(3, 4, 5)).astype(np.float32)
    write_nifti(Volume(array, np.eye(4)), tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(load_volume(tmp_path / "v.nii.gz").array, array)
    np.testing.assert_array_equal(load_volume([tmp_path / "v.nii.gz"]).array, array)


# ---------------------------------------------------------------------------------------------
# MONAI: LoadImaged with medtl's reader


def _load_monai(path):
    transform = LoadImaged(keys="image", reader="medtl.reader.VolumeReader", ensure_channel_first=True)
    return transform({"image": str(path), "label": 1})


def test_monai_loadimaged_nifti(tmp_path):
    array = np.random.default_rng(5).normal(size=(6, 5, 4)).astype(np.float32)
    path = tmp_path / "img.nii.gz"
    save_raw(array, np.diag([-0.7, -0.8, 2.0, 1.0]), path)  # LPS on disk: the reader returns RAS
    out = _load_monai(path)
    img = out["image"]
    assert isinstance(img, MetaTensor) and out["label"] == 1
    assert tuple(img.shape) == (1, 6, 5, 4) and img.dtype == torch.float32
    expected = read_nifti(path)
    np.testing.assert_allclose(img.affine.numpy(), expected.affine, atol=1e-6)
    np.testing.assert_allclose(np.diag(img.affine.numpy())[:3], (0.7, 0.8, 2.0), rtol=1e-6)
    np.testing.assert_array_equal(img[0].numpy(), array[::-1, ::-1, :])
    assert img.meta["filename_or_obj"] == str(path)
    assert img.meta["space"] == "RAS"  # MONAI's Orientation transforms read the space from here


def test_monai_loadimaged_dicom_folder(make_series):
    s = make_series("ct", shape=(20, 16, 5), spacing=(0.7, 0.8, 2.5))
    out = _load_monai(s.folder)
    img = out["image"]
    assert isinstance(img, MetaTensor) and tuple(img.shape) == (1, 20, 16, 5)
    expected = load_volume(s.folder)
    np.testing.assert_allclose(img.affine.numpy(), expected.affine, atol=1e-6)
    # RAS affine of an axial LPS series: +x/+y flipped, origin at the far corner of the first slice
    np.testing.assert_allclose(
        img.affine.numpy(),
        [[0.7, 0, 0, -(10 + 19 * 0.7)], [0, 0.8, 0, -(20 + 15 * 0.8)], [0, 0, 2.5, 30], [0, 0, 0, 1]],
        atol=1e-4,
    )
    np.testing.assert_array_equal(img[0].numpy(), s.hu[::-1, ::-1, :].astype(np.float32))


def test_monai_reader_for_file_list_and_series_choice(make_series):
    a = make_series("a", shape=(12, 10, 3), series_number=2)
    make_series("b", shape=(8, 8, 4), series_number=5, folder=a.folder, file_prefix="B")
    transform = LoadImaged(keys="image", reader=VolumeReader(series=5), ensure_channel_first=True)
    assert tuple(transform({"image": str(a.folder)})["image"].shape) == (1, 8, 8, 4)
    listed = LoadImaged(keys="image", reader="medtl.reader.VolumeReader", ensure_channel_first=True)
    img = listed({"image": [str(f) for f in a.files]})["image"]
    assert tuple(img.shape) == (1, 12, 10, 3)
    reader = VolumeReader()
    assert reader.verify_suffix(str(a.folder)) and reader.verify_suffix("x.nii.gz") and reader.verify_suffix("x.dcm")
    assert not reader.verify_suffix("x.png")
