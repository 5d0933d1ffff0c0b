"""A run's stages side by side: each network scored on the target's held-out cases with patient-level
CIs, the table printed, the rows written as JSON, and the one sentence that says whether adapting helped.

``medtl demo``, ``medtl adapt`` and ``medtl fl`` report through these, so their tables read alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medtl.adapt.recipe import loader
from medtl.evaluate import classification_metrics, collect_predictions, paired_auc_difference
from medtl.runlog import record_evaluation

__all__ = ["adaptation_finding", "evaluate_items", "print_stages", "stages_json"]


def evaluate_items(
    network: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    seed: int = 0,
    record: tuple[Path, str, str] | None = None,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Target-domain metrics of ``network`` on preprocessed items, CIs resampling patients.
    ``record=(run folder, stage, set name)`` also keeps the per-case predictions for the report."""
    y, probs, _ = collect_predictions(network, loader(items, batch_size=32, device=device), device)
    result = classification_metrics(
        y, probs, class_names=list(class_names), patient_ids=[i["patient"] for i in items], seed=seed
    )
    if record is not None:
        run, stage, evaluated_on = record
        record_evaluation(
            run,
            stage,
            evaluated_on,
            y_true=y,
            probs=probs,
            class_names=class_names,
            case_ids=[i["case_id"] for i in items],
            result=result,
        )
    return result


def adaptation_finding(
    source: Any,
    tuned: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    seed: int = 0,
    device: Any = "cpu",
    names: tuple[str, str] = ("fine-tuned", "source-only"),
    where: str = "site B test",
) -> dict[str, Any]:
    """Whether adaptation helped, said plainly: the paired AUC difference on the same test cases
    with its patient-bootstrap 95% CI, and a sentence that does not claim more than the CI shows."""
    y, before, _ = collect_predictions(source, loader(items, batch_size=32, device=device), device)
    _, after, _ = collect_predictions(tuned, loader(items, batch_size=32, device=device), device)
    d = paired_auc_difference(y, before, after, patient_ids=[i["patient"] for i in items], seed=seed)
    ci = "no CI" if d["ci95"] is None else f"95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}"
    change = f"AUC {d['auc_b']:.3f} vs {d['auc_a']:.3f}, difference {d['difference']:+.3f} ({ci}, paired over patients)"
    if d["difference"] <= 0:
        verdict = f"{names[0]} did NOT beat {names[1]} on {where} in this run (seed {seed})"
    elif d["ci95"] is not None and d["ci95"][0] > 0:
        verdict = f"{names[0]} beats {names[1]} on {where}"
    else:
        verdict = (
            f"{names[0]} scores above {names[1]} on {where}, but the CI still includes no gain ({len(items)} cases)"
        )
    return d | {"text": f"result: {verdict}: {change}; benchmarks/adaptation.py gives the mean over seeds."}


def stages_json(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Stage rows for a summary file: the scalar metrics with CIs, not the full evaluation results."""
    return [{k: v for k, v in r.items() if k != "result"} | {"metrics": r["result"]["metrics"]} for r in rows]


def _cell(metrics: Mapping[str, Any], key: str) -> str:
    """One metric of the stage table: the value with its 95% CI when there is one, "n/a" when undefined."""
    value, ci = metrics[key]["value"], metrics[key]["ci95"]
    return "n/a" if value is None else f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.3f}"


def print_stages(rows: Sequence[Mapping[str, Any]]) -> None:
    """The stage table: AUC and accuracy with 95% CIs, parameters and seconds per stage."""
    print(
        f"\n{'stage':<16}{'evaluated on':<14}{'n':>4}{'AUC [95% CI]':>24}{'accuracy [95% CI]':>24}"
        f"{'params':>9}{'time':>7}"
    )
    for row in rows:
        m, n = row["result"]["metrics"], row["result"]["n"]
        print(
            f"{row['stage']:<16}{row['evaluated on']:<14}{n:>4}{_cell(m, 'auc'):>24}{_cell(m, 'accuracy'):>24}"
            f"{row['params'] / 1e6:>8.2f}M{row['seconds']:>6.0f}s"
        )
