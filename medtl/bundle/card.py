"""The model card: a bundle's ``docs/README.md`` written from its metadata and provenance.

A receiving site reads the card before running the model, so everything in it comes from the
recorded facts (metadata, ``provenance.json``, evaluation results) rather than from prose someone
must remember to update. Data is described by aggregates only: sites, counts and class balance.
The template's own how-to sections (running, limits) follow the generated ones unchanged.

The headings are model-zoo's README sections (``MODEL_ZOO_SECTIONS``, in that order): Model Overview,
Data, Training configuration, Performance, MONAI Bundle Commands, References, License. A template's
own ``## MONAI Bundle Commands`` section replaces the generic one the card writes otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: Template README sections carried into the card as written.
KEPT_SECTIONS = ("monai bundle commands", "run it", "how to run", "limits", "the recipe", "input", "inputs")
#: The ``## `` headings of a model-zoo bundle README, in order; every card has them.
MODEL_ZOO_SECTIONS = (
    "Model Overview",
    "Data",
    "Training configuration",
    "Performance",
    "MONAI Bundle Commands",
    "References",
    "License",
)
#: The commands section when the template has none: the configs every medtl bundle ships.
COMMANDS = """## MONAI Bundle Commands

From the bundle folder (data from a medtl manifest, `--manifest` and `--dataset_dir`; inference input
from `--input_dir` or `--input_csv`):

```bash
python -m monai.bundle run --config_file configs/train.json --bundle_root . --manifest MANIFEST --dataset_dir DATA
python -m monai.bundle run --config_file configs/evaluate.json --bundle_root . --manifest MANIFEST --dataset_dir DATA
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --input_csv cases.csv --output_dir out
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath SCHEMA.json
python -m monai.bundle download_large_files --bundle_path .   # checks the weights against large_files.yml
```
"""


def _ci(values: Any) -> str:
    return f" [{values[0]:.3f}, {values[1]:.3f}]" if isinstance(values, list) and len(values) == 2 else ""


def _metric(metrics: Mapping[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "–" if value is None else f"{value:.3f}{_ci(metrics.get(f'{key}_ci95'))}"


def evaluation_table(metrics: Mapping[str, Any]) -> list[str]:
    """Markdown rows per evaluation set from metadata ``eval_metrics`` (``<set>_n``, ``<set>_auc`` ...)."""
    sets = [
        k[:-4] for k in metrics if k.endswith("_auc")
    ]  # a set may state its AUC alone (a baseline score on the same cases)
    if not sets:
        return [
            "No evaluation recorded: run `configs/evaluate.json` on held-out data of the site that will use the model."
        ]
    rows = [
        "| evaluation set | cases | AUC [95% CI] | accuracy [95% CI] | sensitivity | specificity |",
        "|---|---|---|---|---|---|",
    ]
    for s in sets:
        rows.append(
            f"| {s.replace('_', ' ')} | {metrics.get(f'{s}_n', '–')} | {_metric(metrics, f'{s}_auc')} "
            f"| {_metric(metrics, f'{s}_accuracy')} | {_metric(metrics, f'{s}_sensitivity')} | "
            f"{_metric(metrics, f'{s}_specificity')} |"
        )
    return rows


def data_table(manifests: list[Mapping[str, Any]]) -> list[str]:
    """Cases per site, split and class from the manifests' aggregate counts."""
    rows = ["| manifest | site | split | cases | class balance |", "|---|---|---|---|---|"]
    for m in manifests:
        for site, splits in m.get("counts", {}).get("by_site_split_label", {}).items():
            for split, labels in splits.items():
                balance = ", ".join(f"{k} {v}" for k, v in labels.items())
                rows.append(f"| {m['name']} | {site} | {split} | {sum(labels.values())} | {balance} |")
    return rows


def _io_lines(meta: Mapping[str, Any]) -> list[str]:
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    classes = ", ".join(f"{k}: {v}" for k, v in pred.get("channel_def", {}).items())
    return [
        f"- Input `image`: {image.get('modality', '')} {image.get('num_channels')} channel(s), "
        f"{'x'.join(str(s) for s in image.get('spatial_shape', []))} voxels, values {image.get('value_range')} "
        f"({meta.get('image_classes', '')}).",
        f"- Output `pred`: {pred.get('type')} of {pred.get('num_channels')} classes ({classes}).",
    ]


def _template_sections(readme: str) -> list[str]:
    sections = re.split(r"(?m)^(?=## )", readme)
    return [s.rstrip() for s in sections[1:] if s.splitlines()[0][3:].strip().lower().startswith(KEPT_SECTIONS)]


def _commands_section(heading: str) -> bool:
    return heading.lower().startswith(("monai bundle commands", "run it", "how to run"))


def model_card(meta: Mapping[str, Any], provenance: Mapping[str, Any], template_readme: str = "") -> str:
    """``docs/README.md`` for a bundle with this metadata and provenance record, with model-zoo's
    sections (``MODEL_ZOO_SECTIONS``); ``template_readme``'s ``KEPT_SECTIONS`` follow Performance."""
    name, version = meta.get("name", "bundle"), meta["version"]
    lines = [f"# {name} {version}", "", meta["task"] + ".", ""]
    lines += ["## Model Overview", "", meta["description"], "", *_io_lines(meta)]
    if provenance.get("parameters"):
        lines.append(f"- Parameters: {provenance['parameters']:,}.")
    lines += ["", "### Intended use", "", meta.get("intended_use", "Research use only."), ""]
    manifests = provenance.get("data", {}).get("manifests", [])
    lines += ["## Data", ""]
    if manifests:
        lines += ["Aggregates only; no case, patient or file is named.", "", *data_table(manifests), ""]
        hashes = ", ".join(f"{m['name']} `{m['sha256'][:16]}`" for m in manifests)
        lines += [f"Manifest content hashes (sha256): {hashes}.", ""]
    else:
        lines += [meta.get("data_source", "Not recorded."), ""]
    lines += ["The data's terms of use: `docs/data_license.txt`.", ""]
    lines += ["## Training configuration", ""]
    source = provenance.get("adapted_from")
    if source:
        lines.append(
            f"- Adapted from `{source['name']}` {source.get('version') or ''} (content "
            f"sha256 `{source['sha256'][:16]}`)."
        )
    for key, value in provenance.get("recipe", {}).items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"- {key.replace('_', ' ')}: {value}")
    lines.append(f"- Changelog for {version}: {meta.get('changelog', {}).get(version, '')}")
    lines += ["", "## Performance", "", *evaluation_table(meta.get("eval_metrics", {})), ""]
    kept = _template_sections(template_readme)
    if not any(_commands_section(s.splitlines()[0][3:]) for s in kept):
        lines.append(COMMANDS)
    lines += [section + "\n" for section in kept]
    references = meta.get("references") or ["None recorded in the metadata."]
    lines += ["## References", "", *(f"- {r}" for r in references), ""]
    software = provenance.get("software", {})
    lines += [
        "## License",
        "",
        "Code and weights: `LICENSE`. The data's terms of use: `docs/data_license.txt`.",
        "",
        (
            f"Built with {', '.join(f'{k} {v}' for k, v in software.items())}. `provenance.json` records "
            "the source, data and configuration hashes; `large_files.yml` the weights' sha256 (`python "
            "-m monai.bundle download_large_files --bundle_path .` checks them); `SHA256SUMS` (written by "
            "`medtl bundle pack`) lists every file's checksum."
        ),
        "",
    ]
    return "\n".join(lines)


__all__ = ["MODEL_ZOO_SECTIONS", "data_table", "evaluation_table", "model_card"]
