"""Progress reports: a bar on a terminal, a few plain lines in a log, nothing when switched off."""

from __future__ import annotations

import io

import numpy as np
import pytest
from ignite.engine import Engine, Events
from tqdm import tqdm

from medtl import progress as progress_module
from medtl.importers import import_medmnist
from medtl.manifest import SPLITS
from medtl.progress import EngineProgress, Lines, track


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_tenth_and_no_carriage_returns():
    log = io.StringIO()
    for _ in track(range(1000), desc="preprocess", unit="case", file=log):
        pass
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 2 <= len(lines) <= 12
    assert lines[0].startswith("preprocess: 100/1000 case (10%)")
    assert lines[-1].startswith("preprocess: 1000/1000 case (100%)")


def test_log_lines_carry_the_postfix_and_a_count_without_total():
    log = io.StringIO()
    bar = track((i for i in range(50)), desc="train", file=log)
    assert isinstance(bar, Lines)
    for i in bar:
        bar.set_postfix(loss=1 / (i + 1))
    (line,) = log.getvalue().splitlines()  # no total, under EVERY_SECONDS: the final line only
    assert line.startswith("train: 50 it,") and "loss=0.02" in line


def test_a_line_at_least_every_interval(monkeypatch):
    monkeypatch.setattr(progress_module, "EVERY_SECONDS", 0.0)
    log = io.StringIO()
    with track(desc="importing", unit="image", file=log) as bar:
        for _ in range(5):
            bar.update()
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == [
        f"importing: {n} image" for n in range(1, 6)
    ]


def test_a_terminal_gets_a_tqdm_bar():
    screen = _Terminal()
    bar = track(range(1000), desc="preprocess", file=screen)
    assert isinstance(bar, tqdm)
    for _ in bar:
        pass
    text = screen.getvalue()
    assert "\r" in text and "1000/1000" in text and "|" in text


@pytest.mark.parametrize("stream", [io.StringIO, _Terminal], ids=["log", "terminal"])
def test_switched_off_writes_nothing(stream):
    out = stream()
    assert sum(track(range(1000), desc="quiet", file=out, disable=True)) == sum(range(1000))
    with track(total=10, file=out, disable=True) as bar:
        bar.update(10)
    assert out.getvalue() == ""


def _engine(epochs: int, steps: int, log: io.StringIO) -> Engine:
    engine = Engine(lambda _e, batch: {"loss": float(batch)})
    bar = EngineProgress(desc="train", file=log)
    bar.attach(engine, output_transform=lambda output: {"loss": output["loss"]})
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: bar.log_message(f"epoch {e.state.epoch} done"))
    engine.run(list(range(steps)), max_epochs=epochs)
    return engine


def test_an_engine_in_a_log_reports_its_whole_run_in_a_few_lines():
    log = io.StringIO()
    _engine(epochs=3, steps=400, log=log)
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert [line for line in lines if line.endswith("done")] == [f"epoch {e} done" for e in (1, 2, 3)]
    reports = [line for line in lines if not line.endswith("done")]
    assert 2 <= len(reports) <= 12
    assert reports[-1].startswith("train epoch 3/3: 1200/1200 it (100%)") and "loss=399" in reports[-1]


def test_an_engine_on_a_terminal_draws_a_bar():
    screen = _Terminal()
    _engine(epochs=2, steps=50, log=screen)
    text = screen.getvalue()
    assert "\r" in text and "100/100" in text and "loss=" in text and "epoch 2 done" in text


def test_medmnist_import_logs_a_few_lines(tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(SPLITS, (150, 30, 20), strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez(tmp_path / "fake.npz", **arrays)
    import_medmnist(tmp_path / "fake.npz", tmp_path / "out", classes=("a", "b"))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert 2 <= len([line for line in err.splitlines() if line.startswith("importing fake")]) <= 12
