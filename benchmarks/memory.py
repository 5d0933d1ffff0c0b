"""Peak memory: does scanning grow with the number of files only by the index it builds, and does
training hold the items and nothing more, epoch after epoch?

    .venv/bin/python benchmarks/memory.py [--work DIR] [--files 1000 10000] [--items 64 256]
        [--epochs 4] [--out memory.json]

Scan: folders of small DICOM files (32x32 pixels, 20-slice series, four per patient folder) are
written once under ``--work`` (default: a temporary folder) with ``write_ct_series``; each
folder is scanned with ``scan_dicom`` in a fresh child process, which reports its RSS after imports,
its peak RSS (``ru_maxrss``) and the largest peak of the header-reading worker processes a large
scan starts. Reported: peak RSS per folder, the growth in MB per 1,000 files and the ratio of the
peaks of the scanning process, which holds the index. Training: ``medtl.adapt.recipe.train``
(ResNet10 width 0.5, batch 16, light augmentation, no validation) on random preprocessed items
(1x32x32x32), for 1 epoch and for
``--epochs`` epochs, each in its own child process: the same peak after 1 and N epochs means
nothing accumulates per epoch; the step between dataset sizes is what the items cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medtl.dicomwrite import SeriesInfo, make_uid, write_ct_series
from medtl.fileio import atomic_write_json, utf8_child_env

SLICES = 20  # files per series in the generated folders

# Child programs: print one JSON line with RSS figures in MB (ru_maxrss is in KiB on Linux).
_RSS = """
import resource
def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS')) / 1024
def peak_mb(who=resource.RUSAGE_SELF):
    return resource.getrusage(who).ru_maxrss / 1024
"""

_SCAN = (
    _RSS
    + """
import json, sys
from medtl.dicom import scan_dicom
base = rss_mb()
index = scan_dicom(sys.argv[1], 'salt', progress=False)
print(json.dumps({'base_mb': base, 'peak_mb': peak_mb(), 'worker_peak_mb': peak_mb(resource.RUSAGE_CHILDREN),
                  'files': index['summary']['files'], 'series': index['summary']['series']}))
"""
)

_TRAIN = (
    _RSS
    + """
import json, sys
import torch
from monai.data import MetaTensor
from monai.utils import set_determinism
from medtl.adapt.recipe import train
from medtl.recipes import TrainRecipe
from medtl.networks import resnet
n, epochs = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(2)
set_determinism(0)
network = resnet(0.5)
base = rss_mb()
items = [{'image': MetaTensor(torch.rand(1, 32, 32, 32)), 'label': i % 2} for i in range(n)]
with_items = rss_mb()
result = train(network, items, None, TrainRecipe(epochs=epochs, batch_size=16, augment='light'), progress=False)
print(json.dumps({'base_mb': base, 'items_mb': with_items, 'peak_mb': peak_mb(), 'end_mb': rss_mb(),
                  'seconds': result['seconds']}))
"""
)


def child(program: str, *args: Any) -> dict[str, Any]:
    """Run ``program`` in a fresh interpreter (its own peak RSS) and return the JSON it prints."""
    done = subprocess.run(
        [sys.executable, "-c", program, *map(str, args)],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=utf8_child_env(),
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_folder(folder: Path, n_files: int) -> Path:
    """``n_files`` CT files of 32x32 pixels, SLICES per series and four series per patient folder,
    written once and reused."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    pixels = np.zeros((32, 32, SLICES))
    for s in range(n_files // SLICES):
        info = SeriesInfo(
            patient_id=f"BENCH-MEM-{s // 4:05d}",
            patient_name="BENCH^MEM",
            study_uid=make_uid(f"mem/{s // 4}"),
            series_uid=make_uid(f"mem/{s}"),
            series_number=s % 4 + 1,
        )
        write_ct_series(folder / f"patient_{s // 4:05d}", pixels, (1.0, 1.0, 2.0), info, file_prefix=f"S{s % 4}_")
    done.touch()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the generated DICOM files (reused across runs; default: temporary)")
    parser.add_argument("--files", type=int, nargs=2, default=[1000, 10000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--items", type=int, nargs="+", default=[64, 256], help="training set sizes")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medtl-memory-") as tmp:
        work = Path(args.work or tmp)
        scans = []
        for n in args.files:
            t = time.perf_counter()
            folder = write_folder(work / f"dicom_{n}", n)
            written = time.perf_counter() - t
            t = time.perf_counter()
            scans.append(child(_SCAN, folder) | {"seconds": time.perf_counter() - t, "write_seconds": written})
    training = [
        child(_TRAIN, n, epochs) | {"items": n, "epochs": epochs} for n in args.items for epochs in (1, args.epochs)
    ]

    (small, large) = scans
    per_1000 = (large["peak_mb"] - small["peak_mb"]) / (large["files"] - small["files"]) * 1000
    print("\nscan_dicom peak RSS (child process per folder; MB)")
    print(
        f"{'files':>7}{'series':>8}{'after imports':>15}{'peak':>8}{'peak - imports':>16}"
        f"{'worker peak':>13}{'seconds':>9}"
    )
    for r in scans:
        workers = f"{r['worker_peak_mb']:.0f}" if r["worker_peak_mb"] else "-"
        print(
            f"{r['files']:>7}{r['series']:>8}{r['base_mb']:>15.0f}{r['peak_mb']:>8.0f}"
            f"{r['peak_mb'] - r['base_mb']:>16.1f}{workers:>13}{r['seconds']:>9.1f}"
        )
    print(
        f"growth: {per_1000:.2f} MB per 1,000 files; peak {large['files']} / "
        f"{small['files']} files: {large['peak_mb'] / small['peak_mb']:.2f}x (above imports: "
        f"{(large['peak_mb'] - large['base_mb']) / max(small['peak_mb'] - small['base_mb'], 1e-9):.1f}x)"
    )
    print("\nrecipe.train peak RSS (child process per run; MB)")
    print(f"{'items':>6}{'epochs':>7}{'model':>7}{'+ items':>9}{'peak':>8}{'peak - items':>14}{'seconds':>9}")
    for r in training:
        print(
            f"{r['items']:>6}{r['epochs']:>7}{r['base_mb']:>7.0f}{r['items_mb']:>9.0f}{r['peak_mb']:>8.0f}"
            f"{r['peak_mb'] - r['items_mb']:>14.0f}{r['seconds']:>9.1f}"
        )
    for n in args.items:
        one, many = (r for r in training if r["items"] == n)
        print(
            f"{n} items: peak after {args.epochs} epochs - after 1 epoch = {many['peak_mb'] - one['peak_mb']:+.1f} MB"
        )
    if args.out:
        atomic_write_json(args.out, {"scan": scans, "train": training, "scan_mb_per_1000_files": per_1000})


if __name__ == "__main__":
    main()
