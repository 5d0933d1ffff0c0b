"""``medtl demo``: the main job on the embedded two-site cohort, start to end.

cohort (DICOM + masks + labels) -> scan index and manifest per site -> source model trained on
site A -> evaluated on site A and site B (the domain-shift drop) -> AdaBN -> fine-tuned on a few
labeled site-B cases (freeze -> unfreeze) -> a smaller student distilled on site B's unlabeled
scans -> the fine-tuned model exported as a MONAI bundle -> its ``inference.json`` run by
``python -m monai.bundle run`` on site-B DICOM folders it never saw. Every arrow is a file the
user can open; the closing tables say what each stage scored and where each file is.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from monai.utils import set_determinism

from medtl.adapt.adabn import adabn
from medtl.adapt.recipe import distill, finetune, loader, preprocess_splits, recipe_outcome, train
from medtl.adapt.source import open_source
from medtl.bundle.export import export_bundle
from medtl.cohort import COHORT_VERSION, generate_cohort
from medtl.dicom import folder_key, write_scan_index
from medtl.errors import MedtlError
from medtl.fileio import atomic_write_json, atomic_write_text, utf8_child_env
from medtl.loading import resolve_device
from medtl.manifest import build_manifest_file, check_manifest, load_manifest
from medtl.networks import resnet
from medtl.privacy import SALT_FILENAME, load_salt
from medtl.recipes import DistillRecipe, FineTuneRecipe, TrainRecipe
from medtl.report import render_report
from medtl.runlog import record_curve, record_explanations, record_features, record_intensities, run_folder
from medtl.stages import adaptation_finding, evaluate_items, print_stages, stages_json
from medtl.transforms import preprocessing

# Site B mimics a new hospital: few labeled cases to adapt with, most held out for evaluation.
DEMO_SPLITS = {"A": {"train": 0.7, "val": 0.15, "test": 0.15}, "B": {"train": 0.3, "val": 0.2, "test": 0.5}}
CLASSES = ("benign", "malignant")


def demo_salt(seed: int) -> str:
    """The demo's identities are synthetic, so its salt is fixed by the seed to make the example
    manifests in ``data_manifests/`` reproducible. Real projects get a random salt."""
    return hashlib.sha256(f"medtl-demo-cohort-{seed}".encode()).hexdigest()


def _cohort_current(out: Path, seed: int, scale: float) -> bool:
    try:
        info = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
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
    sites = json.loads((out / "cohort.json").read_text(encoding="utf-8"))["sites"]
    result: dict[str, Any] = {"out": out, "sites": {}, "timings": timings}
    for name in sites:
        t0 = time.perf_counter()
        scan_path = scans_dir / f"site_{name}.json"
        index = write_scan_index(out / f"site_{name}" / "dicom", scan_path, progress=progress)
        timings[f"scan {name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        manifest_path = out / "manifests" / f"demo_site_{name}.json"
        manifest = build_manifest_file(
            labels=out / f"site_{name}" / "labels.csv",
            classes=CLASSES,
            out=manifest_path,
            scan=scan_path,
            root=out,
            fractions=DEMO_SPLITS.get(name),
            seed=seed,
            name=f"demo_site_{name}",
            progress=progress,
        )
        check = check_manifest(manifest_path, out, progress=progress)
        timings[f"manifest {name}"] = time.perf_counter() - t0
        result["sites"][name] = {
            "scan": scan_path,
            "scan_summary": index["summary"],
            "manifest": manifest_path,
            "counts": manifest["counts"],
            "check_ok": check["ok"],
        }
    return result


SPLITS = {"A": ("train", "val", "test"), "B": ("train", "val", "test", "unlabeled")}


def demo_splits(demo: Mapping[str, Any], *, progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Every site/split of the demo cohort, preprocessed once: ``{"A train": [...], ...}``."""

    pre = preprocessing(modality="ct")
    items: dict[str, list[dict[str, Any]]] = {}
    for site, splits in SPLITS.items():
        manifest = load_manifest(demo["sites"][site]["manifest"])
        items |= preprocess_splits(manifest, demo["out"], splits, pre, prefix=f"{site} ", progress=progress)
    return items


