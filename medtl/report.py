"""``medtl report``: a run's evaluation as one self-contained HTML page, a Markdown twin and PNG figures.

The page is what a research group reads after adapting a model: a metric table with CIs, ROC
curves of every stage on one plot, confusion matrices, a reliability diagram, learning curves,
the domain-shift figures (the AUC drop between sites, crop intensities, features seen by each
network) and Grad-CAM overlays of correct and wrong cases. The HTML embeds its images, so it opens
from an e-mail attachment or a shared drive with no network access; the Markdown links the PNGs.

Figures are drawn with matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import medtl
from medtl.fileio import atomic_write_bytes, atomic_write_text
from medtl.runlog import load_run, run_folder

__all__ = ["reliability_bins", "render_report", "roc_curve"]

_DPI = 110
_PLANES = ("axial", "coronal", "sagittal")


# --------------------------------------------------------------------------- curves (pure)


def roc_curve(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score threshold, from (0, 0) to (1, 1)."""
    is_positive, scores = np.asarray(is_positive, dtype=bool), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    if n_pos == 0 or n_neg == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]) * np.nan
    order = np.argsort(-scores, kind="stable")
    scores, hits = scores[order], is_positive[order]
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]  # ties move together
    tp, fp = np.cumsum(hits)[last_of_tie], np.cumsum(~hits)[last_of_tie]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) of the non-empty equal-width bins of the top probability."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence, correct = probs.max(1), probs.argmax(1) == np.asarray(y_true)
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    return [
        (float(confidence[index == b].mean()), float(correct[index == b].mean()), int((index == b).sum()))
        for b in range(n_bins)
        if (index == b).any()
    ]


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _label(evaluation: Mapping[str, Any]) -> str:
    return f"{evaluation['stage']} - {evaluation['evaluated_on']}"


