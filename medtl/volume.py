"""A 3D image in canonical RAS orientation: the one in-memory form every reader returns."""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """DICOM patient coordinates (LPS) to NIfTI/MONAI world coordinates (RAS)."""
    return _LPS_TO_RAS @ affine


def canonical_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel's orientation transform taking an array with this affine to RAS axis order."""
    return nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(("R", "A", "S"))
    )


@dataclass
class Volume:
    """Voxel array indexed [i, j, k] and the 4x4 RAS affine mapping indices to millimetres, with the
    DICOM modality code (``"CT"``, ``"MR"``, ...) when the source names one (NIfTI does not)."""

    array: np.ndarray
    affine: np.ndarray
    modality: str | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def canonical(self) -> Volume:
        """Reorder/flip axes so i, j, k run closest to R, A, S (no resampling)."""
        transform = canonical_transform(self.affine)
        if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
            return self
        array = nib.orientations.apply_orientation(self.array, transform)
        affine = self.affine @ nib.orientations.inv_ornt_aff(transform, self.array.shape)
        return Volume(np.ascontiguousarray(array), affine, self.modality)
