"""Named transform presets for lesion classification, built from MONAI's dictionary transforms.

Data flows one way: a deterministic part (load, RAS orientation, resampling, intensity preset,
lesion-centred crop, resize to the network input) that can be cached, then an optional random
augmentation part. Volumes are the default; ``spatial_dims=2`` runs the same steps on 2D images
stored as single-slice volumes (MedMNIST 2D imports, one ultrasound frame). Every preset is a
plain function returning a ``monai.transforms.Compose``, so bundles name it the same way Python
does::

    {"_target_": "medtl.transforms.train_transforms", "modality": "ct", "level": "light", "seed": 0}

Data dicts look like ``{"image": path or DICOM file list, "label": int, "mask": optional NIfTI path,
"roi_center_mm": optional [x, y, z] RAS mm, "roi_size_mm": optional}``. The mask and ``roi_center_mm``
locate the lesion (``roi_size_mm`` is not used: the crop has one physical size for every case);
preprocessing drops all three so cases with and without a mask batch together. With
``mask_channel=True`` the mask also becomes the image's last channel, and every case needs one.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    BorderPad,
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandRotated,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandZoomd,
    ResampleToMatchd,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCrop,
    SqueezeDimd,
    Transform,
)
from monai.utils import PostFix, convert_to_tensor

from medtl.errors import MedtlError, medtl_cause
from medtl.reader import LoadVolumed
from medtl.recipes import AUGMENT_LEVELS

MODALITIES = ("ct", "mr")
SPATIAL_DIMS = (2, 3)
_AXES = {2: ("two", "x, y"), 3: ("three", "x, y, z")}
_LINEAR = {2: "bilinear", 3: "trilinear"}  # interpolation mode of resizing and zooming
# Lung window: air (-1000 HU) maps to 0, so padding with 0 after scaling is air; solid nodules,
# ground-glass halos and spiculae stay distinct, calcifications (> 400 HU) saturate at 1.
CT_WINDOW = (-1000.0, 400.0)
DEFAULT_SPATIAL_SIZE = (32, 32, 32)
ROI_CENTER_KEY = "roi_center_mm"
ROI_SIZE_KEY = "roi_size_mm"


def _sizes(value: Any, name: str, spatial_dims: int = 3, *, integer: bool = False) -> tuple:
    """One positive number per spatial axis (a JSON list from a bundle, or a tuple), or a MedtlError
    saying what was given."""
    try:
        if isinstance(value, str):
            raise TypeError(value)
        values = tuple(int(v) if integer else float(v) for v in value)
        ok = (
            len(values) == spatial_dims
            and all(v > 0 for v in values)
            and (not integer or all(float(v) == int(v) for v in value))
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        kind = "integers" if integer else "numbers"
        count, axes = _AXES[spatial_dims]
        raise MedtlError(f"{name} must be {count} positive {kind} ({axes}), got {value!r}")
    return values


def _spatial_dims(value: Any) -> int:
    if value not in SPATIAL_DIMS:
        raise MedtlError(f"spatial_dims must be 2 (images) or 3 (volumes), got {value!r}")
    return int(value)


def _keys(keys: str | Sequence[str]) -> list[str]:
    names = [keys] if isinstance(keys, str) else list(keys)
    if not names or not all(isinstance(k, str) and k for k in names):
        raise MedtlError(f"keys must be one or more non-empty names of image entries, got {keys!r}")
    return names


def _spacing(affine: torch.Tensor) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    n = affine.shape[0] - 1
    return np.linalg.norm(affine[:n, :n], axis=0)


def mask_center_mm(mask: Any) -> np.ndarray:
    """Centre of mass (RAS mm) of a mask's voxels > 0, through the mask's own affine.

    Going through millimetres means the mask need not share the image's grid, and it is not
    resampled: nearest-neighbour resampling can erase a lesion only a voxel or two wide. A 2D mask
    (3x3 affine) gives (x, y).
    """
    mask = convert_to_tensor(mask, track_meta=True)
    n = mask.affine.shape[0] - 1
    spatial = np.asarray(mask.detach().cpu()).reshape(-1, *mask.shape[-n:])
    voxels = np.argwhere((spatial > 0).any(axis=0))
    if len(voxels) == 0:
        raise MedtlError(
            "lesion mask is empty (no voxel > 0), so there is no lesion to crop around",
            path=mask.meta.get("filename_or_obj") or None,
            hint="check that the mask belongs to this image, or give roi_center_mm instead of a mask",
        )
    center = np.append(voxels.mean(axis=0), 1.0)
    return (np.asarray(mask.affine, dtype=np.float64) @ center)[:n]


class CropAroundLesion(Transform):
    """Crop a fixed box around a point given in RAS millimetres, padding where the box leaves the image.

    A fixed physical size keeps lesions at their true scale across scanners; a voxel size is for
    data already resampled to a known spacing. The box is placed with the image's current affine,
    so it is right after ``Spacingd``. Without a point, the box is centred on the image.

    Args:
        size_mm: box size (x, y, z) in millimetres, turned into voxels with the current spacing.
        size_vox: box size in voxels; give exactly one of ``size_mm`` and ``size_vox``.
        pad_value: value where the box extends past the image: the background after the
            intensity preset (0 is air for the CT window and background for MR).
        spatial_dims: 3 for volumes, 2 for images (sizes and centre are then (x, y)).

    Examples:
        A 40 mm cube around a nodule at RAS (-52.0, 14.5, 120.0) mm::

            crop = CropAroundLesion(size_mm=(40, 40, 40))
            patch = crop(image, center_mm=(-52.0, 14.5, 120.0))
    """

    def __init__(
        self,
        *,
        size_mm: Sequence[float] | None = None,
        size_vox: Sequence[int] | None = None,
        pad_value: float = 0.0,
        spatial_dims: int = 3,
    ):
        if (size_mm is None) == (size_vox is None):
            raise MedtlError(
                f"give exactly one of size_mm and size_vox, got size_mm={size_mm!r}, size_vox={size_vox!r}"
            )
        self.spatial_dims = _spatial_dims(spatial_dims)
        self.size_mm = None if size_mm is None else _sizes(size_mm, "size_mm", self.spatial_dims)
        self.size_vox = None if size_vox is None else _sizes(size_vox, "size_vox", self.spatial_dims, integer=True)
        self.pad_value = float(pad_value)

    def box(self, img: MetaTensor, center_mm: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
        """Start and end voxel indices of the box; either may lie outside the image."""
        shape = np.asarray(img.shape[-self.spatial_dims :])
        affine = np.asarray(img.affine, dtype=np.float64)
        if self.size_vox is not None:
            size = np.asarray(self.size_vox)
        else:
            size = np.maximum(1, np.round(np.asarray(self.size_mm) / _spacing(affine))).astype(int)
        if center_mm is None:
            center = (shape - 1) / 2.0
        else:
            center = (np.linalg.inv(affine) @ np.append(np.asarray(center_mm, dtype=np.float64), 1.0))[
                : self.spatial_dims
            ]
        start = np.floor(center - (size - 1) / 2.0 + 0.5).astype(int)
        return start, start + size

    def __call__(self, img: Any, center_mm: Sequence[float] | None = None) -> MetaTensor:
        img = convert_to_tensor(img, track_meta=True)
        start, end = self.box(img, center_mm)
        shape = np.asarray(img.shape[-self.spatial_dims :])
        lo, hi = np.maximum(start, 0), np.minimum(end, shape)
        if np.any(hi <= lo):
            raise MedtlError(
                f"the crop box around {np.round(np.asarray(center_mm), 1).tolist()} mm lies outside the image "
                f"(voxels {start.tolist()}..{end.tolist()}, image shape {shape.tolist()})",
                path=img.meta.get("filename_or_obj") or None,
                hint="roi_center_mm must be RAS world coordinates in millimetres inside this image",
            )
        cropped = SpatialCrop(roi_start=lo.tolist(), roi_end=hi.tolist())(img)
        border = np.stack([lo - start, end - hi], axis=1).ravel()
        if not border.any():
            return cropped
        return BorderPad(spatial_border=border.tolist(), mode="constant", constant_values=self.pad_value)(cropped)


class CropAroundLesiond(MapTransform):
    """Dictionary twin of :class:`CropAroundLesion`: the point comes from the case itself.

    The centre is the mask's centre of mass when ``mask_key`` is present, else ``roi_center_mm``
    (RAS mm), else each image's own centre. An empty mask raises ``MedtlError``.

    Args:
        keys: image entries to crop (each placed through its own affine).
        size_mm, size_vox, pad_value, spatial_dims: as in :class:`CropAroundLesion`.
        mask_key: entry holding the lesion mask (a loaded ``MetaTensor`` with its affine).
        center_key: entry holding the lesion centre in RAS millimetres.

    Examples:
        In a bundle, after ``Spacingd``::

            {"_target_": "medtl.transforms.CropAroundLesiond", "keys": "image", "size_mm": [40, 40, 40]}
    """

    def __init__(
        self,
        keys: KeysCollection,
        *,
        size_mm: Sequence[float] | None = None,
        size_vox: Sequence[int] | None = None,
        pad_value: float = 0.0,
        spatial_dims: int = 3,
        mask_key: str = "mask",
        center_key: str = ROI_CENTER_KEY,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.cropper = CropAroundLesion(
            size_mm=size_mm, size_vox=size_vox, pad_value=pad_value, spatial_dims=spatial_dims
        )
        self.mask_key = mask_key
        self.center_key = center_key

    def center_mm(self, data: Mapping[Hashable, Any]) -> np.ndarray | None:
        """The lesion centre in RAS mm for this case, or None when it names no lesion."""
        if data.get(self.mask_key) is not None:
            return mask_center_mm(data[self.mask_key])
        if data.get(self.center_key) is not None:
            center = np.asarray(data[self.center_key], dtype=np.float64).ravel()
            n = self.cropper.spatial_dims
            if center.shape != (n,) or not np.isfinite(center).all():
                count, axes = _AXES[n]
                raise MedtlError(
                    f"{self.center_key} must be {count} finite numbers [{axes}] in RAS mm, "
                    f"got {data[self.center_key]!r}"
                )
            return center
        return None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        center = self.center_mm(d)
        for key in self.key_iterator(d):
            d[key] = self.cropper(d[key], center)
        return d


class _Pipeline(Compose):
    """A Compose that lets medtl's errors through: MONAI wraps every failure in a RuntimeError,
    which would hide a fixable input problem (an empty mask, an ROI outside the image) behind a traceback."""

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as exc:
            cause = medtl_cause(exc)
            if cause is None:
                raise
            raise cause from None


class _NoMetaShadows(Transform):
    """Refuse an entry named like MONAI's meta dictionary of an image key (``image_meta_dict``,
    ``PostFix.meta``) that is not a dict: MONAI's dictionary transforms read and update it as the
    image's metadata (``Spacingd`` fails deep inside with "'str' object has no attribute 'update'").
    Other ``<key>_...`` entries, such as the ``image_path`` MONAI Label adds, are the caller's own
    and pass (``_Spacingd`` leaves them alone)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        for key in self.keys:
            name = PostFix.meta(key)
            if name in data and not isinstance(data[name], Mapping):
                raise MedtlError(
                    f"data entry {name!r} is a {type(data[name]).__name__}, but MONAI's transforms take it for "
                    f"the meta dictionary of {key!r}",
                    hint=f"rename the entry, or give {name!r} as a dict of the image's metadata",
                )
        return data


