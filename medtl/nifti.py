"""NIfTI volumes in and out, through nibabel, with the same checks as DICOM series."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medtl.errors import ImageError
from medtl.fileio import atomic_write
from medtl.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | Path) -> Volume:
    """Load a 3D NIfTI as a canonical RAS float32 volume; 4D or non-finite data is refused."""
    path = Path(path)
    if not path.exists():
        raise ImageError("file not found", path=path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except PermissionError:
        raise ImageError("permission denied", path=path, hint="check the file's read permissions") from None
    except Exception as exc:  # nibabel/gzip/zlib raise many types on damaged files
        detail = " ".join(str(exc).split())  # nibabel's messages span lines; the CLI prints one
        raise ImageError(f"not a readable NIfTI file ({exc.__class__.__name__}: {detail})", path=path) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageError(
            f"expected a 3D image, got shape {tuple(data.shape)}",
            path=path,
            hint="split 4D series (e.g. time points or channels) into one 3D file each",
        )
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise ImageError(f"{bad} voxel(s) are NaN or infinite", path=path, hint="fix or mask them before use")
    return Volume(data, np.asarray(img.affine, dtype=np.float64)).canonical()


def write_nifti(volume: Volume, path: str | Path, dtype: type | None = None) -> Path:
    """Write atomically with sform/qform set to scanner coordinates."""
    array = volume.array if dtype is None else volume.array.astype(dtype)
    img = nib.Nifti1Image(array, volume.affine)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))