def _unseen_folders(demo: Mapping[str, Any], out: Path, n: int) -> tuple[Path, dict[str, str]]:
    """Copies of ``n`` site-B test patients' DICOM folders (never trained or selected on) and their
    truth, by folder name (one level below the copy, as ``truth_by_key`` expects)."""

    manifest = load_manifest(demo["sites"]["B"]["manifest"])
    folders, truth = [], {}
    for case in manifest["cases"]:
        if case["split"] == "test" and case["image"]["type"] == "dicom":
            folder = Path(case["image"]["files"][0]["path"]).parent
            if folder not in folders:
                folders.append(folder)
                truth[folder.name] = case["label"]
        if len(folders) == n:
            break
    incoming = out / "incoming_site_B"
    if incoming.exists():
        shutil.rmtree(incoming)
    for folder in folders:
        shutil.copytree(Path(demo["out"]) / folder, incoming / folder.name)
    return incoming, truth


def truth_by_key(truth: Mapping[str, str], output_dir: Path) -> dict[str, str]:
    """``truth`` (label by patient folder) by the salted key the bundle's predictions name each
    folder with: the site holds the salt (``output_dir/.medtl-salt``) and so can link its
    pseudonymous predictions back to its folders; a reader of the predictions alone cannot."""
    salt = load_salt(output_dir)
    return {folder_key(folder, salt): label for folder, label in truth.items()}


