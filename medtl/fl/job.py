"""``medtl fl``: fine-tune a source model across sites with NVIDIA FLARE, without their scans leaving them.

source weights -> NVFlare job (``OUT/job/medtl_fl/``): the server holds the global model (the
source weights, head swapped when the sites have other classes), runs FedAvg for ``rounds`` rounds
(FedProx with ``fedprox_mu``), then sends the source and the final global model to every site for
evaluation (``GlobalModelEval``); each site runs ``medtl/fl/client.py`` on its own manifest ->
NVFlare's simulator runs the job on this machine (``OUT/workspace/``, its output in
``OUT/simulator.log``) -> the server's records (``metrics/round_metrics.jsonl``,
``cross_site_val/cross_val_results.json``, ``FL_global_model.pt``) become ``OUT/fl_summary.json``,
a printed table and a ``tumor_cls_finetune`` bundle whose provenance names the sites by pseudonym
(site-1, site-2, ...) with the hashes and counts they reported.

The exported job folder is a plain NVFlare job (``meta.json``, ``app_server``, ``app_site-N``) with
the client script in each site's ``custom/`` folder; outside the simulator each site's
``--manifest``/``--root`` in ``app_site-N/config/config_fed_client.json`` must be its own paths
(docs/federated.md; only the simulator is tested).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from medtl.adapt.schedule import layer_groups
from medtl.adapt.source import Source, open_source
from medtl.bundle.export import export_bundle, network_data_format_with_classes
from medtl.bundle.provenance import describe_source
from medtl.errors import MedtlError
from medtl.fileio import atomic_write_json
from medtl.fl import require_nvflare
from medtl.fl.schedule import RoundSchedule
from medtl.loading import resolve_device
from medtl.manifest import load_manifest
from medtl.networks import find_classifier, first_conv, resnet, resnet_config
from medtl.recipes import FederatedRecipe
from medtl.stages import print_stages, stages_json

CLIENT_SCRIPT = Path(__file__).with_name("client.py")
JOB_NAME = "medtl_fl"
SOURCE_FILE = "source_model.pt"
GLOBAL_FILE = "FL_global_model.pt"  # NVFlare's PTFileModelPersistor default
SIMULATION = "simulate_job"  # the job's folder inside each workspace of NVFlare's simulator


def server_model(file_name: str) -> str:
    """The name NVFlare's GlobalModelEval gives a server model in its results."""
    return f"SRV_{file_name}"


@dataclass(frozen=True)
class Site:
    """A participant: its pseudonym (the NVFlare client name) and where its own data is."""

    name: str
    manifest: Path
    root: Path


def plan_sites(manifests: Sequence[str | Path], roots: Sequence[str | Path]) -> tuple[list[Site], list[str]]:
    """The sites, named site-1, site-2, ... in the order given, and their shared class names.

    What would otherwise fail inside a site's process, where it costs a simulator run and a log to
    read, is checked here: each manifest loads, the data root exists, every site has the same label
    map and labeled training cases.
    """
    if not manifests:
        raise MedtlError("no site manifests given", hint="pass --manifest once per site")
    if len(roots) not in (1, len(manifests)):
        raise MedtlError(
            f"{len(manifests)} manifests but {len(roots)} data roots",
            hint="give one --root for all sites, or one per --manifest in the same order",
        )
    sites, label_map = [], None
    for i, manifest in enumerate(manifests):
        root = Path(roots[0] if len(roots) == 1 else roots[i])
        data = load_manifest(manifest)
        if not root.is_dir():
            raise MedtlError(
                "data root not found", path=root, hint="--root is the folder the manifest's paths are relative to"
            )
        if label_map is None:
            label_map = data["label_map"]
        elif data["label_map"] != label_map:
            raise MedtlError(
                f"label map {data['label_map']} differs from the first site's {label_map}",
                path=Path(manifest).name,
                hint="every site must use the same classes in the same order",
            )
        if not any(c["split"] == "train" and c["label"] is not None for c in data["cases"]):
            raise MedtlError(
                "no labeled train cases: this site would have nothing to contribute", path=Path(manifest).name
            )
        sites.append(Site(f"site-{i + 1}", Path(manifest), root))
    return sites, sorted(label_map, key=label_map.get)


