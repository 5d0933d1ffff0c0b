"""The embedded two-site demo cohort: chest-CT lung lesions written as real DICOM series.

Lesions are drawn in millimetres and sampled through each site's scanner model, so site
differences arise the way they do between scanners rather than as a label-dependent trick:

* malignant lesions are larger on average, lobulated, often spiculated and heterogeneous
  (solid texture, necrotic core, ground-glass halo); benign ones are smaller, smoother, more
  homogeneous and sometimes calcified, with overlap in every feature (atypical cases on both sides);
* site A is a thin-slice sharp-kernel scanner; site B is a low-dose protocol with thick slices,
  coarser in-plane resolution, a smooth kernel (blur), strong blotchy noise and a HU calibration
  offset. Lesion size differs only mildly between classes, so a model must read margins and
  texture, which are exactly what site B's acquisition degrades.

Everything is deterministic given the seed: UIDs, pixel values and file bytes.
"""

from __future__ import annotations

import functools
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtl.dicomwrite import SeriesInfo, make_uid, write_ct_series
from medtl.fileio import atomic_write_csv, atomic_write_json
from medtl.nifti import write_nifti
from medtl.progress import track
from medtl.volume import Volume, lps_to_ras

COHORT_VERSION = 1
LABELS = ("benign", "malignant")
TEXTURE_GRAIN_MM = 1.0  # correlation length of the lesions' internal texture


@dataclass(frozen=True)
class SiteProfile:
    """How one scanner samples the same anatomy."""

    name: str
    n_patients: int
    malignant_fraction: float
    spacing: tuple[float, float, float]  # column, row, slice (mm)
    shape: tuple[int, int, int]  # columns, rows, slices
    psf_mm: float  # in-plane reconstruction blur (Gaussian sigma)
    noise_hu: float  # noise standard deviation
    noise_grain_mm: float  # noise correlation length (texture of the kernel)
    hu_offset: float  # calibration error added to every voxel
    rescale_intercept: float
    kernel: str
    manufacturer: str
    model: str
    unlabeled_fraction: float = 0.0  # cases whose label is withheld (for distillation)


SITES: dict[str, SiteProfile] = {
    "A": SiteProfile(
        name="A",
        n_patients=300,
        malignant_fraction=0.45,
        spacing=(0.75, 0.75, 1.25),
        shape=(64, 64, 40),
        psf_mm=0.35,
        noise_hu=12.0,
        noise_grain_mm=0.35,
        hu_offset=0.0,
        rescale_intercept=-1024.0,
        kernel="B60f",
        manufacturer="medtl-site-A",
        model="thin-slice sharp",
    ),
    "B": SiteProfile(
        name="B",
        n_patients=160,
        malignant_fraction=0.35,
        spacing=(0.9, 0.9, 2.5),
        shape=(56, 56, 20),
        psf_mm=1.6,
        noise_hu=70.0,
        noise_grain_mm=1.0,
        hu_offset=60.0,
        rescale_intercept=-1000.0,
        kernel="SOFT",
        manufacturer="medtl-site-B",
        model="low-dose thick-slice smooth",
        unlabeled_fraction=0.4,
    ),
}


def _gaussian(vol: np.ndarray, sigma_vox: tuple[float, ...]) -> np.ndarray:
    """Gaussian filter by FFT with reflect padding (numpy only)."""
    if all(s <= 0 for s in sigma_vox):
        return vol
    pad = [(int(np.ceil(3 * s)),) * 2 for s in sigma_vox]
    padded = np.pad(vol, pad, mode="reflect")
    spectrum = np.fft.rfftn(padded)
    for axis, s in enumerate(sigma_vox):
        n = padded.shape[axis]
        freq = np.fft.rfftfreq(n) if axis == padded.ndim - 1 else np.fft.fftfreq(n)
        kernel = np.exp(-2 * (np.pi * freq * s) ** 2)
        shape = [1] * padded.ndim
        shape[axis] = kernel.size
        spectrum *= kernel.reshape(shape)
    out = np.fft.irfftn(spectrum, s=padded.shape, axes=range(padded.ndim))
    return out[tuple(slice(p[0], p[0] + n) for p, n in zip(pad, vol.shape, strict=True))]


