"""Benchmark scripts: the GPU benchmark runs end to end on the CPU, so it works when a GPU machine
first runs it; the LIDC MONAI-only benchmark's summary and case sample on known numbers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medtl.fileio import utf8_child_env

REPO = Path(__file__).resolve().parents[1]


def test_device_benchmark_measures_every_row_on_the_cpu(tmp_path):
    out = tmp_path / "device.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "device.py"),
            "--device",
            "cpu",
            "--steps",
            "1",
            "--cases",
            "4",
            "--batch-size",
            "2",
            "--widen",
            "0.125",
            "--out",
            str(out),
        ],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=utf8_child_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    rows = {(r["group"], r["row"]): r for r in result["rows"]}
    assert set(rows) == {
        ("train", "fp32"),
        ("train", "mixed precision"),
        ("train", "mixed precision, channels-last"),
        ("inference", "fp32"),
        ("inference", "mixed precision"),
        ("augmentation", "on the host, then copied"),
        ("augmentation", "on the device"),
        ("data path", "model only (batch on the device)"),
        ("data path", "augmentation on the host, pinned"),
        ("data path", "augmentation on the device"),
    }
    assert all(r["seconds"] > 0 and r["cases_per_s"] > 0 for r in rows.values())
    assert (
        rows[("train", "mixed precision")]["speedup"] > 0
        and rows[("data path", "augmentation on the device")]["per_model_only"] > 0
    )
    assert result["device"] == "CPU" and "÷" in done.stdout


def _lidc_monai_only():
    spec = importlib.util.spec_from_file_location("lidc_monai_only", REPO / "benchmarks" / "lidc_monai_only.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lidc_monai_only_summary_sample_and_missing_data(tmp_path):
    """The agreement figures on known numbers, the seeded sample, and the one-line refusal without data."""
    bench = _lidc_monai_only()
    a = np.array([0.10, 0.49, 0.51, 0.90, 0.50])
    b = np.array([0.12, 0.52, 0.51, 0.60, 0.49])
    s = bench.agreement(a, b)
    assert s["max"] == pytest.approx(0.30) and s["mean"] == pytest.approx((0.02 + 0.03 + 0 + 0.30 + 0.01) / 5)
    assert s["p95"] == pytest.approx(np.percentile([0.02, 0.03, 0, 0.30, 0.01], 95))
    assert s["other_side"] == 2  # 0.49 -> 0.52 and 0.50 -> 0.49 cross 0.5; 0.90 -> 0.60 does not

    cases = [{"i": i} for i in range(50)]
    picked = bench.pick(cases, 10, 0)
    assert picked == bench.pick(cases, 10, 0) != bench.pick(cases, 10, 1)
    assert len(picked) == 10 and [c["i"] for c in picked] == sorted(c["i"] for c in picked)
    assert bench.pick(cases, None, 0) == bench.pick(cases, 80, 0) == cases

    with pytest.raises(SystemExit, match=r"LIDC VOIs not found at .*nowhere: pass --lidc"):
        bench.main(["--lidc", str(tmp_path / "nowhere")])


@pytest.mark.slow
def test_shipped_lidc_bundle_reproduces_its_eval_metrics(shared_data, tmp_path):
    """The LIDC bundle's metadata states what its inference.json scores, through MONAI's CLI, on the
    pooled test split the importer draws (fixed salt: the same split on every machine)."""
    lidc = shared_data / "lidc_nodule_vois"
    if not (lidc / "labels.csv").is_file():
        pytest.skip("no LIDC VOIs in the shared data")
    bench = _lidc_monai_only()
    bundle = REPO / "bundles" / "lidc_nodule_malignancy"
    stated = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))["eval_metrics"]
    cases = bench.pooled_test_cases(lidc, tmp_path / "work")
    assert len(cases) == stated["pooled_test_n"]
    (tmp_path / "in").mkdir()
    table, datalist, masks = bench.write_inputs(tmp_path / "in", cases)
    got = bench.run_config(bundle, "inference.json", (), (table, datalist), tmp_path / "out", 2)
    auc = bench.scored_auc(cases, np.array([got[m] for m in masks]))
    assert auc["auc"] == pytest.approx(stated["pooled_test_auc"], abs=1e-4)
    assert auc["auc_ci95"] == pytest.approx(stated["pooled_test_auc_ci95"], abs=2e-3)


@pytest.mark.slow
def test_cross_task_benchmark_runs_every_method_and_pairs_it_with_scratch(tmp_path):
    """benchmarks/cross_task.py end to end on a tiny shape set: the LIDC bundle as the source, four
    methods, the paired difference to scratch in the printed table."""
    from tests.test_importers import FAKE_SHAPES, _fake_shape_npz

    npz = _fake_shape_npz(tmp_path / "shapes3d.npz", shapes=FAKE_SHAPES * 3, sizes=(12, 6, 6))
    out = tmp_path / "cross_task.json"
    argv = ["--npz", str(npz), "--classes", "normal,hyperplasia", "--work", str(tmp_path / "work"), "--draws", "1"]
    argv += ["--budgets", "1.0", "--epochs", "1", "--folds", "2", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cross_task.py"), *argv],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=utf8_child_env(),
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert sorted(r["method"] for r in rows) == sorted(["medtl recipe", "linear probe", "naive fine-tune", "scratch"])
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows)
    assert (
        "AUC - scratch" in done.stdout and "lidc_nodule_malignancy" in json.loads(out.read_text())["settings"]["bundle"]
    )