def site_args(
    site: Site, recipe: FederatedRecipe, *, widen_factor: float, modality: str, seed: int, device: str = "cpu"
) -> str:
    """The client script's arguments for ``site``. NVFlare splits them at whitespace (quotes are not
    honoured), so the recipe goes as compact JSON and a path with spaces is refused here."""
    paths = [str(site.manifest.resolve()), str(site.root.resolve())]
    spaced = [p for p in paths if any(c.isspace() for c in p)]
    if spaced:
        raise MedtlError(
            "NVIDIA FLARE hands a site its script arguments split at whitespace, so this path cannot be passed",
            path=spaced[0],
            hint="move or link the manifest and data to a path without spaces",
        )
    return " ".join(
        [
            "--manifest",
            paths[0],
            "--root",
            paths[1],
            "--recipe",
            recipe.to_json(),
            "--widen-factor",
            str(widen_factor),
            "--modality",
            modality,
            "--seed",
            str(seed),
            "--device",
            device,
        ]
    )


def build_job(
    sites: Sequence[Site],
    recipe: FederatedRecipe,
    source_file: Path,
    *,
    num_classes: int,
    widen_factor: float = 0.5,
    modality: str = "ct",
    seed: int = 0,
    device: str = "cpu",
) -> Any:
    """The NVFlare job: the server's global model, FedAvg and final evaluation; the client script per site.

    Each site gets what ``ScriptRunner`` would give it (a ``ClientAPIExecutor`` running the script in
    the site's process, the script in the app's ``custom/`` folder), but the script is named by its
    file name and copied as a file: NVFlare finds it in ``custom/`` wherever the job folder is
    deployed, and medtl, installed at every site, is imported from there rather than copied in.
    """
    require_nvflare()
    from nvflare.app_common.executors.client_api_executor import (
        ClientAPIExecutor,
        ExecutionMode,
    )
    from nvflare.app_common.workflows.fedavg import FedAvg
    from nvflare.app_common.workflows.global_model_eval import GlobalModelEval
    from nvflare.app_opt.pt.job_config.model import PTModel
    from nvflare.client.config import ExchangeFormat
    from nvflare.job_config.base_fed_job import BaseFedJob
    from nvflare.job_config.file_source import FileSource

    job = BaseFedJob(name=JOB_NAME, min_clients=len(sites), key_metric="")  # the final model is exported, no selection
    ids = job.to_server(PTModel(resnet_config(widen_factor, num_classes), initial_ckpt=str(source_file.resolve())))
    job.to_server(
        FedAvg(
            num_clients=len(sites),
            num_rounds=recipe.rounds,
            persistor_id=ids["persistor_id"],
            fedprox_mu=recipe.fedprox_mu or None,
        )
    )
    job.to_server(GlobalModelEval(model_locator_id=ids["locator_id"]))
    for site in sites:
        executor = ClientAPIExecutor(
            execution_mode=ExecutionMode.IN_PROCESS,
            task_script_path=CLIENT_SCRIPT.name,
            task_script_args=site_args(
                site, recipe, widen_factor=widen_factor, modality=modality, seed=seed, device=device
            ),
            params_exchange_format=ExchangeFormat.PYTORCH,
        )
        job.to(executor, site.name)
        job.to(FileSource(str(CLIENT_SCRIPT)), site.name)
    return job


def _sites_resnet10(src: Source) -> float:
    """The width of ``src``'s network when it is what every site's script builds (medtl's one-channel
    3D ResNet10, ``medtl.networks.resnet``); any other source is refused before the job starts."""
    network = src.network
    stem = network.get_submodule(first_conv(network) or "")
    widen = stem.out_channels / 64
    same = resnet(widen, find_classifier(network)[1].out_features).state_dict()
    shapes = {k: v.shape for k, v in network.state_dict().items()}
    if src.settings.get("mask_channel") or shapes != {k: v.shape for k, v in same.items()}:
        raise MedtlError(
            f"medtl fl trains medtl's one-channel 3D ResNet10 at every site; {src.label}'s network is "
            f"{type(network).__name__} with {src.in_channels} input channel(s) in {src.spatial_dims}D",
            path=src.label,
            hint="adapt it at one site with medtl adapt, which takes any registered architecture and source bundle",
        )
    return widen


@contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """What the simulator's processes print (NVFlare's logging, every site's) goes to ``log``: the
    terminal keeps medtl's own lines, the file the full story for when a run fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with log.open("wb") as file:
            os.dup2(file.fileno(), 1)
            os.dup2(file.fileno(), 2)
            yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def read_results(workspace: Path, sites: Sequence[Site], log: Path) -> dict[str, Any]:
    """What the server recorded, per site in the order given: each round's scalars, the evaluation
    of the source and of the final global model, the data record it reported; the final weights."""
    server = workspace / "server" / SIMULATION
    hint = f"see {log.name} and {workspace.name}/site-*/{SIMULATION}/log.txt in the output folder"
    files = {
        "weights": server / "app_server" / GLOBAL_FILE,
        "rounds": server / "metrics" / "round_metrics.jsonl",
        "evaluations": server / "cross_site_val" / "cross_val_results.json",
    }
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise MedtlError(f"the federated run left no {', '.join(missing)} on the server", hint=hint)
    records = [json.loads(line) for line in files["rounds"].read_text(encoding="utf-8").splitlines()]
    rounds = [
        {"round": r["round"], "sites": {s["name"]: {m["name"]: m["value"] for m in s["metrics"]} for s in r["sites"]}}
        for r in records
    ]
    evaluated = json.loads(files["evaluations"].read_text(encoding="utf-8"))
    models = {"source": server_model(SOURCE_FILE), "federated": server_model(GLOBAL_FILE)}
    silent = [
        s.name
        for s in sites
        if not all(s.name in r["sites"] for r in rounds)
        or not all(m in evaluated.get(s.name, {}) for m in models.values())
    ]
    if silent or not rounds:
        raise MedtlError(f"{', '.join(silent) or 'no site'} sent no results", hint=hint)
    evaluations, reported = {}, {}
    for site in sites:
        results = {stage: dict(evaluated[site.name][name]) for stage, name in models.items()}
        reported[site.name] = results["federated"].pop("data")
        results["source"].pop("data")
        evaluations[site.name] = results
    weights = torch.load(files["weights"], map_location="cpu", weights_only=True)["model"]
    return {"weights": weights, "rounds": rounds, "evaluations": evaluations, "reported": reported}


def run_federated(
    source: str | Path,
    manifests: Sequence[str | Path],
    roots: Sequence[str | Path],
    out: str | Path,
    *,
    recipe: FederatedRecipe = FederatedRecipe(),
    arch: str | None = None,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    widen_factor: float | None = None,
    modality: str | None = None,
    threads: int | None = None,
    trust: bool = False,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Federated fine-tuning of ``source`` across one site per manifest in NVFlare's simulator.

    Returns ``{"summary", "bundle", "network"}``; writes the job folder, the simulator workspace
    and log, ``fl_summary.json`` and the ``tumor_cls_finetune`` bundle under ``out``.
    """
    require_nvflare()
    start = time.perf_counter()
    sites, names = plan_sites(manifests, roots)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    src = open_source(
        source,
        target_classes=names,
        workdir=out,
        arch=arch,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        modality=modality,
        network_options={"widen_factor": widen_factor} if widen_factor is not None else None,
        trust=trust,
    )
    network, modality = src.network, src.settings.get("modality", "ct")
    widen_factor = _sites_resnet10(src)
    source_file = out / SOURCE_FILE
    torch.save(network.state_dict(), source_file)
    device = str(resolve_device(device))  # checked here, once, before any site starts
    job = build_job(
        sites,
        recipe,
        source_file,
        num_classes=len(names),
        widen_factor=widen_factor,
        modality=modality,
        seed=seed,
        device=device,
    )
    for folder in (out / "job", out / "workspace"):
        shutil.rmtree(folder, ignore_errors=True)
    job.export_job(str(out / "job"))
    algorithm = f"FedProx (mu={recipe.fedprox_mu:g})" if recipe.fedprox_mu else "FedAvg"
    log = out / "simulator.log"
    print(
        f"medtl fl: {algorithm}, {recipe.rounds} rounds of {recipe.local_epochs} local epochs across "
        + ", ".join(f"{s.name} ({s.manifest.name})" for s in sites)
    )
    print(f"NVIDIA FLARE simulator running; its log: {log}", flush=True)
    with _output_to(log):
        code = job.simulator_run(str(out / "workspace"), threads=threads or len(sites))
    if code:
        raise MedtlError(f"the NVIDIA FLARE simulator failed (exit code {code})", hint=f"see {log}")
    results = read_results(out / "workspace", sites, log)
    network.load_state_dict(results["weights"])
    seconds = time.perf_counter() - start

    groups = [g.name for g in layer_groups(network)]
    schedule = RoundSchedule.for_recipe(recipe)
    rounds = [r | {"trainable": schedule.trainable(r["round"], groups)} for r in results["rounds"]]
    evaluations, reported = results["evaluations"], results["reported"]
    params = sum(p.numel() for p in network.parameters())
    rows = [
        {
            "stage": stage,
            "evaluated on": f"{site} test",
            "result": models[stage]["test"],
            "params": params,
            "seconds": seconds if stage == "federated" else 0.0,
        }
        for stage in ("source", "federated")
        for site, models in evaluations.items()
        if "test" in models[stage]
    ]
    bundle = _export(
        network,
        out,
        source=source,
        names=names,
        recipe=recipe,
        algorithm=algorithm,
        reported=reported,
        tests={row["evaluated on"]: row["result"] for row in rows if row["stage"] == "federated"},
    )
    summary = {
        "job": {
            "algorithm": algorithm,
            "engine": "NVIDIA FLARE simulator",
            "rounds": recipe.rounds,
            "recipe": asdict(recipe),
            "source": describe_source(source),
            "widen_factor": widen_factor,
            "modality": modality,
            "seed": seed,
            "seconds": seconds,
        },
        "sites": {s.name: {"manifest": s.manifest.name, **reported[s.name]} for s in sites},
        "rounds": rounds,
        "evaluation": evaluations,
        "test": stages_json(rows),
        "bundle": {"path": bundle["path"].name, "version": bundle["version"]},
    }
    atomic_write_json(out / "fl_summary.json", summary)
    _print_rounds(rounds, [s.name for s in sites])
    print_stages(rows)
    print(f"\nbundle: {bundle['path']} ({bundle['version']}); summary: {out / 'fl_summary.json'}")
    print(f"NVFlare job folder: {out / 'job' / JOB_NAME}")
    return {"summary": summary, "bundle": bundle, "network": network}