def _arrays(evaluation: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    cases = evaluation["cases"]
    return np.array([c["label"] for c in cases]), np.array([c["probs"] for c in cases], dtype=np.float64)


def _positive(evaluation: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
    """Binary: class 1 against class 0. More classes: every one-vs-rest decision pooled (micro average)."""
    y, probs = _arrays(evaluation)
    names = evaluation["class_names"]
    if len(names) == 2:
        return y == 1, probs[:, 1], f"positive class: {names[1]}"
    onehot = np.eye(len(names), dtype=bool)[y]
    return onehot.ravel(), probs.ravel(), "one-vs-rest, pooled over classes"


def roc_figure(evaluations: Sequence[Mapping[str, Any]]) -> bytes:
    figure = _figure(6.4, 5.2)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    note = ""
    for evaluation in evaluations:
        positive, scores, note = _positive(evaluation)
        fpr, tpr = roc_curve(positive, scores)
        auc = evaluation["metrics"]["auc"]["value"]
        ax.plot(
            fpr,
            tpr,
            linewidth=1.6,
            label=f"{_label(evaluation)} (AUC {auc:.3f})" if auc is not None else _label(evaluation),
        )
    ax.set(
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=f"ROC curves ({note})",
    )
    ax.legend(loc="lower right", fontsize=8)
    return _png(figure)


def confusion_figure(evaluations: Sequence[Mapping[str, Any]]) -> bytes:
    columns = min(len(evaluations), 3)
    rows = -(-len(evaluations) // columns)
    figure = _figure(3.3 * columns, 3.1 * rows)
    for i, evaluation in enumerate(evaluations):
        y, probs = _arrays(evaluation)
        names = evaluation["class_names"]
        matrix = np.zeros((len(names), len(names)), dtype=int)
        np.add.at(matrix, (y, probs.argmax(1)), 1)
        ax = figure.add_subplot(rows, columns, i + 1)
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for (r, c), count in np.ndenumerate(matrix):
            ax.text(c, r, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
        ax.set(
            xticks=range(len(names)),
            yticks=range(len(names)),
            xticklabels=names,
            yticklabels=names,
            xlabel="predicted",
            ylabel="true",
            title=_label(evaluation),
        )
        ax.title.set_fontsize(9)
    return _png(figure)


def calibration_figure(evaluations: Sequence[Mapping[str, Any]]) -> bytes:
    figure = _figure(6.4, 5.2)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="perfectly calibrated")
    for evaluation in evaluations:
        y, probs = _arrays(evaluation)
        bins = reliability_bins(y, probs)
        ece = evaluation["metrics"]["ece"]["value"]
        ax.plot(
            [b[0] for b in bins],
            [b[1] for b in bins],
            marker="o",
            linewidth=1.4,
            label=f"{_label(evaluation)} (ECE {ece:.3f})" if ece is not None else _label(evaluation),
        )
    ax.set(
        xlabel="confidence (top probability, 10 bins)",
        ylabel="accuracy in bin",
        xlim=(0, 1.01),
        ylim=(0, 1.01),
        title="Reliability diagram",
    )
    ax.legend(loc="upper left", fontsize=8)
    return _png(figure)


def curves_figure(curves: Sequence[Mapping[str, Any]]) -> bytes:
    from matplotlib.ticker import MaxNLocator

    figure = _figure(4.2 * len(curves), 3.4)
    for i, curve in enumerate(curves):
        ax = figure.add_subplot(1, len(curves), i + 1)
        loss = curve["train_loss"]
        ax.plot([p["epoch"] for p in loss], [p["value"] for p in loss], color="tab:blue", label="training loss")
        ax.set(xlabel="epoch", ylabel="training loss", title=curve["stage"])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        auc_ax = ax.twinx()
        aucs = [p for p in curve["val_auc"] if p["value"] is not None]
        auc_ax.plot(
            [p["epoch"] for p in aucs],
            [p["value"] for p in aucs],
            color="tab:orange",
            marker=".",
            label="validation AUC",
        )
        auc_ax.set(ylabel="validation AUC", ylim=(0, 1.02))
        if curve.get("best_epoch") is not None:
            ax.axvline(
                curve["best_epoch"], color="tab:green", linestyle=":", label=f"kept: epoch {curve['best_epoch']}"
            )
        handles = ax.get_legend_handles_labels()[0] + auc_ax.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="center right")
    return _png(figure)


def auc_by_set_figure(evaluations: Sequence[Mapping[str, Any]]) -> bytes:
    """AUC with its CI for every stage and set: the drop from source site to target site, and what
    each adaptation step won back."""
    figure = _figure(max(5.0, 1.1 * len(evaluations)), 3.8)
    ax = figure.add_subplot()
    values = [e["metrics"]["auc"]["value"] for e in evaluations]
    cis = [e["metrics"]["auc"]["ci95"] for e in evaluations]
    x = np.arange(len(evaluations))
    heights = [v if v is not None else 0.0 for v in values]
    low = [v - ci[0] if ci and v is not None else 0.0 for v, ci in zip(values, cis, strict=True)]
    high = [ci[1] - v if ci and v is not None else 0.0 for v, ci in zip(values, cis, strict=True)]
    sets = sorted({e["evaluated_on"] for e in evaluations})
    colours = {s: f"C{i}" for i, s in enumerate(sets)}
    ax.bar(x, heights, yerr=[low, high], capsize=3, color=[colours[e["evaluated_on"]] for e in evaluations])
    for s in sets:
        ax.bar([0], [0], color=colours[s], label=s)
    ax.set_xticks(x, [e["stage"] for e in evaluations], rotation=20, ha="right")
    ax.set(ylabel="AUC (95% CI)", ylim=(0, 1.05), title="AUC per stage and evaluation set")
    ax.axhline(0.5, color="0.6", linestyle="--", linewidth=1)
    ax.legend(fontsize=8, loc="lower right")
    return _png(figure)


def intensity_figure(intensities: Mapping[str, Any]) -> bytes:
    figure = _figure(6.4, 3.6)
    ax = figure.add_subplot()
    edges = np.asarray(intensities["bins"])
    centres = (edges[:-1] + edges[1:]) / 2
    for name, entry in intensities["sets"].items():
        ax.plot(centres, entry["density"], label=f"{name} ({entry['cases']} cases)")
    ax.set(
        xlabel="preprocessed voxel value ([0, 1] of the CT window)",
        ylabel="fraction of voxels",
        yscale="log",
        title="Crop intensities per set",
    )
    ax.legend(fontsize=8)
    return _png(figure)


def _pca_2d(blocks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Project every set onto the first two principal axes of all sets pooled."""
    pooled = np.concatenate(blocks).astype(np.float64)
    mean = pooled.mean(0)
    _, _, vt = np.linalg.svd(pooled - mean, full_matrices=False)
    axes = vt[:2].T if vt.shape[0] >= 2 else np.eye(pooled.shape[1], 2)
    return [(b - mean) @ axes for b in blocks]


def features_figure(features: Sequence[Mapping[str, Any]]) -> bytes:
    figure = _figure(4.0 * len(features), 3.8)
    for i, record in enumerate(features):
        blocks = [record["arrays"][f"features_{k}"] for k in range(len(record["sets"]))]
        ax = figure.add_subplot(1, len(features), i + 1)
        for name, points in zip(record["sets"], _pca_2d(blocks), strict=True):
            ax.scatter(points[:, 0], points[:, 1], s=12, alpha=0.7, label=name)
        shifts = "; ".join(f"MMD² {t['mmd2']:.3f} (p={t['p_value']:.3f})" for t in record["mmd"].values())
        ax.set(xlabel="PC 1", ylabel="PC 2", title=f"{record['stage']}\n{shifts}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    return _png(figure)


def gradcam_figure(record: Mapping[str, Any]) -> bytes:
    from medtl.explain import overlay

    cases, arrays = record["cases"], record["arrays"]
    planes = [p for p in _PLANES if f"image_0_{p}" in arrays]
    figure = _figure(2.3 * len(planes) * 2, 2.4 * len(cases))
    for row, case in enumerate(cases):
        for col, plane in enumerate(planes):
            image, heat = arrays[f"image_{row}_{plane}"], arrays[f"cam_{row}_{plane}"]
            for k, picture in enumerate((overlay(image, np.zeros_like(heat), alpha=0.0), overlay(image, heat))):
                ax = figure.add_subplot(len(cases), 2 * len(planes), row * 2 * len(planes) + 2 * col + k + 1)
                ax.imshow(picture, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{plane}{' + Grad-CAM' if k else ''}", fontsize=8)
                if col == 0 and k == 0:
                    ax.set_ylabel(
                        f"{case['group']}: {case['label']}\npred {case['pred']} ({case['prob']:.2f})", fontsize=8
                    )
    figure.suptitle(
        f"Grad-CAM of {record['stage']} (central slices through the lesion; patient right on image left)", fontsize=9
    )
    return _png(figure)


# --------------------------------------------------------------------------- page


def _cell(metric: Mapping[str, Any]) -> str:
    value, ci = metric.get("value"), metric.get("ci95")
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.3f}"


_TABLE = (
    ("auc", "AUC"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced acc."),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("ece", "ECE"),
)


def _metric_rows(evaluations: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["stage", "evaluated on", "n", *[title for _, title in _TABLE]]
    rows = [
        [e["stage"], e["evaluated_on"], str(e["n"]), *[_cell(e["metrics"].get(key, {})) for key, _ in _TABLE]]
        for e in evaluations
    ]
    return header, rows


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows])


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,td:nth-child(2),th{text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:0.9em}"""


def _sections(run: Mapping[str, Any]) -> list[tuple[str, str, list[tuple[str, Callable[[], bytes]]]]]:
    """(title, explanation, [(figure file, drawing)]) for every section the run has records for."""
    evaluations = run["evaluations"]
    sections = [
        (
            "ROC curves",
            "Every stage and evaluation set on one plot; each set holds held-out cases only.",
            [("roc.png", lambda: roc_figure(evaluations))],
        ),
        (
            "Confusion matrices",
            "Predictions are the most probable class.",
            [("confusion.png", lambda: confusion_figure(evaluations))],
        ),
        (
            "Calibration",
            "Cases binned by the model's top probability; a calibrated model lies on the diagonal.",
            [("calibration.png", lambda: calibration_figure(evaluations))],
        ),
    ]
    if run["curves"]:
        sections.append(
            (
                "Learning curves",
                "Mean training loss and validation AUC per epoch; the dotted line is the "
                "epoch whose weights were kept.",
                [("learning_curves.png", lambda: curves_figure(run["curves"]))],
            )
        )
    shift = [("auc_by_set.png", lambda: auc_by_set_figure(evaluations))]
    if run["intensities"]:
        shift.append(("intensities.png", lambda: intensity_figure(run["intensities"])))
    if run["features"]:
        shift.append(("features.png", lambda: features_figure(run["features"])))
    sections.append(
        (
            "Domain shift",
            "The AUC drop between sites; voxel values of the crops the networks see; each network's "
            "penultimate features projected on their two main axes, with the squared MMD between the sets.",
            shift,
        )
    )
    for record in run["explanations"]:
        name = f"gradcam_{record['stage'].replace(' ', '-').lower()}.png"
        sections.append(
            (
                f"Grad-CAM: {record['stage']}",
                "Where the network looked for its predicted class: the most confident correct and wrong test cases.",
                [(name, lambda record=record: gradcam_figure(record))],
            )
        )
    return sections


def _run_lines(info: Mapping[str, Any]) -> list[str]:
    lines = []
    if "seed" in info:
        lines.append(f"seed {info['seed']}")
    for name, digest in sorted(info.get("manifests", {}).items()):
        lines.append(f"manifest {name} (content sha256 {digest[:12]})")
    return lines + [f"medtl {medtl.__version__}"]


def render_report(
    run_dir: str | Path, out: str | Path | None = None, *, title: str = "medtl run report"
) -> dict[str, Any]:
    """Write ``report.html`` (images embedded), ``report.md`` and ``figures/*.png`` for a run.

    ``run_dir`` is a run's output folder (holding ``run/``) or the ``run/`` folder itself; the report
    goes to ``out``, by default ``<output folder>/report``. Returns the paths written.
    """
    run_dir = Path(run_dir)
    records = run_folder(run_dir) if (run_folder(run_dir) / "evaluations").is_dir() else run_dir
    run = load_run(records)
    out = Path(out) if out is not None else (records.parent if records.name == "run" else records) / "report"
    figures_dir = out / "figures"
    header, rows = _metric_rows(run["evaluations"])
    run_lines = _run_lines(run["info"])
    page = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{html.escape('; '.join(run_lines))}</p>",
        "<h2>Metrics</h2><p class='note'>95% CIs are patient-level bootstrap intervals.</p>",
        _html_table(header, rows),
    ]
    markdown = [
        f"# {title}",
        "",
        "; ".join(run_lines),
        "",
        "## Metrics",
        "",
        "95% CIs are patient-level bootstrap intervals.",
        "",
        _md_table(header, rows),
        "",
    ]
    for finding in run["info"].get("findings", []):  # what the run concludes, as the run itself worded it
        page.append(f"<p><strong>{html.escape(finding)}</strong></p>")
        markdown += [f"**{finding}**", ""]
    written = []
    for heading, note, figures in _sections(run):
        page.append(f"<h2>{html.escape(heading)}</h2><p class='note'>{html.escape(note)}</p>")
        markdown += [f"## {heading}", "", note, ""]
        for name, draw in figures:
            png = draw()
            written.append(atomic_write_bytes(figures_dir / name, png))
            page.append(
                f"<p><img alt='{html.escape(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>"
            )
            markdown += [f"![{name}](figures/{name})", ""]
    page.append("</body></html>")
    html_path = atomic_write_text(out / "report.html", "\n".join(page) + "\n")
    md_path = atomic_write_text(out / "report.md", "\n".join(markdown))
    return {"html": html_path, "markdown": md_path, "figures": written}