@dataclass
class Lesion:
    """A lesion in millimetres, independent of any scanner."""

    label: str
    center: np.ndarray  # mm, relative to the field-of-view centre
    radius: float
    lobes: list[tuple[np.ndarray, float, float]]  # (direction, amplitude, angular frequency)
    spicules: list[tuple[np.ndarray, float, float]]  # (direction, length mm, width mm)
    density: float  # mean HU of solid tissue
    heterogeneity: float  # HU std of internal texture
    necrosis: float  # fraction of radius that is a low-density core (0 = none)
    cavity: float  # fraction of radius that is an air-filled cavity (0 = none)
    calcification: float  # fraction of radius that is calcified (0 = none)
    halo: float  # ground-glass halo thickness in mm (0 = none)

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "diameter_mm": round(2 * self.radius, 2),
            "spicules": len(self.spicules),
            "lobulation": round(sum(a for _, a, _ in self.lobes), 3),
            "calcified": self.calcification > 0,
            "necrotic": self.necrosis > 0,
            "cavitated": self.cavity > 0,
        }


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def draw_lesion(rng: np.random.Generator, malignant: bool) -> Lesion:
    """Draw lesion properties; each feature overlaps between classes, ~10% of cases are atypical."""
    atypical = rng.random() < 0.1
    looks_malignant = malignant != atypical
    diameter = float(np.clip(rng.lognormal(np.log(13.0 if malignant else 11.5), 0.3), 5.0, 28.0))
    n_lobes = int(rng.integers(2, 5))
    lobe_amp = (0.08, 0.2) if looks_malignant else (0.0, 0.04)
    lobes = [(_unit(rng), float(rng.uniform(*lobe_amp)), float(rng.uniform(2.0, 5.0))) for _ in range(n_lobes)]
    n_spic = int(rng.integers(4, 13)) if looks_malignant and rng.random() < 0.85 else int(rng.random() < 0.08)
    spicules = [
        (_unit(rng), float(rng.uniform(0.4, 1.2) * diameter / 2 + 2.0), float(rng.uniform(0.7, 1.3)))
        for _ in range(n_spic)
    ]
    return Lesion(
        label="malignant" if malignant else "benign",
        center=rng.uniform(-6.0, 6.0, size=3),
        radius=diameter / 2,
        lobes=lobes,
        spicules=spicules,
        density=float(rng.normal(35.0, 12.0)),
        heterogeneity=float(rng.uniform(25.0, 50.0) if looks_malignant else rng.uniform(3.0, 10.0)),
        necrosis=float(rng.uniform(0.3, 0.6)) if looks_malignant and diameter > 11 and rng.random() < 0.7 else 0.0,
        cavity=float(rng.uniform(0.2, 0.45)) if malignant and diameter > 14 and rng.random() < 0.25 else 0.0,
        calcification=float(rng.uniform(0.2, 0.5)) if not malignant and rng.random() < 0.3 else 0.0,
        halo=float(rng.uniform(1.0, 2.5)) if looks_malignant and rng.random() < 0.3 else 0.0,
    )


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of points p (..., 3) to the segment a-b and the position t in [0, 1] along it."""
    a, b = a.astype(p.dtype), b.astype(p.dtype)
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.linalg.norm(p - closest, axis=-1), t


def render(
    lesion: Lesion, points: np.ndarray, voxel_mm: tuple[float, float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """HU of lung background plus lesion on the grid ``points`` (x, y, z, 3) in mm, whose voxel
    size is ``voxel_mm``; also the lesion mask."""
    shape = points.shape[:-1]
    # Lung parenchyma with slow density variation and a few vessels crossing the field.
    hu = np.full(shape, -850.0) + 25.0 * np.sin(points @ _unit(rng) / rng.uniform(6.0, 12.0))
    for _ in range(int(rng.integers(3, 7))):
        a = _unit(rng) * 30.0 + rng.uniform(-8, 8, 3)
        dist, _ = _segment_distance(points, a, -a + rng.uniform(-8, 8, 3))
        radius = rng.uniform(0.6, 1.8)
        hu = np.maximum(hu, -850.0 + 890.0 * np.clip(1.5 - dist / radius, 0.0, 1.0))
    rel = points - lesion.center
    r = np.linalg.norm(rel, axis=-1)
    direction = rel / np.maximum(r, 1e-6)[..., None]
    boundary = np.full(shape, lesion.radius)
    for axis, amp, freq in lesion.lobes:
        boundary += lesion.radius * amp * np.cos(freq * np.arccos(np.clip(direction @ axis, -1.0, 1.0)))
    solid = np.clip((boundary - r) / 0.4 + 0.5, 0.0, 1.0)
    if lesion.spicules:  # evaluated only near the lesion, where spicules can reach
        reach = lesion.radius * 1.3 + max(length for _, length, _ in lesion.spicules) + 2.0
        near = r < reach
        rel_near, solid_near = rel[near], solid[near]
        for axis, length, width in lesion.spicules:
            dist, t = _segment_distance(rel_near, axis * lesion.radius * 0.7, axis * (lesion.radius + length))
            taper = width * (1.0 - 0.7 * t)
            solid_near = np.maximum(solid_near, np.clip((taper - dist) / 0.3 + 0.5, 0.0, 1.0))
        solid[near] = solid_near
    texture = _gaussian(rng.normal(size=shape), tuple(TEXTURE_GRAIN_MM / v for v in voxel_mm))
    texture /= texture.std() + 1e-6
    tissue = lesion.density + lesion.heterogeneity * texture
    if lesion.necrosis:
        tissue = np.where(r < lesion.necrosis * lesion.radius, tissue - 60.0, tissue)
    if lesion.cavity:
        tissue = np.where(
            np.linalg.norm(rel - lesion.radius * 0.2 * _unit(rng), axis=-1) < lesion.cavity * lesion.radius,
            -900.0,
            tissue,
        )
    if lesion.calcification:
        calc_center = lesion.radius * 0.3 * _unit(rng)
        calc = np.linalg.norm(rel - calc_center, axis=-1) < lesion.calcification * lesion.radius
        tissue = np.where(calc, rng.uniform(250.0, 600.0), tissue)
    if lesion.halo:
        halo = np.clip((boundary + lesion.halo - r) / 0.5, 0.0, 1.0) * (1 - solid)
        hu = hu * (1 - halo) + (-500.0 + 60.0 * texture) * halo
    hu = hu * (1 - solid) + tissue * solid
    return hu, (r < boundary)


def acquire(site: SiteProfile, lesion: Lesion, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample the lesion through the site's scanner: slab averaging, blur, noise, calibration.

    Returns HU [column, row, slice], the lesion mask on the same grid, and the LPS affine.
    """
    sx, sy, sz = site.spacing
    nx, ny, nz = site.shape
    sub = max(1, int(np.ceil(sz / 0.8)))  # sub-slices averaged into one thick slice (partial volume)
    xs = (np.arange(nx) - (nx - 1) / 2) * sx
    ys = (np.arange(ny) - (ny - 1) / 2) * sy
    zs = (np.arange(nz * sub) - (nz * sub - 1) / 2) * (sz / sub)
    points = np.stack(np.meshgrid(xs, ys, zs, indexing="ij"), axis=-1).astype(np.float32)
    hu_fine, mask_fine = render(lesion, points, (sx, sy, sz / sub), rng)
    hu = hu_fine.reshape(nx, ny, nz, sub).mean(axis=-1)
    mask = mask_fine.reshape(nx, ny, nz, sub).mean(axis=-1) >= 0.5
    hu = _gaussian(hu, (site.psf_mm / sx, site.psf_mm / sy, 0.0))
    grain = (site.noise_grain_mm / sx, site.noise_grain_mm / sy, 0.5)
    noise = _gaussian(rng.normal(size=hu.shape), grain)
    hu = hu + site.noise_hu * noise / (noise.std() + 1e-6) + site.hu_offset
    hu = np.clip(np.round(hu), site.rescale_intercept, 3071)
    # Patient coordinates: field of view centred at a random table position, axial, head-first supine.
    origin = np.array([-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz]) + rng.uniform(-60, 60, 3)
    lps = np.diag([sx, sy, sz, 1.0])
    lps[:3, 3] = origin
    return hu, mask, lps


