"""One entry point for images: DICOM series (folder or file list) and NIfTI, as a plain function
(``load_volume``), as a MONAI ``ImageReader`` (``VolumeReader``) and as the MONAI transform bundles
use (``LoadVolumed``)::

    {"_target_": "medtl.reader.LoadVolumed", "keys": ["image", "mask"], "allow_missing_keys": true}
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader
from monai.transforms import LoadImaged, MapTransform
from monai.utils import MetaKeys, SpaceKeys

from medtl.dicom import Header, assemble_series, group_series, iter_files, read_series, series_problems
from medtl.errors import DicomError, ImageError
from medtl.nifti import is_nifti, read_nifti
from medtl.volume import Volume

PathLike = str | Path

# LoadImage registers every MONAI reader, and the GPU DICOM decoder warns on each registration that
# it is absent; medtl decodes with pydicom's own plugins, so that warning is noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


def _pick_series(folder: Path, series: str | int | None) -> list[Header]:
    files = iter_files(folder)
    if not files:
        raise DicomError("empty folder: no files to load", path=folder)
    groups = group_series(files)
    if not groups:
        raise DicomError(
            f"none of the {len(files)} file(s) is a readable DICOM image",
            path=folder,
            hint="run `medtl scan` to see why each was skipped",
        )
    if series is not None:
        wanted = str(series)
        chosen = [hs for uid, hs in groups.items() if uid == wanted or str(hs[0].series_number) == wanted]
        if len(chosen) != 1:
            raise DicomError(f"series {wanted!r} not found (or not unique) in this folder", path=folder)
        return chosen[0]
    images = {uid: hs for uid, hs in groups.items() if not any(p["code"] == "non_image" for p in series_problems(hs))}
    if len(images) == 1:
        return next(iter(images.values()))
    listing = "; ".join(
        (
            f"series number {hs[0].series_number} ({hs[0].modality}, {len(hs)} files, "
            f"{hs[0].series_description or 'no description'})"
        )
        for hs in sorted(images.values() or groups.values(), key=lambda hs: hs[0].series_number or 0)
    )
    raise DicomError(
        f"folder holds {len(images)} image series: {listing}" if images else "folder holds no image series",
        path=folder,
        hint="choose one with --series NUMBER (or give the series' own file list)",
    )


def load_volume(source: PathLike | Sequence[PathLike], *, series: str | int | None = None) -> Volume:
    """Load a NIfTI file, a DICOM file, a list of DICOM files, or a DICOM folder holding one series."""
    if isinstance(source, (list, tuple)):
        if len(source) == 1:
            return load_volume(source[0], series=series)
        return read_series([Path(p) for p in source])
    path = Path(source)
    if is_nifti(path):
        return read_nifti(path)
    if path.is_dir():
        return assemble_series(_pick_series(path, series), name=str(path))
    if path.is_file():
        return read_series([path], name=str(path))  # a problem with a lone file names the file, not its folder
    raise ImageError("no such file or folder", path=path)


class VolumeReader(ImageReader):
    """MONAI reader for DICOM series and NIfTI with medtl's geometry checks and clear errors."""

    def __init__(self, series: str | int | None = None, **kwargs: Any):
        super().__init__()
        self.series = series

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return all(is_nifti(n) or Path(n).is_dir() or str(n).lower().endswith(".dcm") or len(names) > 1 for n in names)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Volume:
        return load_volume(data if isinstance(data, (str, Path)) else list(data), series=self.series)

    def get_data(self, img: Volume) -> tuple[np.ndarray, dict]:
        meta = {
            MetaKeys.AFFINE: img.affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: img.affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(img.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
            "spacing": np.asarray(img.spacing),
            "modality": img.modality or "",  # DICOM's code; "" for NIfTI (every case has the key, so batches collate)
        }
        return img.array, meta


class LoadVolumed(MapTransform):
    """MONAI's ``LoadImaged`` bound to ``VolumeReader``: channel-first MetaTensors in RAS.

    Given a reader up front, ``LoadImaged`` catches the reader's exception and raises a generic
    "cannot find a suitable reader" error; passing the reader per call keeps medtl's own error
    (file name and problem) intact.

    An entry that already holds an image (an array or tensor, as an application that loaded the
    series itself passes it: MONAI Deploy's bundle operator keeps this loader, whose name is not
    one it strips) is left as it is, so a bundle's ``preprocessing`` can start with the loader, as
    MONAI Label expects, and still take in-memory images.

    It holds a ``LoadImaged`` rather than being one: MONAI Label's ``BundleInferTask`` wraps every
    ``LoadImaged`` of a bundle's preprocessing in its own loader, which takes each of its keys as
    required, so a request without the optional mask (``allow_missing_keys``) failed with a KeyError.
    """

    def __init__(
        self,
        keys: KeysCollection,
        *,
        series: str | int | None = None,
        ensure_channel_first: bool = True,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ):
        super().__init__(keys, allow_missing_keys)
        with warnings.catch_warnings():  # MONAI probes optional GPU decoders while registering readers
            warnings.simplefilter("ignore")
            self.loader = LoadImaged(
                keys,
                reader=VolumeReader(series=series),
                ensure_channel_first=ensure_channel_first,
                allow_missing_keys=True,  # this transform checks the keys; the loader gets those to load
                **kwargs,
            )
        self.volume_reader = self.loader._loader.readers[-1]

    def __call__(self, data: Mapping[Any, Any]) -> dict:
        """Load the keys present (a missing one is an error unless ``allow_missing_keys``) whose value
        is not an image already."""
        d = dict(data)
        images = {key: d[key] for key in self.key_iterator(d) if isinstance(d[key], (np.ndarray, torch.Tensor))}
        loaded = self.loader({k: v for k, v in d.items() if k not in images}, reader=self.volume_reader)
        return {**loaded, **images}


__all__ = ["LoadVolumed", "VolumeReader", "load_volume"]
