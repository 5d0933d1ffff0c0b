"""``medtl demo``: the ingest half of the main job on the embedded two-site cohort.

cohort (DICOM + masks + labels) -> scan index per site -> manifest per site -> manifest check.
Every arrow is a file the user can open; the closing table says where each one is.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from medtl.cohort import COHORT_VERSION, generate_cohort
from medtl.dicom import write_scan_index
from medtl.fileio import atomic_write_text
from medtl.manifest import build_manifest_file, check_manifest
from medtl.privacy import SALT_FILENAME

# Site B mimics a new hospital: few labeled cases to adapt with, most held out for evaluation.
DEMO_SPLITS = {"A": {"train": 0.7, "val": 0.15, "test": 0.15}, "B": {"train": 0.3, "val": 0.2, "test": 0.5}}
CLASSES = ("benign", "malignant")


def demo_salt(seed: int) -> str:
    """The demo's identities are synthetic, so its salt is fixed by the seed to make the example
    manifests in ``data_manifests/`` reproducible. Real projects get a random salt."""
    return hashlib.sha256(f"medtl-demo-cohort-{seed}".encode()).hexdigest()


def _cohort_current(out: Path, seed: int, scale: float) -> bool:
    try:
        info = json.loads((out / "cohort.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("seed") == seed and info.get("cohort_version") == COHORT_VERSION and info.get("scale", 1.0) == scale


def prepare_demo_data(out: str | Path, *, seed: int = 0, scale: float = 1.0, progress: bool = True) -> dict[str, Any]:
    """Cohort, scan indexes and manifests under ``out``; reuses a cohort already generated."""
    out = Path(out)
    timings = {}
    t0 = time.perf_counter()
    if not _cohort_current(out, seed, scale):
        generate_cohort(out, seed=seed, scale=scale, progress=progress)
    timings["cohort"] = time.perf_counter() - t0
    scans_dir = out / "scans"
    scans_dir.mkdir(parents=True, exist_ok=True)
    salt_file = scans_dir / SALT_FILENAME
    if not salt_file.exists():
        atomic_write_text(salt_file, demo_salt(seed) + "\n")
    sites = json.loads((out / "cohort.json").read_text())["sites"]
    result: dict[str, Any] = {"out": out, "sites": {}, "timings": timings}
    for name in sites:
        t0 = time.perf_counter()
        scan_path = scans_dir / f"site_{name}.json"
        index = write_scan_index(out / f"site_{name}" / "dicom", scan_path, progress=progress)
        timings[f"scan {name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        manifest_path = out / "manifests" / f"demo_site_{name}.json"
        manifest = build_manifest_file(
            labels=out / f"site_{name}" / "labels.csv", classes=CLASSES, out=manifest_path, scan=scan_path, root=out,
            fractions=DEMO_SPLITS.get(name), seed=seed, name=f"demo_site_{name}", progress=progress,
        )
        check = check_manifest(manifest_path, out, progress=progress)
        timings[f"manifest {name}"] = time.perf_counter() - t0
        result["sites"][name] = {"scan": scan_path, "scan_summary": index["summary"], "manifest": manifest_path, "counts": manifest["counts"], "check_ok": check["ok"]}
    return result


def run_demo(out: str | Path, *, seed: int = 0, scale: float = 1.0, progress: bool = True) -> dict[str, Any]:
    result = prepare_demo_data(out, seed=seed, scale=scale, progress=progress)
    print("\nmedtl demo: ingest")
    print(f"{'site':<5}{'files':>7}{'series':>8}{'loadable':>10}{'skipped':>9}  {'train':>6}{'val':>5}{'test':>6}{'unlab.':>7}  check")
    for name, site in result["sites"].items():
        s = site["scan_summary"]
        per_split = site["counts"]["by_site_split_label"].get(name, {})
        n = {k: sum(per_split.get(k, {}).values()) for k in ("train", "val", "test", "unlabeled")}
        print(f"{name:<5}{s['files']:>7}{s['series']:>8}{s['loadable_series']:>10}{s['skipped_files']:>9}  {n['train']:>6}{n['val']:>5}{n['test']:>6}{n['unlabeled']:>7}  {'OK' if site['check_ok'] else 'FAILED'}")
    print("\ntimings: " + ", ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items()))
    print("\nartifacts:")
    print(f"  cohort (DICOM, masks, labels.csv): {result['out']}/site_*/")
    for name, site in result["sites"].items():
        print(f"  site {name}: scan index {site['scan']}, manifest {site['manifest']}")
    return result
