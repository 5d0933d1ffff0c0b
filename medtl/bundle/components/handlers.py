"""Ignite handlers for bundle evaluators: target-domain metrics with CIs (``MetricsReport``) and
predictions (``PredictionWriter``), written atomically."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events

from medtl.bundle import confine
from medtl.evaluate import classification_metrics, format_table
from medtl.fileio import atomic_write_csv, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


def _probabilities(engine: Any) -> np.ndarray:
    return np.stack(
        [torch.as_tensor(o["pred"]).detach().float().cpu().reshape(-1).numpy() for o in engine.state.output]
    )


def _column(batch: Any, key: str, n: int) -> list[Any] | None:
    """``key`` of every case in the batch, collated (dict of lists) or decollated (list of dicts, MONAI's default)."""
    if isinstance(batch, Mapping):
        values = batch.get(key)
    elif all(isinstance(item, Mapping) and key in item for item in batch):
        values = [item[key] for item in batch]
    else:
        values = None
    if values is None:
        return None
    values = (
        values.tolist()
        if isinstance(values, torch.Tensor)
        else [v.item() if isinstance(v, torch.Tensor) else v for v in values]
    )
    return values if len(values) == n else None


class MetricsReport:
    """Target-domain metrics of an evaluation run, with bootstrap CIs per site, as JSON and a table.

    Attach to a ``SupervisedEvaluator`` whose postprocessing applies softmax to ``pred``. Labels,
    patients (for patient-level resampling) and sites are read from the batch.
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        *,
        filename: str = "metrics",
        n_boot: int = 1000,
        seed: int = 0,
        enabled: bool = True,
        run: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir, self.filename = confine.check(output_dir, write=True, what=type(self).__name__), filename
        self.class_names, self.n_boot, self.seed, self.enabled = list(class_names), n_boot, seed, enabled
        self.run = dict(run or {})
        self.result: dict[str, Any] | None = None

    def attach(self, engine: Any) -> None:

        if self.enabled:
            engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, _engine: Any) -> None:
        self._probs, self._labels, self._patients, self._sites = [], [], [], []

    def _collect(self, engine: Any) -> None:
        probs = _probabilities(engine)
        batch, n = engine.state.batch, len(probs)
        self._probs.append(probs)
        self._labels += _column(batch, "label", n) or []
        self._patients += _column(batch, "patient", n) or [None] * n
        self._sites += _column(batch, "site", n) or [None] * n

    def _write(self, _engine: Any) -> None:
        probs = np.concatenate(self._probs)
        y = np.asarray(self._labels).reshape(-1).astype(np.int64)
        patients = None if None in self._patients else self._patients
        sites = None if None in self._sites else self._sites
        self.result = classification_metrics(
            y,
            probs,
            class_names=self.class_names,
            patient_ids=patients,
            sites=sites,
            n_boot=self.n_boot,
            seed=self.seed,
        )
        atomic_write_json(
            self.output_dir / f"{self.filename}.json", self.result | ({"run": self.run} if self.run else {})
        )
        atomic_write_text(self.output_dir / f"{self.filename}.md", format_table(self.result))
        logger.info("metrics on %d cases -> %s.json\n%s", len(y), self.filename, format_table(self.result))


class PredictionWriter:
    """One row per case: its identifying columns, class probabilities (``prob_<class>``), predicted
    class and model version; CSV (``fileio.atomic_write_csv``: a cell a spreadsheet would read as a
    formula, such as a folder named ``=cmd|' /C calc'!A0``, is written as text) and JSON.

    ``columns`` maps output column names to batch keys (a plain list repeats keys under their own
    names): ``{"image": "csv_image", "mask": "csv_mask"}`` repeats a CSV input's paths as given.
    ``skipped`` (from ``prepare_cases``) is written beside the predictions so nothing goes missing
    silently.
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        *,
        skipped: Sequence[Mapping[str, Any]] = (),
        model_version: str = "",
        columns: Sequence[str] | Mapping[str, str] = ("id", "series"),
        filename: str = "predictions",
    ) -> None:
        self.output_dir, self.filename = confine.check(output_dir, write=True, what=type(self).__name__), filename
        self.class_names, self.skipped = list(class_names), list(skipped)
        self.model_version = str(model_version)
        self.columns = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:

        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Any) -> None:
        probs = _probabilities(engine)
        extra = {
            c: _column(engine.state.batch, key, len(probs)) or [""] * len(probs) for c, key in self.columns.items()
        }
        for i, p in enumerate(probs):
            row = {c: extra[c][i] for c in self.columns}
            row.update({f"prob_{name}": round(float(v), 6) for name, v in zip(self.class_names, p, strict=True)})
            row["pred"] = self.class_names[int(np.argmax(p))]
            row["model_version"] = self.model_version
            self.rows.append(row)

    def _write(self, _engine: Any) -> None:
        fields = [*self.columns, *(f"prob_{n}" for n in self.class_names), "pred", "model_version"]
        atomic_write_csv(self.output_dir / f"{self.filename}.csv", self.rows, fields)  # a formula-like cell is text
        atomic_write_json(
            self.output_dir / f"{self.filename}.json",
            {
                "model_version": self.model_version,
                "class_names": self.class_names,
                "predictions": self.rows,
                "skipped": self.skipped,
            },
        )
        logger.info("%d predictions, %d skipped -> %s.csv", len(self.rows), len(self.skipped), self.filename)
