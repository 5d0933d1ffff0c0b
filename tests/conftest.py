"""Shared fixtures: the demo cohort at each scale the tests use, tiny generated CT series with known
geometry, and the optional shared data folder."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medtl.dicomwrite import SeriesInfo, make_uid, write_ct_series
from medtl.fileio import utf8_child_env

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


#: ``python -m monai.bundle`` ARGS that run a bundle's inference.json from inside the bundle.
RUN_INFERENCE = ("run", "--config_file", "configs/inference.json", "--bundle_root", ".")


def monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` as a user would type it; fails the test with its output on error."""
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=utf8_child_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@dataclass
class GeneratedSeries:
    """A series written by ``make_series`` and everything needed to predict how it must load."""

    folder: Path
    files: list[Path]  # in slice order (k = 0, 1, ...)
    hu: np.ndarray  # [column, row, slice], the values the loader must return
    info: SeriesInfo
    spacing: tuple[float, float, float]  # (column, row, slice) mm
    orientation: tuple[float, ...]  # ImageOrientationPatient (row direction, column direction)
    positions_lps: np.ndarray  # (slices, 3) ImagePositionPatient of each slice

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    def world_ras(self) -> np.ndarray:
        """RAS world coordinate of every stored voxel, shape hu.shape + (3,), from the DICOM tags' meaning."""
        cols, rows, _ = self.hu.shape
        orient = np.asarray(self.orientation, dtype=float)
        i = np.arange(cols)[:, None, None, None]
        j = np.arange(rows)[None, :, None, None]
        pos = np.asarray(self.positions_lps, dtype=float)[None, None, :, :]
        lps = pos + i * self.spacing[0] * orient[:3] + j * self.spacing[1] * orient[3:]
        return lps * np.array([-1.0, -1.0, 1.0])


def write_jpeg_lossless(source: str | Path, dest: Path) -> Path:
    """A JPEG-lossless DICOM copy of ``source`` written by SimpleITK (pydicom cannot encode that syntax).

    SimpleITK's DICOM writer (GDCM) sets the C library's whole locale to "C" and leaves it there:
    LC_CTYPE drops from C.UTF-8 to ASCII, and later subprocess output and text files decode as
    ASCII in this process. The locale is put back as it was.
    """
    import locale

    import SimpleITK as sitk

    saved = locale.setlocale(locale.LC_ALL)
    try:
        writer = sitk.ImageFileWriter()
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(dest))
        writer.Execute(sitk.ReadImage(str(source)))
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return dest


def ct_values(shape: Sequence[int], seed: int = 0, *, step: int = 1) -> np.ndarray:
    """Deterministic HU-like integers (every voxel distinct enough to catch flips and transposes)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-1000, 2000 // step, size=tuple(shape)) * step).astype(np.float64)


@pytest.fixture
def make_series(tmp_path):
    """Factory writing a small CT series into ``tmp_path / name``; returns a GeneratedSeries.

    Geometry defaults: 64 columns x 48 rows x 6 axial slices, spacing (0.7, 0.8, 2.5) mm, origin
    (10, 20, 30) LPS. ``positions_lps`` overrides slice positions (tilt, gaps, duplicates); other
    keyword arguments go to ``write_ct_series``.
    """

    def make(
        name: str = "series",
        shape: Sequence[int] = (64, 48, 6),
        spacing: Sequence[float] = (0.7, 0.8, 2.5),
        *,
        seed: int = 0,
        hu: np.ndarray | None = None,
        series_number: int = 1,
        patient_id: str = "PAT-0001",
        patient_name: str = "Doe^Jane",
        study_seed: str = "study-1",
        series_seed: str | None = None,
        origin_lps: Sequence[float] = (10.0, 20.0, 30.0),
        orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        positions_lps: Sequence[Sequence[float]] | None = None,
        folder: Path | None = None,
        **kwargs,
    ) -> GeneratedSeries:
        values = ct_values(shape, seed) if hu is None else np.asarray(hu, dtype=np.float64)
        info = SeriesInfo(
            patient_id=patient_id,
            patient_name=patient_name,
            study_uid=make_uid(study_seed),
            series_uid=make_uid(series_seed or f"series-{name}"),
            series_number=series_number,
            series_description=f"test series {name}",
        )
        orient = np.asarray(orientation, dtype=float)
        if positions_lps is None:
            normal = np.cross(orient[:3], orient[3:])
            positions = np.asarray(origin_lps, dtype=float) + np.arange(values.shape[2])[:, None] * spacing[2] * normal
        else:
            positions = np.asarray(positions_lps, dtype=float)
        # write_ct_series formats positions with 6 significant digits; predict with the same values
        positions = np.array([[float(f"{v:.6g}") for v in p] for p in positions])
        out = folder if folder is not None else tmp_path / name
        files = write_ct_series(
            out, values, spacing, info, orientation=tuple(orient), positions_lps=positions, **kwargs
        )
        return GeneratedSeries(
            out, files, values, info, tuple(spacing), tuple(float(f"{v:.6g}") for v in orient), positions
        )

    return make


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory) -> Path:
    """tumor_cls_finetune exported with an untrained (seeded) network: the real configs, weights in
    seconds. Shared by the modules that run or attack a bundle: copy it before changing it."""
    import torch
    from monai.networks.nets import resnet10

    from medtl.bundle.export import export_bundle

    torch.manual_seed(0)
    network = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.5)
    folder = tmp_path_factory.mktemp("bundles") / "tumor_cls_finetune"
    return export_bundle(network, folder, template="tumor_cls_finetune", torchscript=False, onnx=False)["path"]


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A small two-site demo cohort (scale 0.06) with scan indexes and manifests (about 5 s).

    Shared by the whole session: a test that changes files in it works on a copy
    (``shutil.copytree(small_demo["out"], tmp_path / "copy")``)."""
    from medtl.demo import prepare_demo_data

    return prepare_demo_data(tmp_path_factory.mktemp("demo"), scale=0.06, progress=False)


@pytest.fixture(scope="session")
def demo_with_unlabeled(tmp_path_factory):
    """The demo cohort at scale 0.1, just large enough that site B has train, val, test and unlabeled
    cases (fine-tuning, distillation and the bundles' runs need all four); built once a session.

    Shared like ``small_demo``: tests write their outputs elsewhere, and one that changes the cohort
    works on a copy."""
    from medtl.demo import prepare_demo_data

    return prepare_demo_data(tmp_path_factory.mktemp("demo_0.1"), scale=0.1, progress=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (public test data); skip when this checkout lacks it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("shared test data not found at <repo>/../shared/data; these tests need it")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _locale_unchanged(request):
    """Fail the test that changes the process locale: a locale switched mid-session (a library calling
    ``setlocale``) turns later subprocess output and text files into ASCII decode errors."""
    import locale

    before = locale.setlocale(locale.LC_ALL)
    yield
    after = locale.setlocale(locale.LC_ALL)
    if after != before:
        locale.setlocale(locale.LC_ALL, before)
        pytest.fail(f"{request.node.nodeid} changed the process locale from {before!r} to {after!r}")