class _Spacingd(Spacingd):
    """MONAI's ``Spacingd`` that updates only dictionaries among the ``<key>_...`` entries.

    After resampling an image read from NIfTI, ``Spacingd`` calls ``update`` on every entry whose
    name starts with the image key and ``_``, taking each for the image's meta dictionary; a string
    there (MONAI Label's ``image_path``, a table's ``image_id``) fails deep inside. Those entries are
    set aside for the call and put back as they were."""

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        prefixes = tuple(f"{key}_" for key in self.keys if isinstance(key, str))
        aside = {
            name: value
            for name, value in data.items()
            if isinstance(name, str) and name.startswith(prefixes) and not isinstance(value, Mapping)
        }
        resampled = super().__call__({k: v for k, v in data.items() if k not in aside}, lazy=lazy)
        return {**resampled, **aside}


class _RequireMask(Transform):
    """Refuse a case without a lesion mask by name, when the network takes the mask as a channel."""

    def __init__(self, mask_key: str) -> None:
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        if data.get(self.mask_key) is None:
            image = next((v for v in data.values() if isinstance(v, MetaTensor)), None)
            raise MedtlError(
                f"this model takes the lesion mask as an input channel, but the case has no {self.mask_key!r}",
                path=None if image is None else image.meta.get("filename_or_obj") or None,
                hint=f"give a mask for every case (a {self.mask_key!r} column or manifest entry)",
            )
        return data


