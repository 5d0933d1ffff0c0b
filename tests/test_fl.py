"""Federated fine-tuning with NVIDIA FLARE: the round-keyed schedule, FedProx, the job's inputs, and a
2-site, 2-round run in NVFlare's simulator on the small demo cohort."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from medtl.adapt.recipe import loader
from medtl.adapt.schedule import FineTuneSchedule, layer_groups, param_groups
from medtl.adapt.train import fit
from medtl.cli import main
from medtl.errors import MedtlError
from medtl.fileio import utf8_child_env
from medtl.fl.fedprox import FedProx
from medtl.fl.schedule import RoundSchedule
from medtl.networks import resnet
from medtl.recipes import FederatedRecipe

GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def _items(n: int = 8, size: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(1, size, size, size, generator=generator), "label": i % 2} for i in range(n)]


def _one_round(network: nn.Module, schedule: RoundSchedule, round_: int, *, fedprox_mu: float = 0.0) -> dict:
    optimizer = torch.optim.AdamW(param_groups(network, lr=1e-3), weight_decay=0.0)
    handlers = [schedule.for_round(round_)] + ([FedProx(fedprox_mu)] if fedprox_mu else [])
    return fit(
        network,
        loader(_items(), batch_size=4),
        optimizer=optimizer,
        max_epochs=schedule.local_epochs,
        handlers=handlers,
        progress=False,
    )


def test_round_schedule_is_the_fine_tune_schedule_counted_in_rounds():
    schedule = RoundSchedule(head_rounds=2, unfreeze="gradual", unfreeze_every=1, local_epochs=2)
    assert [schedule.trainable(r, GROUPS) for r in range(4)] == [
        ["head"],
        ["head"],
        ["layer4", "head"],
        ["layer3", "layer4", "head"],
    ]
    assert schedule.trainable(9, GROUPS) == GROUPS
    assert schedule.global_epoch(2, 1) == 5 and schedule.global_epoch(0, 2) == 2
    by_epoch = FineTuneSchedule(head_epochs=4, unfreeze="gradual", unfreeze_every=2)
    for r in range(6):  # every local epoch of a round is in the same phase as its first
        for e in (1, 2):
            assert by_epoch.trainable(schedule.global_epoch(r, e), len(GROUPS)) == len(schedule.trainable(r, GROUPS))
    assert RoundSchedule(head_rounds=1, unfreeze="all").trainable(1, GROUPS) == GROUPS
    assert RoundSchedule(head_rounds=0).trainable(0, GROUPS) == ["layer4", "head"]
    with pytest.raises(MedtlError, match="local_epochs >= 1"):
        RoundSchedule(local_epochs=0)
    with pytest.raises(MedtlError, match="local epoch in 1..2"):
        schedule.global_epoch(0, 3)


def test_a_round_trains_only_the_groups_its_round_unfreezes():
    torch.manual_seed(0)
    network = resnet(0.125)
    schedule = RoundSchedule(head_rounds=1, unfreeze="gradual", local_epochs=1)
    groups = {g.name: g.params for g in layer_groups(network)}

    def moved(before: dict) -> set[str]:
        after = network.state_dict()
        return {name for name, params in groups.items() if any(not torch.equal(before[p], after[p]) for p in params)}

    before = {k: v.clone() for k, v in network.state_dict().items()}
    _one_round(network, schedule, 0)
    assert moved(before) == {"head"}
    assert torch.equal(
        before["layer4.0.bn1.running_mean"], network.state_dict()["layer4.0.bn1.running_mean"]
    )  # frozen BN kept
    before = {k: v.clone() for k, v in network.state_dict().items()}
    _one_round(network, schedule, 1)
    assert moved(before) == {"layer4", "head"}
    assert all(p.requires_grad for p in network.parameters())  # released after the round
    assert [entry["trainable"] for entry in schedule.history] == [["head"], ["layer4", "head"]]


def test_fedprox_term_is_mu_half_squared_distance_to_the_global_weights():
    network = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    prox = FedProx(0.5)
    prox.bind(network)
    assert float(prox.penalty().detach()) == 0.0
    with torch.no_grad():
        network[0].weight += 0.1
        network[1].bias += 0.2
    expected = 0.5 / 2 * (6 * 0.1**2 + 2 * 0.2**2)
    assert float(prox.penalty().detach()) == pytest.approx(expected)
    prox.penalty().backward()
    assert torch.allclose(network[0].weight.grad, torch.full((2, 3), 0.5 * 0.1))  # mu * (w - w_global)
    network[1].bias.requires_grad_(False)  # frozen parameters are left out
    assert float(prox.penalty().detach()) == pytest.approx(0.5 / 2 * 6 * 0.1**2)
    with pytest.raises(MedtlError, match="mu must be >= 0"):
        FedProx(-1.0)


def test_fedprox_enters_the_training_loss():
    losses = {}
    for mu in (0.0, 1e6):
        torch.manual_seed(0)
        losses[mu] = _one_round(resnet(0.125), RoundSchedule(head_rounds=0, unfreeze="all"), 0, fedprox_mu=mu)[
            "train_loss"
        ][0]
    assert losses[1e6] > losses[0.0] + 1.0  # the second step's loss carries the proximal term


def test_recipe_travels_as_one_script_argument():
    recipe = FederatedRecipe(rounds=3, local_epochs=2, fedprox_mu=0.01, unfreeze="all")
    text = recipe.to_json()
    assert not any(c.isspace() for c in text)  # NVFlare splits script arguments at whitespace
    assert FederatedRecipe.from_json(text) == recipe
    assert RoundSchedule.for_recipe(recipe).trainable(1, GROUPS) == GROUPS
    for bad, match in (
        ({"fedprox_mu": -0.1}, "fedprox-mu"),
        ({"unfreeze": "some"}, "unfreeze"),
        ({"rounds": 0}, "rounds"),
        ({"augment": "wild"}, "augment"),
        ({"local_epochs": 0}, "local_epochs"),
    ):
        with pytest.raises(MedtlError, match=match):
            FederatedRecipe(**bad)


def test_sites_are_pseudonyms_and_inputs_are_checked_before_the_run(small_demo, tmp_path):
    from medtl.fl.job import Site, plan_sites, site_args

    manifests = [small_demo["sites"][s]["manifest"] for s in ("A", "B")]
    sites, names = plan_sites(manifests, [small_demo["out"]])
    assert [s.name for s in sites] == ["site-1", "site-2"] and names == ["benign", "malignant"]
    args = site_args(sites[0], FederatedRecipe(), widen_factor=0.5, modality="ct", seed=0)
    assert args.split()[args.split().index("--manifest") + 1] == str(Path(manifests[0]).resolve())
    with pytest.raises(MedtlError, match="2 manifests but 3 data roots"):
        plan_sites(manifests, [small_demo["out"]] * 3)
    with pytest.raises(MedtlError, match="manifest not found"):
        plan_sites([tmp_path / "missing.json"], [small_demo["out"]])
    with pytest.raises(MedtlError, match="data root not found"):
        plan_sites(manifests[:1], [tmp_path / "nowhere"])
    with pytest.raises(MedtlError, match="without spaces"):
        site_args(
            Site("site-1", tmp_path / "my data" / "m.json", tmp_path),
            FederatedRecipe(),
            widen_factor=0.5,
            modality="ct",
            seed=0,
        )


def test_cli_bad_manifest_is_one_line(tmp_path, capsys):
    source = tmp_path / "source.pt"
    torch.save(resnet(0.5).state_dict(), source)
    code = main(
        [
            "fl",
            "--source",
            str(source),
            "--manifest",
            str(tmp_path / "nope.json"),
            "--root",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("medtl: error:") and "manifest not found" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_core_never_imports_nvflare():
    code = (
        "import sys, medtl.cli, medtl.demo, medtl.adapt.recipe, medtl.fl.job, medtl.fl.client, medtl.fl.schedule; "
        "assert 'nvflare' not in sys.modules, 'nvflare imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace", env=utf8_child_env()
    )
    assert done.returncode == 0, done.stderr


def test_missing_nvflare_gives_the_install_hint(monkeypatch):
    from medtl.fl import require_nvflare

    monkeypatch.setitem(sys.modules, "nvflare", None)  # import nvflare now raises ImportError
    with pytest.raises(MedtlError, match=r"pip install medtl\[fl\]"):
        require_nvflare()


@pytest.mark.slow
def test_two_sites_two_rounds_in_the_simulator(small_demo, tmp_path):
    """The whole job in NVFlare's simulator (about 40 s on two cores)."""
    from medtl.bundle.verify import verify_bundle
    from medtl.fl.job import run_federated

    source = tmp_path / "source_weights.pt"
    torch.save(resnet(0.5).state_dict(), source)
    manifests = [small_demo["sites"][s]["manifest"] for s in ("A", "B")]
    out = tmp_path / "fl"
    result = run_federated(
        source,
        manifests,
        [small_demo["out"]],
        out,
        recipe=FederatedRecipe(rounds=2, local_epochs=1, head_rounds=1, fedprox_mu=0.01),
    )

    start = torch.load(source, weights_only=True)
    final = result["network"].state_dict()
    assert any(not torch.equal(start[k].float(), final[k].float()) for k in start)  # the global model moved
    summary = json.loads((out / "fl_summary.json").read_text(encoding="utf-8"))
    assert summary == json.loads(json.dumps(result["summary"]))
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert [r["trainable"] for r in summary["rounds"]] == [["head"], ["layer4", "head"]]
    for r in summary["rounds"]:
        for site in ("site-1", "site-2"):  # both sites contributed in every round, FedProx applied
            metrics = r["sites"][site]
            assert metrics["train_steps"] > 0 and metrics["train_cases"] > 0 and metrics["fedprox_mu"] == 0.01
    assert (
        summary["rounds"][0]["sites"]["site-1"]["trainable_params"]
        < summary["rounds"][1]["sites"]["site-1"]["trainable_params"]
    )
    for site, name in (("site-1", "A"), ("site-2", "B")):
        federated = summary["evaluation"][site]["federated"]
        assert federated["test"]["n"] == sum(
            small_demo["sites"][name]["counts"]["by_site_split_label"][name]["test"].values()
        )
        assert "value" in federated["test"]["metrics"]["auc"] and "ci95" in federated["test"]["metrics"]["auc"]
        assert (
            summary["sites"][site]["manifest_sha256"]
            == json.loads(Path(small_demo["sites"][name]["manifest"]).read_text(encoding="utf-8"))["content_sha256"]
        )
    assert "val" in summary["evaluation"]["site-1"]["federated"]  # site B of the small cohort has no val split

    bundle = out / "tumor_cls_finetune"
    report = verify_bundle(bundle)
    assert report.ok, report.table()
    provenance = json.loads((bundle / "provenance.json").read_text(encoding="utf-8"))
    assert [m["name"] for m in provenance["data"]["manifests"]] == ["site-1", "site-2"]
    assert "2 rounds" in provenance["recipe"]["federated"] and "FedProx" in provenance["recipe"]["federated"]
    shipped = "".join(p.read_text(encoding="utf-8") for p in bundle.rglob("*") if p.suffix in {".json", ".md", ".txt"})
    for private in ("demo_site_A", "demo_site_B", str(small_demo["out"]), str(tmp_path)):
        assert private not in shipped
    assert (out / "job" / "medtl_fl" / "app_site-1" / "custom" / "client.py").is_file()