def _site_cases(site: SiteProfile, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, ord(site.name)])
    n_mal = int(round(site.n_patients * site.malignant_fraction))
    labels = np.array(["malignant"] * n_mal + ["benign"] * (site.n_patients - n_mal))
    rng.shuffle(labels)
    unlabeled = rng.random(site.n_patients) < site.unlabeled_fraction
    # Hospital-style record numbers, unrelated to the folder names (which are subject numbers).
    mrns = rng.choice(np.arange(1_000_000, 9_999_999), size=site.n_patients, replace=False)
    cases = []
    for i, label in enumerate(labels):
        cases.append(
            {
                "index": i + 1,
                "folder": f"subject_{i + 1:04d}",
                "patient_id": f"{site.name}{mrns[i]}",
                "label": str(label),
                "unlabeled": bool(unlabeled[i]),
                "second_series": i % 12 == 3,  # about 8% of folders hold a second (thick) series
            }
        )
    return cases


def generate_cohort(
    out: str | Path,
    *,
    seed: int = 0,
    sites: tuple[str, ...] = ("A", "B"),
    scale: float = 1.0,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the demo cohort under ``out`` and return its description (also saved as cohort.json).

    Layout: ``site_X/dicom/subject_NNNN/`` (one folder per patient, some holding a second, thick
    series), ``site_X/masks/subject_NNNN.nii.gz`` and ``site_X/labels.csv``. ``scale`` shrinks the
    number of patients for tests. Patients are rendered in ``workers`` processes (default: one per
    CPU); the files are the same for any number.
    """
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    out = Path(out)
    summary: dict[str, Any] = {"cohort_version": COHORT_VERSION, "seed": seed, "scale": scale, "sites": {}}
    for name in sites:
        profile = SITES[name]
        if scale != 1.0:
            profile = SiteProfile(**{**asdict(profile), "n_patients": max(4, int(round(profile.n_patients * scale)))})
        # Written aside and renamed whole, so an interrupted run never leaves half a site behind.
        final, partial = out / f"site_{name}", out / f".site_{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        summary["sites"][name] = _write_site(partial, profile, seed, progress, workers)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    atomic_write_json(out / "cohort.json", summary)
    return summary


def _write_case(
    root: Path, site: SiteProfile, seed: int, case: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One patient's series (and thick series), mask and label row; its own generator makes the
    files the same whichever process writes them."""
    pid, folder_name = case["patient_id"], case["folder"]
    rng = np.random.default_rng([seed, ord(site.name), case["index"]])
    lesion = draw_lesion(rng, case["label"] == "malignant")
    hu, mask, lps = acquire(site, lesion, rng)
    study_uid = make_uid(f"{seed}/{pid}/study")
    info = SeriesInfo(
        patient_id=pid,
        patient_name=f"DEMO^{site.name}{case['index']:04d}",
        study_uid=study_uid,
        series_uid=make_uid(f"{seed}/{pid}/series/2"),
        series_number=2,
        series_description=f"CHEST {site.spacing[2]:g}mm {site.kernel}",
        birth_date="19600101",
        accession=f"X{pid}",
        manufacturer=site.manufacturer,
        model=site.model,
        kernel=site.kernel,
    )
    folder = root / "dicom" / folder_name
    write_ct_series(folder, hu, site.spacing, info, origin_lps=lps[:3, 3], rescale_intercept=site.rescale_intercept)
    if case["second_series"]:  # a thick 5 mm reconstruction of the same scan in the same folder
        factor = max(1, int(round(5.0 / site.spacing[2])))
        nz = hu.shape[2] // factor * factor
        thick = np.round(hu[:, :, :nz].reshape(hu.shape[0], hu.shape[1], -1, factor).mean(axis=-1))
        thick_info = SeriesInfo(
            **{
                **asdict(info),
                "series_uid": make_uid(f"{seed}/{pid}/series/3"),
                "series_number": 3,
                "series_description": "CHEST 5mm THICK",
            }
        )
        origin = lps[:3, 3] + np.array([0, 0, (factor - 1) / 2 * site.spacing[2]])
        write_ct_series(
            folder,
            thick,
            (*site.spacing[:2], site.spacing[2] * factor),
            thick_info,
            origin_lps=origin,
            rescale_intercept=site.rescale_intercept,
            file_prefix="TH",
        )
    mask_rel = f"masks/{folder_name}.nii.gz"
    write_nifti(Volume(mask.astype(np.uint8), lps_to_ras(lps)).canonical(), root / mask_rel, dtype=np.uint8)
    row = {
        "patient_id": pid,
        "series_uid": info.series_uid,
        "label": "" if case["unlabeled"] else case["label"],
        "site": site.name,
        "mask": mask_rel,
    }
    return row, {"subject": folder_name, **lesion.describe()}


def _write_site(root: Path, site: SiteProfile, seed: int, progress: bool, workers: int) -> dict[str, Any]:
    cases = _site_cases(site, seed)
    write = functools.partial(_write_case, root, site, seed)
    bar = {"desc": f"site {site.name}", "unit": "patient", "disable": not progress, "total": len(cases)}
    if workers <= 1:
        written = list(track(map(write, cases), **bar))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:  # rendering is numpy-bound, one case per core
            written = list(track(pool.map(write, cases), **bar))
    rows = [row for row, _ in written]
    truth = [entry for _, entry in written]
    atomic_write_csv(root / "labels.csv", rows, list(rows[0]))
    atomic_write_json(root / "truth.json", truth)
    labels = [t["label"] for t in truth]
    return {
        "profile": asdict(site),
        "patients": len(rows),
        "malignant": labels.count("malignant"),
        "benign": labels.count("benign"),
        "unlabeled": sum(1 for r in rows if not r["label"]),
        "two_series_folders": sum(c["second_series"] for c in cases),
    }
