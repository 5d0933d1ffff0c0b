"""The site side of ``medtl fl``: an NVIDIA FLARE Client API script that fine-tunes the global model on
one site's manifest.

NVFlare's ``ClientAPIExecutor`` (as ``ScriptRunner`` sets it up) runs this file in every site's
process with that site's ``--manifest`` and ``--root``; it reads no other site's data and never
sends cases, images or paths. What leaves the site, through ``flare.send``:

- per training round: the updated weights, the number of optimizer steps (FedAvg's weight), and
  scalars: the received global model's validation AUC, the last epoch's loss, the train case count,
  the number of trainable parameters (the round's place in the freeze -> unfreeze schedule) and
  the FedProx mu it applied;
- per evaluated model (the source and the final global model): its metrics with 95% CIs on the
  site's val and test splits, the manifest's content hash and its case counts per split and class.

Training is medtl's own: ``fit`` (MONAI ``SupervisedTrainer``) with the round-keyed
``RoundSchedule``, discriminative learning rates from ``param_groups`` and, when the server's
FedAvg carries ``fedprox_mu``, the ``FedProx`` term.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.utils import set_determinism
from torch import nn

from medtl.adapt.recipe import loader, preprocess_splits, validation_auc
from medtl.adapt.schedule import param_groups
from medtl.adapt.train import fit
from medtl.bundle.components import class_names
from medtl.fl.fedprox import FedProx
from medtl.fl.schedule import RoundSchedule
from medtl.loading import resolve_device
from medtl.manifest import load_manifest
from medtl.networks import resnet
from medtl.recipes import FederatedRecipe
from medtl.stages import evaluate_items
from medtl.transforms import preprocessing

SPLITS = ("train", "val", "test")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="medtl federated fine-tuning, site side (run by NVFlare, written by medtl fl)"
    )
    parser.add_argument("--manifest", required=True, help="this site's manifest")
    parser.add_argument("--root", required=True, help="data root the manifest's paths are relative to")
    parser.add_argument("--recipe", required=True, help="FederatedRecipe as JSON (written by medtl fl)")
    parser.add_argument("--widen-factor", type=float, default=0.5, help="ResNet10 width of the global model")
    parser.add_argument("--modality", default="ct", help="ct or mr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    return parser.parse_args(argv)


def split_counts(manifest: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Cases per split and class of a manifest, summed over its site labels: the aggregate a site reports."""
    out: dict[str, dict[str, int]] = {}
    for splits in manifest["counts"]["by_site_split_label"].values():
        for split, labels in splits.items():
            counts = out.setdefault(split, {})
            for label, n in labels.items():
                counts[label] = counts.get(label, 0) + n
    return out


def train_round(
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    recipe: FederatedRecipe,
    schedule: RoundSchedule,
    round_: int,
    *,
    num_classes: int,
    fedprox_mu: float | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """``recipe.local_epochs`` of fine-tuning in place, in round ``round_``'s place of the schedule.
    Returns the scalars the server records: loss, optimizer steps, cases, trainable parameters and
    the FedProx mu applied (0: none)."""
    optimizer = torch.optim.AdamW(param_groups(network, lr=recipe.lr, lr_decay=recipe.lr_decay), weight_decay=0.0)
    handlers: list[Any] = [schedule.for_round(round_)]
    if fedprox_mu:
        handlers.append(FedProx(fedprox_mu))
    batches = loader(items, augment=recipe.augment, batch_size=recipe.batch_size, shuffle=True, device=device)
    run = fit(
        network,
        batches,
        optimizer=optimizer,
        max_epochs=recipe.local_epochs,
        handlers=handlers,
        num_classes=num_classes,
        progress=False,
        desc=f"round {round_}",
        device=device,
    )
    return {
        "train_loss": float(run["train_loss"][-1]),
        "train_steps": len(batches) * run["epochs_run"],
        "train_cases": len(items),
        "trainable_params": schedule.history[-1]["trainable_params"],
        "fedprox_mu": fedprox_mu or 0.0,
    }


def evaluate_model(
    network: nn.Module,
    items: Mapping[str, Sequence[Mapping[str, Any]]],
    class_names: Sequence[str],
    seed: int,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Metrics with patient-level 95% CIs of ``network`` on this site's val and test splits (the ones it has)."""
    return {
        split: evaluate_items(network, items[split], seed=seed, class_names=class_names, device=device)
        for split in ("val", "test")
        if items[split]
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Join the federation: train on every ``train`` task, evaluate on every ``validate`` task."""
    import nvflare.client as flare
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.app_constant import AlgorithmConstants

    args = parse_args(argv)
    torch.set_num_threads(1)  # sites of a simulation share the machine's cores
    set_determinism(args.seed)
    recipe = FederatedRecipe.from_json(args.recipe)
    schedule = RoundSchedule.for_recipe(recipe)
    manifest = load_manifest(args.manifest)
    names = class_names(args.manifest)
    items = preprocess_splits(manifest, args.root, SPLITS, preprocessing(modality=args.modality), progress=False)
    data = {"manifest_sha256": manifest["content_sha256"], "counts": split_counts(manifest)}
    device = resolve_device(args.device)
    network = resnet(args.widen_factor, len(names)).to(device)

    flare.init()
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        network.load_state_dict(received.params)
        if flare.is_evaluate():
            flare.send(FLModel(metrics={**evaluate_model(network, items, names, args.seed, device), "data": data}))
            continue
        metrics: dict[str, float] = {}
        if items["val"]:
            auc = validation_auc(network, items["val"], device)
            if math.isfinite(auc):
                metrics["val_auc"] = auc
        metrics |= train_round(
            network,
            items["train"],
            recipe,
            schedule,
            received.current_round,
            num_classes=len(names),
            fedprox_mu=(received.meta or {}).get(AlgorithmConstants.FEDPROX_MU),
            device=device,
        )
        flare.send(
            FLModel(
                params={k: v.cpu() for k, v in network.state_dict().items()},
                metrics=metrics,
                meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: metrics["train_steps"]},
            )
        )


if __name__ == "__main__":
    main()