def requires_mask(transform: Any) -> bool:
    """Whether a preprocessing pipeline (a ``Compose``, nested or not, as a bundle's ``preprocessing``
    holds it) refuses cases without a lesion mask: its network takes the mask as an input channel.
    What ``medtl predict`` asks to find every series' mask before any image is read."""
    if isinstance(transform, _RequireMask):
        return True
    return isinstance(transform, Compose) and any(requires_mask(t) for t in transform.transforms)


class _RequireModality(Transform):
    """Refuse an image whose DICOM header names another modality than the preset reads (an MR series
    given to a CT model would be windowed as if its values were Hounsfield units). Images that name
    none (NIfTI) or only "OT" (other: medtl's code for a missing tag) pass: nothing says they differ."""

    def __init__(self, keys: list[str], modality: str) -> None:
        self.keys, self.expected = keys, modality.upper()

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        for key in self.keys:
            meta = getattr(data.get(key), "meta", None) or {}
            code = str(meta.get("modality") or "").strip().upper()
            if code not in ("", "OT", self.expected):
                raise MedtlError(
                    f"{key!r} is a {code} series, but this model reads {self.expected} "
                    f"(modality={self.expected.lower()!r})",
                    path=meta.get("filename_or_obj") or None,
                    hint=f"give it a {self.expected} series, or use a model trained on {code}",
                )
        return data