def run_bundle_inference(bundle: Path, input_dir: Path, output_dir: Path) -> list[dict[str, str]]:
    """The exported bundle's inference.json through MONAI's own CLI, as another site would run it
    (folders named by salted keys, its default)."""
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        ".",
        "--input_dir",
        str(input_dir.resolve()),
        "--output_dir",
        str(output_dir.resolve()),
    ]
    done = subprocess.run(
        command, cwd=bundle, capture_output=True, encoding="utf-8", errors="replace", env=utf8_child_env()
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise MedtlError(
            "the exported bundle's inference.json failed under python -m monai.bundle run",
            path=bundle.name,
            hint=" | ".join(tail),
        )
    return list(csv.DictReader((output_dir / "predictions.csv").open(encoding="utf-8")))


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    scale: float = 1.0,
    source_epochs: int = 20,
    target_epochs: int = 15,
    student_epochs: int = 15,
    unseen: int = 6,
    progress: bool = True,
    device: str = "auto",
    seeds: int = 1,
) -> dict[str, Any]:
    """The whole job on the demo cohort on ``device`` (``medtl.loading.resolve_device``); returns the
    stage table rows and artifact paths. ``seeds`` > 1 repeats the seed-dependent site-B stages
    (fine-tuning and the student) with seeds ``seed+1...`` over the same source model, and prints and
    reports each stage's spread of site-B test AUC."""

    out = Path(out)
    device = resolve_device(device)
    start = time.perf_counter()
    demo = prepare_demo_data(out, seed=seed, scale=scale, progress=progress)
    _print_ingest(demo)
    set_determinism(seed)
    t = time.perf_counter()
    items = demo_splits(demo, progress=progress)
    timings = {"ingest": time.perf_counter() - start, "preprocess": time.perf_counter() - t}
    rows: list[dict[str, Any]] = []
    records = run_folder(out)
    shutil.rmtree(records, ignore_errors=True)  # a report shows this run only
    test_sets = {"site A test": items["A test"], "site B test": items["B test"]}
    record_intensities(records, test_sets)

    def stage(
        name: str, network: Any, seconds: float, evaluated: dict[str, str], fitted: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        results = {
            label: evaluate_items(
                network, items[split], class_names=CLASSES, seed=seed, record=(records, name, label), device=device
            )
            for label, split in evaluated.items()
        }
        if fitted is not None:
            record_curve(records, name, fitted)
        params = sum(p.numel() for p in network.parameters())
        for label, result in results.items():
            rows.append({"stage": name, "evaluated on": label, "result": result, "params": params, "seconds": seconds})
        timings[name] = seconds
        return results

    print(f"\nmedtl demo: adaptation on {device} (every score on held-out test cases)")
    source, t = resnet(0.5), time.perf_counter()
    source_run = train(
        source,
        items["A train"],
        items["A val"],
        TrainRecipe(epochs=source_epochs),
        progress=progress,
        desc="source on site A",
        device=device,
    )
    source_results = stage(
        "source-only", source, time.perf_counter() - t, {"site A test": "A test", "site B test": "B test"}, source_run
    )

    adapted, t = copy.deepcopy(source), time.perf_counter()
    adabn(
        adapted,
        loader([*items["B train"], *items["B unlabeled"]], batch_size=16, device=device),
        progress=progress,
        device=device,
    )
    stage("AdaBN", adapted, time.perf_counter() - t, {"site B test": "B test"})

    # the fine-tuning starts from the exported source bundle, loaded as medtl adapt loads a received one
    bundles = out / "bundles"
    manifests = {name: load_manifest(site["manifest"]) for name, site in demo["sites"].items()}
    t = time.perf_counter()
    exported = {
        "tumor_cls_source": export_bundle(
            source,
            bundles / "tumor_cls_source",
            template="tumor_cls_source",
            metrics=source_results,
            manifests=[manifests["A"]],
            recipe={"training": asdict(TrainRecipe(epochs=source_epochs))},
            changelog="trained by medtl demo on demo site A",
        )
    }
    received = open_source(exported["tumor_cls_source"]["path"], target_classes=CLASSES, workdir=out / "adapt")
    timings["export + bundle inference"] = time.perf_counter() - t

    def fine_tune(run_seed: int, suffix: str = "") -> tuple[Any, dict[str, Any]]:
        set_determinism(run_seed)
        network = copy.deepcopy(received.network)
        fitted = finetune(
            network,
            items["B train"],
            items["B val"],
            FineTuneRecipe(epochs=target_epochs),
            unlabeled_items=items["B unlabeled"],
            progress=progress,
            desc=f"fine-tune on site B{suffix}",
            device=device,
            seed=run_seed,
        )
        return network, fitted

    def distil(teacher: Any, run_seed: int, suffix: str = "") -> tuple[Any, dict[str, Any]]:
        set_determinism(run_seed)
        network = resnet(0.25)
        fitted = distill(
            teacher,
            network,
            [*items["B train"], *items["A train"]],
            items["B unlabeled"],
            items["B val"],
            DistillRecipe(epochs=student_epochs),
            class_names=CLASSES,
            cache_dir=out / "cache",
            progress=progress,
            desc=f"distill student{suffix}",
            device=device,
        )
        return network, fitted

    def b_test_auc(network: Any) -> float:
        return evaluate_items(network, items["B test"], class_names=CLASSES, seed=seed, device=device)["metrics"][
            "auc"
        ]["value"]

    t = time.perf_counter()
    tuned, tuned_run = fine_tune(seed)
    tuned_results = stage("fine-tuned", tuned, time.perf_counter() - t, {"site B test": "B test"}, tuned_run)
    t = time.perf_counter()
    student, student_run = distil(tuned, seed)
    stage("student", student, time.perf_counter() - t, {"site B test": "B test"}, student_run)

    t = time.perf_counter()
    spread = {
        "source-only": [source_results["site B test"]["metrics"]["auc"]["value"]],
        "AdaBN": [_auc(rows, "AdaBN")],
        "fine-tuned": [tuned_results["site B test"]["metrics"]["auc"]["value"]],
        "student": [_auc(rows, "student")],
    }
    for extra in range(seed + 1, seed + seeds):
        again, _ = fine_tune(extra, f", seed {extra}")
        spread["fine-tuned"].append(b_test_auc(again))
        spread["student"].append(b_test_auc(distil(again, extra, f", seed {extra}")[0]))
    if seeds > 1:
        timings["more seeds"] = time.perf_counter() - t

    t = time.perf_counter()
    for name, network in (("source-only", source), ("AdaBN", adapted), ("fine-tuned", tuned)):
        record_features(records, name, network, test_sets, seed=seed, device=device)
    for name, network in (("source-only", source), ("fine-tuned", tuned)):
        record_explanations(records, f"{name} on site B", network, items["B test"], CLASSES, device=device)
    timings["explain"] = time.perf_counter() - t

    t = time.perf_counter()
    exported["tumor_cls_finetune"] = export_bundle(
        tuned,
        bundles / "tumor_cls_finetune",
        template="tumor_cls_finetune",
        metrics=tuned_results,
        source=exported["tumor_cls_source"]["path"],
        manifests=[manifests["B"]],
        recipe=recipe_outcome(tuned_run),
        changelog="adapted by medtl demo from tumor_cls_source to demo site B",
    )
    incoming, truth = _unseen_folders(demo, out, unseen)
    predictions = run_bundle_inference(exported["tumor_cls_finetune"]["path"], incoming, out / "predictions")
    timings["export + bundle inference"] += time.perf_counter() - t
    timings["total"] = time.perf_counter() - start

    print_stages(rows)
    finding = adaptation_finding(source, tuned, items["B test"], seed=seed, device=device)
    print(finding["text"])
    spread_text = seed_spread_text(spread)
    print(spread_text)
    kept = student_run["pseudo_labels"]
    print(
        f"fine-tuning: {recipe_outcome(tuned_run)['outcome']}\n"
        f"pseudo-labels for the student at p >= {kept['threshold']:g}: {kept['pseudo_labels_kept']}, "
        f"{kept['below_threshold']} soft-only"
    )
    print(
        f"\nbundle inference on {len(truth)} unseen site-B patients ({len(predictions)} "
        "series), python -m monai.bundle run:"
    )
    keyed_truth = truth_by_key(truth, out / "predictions")
    for row in predictions:
        folder = row["id"].split("#")[0]  # the series folder's key (dir-3f2a...#2)
        print(
            f"  {row['id']:<28} p(malignant) {float(row['prob_malignant']):.2f} -> {row['pred']:<10} "
            f"truth: {keyed_truth.get(folder, '?')}"
        )
    print("\ntimings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print("\nartifacts:")
    print(f"  cohort (DICOM, masks, labels.csv): {out}/site_*/")
    for name, site in demo["sites"].items():
        print(f"  site {name}: scan index {site['scan']}, manifest {site['manifest']}")
    for name, info in exported.items():
        onnx = (
            "no ONNX (onnxruntime not installed)"
            if info["onnx_max_abs_diff"] is None
            else f"ONNX {info['onnx_max_abs_diff']:.1e}"
        )
        print(
            f"  bundle {name} {info['version']}: {info['path']} (max abs diff to the network: TorchScript "
            f"{info['torchscript_max_abs_diff']:.1e}, {onnx})"
        )
    print(f"  predictions: {out / 'predictions'}/predictions.csv, predictions.json")
    summary = {
        "run": {
            "seed": seed,
            "scale": scale,
            "manifests": {m["name"]: m["content_sha256"] for m in manifests.values()},
        },
        "stages": stages_json(rows),
        "timings": timings,
        "bundles": {k: str(v["path"].relative_to(out)) for k, v in exported.items()},
        "pseudo_labels": kept,
        "predictions": predictions,
        "finding": finding,
        "seed_spread": spread,
    }
    atomic_write_json(records / "run.json", summary["run"] | {"findings": [finding["text"], spread_text]})
    report = render_report(out, title="medtl demo: adapting a tumor classifier from site A to site B")
    atomic_write_json(out / "demo_summary.json", summary | {"report": str(report["html"].relative_to(out))})
    print(f"  summary: {out / 'demo_summary.json'}")
    print(f"  report: {report['html']} (Markdown twin {report['markdown'].name}, {len(report['figures'])} figures)")
    return {
        "demo": demo,
        "rows": rows,
        "timings": timings,
        "bundles": exported,
        "predictions": predictions,
        "report": report,
    }


def _auc(rows: Sequence[Mapping[str, Any]], stage: str, where: str = "site B test") -> float:
    return next(
        r["result"]["metrics"]["auc"]["value"] for r in rows if r["stage"] == stage and r["evaluated on"] == where
    )


def seed_spread_text(spread: Mapping[str, Sequence[float]]) -> str:
    """Each stage's site-B test AUC over the seeds run: mean ± sd and range, and fine-tuning's mean
    change against source-only; with one seed, how to see the spread."""
    n = max(len(v) for v in spread.values())
    if n == 1:
        return (
            "seed spread: one seed ran; `medtl demo --seeds 3` repeats fine-tuning and the student with two more seeds "
            "(about 3.5 min each) and reports their spread"
        )
    parts = []
    for stage, values in spread.items():
        a = np.asarray(values, dtype=float)
        parts.append(
            f"{stage} {a.mean():.3f}"
            + (f" ± {a.std(ddof=1):.3f} ({a.min():.3f}-{a.max():.3f})" if len(a) > 1 else " (one model)")
        )
    gain = np.mean(spread["fine-tuned"]) - spread["source-only"][0]
    return (
        f"seed spread, site B test AUC over {n} seeds (one source model; AdaBN has no seed): "
        + "; ".join(parts)
        + f"; fine-tuned minus source-only in the mean: {gain:+.3f}"
    )


def _print_ingest(result: Mapping[str, Any]) -> None:
    print("\nmedtl demo: ingest")
    print(
        f"{'site':<5}{'files':>7}{'series':>8}{'loadable':>10}{'skipped':>9}  "
        f"{'train':>6}{'val':>5}{'test':>6}{'unlab.':>7}  check"
    )
    for name, site in result["sites"].items():
        s = site["scan_summary"]
        per_split = site["counts"]["by_site_split_label"].get(name, {})
        n = {k: sum(per_split.get(k, {}).values()) for k in ("train", "val", "test", "unlabeled")}
        print(
            f"{name:<5}{s['files']:>7}{s['series']:>8}{s['loadable_series']:>10}{s['skipped_files']:>9}  "
            f"{n['train']:>6}{n['val']:>5}{n['test']:>6}{n['unlabeled']:>7}  {'OK' if site['check_ok'] else 'FAILED'}"
        )