def _export(
    network: torch.nn.Module,
    out: Path,
    *,
    source: str | Path,
    names: list[str],
    recipe: FederatedRecipe,
    algorithm: str,
    reported: Mapping[str, Mapping[str, Any]],
    tests: Mapping[str, Any],
) -> dict[str, Any]:
    """The global model as a ``tumor_cls_finetune`` bundle: sites by pseudonym, with the manifest
    hashes and counts they reported; the test metrics each site computed."""

    sites = ", ".join(reported)
    data = [
        {
            "name": site,
            "content_sha256": info["manifest_sha256"],
            "counts": {"by_site_split_label": {site: info["counts"]}},
        }
        for site, info in reported.items()
    ]
    description = (
        f"3D ResNet10 initialised from a source model and fine-tuned by federated learning ({algorithm}, NVIDIA FLARE) "
        f"across {len(reported)} sites ({sites}) whose scans never left them: {recipe.rounds} rounds of "
        f"{recipe.local_epochs} local epochs, the classifier head alone for {recipe.head_rounds} round(s), then layer "
        f"groups unfrozen from the top ({recipe.unfreeze}) at discriminative learning rates "
        f"(lr * {recipe.lr_decay:g}^depth). "
        "The final global model; each site evaluated it on its own held-out test split."
    )
    return export_bundle(
        network,
        out / "tumor_cls_finetune",
        template="tumor_cls_finetune",
        metrics=tests,
        source=source,
        manifests=data,
        recipe={
            "federated": (
                f"{algorithm} with NVIDIA FLARE across {len(reported)} sites ({sites}), {recipe.rounds} rounds"
            ),
            "settings": asdict(recipe),
        },
        changelog=f"federated fine-tuning ({algorithm}, {recipe.rounds} rounds) of {Path(source).name} across {sites}",
        metadata={
            "network_data_format": network_data_format_with_classes(names),
            "description": description,
            "task": "Benign vs malignant classification of a lung lesion in chest CT, fine-tuned across sites "
            "by federated learning",
            "intended_use": (
                f"Research only, not for clinical decisions. For the sites of the federation ({sites}), after "
                "evaluation on each one's held-out test split; other sites need their own evaluation."
            ),
        },
    )


def _print_rounds(rounds: Sequence[Mapping[str, Any]], sites: Sequence[str]) -> None:
    """Per round: the layer groups that trained and each site's validation AUC of the global model it received."""
    print(f"\n{'round':<7}{'training':<16}" + "".join(f"{s + ' val AUC':>16}{'steps':>7}" for s in sites))
    for r in rounds:
        training = "head" if r["trainable"] == ["head"] else f"{r['trainable'][0]} .. head"
        cells = ""
        for s in sites:
            metrics = r["sites"].get(s, {})
            auc = metrics.get("val_auc")
            cells += f"{'–' if auc is None else f'{auc:.3f}':>16}{metrics.get('train_steps', 0):>7.0f}"
        print(f"{r['round']:<7}{training:<16}{cells}")
    print(
        "val AUC: each site's validation AUC of the global model it received at the start "
        "of the round (round 0: the source)"
    )


__all__ = ["Site", "build_job", "plan_sites", "read_results", "run_federated", "server_model", "site_args"]