class _SingleSliced(Transform):
    """Loaded single-slice volumes (C, x, y, 1) as 2D images (C, x, y) with a 3x3 affine; missing
    entries (a case without a mask) and entries already 2D (C, x, y) are left as they are, so a
    bundle's own loader and medtl's give the same input. A volume of several slices is refused by
    name: taking one of its slices would be a silent choice the user never made."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        volumes = [k for k in self.keys if data.get(k) is not None and data[k].ndim == 4]
        for key in volumes:
            image = data[key]
            if image.shape[-1] != 1:
                raise MedtlError(
                    f"spatial_dims=2 reads single-slice images, but {key!r} has shape {tuple(image.shape[1:])}",
                    path=image.meta.get("filename_or_obj") or None,
                    hint="use spatial_dims=3 for volumes",
                )
        return SqueezeDimd(keys=volumes, dim=-1)(data) if volumes else dict(data)


def _intensity(modality: str, keys: list[str], ct_window: tuple[float, float]) -> list[Transform]:
    """CT: clip to the HU window and scale to [0, 1]. MR has no absolute scale: z-score the nonzero voxels."""
    if modality == "ct":
        lo, hi = ct_window
        return [ScaleIntensityRanged(keys=keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)]
    return [NormalizeIntensityd(keys=keys, nonzero=True, channel_wise=True)]


def preprocessing(
    *,
    modality: str = "ct",
    spatial_dims: int = 3,
    spatial_size: Sequence[int] | None = None,
    target_spacing: Sequence[float] | None = None,
    crop_mm: Sequence[float] | None = None,
    ct_window: Sequence[float] = CT_WINDOW,
    keys: str | Sequence[str] = ("image",),
    mask_key: str = "mask",
    mask_channel: bool = False,
    load: bool = True,
) -> Compose:
    """The deterministic part: load, RAS, resample, intensity preset, lesion crop, resize.

    Nothing here is random, so its output can be cached and augmentation applied on top. The
    default 32 mm crop at 1 mm holds the largest demo nodules (28 mm); with the default 32-voxel
    input no detail is lost to resizing.

    Args:
        modality: ``"ct"`` (HU window ``ct_window`` to [0, 1]) or ``"mr"`` (z-score of nonzero voxels).
            A DICOM series whose header names another modality is refused (NIfTI names none).
        spatial_dims: 3 for volumes; 2 for images, which load as single-slice volumes, lose that
            slice axis (one that holds more slices is an error), then go through the same steps in
            (x, y) with the sizes below given as two values.
        spatial_size: network input size in voxels; the crop is resized to it. Default 32 per axis.
        target_spacing: voxel size (mm) to resample to, so the crop holds the same anatomy everywhere.
            Default 1 mm per axis.
        crop_mm: physical size of the lesion-centred crop. Default 32 mm per axis.
        ct_window: (lowest, highest) HU kept for CT; the default is a lung window.
        keys: image entries (several for multi-sequence MR).
        mask_key: entry with the lesion mask path; optional per case unless ``mask_channel``.
        mask_channel: add the lesion mask, resampled onto the image's crop (linear interpolation,
            so a lesion thinner than a voxel keeps a partial value), as the last input channel. The
            mask is the ROI a clinician gives; as a channel it tells the network the lesion's
            extent and shape, which the grey values alone blur on thick slices. Every case then
            needs a mask. Augmentation moves it with the CT; its intensity changes touch it too
            (for ``strong``: up to 0.1 shift, 0.03 noise, gamma on partial values), a mild blur of
            the ROI's edge rather than a change of its meaning.
        load: False when the entries already hold channel-first ``MetaTensor`` images (a bundle's
            loader); 2D ones may still have their slice axis of one.
    """
    modality = str(modality).lower()
    if modality not in MODALITIES:
        raise MedtlError(f"unknown modality {modality!r}; allowed: {', '.join(MODALITIES)}")
    spatial_dims = _spatial_dims(spatial_dims)
    spatial_size = _sizes(
        DEFAULT_SPATIAL_SIZE[:spatial_dims] if spatial_size is None else spatial_size,
        "spatial_size",
        spatial_dims,
        integer=True,
    )
    target_spacing = _sizes(
        (1.0,) * spatial_dims if target_spacing is None else target_spacing, "target_spacing", spatial_dims
    )
    crop_mm = _sizes((32.0,) * spatial_dims if crop_mm is None else crop_mm, "crop_mm", spatial_dims)
    window = tuple(float(v) for v in ct_window)
    if len(window) != 2 or not window[0] < window[1]:
        raise MedtlError(f"ct_window must be (lowest HU, highest HU) with lowest < highest, got {ct_window!r}")
    keys = _keys(keys)
    if mask_channel and len(keys) != 1:
        raise MedtlError(f"mask_channel adds the mask to one image entry, got keys={keys!r}")
    loading = [LoadVolumed(keys=keys), LoadVolumed(keys=mask_key, allow_missing_keys=True)]
    spatial = [*keys, mask_key] if mask_channel else keys
    return _Pipeline(
        [
            _NoMetaShadows(keys),
            *(loading if load else []),
            *([_SingleSliced([*keys, mask_key])] if spatial_dims == 2 else []),  # a bundle's loader's too
            _RequireModality(keys, modality),
            *([_RequireMask(mask_key)] if mask_channel else []),
            Orientationd(keys=keys, axcodes="RAS"[:spatial_dims], labels=None),
            _Spacingd(keys=keys, pixdim=target_spacing, mode="bilinear"),
            *(
                [ResampleToMatchd(keys=mask_key, key_dst=keys[0], mode="bilinear", dtype=torch.float32)]
                if mask_channel
                else []
            ),
            *_intensity(modality, keys, window),
            CropAroundLesiond(
                keys=spatial, size_mm=crop_mm, pad_value=0.0, spatial_dims=spatial_dims, mask_key=mask_key
            ),
            Resized(keys=spatial, spatial_size=spatial_size, mode=_LINEAR[spatial_dims], anti_aliasing=True),
            *([ConcatItemsd(keys=spatial, name=keys[0])] if mask_channel else []),
            DeleteItemsd(keys=[mask_key, ROI_CENTER_KEY, ROI_SIZE_KEY]),
        ]
    )


@dataclass(frozen=True)
class _Strength:
    """Parameters of one augmentation level; the transforms draw from these ranges."""

    flip_axes: tuple[int, ...]
    rotate_deg: float
    rotate_prob: float
    rot90_prob: float  # quarter turns in the (x, y) plane, where a lesion has no preferred direction
    zoom: tuple[float, float]
    zoom_prob: float
    crop_min: float  # smallest random crop as a fraction of spatial_size, resized back
    noise_std: float
    noise_prob: float
    shift: float
    shift_prob: float
    gamma: tuple[float, float]
    contrast_prob: float


# Offsets and noise are in output units: [0, 1] for CT (0.01 is 14 HU in the lung window), z for MR.
_STRENGTHS = {
    "light": _Strength(
        flip_axes=(0,),
        rotate_deg=10.0,
        rotate_prob=0.3,
        rot90_prob=0.0,
        zoom=(0.9, 1.1),
        zoom_prob=0.3,
        crop_min=0.9,
        noise_std=0.01,
        noise_prob=0.2,
        shift=0.05,
        shift_prob=0.3,
        gamma=(0.9, 1.1),
        contrast_prob=0.2,
    ),
    "strong": _Strength(
        flip_axes=(0, 1, 2),
        rotate_deg=30.0,
        rotate_prob=0.7,
        rot90_prob=0.5,
        zoom=(0.8, 1.2),
        zoom_prob=0.5,
        crop_min=0.8,
        noise_std=0.03,
        noise_prob=0.5,
        shift=0.1,
        shift_prob=0.5,
        gamma=(0.7, 1.5),
        contrast_prob=0.5,
    ),
}


def augmentation(
    *,
    level: str = "light",
    spatial_dims: int = 3,
    spatial_size: Sequence[int] | None = None,
    keys: str | Sequence[str] = ("image",),
    seed: int | None = None,
) -> Compose:
    """Random augmentation on preprocessed crops; output keeps ``spatial_size`` (default 32 per axis).

    ``none`` is the identity, ``light`` suits lesions whose orientation carries little meaning
    (left-right flips, small rotations and zooms), ``strong`` flips every axis, adds quarter turns in
    the axial plane and widens each range.
    A random sub-crop (90-100 % of each side for ``light``, 80-100 % for ``strong``) resized back to
    ``spatial_size`` jitters position and scale. With ``spatial_dims=2`` the same draws act in
    the image plane (one rotation angle, flips of x and y). ``seed`` makes the whole sequence of
    draws reproducible.
    """
    level = str(level).lower()
    if level not in AUGMENT_LEVELS:
        raise MedtlError(f"unknown augmentation level {level!r}; allowed: {', '.join(AUGMENT_LEVELS)}")
    spatial_dims = _spatial_dims(spatial_dims)
    spatial_size = _sizes(
        DEFAULT_SPATIAL_SIZE[:spatial_dims] if spatial_size is None else spatial_size,
        "spatial_size",
        spatial_dims,
        integer=True,
    )
    keys = _keys(keys)
    if level == "none":
        return _Pipeline([])
    s = _STRENGTHS[level]
    angle = float(np.deg2rad(s.rotate_deg))
    angles = {"range_x": angle} if spatial_dims == 2 else {"range_x": angle, "range_y": angle, "range_z": angle}
    min_crop = [max(1, int(np.ceil(s.crop_min * n))) for n in spatial_size]
    augment = _Pipeline(
        [
            RandSpatialCropd(keys=keys, roi_size=min_crop, max_roi_size=spatial_size, random_size=True),
            Resized(keys=keys, spatial_size=spatial_size, mode=_LINEAR[spatial_dims]),
            *(RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in s.flip_axes if axis < spatial_dims),
            *([RandRotate90d(keys=keys, prob=s.rot90_prob, max_k=3, spatial_axes=(0, 1))] if s.rot90_prob else []),
            RandRotated(keys=keys, **angles, prob=s.rotate_prob, padding_mode="zeros"),
            RandZoomd(
                keys=keys,
                min_zoom=s.zoom[0],
                max_zoom=s.zoom[1],
                prob=s.zoom_prob,
                mode=_LINEAR[spatial_dims],
                padding_mode="constant",
            ),
            RandAdjustContrastd(keys=keys, gamma=s.gamma, prob=s.contrast_prob),
            RandShiftIntensityd(keys=keys, offsets=s.shift, prob=s.shift_prob),
            RandGaussianNoised(keys=keys, std=s.noise_std, prob=s.noise_prob),
        ]
    )
    if seed is not None:
        augment.set_random_state(seed=seed)
    return augment


def train_transforms(
    *, level: str = "light", seed: int | None = None, device: str | torch.device | None = None, **options: Any
) -> Compose:
    """Preprocessing, then augmentation, then float32: one flat Compose whose deterministic prefix
    ``CacheDataset`` can cache (it caches up to the first random transform).

    With ``device`` (e.g. ``"cuda"``), preprocessed crops move there before augmentation, so the
    random rotations, zooms and intensity changes run on the GPU (MONAI's transforms take tensors
    on any device) and a cache keeps the crops in GPU memory: 128 KB per 32³ crop. Load such
    datasets in one process (``medtl.loading.data_loader(on_device=True)``). The draws are the
    same wherever they run, so one seed gives the same augmentation on the CPU and the GPU up to
    floating-point rounding.

    ``options`` are ``preprocessing``'s arguments (modality, spatial_dims, spatial_size, ...).
    """
    pre = preprocessing(**options)
    keys = _keys(options.get("keys", ("image",)))
    aug = augmentation(
        level=level, spatial_dims=options.get("spatial_dims", 3), spatial_size=options.get("spatial_size"), keys=keys
    )
    to_device = [] if device is None else [EnsureTyped(keys=keys, dtype=torch.float32, device=torch.device(device))]
    pipeline = _Pipeline([*pre.transforms, *to_device, *aug.transforms, EnsureTyped(keys=keys, dtype=torch.float32)])
    if seed is not None:  # after building: a Compose re-seeds its random members when it is created
        pipeline.set_random_state(seed=seed)
    return pipeline


def eval_transforms(**options: Any) -> Compose:
    """Preprocessing then float32: what validation, testing and inference see (``options`` as for
    ``preprocessing``)."""
    pre = preprocessing(**options)
    return _Pipeline([*pre.transforms, EnsureTyped(keys=_keys(options.get("keys", ("image",))), dtype=torch.float32)])


__all__ = [
    "CT_WINDOW",
    "MODALITIES",
    "SPATIAL_DIMS",
    "CropAroundLesion",
    "CropAroundLesiond",
    "augmentation",
    "eval_transforms",
    "mask_center_mm",
    "preprocessing",
    "requires_mask",
    "train_transforms",
]
