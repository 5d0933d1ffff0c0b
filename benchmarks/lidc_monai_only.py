"""How far the LIDC bundle's stock-MONAI config agrees with its medtl config on real nodules.

    .venv/bin/python benchmarks/lidc_monai_only.py [--lidc ../shared/data/lidc_nodule_vois] [--work medtl-lidc]
        [--bundle bundles/lidc_nodule_malignancy] [--cases N] [--seed 0] [--threads 2] [--out lidc_monai_only.json]

The cases are the bundle's pooled test split (both LIDC sites' test nodules, patients never used for
its training or epoch choice; 231 nodules, the ``pooled_test_n`` of its ``metadata.json``), taken
from ``medtl import lidc``'s manifests under ``--work`` (imported there first if needed). ``--cases
N`` scores a seeded random sample of N of them instead (``numpy.random.default_rng(--seed)``, kept
in manifest order). Each case is the VOI as shipped in ``--lidc`` (its own orientation and spacing,
not the importer's RAS copy), linked into a temporary folder; its label is the importer's
(``diagnosis`` Malign = 1, Benign = 0).

One CSV of all cases is scored three times on the CPU, each a ``python -m monai.bundle run
--config_file ... --bundle_root BUNDLE`` subprocess as a user would type it: ``inference_monai.json``
(stock MONAI only; ``tests/test_lidc_monai_only.py`` checks that it runs with ``medtl`` blocked),
``inference.json`` (medtl's components, flip TTA), and ``inference.json --tta_axes []`` (no TTA:
the one difference left is the crop centre, the mask's bounding box in MONAI against its centre of
mass in medtl). Printed: the bundle version, N, per pair of configs max / mean / 95th percentile
(linear interpolation) of |ΔP(Malign)| and how many cases fall on the other side of 0.5, and each
config's AUC against the labels with a patient-level bootstrap 95% CI
(``medtl.evaluate.classification_metrics``). The AUCs are test-split figures; the agreement, not
the accuracy, is what this script is about (``benchmarks/lidc_model.py`` measures accuracy).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medtl.evaluate import classification_metrics
from medtl.fileio import atomic_write_json, utf8_child_env
from medtl.importers import LIDC_CLASSES, import_lidc_vois
from medtl.manifest import load_manifest
from medtl.privacy import load_or_create_salt, pseudonym

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "lidc_nodule_vois"
BUNDLE = REPO / "bundles" / "lidc_nodule_malignancy"

#: name -> (config file, extra CLI options)
CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "inference_monai.json": ("inference_monai.json", ()),
    "inference.json": ("inference.json", ()),
    "inference.json, no TTA": ("inference.json", ("--tta_axes", "[]")),
}
#: the pairs compared, (first, second): |P(first) - P(second)|
PAIRS = (
    ("inference_monai.json", "inference.json"),
    ("inference_monai.json", "inference.json, no TTA"),
    ("inference.json", "inference.json, no TTA"),
)


def pooled_test_cases(lidc: Path, work: Path) -> list[dict[str, Any]]:
    """The pooled test split of both sites as the importer made it, each case pointing at the VOI it
    was converted from: ``{"image", "mask"}`` (absolute paths under ``lidc``), ``label``, ``patient``,
    ``site``, ``case_id``, ``voi`` (the VOI's path in ``labels.csv``)."""
    summary = import_lidc_vois(lidc, work, progress=False)
    salt = load_or_create_salt(work / "manifests")  # the importer names a case by a salted hash of its VOI path
    with (lidc / "labels.csv").open(encoding="utf-8-sig") as fh:
        by_key = {pseudonym(r["image"], salt, "voi"): r for r in csv.DictReader(fh) if r.get("image")}
    cases = []
    for site in ("thin", "thick"):
        for c in load_manifest(work / summary["sites"][site]["manifest"])["cases"]:
            if c["split"] != "test":
                continue
            key = Path(c["image"]["path"]).name.removesuffix(".nii.gz")
            if key not in by_key:
                raise SystemExit(f"{work} was imported from other VOIs than {lidc} ({key}): pass another --work")
            row = by_key[key]
            cases.append(
                {
                    "image": str(lidc / row["image"]),
                    "mask": str(lidc / row["mask"]),
                    "label": LIDC_CLASSES.index(c["label"]),
                    "patient": c["patient_key"],
                    "site": site,
                    "case_id": c["case_id"],
                    "voi": row["image"],
                }
            )
    return cases


def pick(cases: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    """``n`` of ``cases`` drawn without replacement by ``default_rng(seed)``, in their given order;
    all of them when ``n`` is None or not below their number."""
    if n is None or n >= len(cases):
        return list(cases)
    if n < 1:
        raise SystemExit(f"--cases must be at least 1, got {n}")
    chosen = np.random.default_rng(seed).choice(len(cases), n, replace=False)
    return [cases[i] for i in sorted(chosen)]


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float | int]:
    """|a - b| of two P(Malign) vectors: max, mean, 95th percentile, and how many cases the 0.5
    threshold puts on different sides (P >= 0.5 is Malign, as an argmax of two classes)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = np.abs(a - b)
    return {
        "max": float(d.max()),
        "mean": float(d.mean()),
        "p95": float(np.percentile(d, 95)),
        "other_side": int(np.sum((a >= 0.5) != (b >= 0.5))),
    }


def scored_auc(cases: list[dict[str, Any]], p_malign: np.ndarray) -> dict[str, Any]:
    """AUC of P(Malign) against the cases' labels, with its patient-bootstrap 95% CI, as the bundle's
    ``eval_metrics`` state it."""
    p = np.asarray(p_malign, dtype=float)
    m = classification_metrics(
        np.array([c["label"] for c in cases]),
        np.stack([1 - p, p], 1),
        class_names=list(LIDC_CLASSES),
        patient_ids=[c["patient"] for c in cases],
    )["metrics"]["auc"]
    return {"auc": m["value"], "auc_ci95": m["ci95"]}


def write_inputs(folder: Path, cases: list[dict[str, Any]]) -> tuple[Path, Path, list[str]]:
    """One case list in both configs' forms: medtl's CSV (paths relative to it, so the VOIs are
    linked beside it) and a MONAI datalist of the same links. Returns both and each case's mask link."""
    masks = []
    for i, c in enumerate(cases):
        for key in ("image", "mask"):
            (folder / f"{key}_{i:04d}.nii.gz").symlink_to(c[key])
        masks.append(f"mask_{i:04d}.nii.gz")
    table = folder / "cases.csv"
    table.write_text("image,mask\n" + "".join(f"image_{i:04d}.nii.gz,{m}\n" for i, m in enumerate(masks)), "utf-8")
    datalist = folder / "datalist.json"
    testing = [{"image": str(folder / f"image_{i:04d}.nii.gz"), "mask": str(folder / m)} for i, m in enumerate(masks)]
    datalist.write_text(json.dumps({"testing": testing}), encoding="utf-8")
    return table, datalist, masks


def run_config(bundle: Path, config: str, extra: tuple[str, ...], inputs: tuple[Path, Path], out: Path, threads: int):
    """``python -m monai.bundle run`` of one config on the CPU; its P(Malign) by mask file name."""
    table, datalist = inputs
    given = ("--datalist_file", str(datalist)) if config == "inference_monai.json" else ("--input_csv", str(table))
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle / "configs" / config),
        "--meta_file",
        str(bundle / "configs" / "metadata.json"),
        "--bundle_root",
        str(bundle),
        *given,
        "--output_dir",
        str(out),
        *extra,
    ]
    env = utf8_child_env({**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)})
    done = subprocess.run(command, cwd=out.parent, capture_output=True, encoding="utf-8", errors="replace", env=env)
    if done.returncode != 0:
        raise SystemExit(f"{config} {' '.join(extra)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    with (out / "predictions.csv").open(encoding="utf-8") as fh:
        if config == "inference_monai.json":  # ClassificationSaver: mask path, P(class 0), P(class 1); no header
            return {Path(r[0]).name: float(r[2]) for r in csv.reader(fh)}
        return {Path(r["mask"]).name: float(r["prob_Malign"]) for r in csv.DictReader(fh)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lidc", default=str(SHARED), help="the lidc_nodule_vois folder")
    parser.add_argument("--work", default="medtl-lidc", help="where the imported NIfTI files and manifests go")
    parser.add_argument("--bundle", default=str(BUNDLE), help="the lidc_nodule_malignancy bundle folder")
    parser.add_argument(
        "--cases", type=int, help="a seeded sample of this many test nodules (default: the whole test split)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --cases sample and of the bootstrap")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each bundle run (OMP_NUM_THREADS)")
    parser.add_argument("--out", help="write the results and every case's probabilities as JSON here")
    args = parser.parse_args(argv)
    lidc, bundle = Path(args.lidc).resolve(), Path(args.bundle).resolve()
    if not (lidc / "labels.csv").is_file():
        raise SystemExit(f"LIDC VOIs not found at {lidc}: pass --lidc (see ../shared/data/README.md)")
    if not (bundle / "models" / "model.pt").is_file():
        raise SystemExit(f"no trained weights at {bundle / 'models' / 'model.pt'}: pass --bundle")
    version = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))["version"]
    everything = pooled_test_cases(lidc, Path(args.work))
    cases = pick(everything, args.cases, args.seed)

    probs: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lidc_monai_only-") as tmp:
        table, datalist, masks = write_inputs(Path(tmp), cases)
        for i, (name, (config, extra)) in enumerate(CONFIGS.items()):
            t = time.perf_counter()
            got = run_config(bundle, config, extra, (table, datalist), Path(tmp) / f"out{i}", args.threads)
            seconds[name] = round(time.perf_counter() - t, 1)
            missing = [m for m in masks if m not in got]
            if missing:
                raise SystemExit(f"{name} scored {len(masks) - len(missing)} of {len(masks)} cases")
            probs[name] = np.array([got[m] for m in masks])
            print(f"{name}: {len(masks)} cases in {seconds[name]:.0f} s", flush=True)

    y = np.array([c["label"] for c in cases])
    pairs = {f"{a} vs {b}": agreement(probs[a], probs[b]) for a, b in PAIRS}
    aucs = {name: scored_auc(cases, p) for name, p in probs.items()}

    n, whole = len(cases), len(everything)
    chosen = "the pooled test split" if n == whole else f"a seeded sample (seed {args.seed}) of the {whole}"
    print(
        f"\n{bundle.name} {version}: {n} LIDC test nodules ({chosen}; {int(y.sum())} malignant), "
        f"{len({c['patient'] for c in cases})} patients, CPU"
    )
    print(f"{'|ΔP(Malign)|':<50}{'max':>7}{'mean':>8}{'p95':>8}{'other side of 0.5':>20}")
    for pair, s in pairs.items():
        print(f"{pair:<50}{s['max']:>7.3f}{s['mean']:>8.3f}{s['p95']:>8.3f}{s['other_side']:>13} of {n}")
    print(f"\n{'config':<50}{'AUC':>7}  95% CI (patient bootstrap)")
    for name, a in aucs.items():
        print(f"{name:<50}{a['auc']:>7.3f}  [{a['auc_ci95'][0]:.3f}, {a['auc_ci95'][1]:.3f}]")
    if args.out:
        atomic_write_json(
            args.out,
            {
                "args": vars(args),
                "bundle": bundle.name,
                "version": version,
                "n": n,
                "test_split_n": whole,
                "malignant": int(y.sum()),
                "seconds": seconds,
                "agreement": pairs,
                "auc": aucs,
                "cases": [
                    {
                        "voi": c["voi"],
                        "site": c["site"],
                        "case_id": c["case_id"],
                        "label": c["label"],
                        **{name: float(p[i]) for name, p in probs.items()},
                    }
                    for i, c in enumerate(cases)
                ],
            },
        )


if __name__ == "__main__":
    main()
