"""P2: DICOM I/O. Is medtl's header-only scan much cheaper than reading every file, and does loading
one series cost about what SimpleITK's reader costs?

    .venv/bin/python benchmarks/io.py [--work DIR] [--scale 0.2] [--size 512] [--slices 100]
        [--repeats 5] [--out io.json]

Folders, generated once under ``--work`` (default: a temporary folder): site A of the demo cohort at
``--scale`` (64x64 slices, uncompressed), and one clinical-size CT series of ``--size``² x
``--slices``, written uncompressed and as JPEG 2000 lossless. Every file is read once before timing
(warm page cache); each figure is the median of ``--repeats`` runs, the tools taking turns. The
"cold" scan row drops the folder's files from the page cache (``posix_fadvise``) before every run.

Scan: ``write_scan_index`` (what ``medtl scan`` runs) against ``pydicom.dcmread`` + ``pixel_array``
of every file; bare ``dcmread(stop_before_pixels=True)`` is listed to show medtl's own cost.
Target: full read ÷ medtl scan >= 5. Load: ``load_volume(folder)`` against SimpleITK's
``ImageSeriesReader`` on GDCM's file list for the same series (array included); MONAI's
``LoadImage`` (``PydicomReader``) for reference. Target: medtl ÷ SimpleITK <= 1.2. medtl decodes
large JPEG 2000 / JPEG-LS series in one worker process per CPU; the "1 process" column is the same
load with that switched off. (SimpleITK uses several cores too: on the 2-core machine its CPU time
for the JPEG 2000 series was 1.7x its wall time.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from monai.transforms import LoadImage
from pydicom.uid import JPEG2000Lossless

import medtl.dicom
from medtl.demo import prepare_demo_data
from medtl.dicom import iter_files, write_scan_index
from medtl.dicomwrite import SeriesInfo, make_uid, write_ct_series
from medtl.fileio import atomic_write_json
from medtl.reader import load_volume

SCAN_TARGET = 5.0  # full read ÷ header scan, at least
LOAD_TARGET = 1.2  # medtl ÷ SimpleITK, at most


def median_seconds(
    fns: dict[str, Callable[[], Any]], repeats: int, before: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median wall time of each function over ``repeats`` rounds, after one untimed round (imports,
    caches, first touch); ``before`` runs untimed before every call. The functions take turns in
    every round, so load from other processes on a shared machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            before()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def phantom(size: int, slices: int, seed: int = 0) -> np.ndarray:
    """A CT-like body section in HU ([column, row, slice]): air outside, soft tissue and a lung-like
    region inside, with scanner noise; compresses like a real scan, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    body = np.where((x / 0.9) ** 2 + (y / 0.7) ** 2 < 1, 40.0, -1000.0)
    body = np.where(((np.abs(x) - 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1, -850.0, body)
    hu = body[:, :, None] + rng.normal(0, 12, size=(size, size, slices))
    return np.clip(np.round(hu), -1024, 3071)


def clinical_series(folder: Path, size: int, slices: int, transfer_syntax: str | None = None) -> Path:
    """One CT series at ``folder`` (written once; an existing complete folder is reused)."""
    if len(iter_files(folder)) != slices:
        info = SeriesInfo(
            patient_id="BENCH-IO",
            patient_name="BENCH^IO",
            study_uid=make_uid(f"io/{folder.name}/study"),
            series_uid=make_uid(f"io/{folder.name}/series"),
            series_description="BENCH",
        )
        options = {"transfer_syntax": transfer_syntax} if transfer_syntax else {}
        write_ct_series(folder, phantom(size, slices), (0.7, 0.7, 1.25), info, **options)
    return folder


def warm(folder: Path) -> list[Path]:
    files = iter_files(folder)
    for f in files:
        f.read_bytes()
    return files


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (no privileges needed), so the next read hits the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def scan_row(name: str, folder: Path, work: Path, repeats: int, *, cold: bool = False) -> dict[str, Any]:
    files = warm(folder)
    index = work / "scans" / f"{folder.name}.json"
    t = median_seconds(
        {
            "medtl_scan_s": lambda: write_scan_index(folder, index, progress=False),
            "pydicom_headers_s": lambda: [pydicom.dcmread(f, stop_before_pixels=True) for f in files],
            "full_read_s": lambda: [pydicom.dcmread(f).pixel_array for f in files],
        },
        repeats,
        (lambda: evict(files)) if cold else (lambda: None),
    )
    ratio = t["full_read_s"] / t["medtl_scan_s"]
    return {
        "folder": name,
        "files": len(files),
        **t,
        "ratio": ratio,
        "target": SCAN_TARGET,
        "pass": ratio >= SCAN_TARGET,
    }


def sitk_load(folder: Path) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def load_in_one_process(folder: Path) -> Any:
    """``load_volume`` with decoding in worker processes switched off."""
    threshold = medtl.dicom.PARALLEL_DECODE_MIN_PIXELS
    medtl.dicom.PARALLEL_DECODE_MIN_PIXELS = 2**62
    try:
        return load_volume(folder)
    finally:
        medtl.dicom.PARALLEL_DECODE_MIN_PIXELS = threshold


def load_row(name: str, folder: Path, repeats: int) -> dict[str, Any]:
    warm(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai_load = LoadImage(reader="PydicomReader", image_only=True)
    t = median_seconds(
        {
            "medtl_s": lambda: load_volume(folder),
            "medtl_one_process_s": lambda: load_in_one_process(folder),
            "simpleitk_s": lambda: sitk_load(folder),
            "monai_pydicom_s": lambda: monai_load(str(folder)),
        },
        repeats,
    )
    ratio = t["medtl_s"] / t["simpleitk_s"]
    # same voxels? SimpleITK gives [slice, row, column] in LPS, medtl [column, row, slice] in RAS
    same = bool(np.array_equal(load_volume(folder).array, sitk_load(folder).transpose(2, 1, 0)[::-1, ::-1, :]))
    return {
        "series": name,
        **t,
        "same_voxels": same,
        "ratio": ratio,
        "target": LOAD_TARGET,
        "pass": ratio <= LOAD_TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the generated DICOM data (reused across runs; default: temporary)")
    parser.add_argument("--scale", type=float, default=0.2, help="demo cohort scale (0.2: 60 site-A patients)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of the clinical-size series")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medtl-io-") as tmp:
        work = Path(args.work or tmp)
        demo = prepare_demo_data(work / "demo", scale=args.scale, progress=False)
        demo_dicom = Path(demo["out"]) / "site_A" / "dicom"
        one_demo_series = clinical_series(work / "demo_size", 64, 40)
        plain = clinical_series(work / f"ct{args.size}", args.size, args.slices)
        j2k = clinical_series(work / f"ct{args.size}_j2k", args.size, args.slices, JPEG2000Lossless)
        scans = [
            scan_row(f"demo site A ({args.scale:g}), 64x64", demo_dicom, work, args.repeats),
            scan_row(f"{args.size}x{args.size}x{args.slices}, uncompressed", plain, work, args.repeats),
            scan_row(f"{args.size}x{args.size}x{args.slices}, uncompr., cold", plain, work, args.repeats, cold=True),
            scan_row(f"{args.size}x{args.size}x{args.slices}, JPEG 2000", j2k, work, args.repeats),
        ]
        loads = [
            load_row("64x64x40, uncompressed", one_demo_series, args.repeats),
            load_row(f"{args.size}x{args.size}x{args.slices}, uncompressed", plain, args.repeats),
            load_row(f"{args.size}x{args.size}x{args.slices}, JPEG 2000", j2k, args.repeats),
        ]
    print(f"\nheader scan vs full read (median of {args.repeats}, warm cache unless cold; ms per file)")
    print(
        f"{'folder':<36}{'files':>7}{'medtl scan':>12}{'pydicom hdr':>13}{'full read':>11}"
        f"{'full/scan':>11}{'target':>9}  result"
    )
    for r in scans:
        ms = [f"{r[key] / r['files'] * 1e3:.2f}" for key in ("medtl_scan_s", "pydicom_headers_s", "full_read_s")]
        print(
            f"{r['folder']:<36}{r['files']:>7}{ms[0]:>12}{ms[1]:>13}{ms[2]:>11}"
            f"{r['ratio']:>10.2f}x{'>=5x':>9}  {'PASS' if r['pass'] else 'MISS'}"
        )
    print(f"\nloading one series (median of {args.repeats}, warm cache; seconds)")
    print(
        f"{'series':<32}{'medtl':>8}{'1 process':>11}{'SimpleITK':>11}{'MONAI LoadImage':>17}"
        f"{'medtl/SITK':>12}{'target':>9}  result  same voxels"
    )
    for r in loads:
        print(
            f"{r['series']:<32}{r['medtl_s']:>8.3f}{r['medtl_one_process_s']:>11.3f}{r['simpleitk_s']:>11.3f}"
            f"{r['monai_pydicom_s']:>17.3f}{r['ratio']:>11.2f}x{'<=1.2x':>9}  {'PASS' if r['pass'] else 'MISS':<8}"
            f"{'yes' if r['same_voxels'] else 'NO'}"
        )
    if args.out:
        atomic_write_json(args.out, {"scan": scans, "load": loads, "repeats": args.repeats})


if __name__ == "__main__":
    main()
