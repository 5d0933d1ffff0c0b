"""Kill -9 in the middle of training, resume, and end with the very weights of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medtl.adapt.resume import TrainingCheckpoint
from medtl.errors import MedtlError
from medtl.fileio import utf8_child_env

SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from monai.utils import set_determinism
from medtl.adapt.recipe import train
from medtl.recipes import TrainRecipe
from medtl.networks import resnet

out, resume = Path(sys.argv[1]), sys.argv[2] == "resume"
torch.set_num_threads(1)
set_determinism(0)
g = torch.Generator().manual_seed(1)
items = []
for i in range(24):
    label = i % 2
    image = torch.rand(1, 16, 16, 16, generator=g) * 0.5
    image[:, 5:11, 5:11, 5:11] += 0.5 * label  # a bright cube for class 1: something to learn
    items.append({"image": image, "label": label, "case_id": f"c{i}", "patient": f"p{i}", "site": "A"})
set_determinism(0)
network = resnet(0.25)
recipe = TrainRecipe(epochs=int(sys.argv[3]), batch_size=4, augment="light", patience=50)
result = train(network, items[:16], items[16:], recipe, progress=False, checkpoint=out / "last.pt", resume=resume)
torch.save(network.state_dict(), out / f"final-{sys.argv[2]}.pt")
summary = {k: result[k] for k in ("val_auc", "best_epoch", "epochs_run")}
summary["resumed_after_epoch"] = result.get("resumed_after_epoch")
(out / f"result-{sys.argv[2]}.json").write_text(json.dumps(summary))
"""
EPOCHS = 6


def _run(out: Path, mode: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.py").write_text(SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(out / "train.py"), str(out), mode, str(EPOCHS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
        env=utf8_child_env(),
    )


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-2000:]


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    whole = tmp_path / "whole"
    _finish(_run(whole, "fresh"))

    broken = tmp_path / "broken"
    proc = _run(broken, "fresh")
    deadline = time.monotonic() + 300
    while not (broken / "last.pt").exists():  # the first epoch's checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # kill -9: no handler runs, whatever was being written stays half-written
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (broken / "final-fresh.pt").exists()
    saved = torch.load(broken / "last.pt", weights_only=True)
    assert 1 <= saved["trainer"]["epoch"] < EPOCHS

    _finish(_run(broken, "resume"))
    resumed = json.loads((broken / "result-resume.json").read_text(encoding="utf-8"))
    expected = json.loads((whole / "result-fresh.json").read_text(encoding="utf-8"))
    assert resumed["resumed_after_epoch"] == saved["trainer"]["epoch"]
    assert resumed["val_auc"] == expected["val_auc"] and resumed["best_epoch"] == expected["best_epoch"]
    a, b = (
        torch.load(whole / "final-fresh.pt", weights_only=True),
        torch.load(broken / "final-resume.pt", weights_only=True),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_damaged_or_foreign_checkpoint(tmp_path):
    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

    class Engine:
        class state:
            epoch, iteration, max_epochs, epoch_length = 0, 0, 3, 1

    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(MedtlError, match="last.pt: cannot resume from this checkpoint"):
        TrainingCheckpoint(path, network=network, optimizer=optimizer, resume=True).load(Engine)
    torch.save({"format": 99, "rng": {"transforms": []}}, path)
    with pytest.raises(MedtlError, match="different training setup"):
        TrainingCheckpoint(path, network=network, optimizer=optimizer, resume=True).load(Engine)
    missing = TrainingCheckpoint(tmp_path / "none.pt", network=network, optimizer=optimizer, resume=True)
    missing.load(Engine)  # nothing to resume from: a fresh start
    assert missing.resumed_from is None

    saver = TrainingCheckpoint(path, network=network, optimizer=optimizer)
    Engine.state.epoch = 2
    saver.save(Engine)
    state = torch.load(path, weights_only=True)  # plain tensors and numbers: no pickled code needed
    assert state["trainer"]["epoch"] == 2 and set(state["rng"]) == {"torch", "numpy", "python", "transforms"}


def test_same_seed_and_data_give_identical_training(tmp_path):
    """Determinism on CPU: two runs from the same seed and items end with equal weights and metrics."""
    from monai.utils import set_determinism

    from medtl.adapt.recipe import train
    from medtl.networks import resnet
    from medtl.recipes import TrainRecipe

    g = torch.Generator().manual_seed(3)
    items = [
        {
            "image": torch.rand(1, 16, 16, 16, generator=g) + 0.3 * (i % 2),
            "label": i % 2,
            "case_id": f"c{i}",
            "patient": f"p{i}",
            "site": "A",
        }
        for i in range(16)
    ]
    runs = []
    for _ in range(2):
        set_determinism(0)
        network = resnet(0.25)
        result = train(
            network, items[:12], items[12:], TrainRecipe(epochs=2, batch_size=4, augment="light"), progress=False
        )
        runs.append((network.state_dict(), result["val_auc"]))
    (a, auc_a), (b, auc_b) = runs
    assert auc_a == auc_b and all(torch.equal(a[k], b[k]) for k in a)
