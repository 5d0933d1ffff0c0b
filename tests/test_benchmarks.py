"""The GPU benchmark runs end to end on the CPU, so it works when a GPU machine first runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
