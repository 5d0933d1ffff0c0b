"""Federated vs site-local fine-tuning on the demo cohort: one model for sites A and B, each scored
on both sites' test splits.

    .venv/bin/python benchmarks/federated.py [--data medtl-demo] [--scale 1.0] [--source-epochs 20]
        [--source-weights FILE] [--rounds 5] [--local-epochs 2] [--fedprox-mu 0] [--out medtl-demo/federated]

The source is a ResNet10 trained on site A's train split (as in ``medtl demo``). From it:
site-local fine-tuning at A and at B (medtl's ``finetune``: AdaBN, head first, gradual unfreezing,
L2-SP, the best validation epoch of the site's own val split; as many epochs as the federation
trains, head and unfreezing steps of the same lengths), federated fine-tuning across A and B
(``medtl.fl.job.run_federated`` in NVFlare's simulator: FedAvg, the head alone in the first
round, then one layer group more per round, the final global model), and, for reference only,
``finetune`` on both sites' cases pooled, which the sites could not do without moving their scans.
Every model is scored on site A's and site B's test splits (AUC and accuracy, patient-level 95%
CIs); the federated model's scores are the ones the sites computed and sent back.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from monai.utils import set_determinism

from medtl.adapt.recipe import finetune, train
from medtl.demo import CLASSES, demo_splits, prepare_demo_data
from medtl.fileio import atomic_write_json
from medtl.fl.job import run_federated
from medtl.networks import resnet
from medtl.recipes import FederatedRecipe, FineTuneRecipe, TrainRecipe
from medtl.stages import evaluate_items


def _cell(result: dict, key: str) -> str:
    metric = result["metrics"][key]
    if metric["value"] is None:
        return "n/a"
    ci = metric["ci95"]
    return f"{metric['value']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{metric['value']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="medtl-demo", help="demo folder (generated if absent)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the demo cohort's patients")
    parser.add_argument("--source-epochs", type=int, default=20)
    parser.add_argument(
        "--source-weights", help="reuse the site-A model saved here (trained and saved there when absent)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--fedprox-mu", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="working folder of the federated run and results.json (default DATA/federated)")
    args = parser.parse_args()
    out = Path(args.out or Path(args.data) / "federated")
    out.mkdir(parents=True, exist_ok=True)
    set_determinism(args.seed)
    demo = prepare_demo_data(args.data, seed=0, scale=args.scale, progress=False)
    split = demo_splits(demo, progress=False)
    print(", ".join(f"{k}: {len(v)}" for k, v in split.items()))

    rows: dict[str, dict] = {}

    def record(stage: str, network: torch.nn.Module, seconds: float) -> None:
        rows[stage] = {
            "seconds": round(seconds, 1),
            **{
                f"{site} test": evaluate_items(network, split[f"{site} test"], class_names=CLASSES, seed=args.seed)
                for site in "AB"
            },
        }

    t = time.perf_counter()
    source = resnet(0.5)
    source_file = Path(args.source_weights or out / "source_site_A.pt")
    if args.source_weights and source_file.is_file():
        source.load_state_dict(torch.load(source_file, weights_only=True))
    else:
        train(
            source,
            split["A train"],
            split["A val"],
            TrainRecipe(epochs=args.source_epochs),
            progress=False,
            desc="source (site A)",
        )
        torch.save(source.state_dict(), source_file)
    record("source (site A model)", source, time.perf_counter() - t)

    fl = FederatedRecipe(rounds=args.rounds, local_epochs=args.local_epochs, head_rounds=1, fedprox_mu=args.fedprox_mu)
    local = FineTuneRecipe(
        epochs=fl.rounds * fl.local_epochs,
        head_epochs=fl.head_rounds * fl.local_epochs,
        unfreeze_every=fl.unfreeze_every * fl.local_epochs,
    )
    runs = {
        "site-local fine-tune at A": (split["A train"], split["A val"]),
        "site-local fine-tune at B": (split["B train"], split["B val"]),
        "pooled A+B fine-tune (reference: moves data)": (
            [*split["A train"], *split["B train"]],
            [*split["A val"], *split["B val"]],
        ),
    }
    for label, (train_items, val_items) in runs.items():
        set_determinism(args.seed)
        network, t = copy.deepcopy(source), time.perf_counter()
        finetune(network, train_items, val_items, local, progress=False, desc=label)
        record(label, network, time.perf_counter() - t)

    t = time.perf_counter()
    manifests = [demo["sites"][site]["manifest"] for site in "AB"]
    federated = run_federated(source_file, manifests, [demo["out"]], out / "fl", recipe=fl, seed=args.seed)
    evaluation = federated["summary"]["evaluation"]
    rows[f"federated ({federated['summary']['job']['algorithm']}, {fl.rounds}x{fl.local_epochs} epochs)"] = {
        "seconds": round(time.perf_counter() - t, 1),
        "A test": evaluation["site-1"]["federated"]["test"],
        "B test": evaluation["site-2"]["federated"]["test"],
    }

    print(
        "\n| model | site A test AUC [95% CI] | site A accuracy | "
        "site B test AUC [95% CI] | site B accuracy | seconds |"
    )
    print("|---|---|---|---|---|---|")
    for stage, row in rows.items():
        print(
            f"| {stage} | {_cell(row['A test'], 'auc')} | {_cell(row['A test'], 'accuracy')} | "
            f"{_cell(row['B test'], 'auc')} | {_cell(row['B test'], 'accuracy')} | {row['seconds']:.0f} |"
        )
    first = next(iter(rows.values()))
    print(f"\nn: site A test {first['A test']['n']}, site B test {first['B test']['n']}")
    atomic_write_json(
        out / "results.json",
        {
            "args": vars(args),
            "federated_rounds": federated["summary"]["rounds"],
            "stages": {
                stage: {
                    "seconds": row["seconds"],
                    "A test": row["A test"]["metrics"],
                    "B test": row["B test"]["metrics"],
                }
                for stage, row in rows.items()
            },
        },
    )
    print(f"-> {out / 'results.json'}")


if __name__ == "__main__":
    main()
