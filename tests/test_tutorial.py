"""The tutorial notebook runs start to end in a fresh kernel and leaves what it promises: a shared bundle
that verifies, predictions for the new patients and the report's figures, with no absolute paths shown."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "tutorials" / "adapt_a_bundle.ipynb"


def test_the_notebook_is_committed_without_outputs():
    """Outputs hold one machine's paths, timings and figures; the notebook's text is its source."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    # the knobs a user scales it with sit in one cell at the top, tagged as papermill expects
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(name in code[0].source for name in ("SCALE", "EPOCHS", "WORK"))


@pytest.mark.slow
def test_the_tutorial_runs_and_leaves_a_verified_bundle_predictions_and_figures(tmp_path, monkeypatch):
    from ipykernel.kernelspec import write_kernel_spec
    from nbclient import NotebookClient

    from medtl.bundle.verify import verify_bundle

    # the kernel is this interpreter: its spec goes first on Jupyter's path, and nothing is written to the user's home
    jupyter = tmp_path / "jupyter"
    write_kernel_spec(jupyter / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    spec = json.loads((jupyter / "kernels" / "python3" / "kernel.json").read_text(encoding="utf-8"))
    assert spec["argv"][0] == sys.executable

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    run = tmp_path / "run"
    run.mkdir()
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(run)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails

    work = run / "adapt-tutorial"
    shared = list((work / "outbox").glob("lidc_nodule_malignancy_*.zip"))
    assert len(shared) == 1 and verify_bundle(shared[0]).ok
    metadata = work / "adapted" / "lidc_nodule_malignancy" / "configs" / "metadata.json"
    meta = json.loads(metadata.read_text(encoding="utf-8"))
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "benign", "1": "malignant"}

    with (work / "masks.csv").open(encoding="utf-8") as f:
        new_series = list(csv.DictReader(f))
    with (work / "predictions" / "predictions.csv").open(encoding="utf-8") as f:
        predictions = list(csv.DictReader(f))
    assert new_series and len(predictions) == len(new_series)  # one per masked series; the thick ones skipped
    assert all(row["pred"] in ("benign", "malignant") and row["id"].startswith("dir-") for row in predictions)

    figures = {p.name for p in (work / "adapted" / "report" / "figures").glob("*.png")}
    assert {"roc.png", "calibration.png", "learning_curves.png", "gradcam_fine-tuned-on-the-target.png"} <= figures
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 5  # the cases' slices and the four report figures, inline
    assert not [output for output in outputs if output.output_type == "error"]
    # what the notebook shows names files relative to its folder (library warnings on stderr name their own install)
    shown = [
        line
        for output in outputs
        if output.get("name") != "stderr"
        for line in (output.get("text", "") + output.get("data", {}).get("text/plain", "")).splitlines()
    ]
    assert shown and not [line for line in shown if str(tmp_path) in line or str(NOTEBOOK.parents[1]) in line]
