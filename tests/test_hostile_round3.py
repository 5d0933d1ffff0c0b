"""Hostile bundles of the third round (issue 28): attacks on run-time confinement and on the audit's
own cost, written with ``medtl/bundle/confine.py``, ``run.py`` and ``audit.py`` in hand.

Each case asserts what a fix must give: a one-line ``MedtlError`` and no marker, no write and no
read outside the bundle and the run's declared folders. Payloads aim at ``outside/`` in the test's
folder (a marker file, the site's manifest) or at the working directory (a site's project folder).
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from medtl.bundle.run import run_bundle
from medtl.bundle.share import import_bundle
from medtl.bundle.verify import verify_bundle
from medtl.errors import MedtlError

LIDC = Path(__file__).resolve().parents[1] / "bundles" / "lidc_nodule_malignancy"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """tumor_cls_finetune exported with an untrained (seeded) network."""
    from monai.networks.nets import resnet10

    from medtl.bundle.export import export_bundle

    torch.manual_seed(0)
    network = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.5)
    folder = tmp_path_factory.mktemp("bundles") / "tumor_cls_finetune"
    return export_bundle(network, folder, template="tumor_cls_finetune", torchscript=False, onnx=False)["path"]


@pytest.fixture
def site(tmp_path, monkeypatch, make_series) -> dict[str, Path]:
    """Scans to predict, an output folder, ``outside/`` (the site's manifest) and ``cwd/`` (the
    working directory, where a relative path lands)."""
    folders = {"outside": tmp_path / "outside", "cwd": tmp_path / "cwd", "out": tmp_path / "out"}
    for name in ("outside", "cwd"):
        folders[name].mkdir()
    (folders["outside"] / "manifest.json").write_text('{"patient": "DOE^JANE"}', encoding="utf-8")
    make_series("a", shape=(40, 40, 12), folder=tmp_path / "scans" / "a")
    folders["scans"] = tmp_path / "scans"
    monkeypatch.chdir(folders["cwd"])
    return folders


def _hostile(bundle: Path, tmp_path: Path, change: Callable[[dict, Path], None]) -> Path:
    copy = Path(shutil.copytree(bundle, tmp_path / "hostile"))
    path = copy / "configs" / "inference.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    change(config, copy)
    path.write_text(json.dumps(config, indent=4), encoding="utf-8")
    return copy


def _run_refused(hostile: Path, site: dict[str, Path], *args: str, trust: bool = False, reason: str = "") -> str:
    """``medtl bundle run`` refuses in one line (containing ``reason``); the message."""
    with pytest.raises(MedtlError) as refused:
        run_bundle(hostile, ["--input_dir", str(site["scans"]), "--output_dir", str(site["out"]), *args], trust=trust)
    message = str(refused.value)
    assert "\n" not in message and reason in message, message
    return message


def _untouched(site: dict[str, Path]) -> bool:
    return sorted(p.name for p in site["outside"].iterdir()) == ["manifest.json"] and not any(site["cwd"].iterdir())


# ------------------------------------------------------------------ --trust: still confined
# A trusted bundle's expressions run past the audit as Python in this process. The confinement still
# stops these; code written to undo it can (docs/bundle-safety.md: --trust means trust).

TRUSTED = {
    # ctypes.dlopen(None) is let through as "the running program itself": libc's system() is C, no event
    "libc system() through ctypes.CDLL(None)": (
        "$__import__('ctypes').CDLL(None).system(('touch ' + {marker!r}).encode())"
    ),
    # a read is allowed by the path as written under a read root, and /proc is one: /proc/self/root/<any path>
    "a read through /proc/self/root": (
        "$open({out!r} + '/leak.txt', 'w').write(open('/proc/self/root' + {manifest!r}).read())"
    ),
}


@pytest.mark.parametrize("case", list(TRUSTED))
def test_a_trusted_bundle_cannot_leave_its_confinement(case, bundle, site, tmp_path):
    payload = TRUSTED[case].format(
        marker=str(site["outside"] / "PWNED"),
        manifest=str(site["outside"] / "manifest.json"),
        out=str(site["out"]),
    )
    hostile = _hostile(bundle, tmp_path, lambda c, _: c.__setitem__("initialize", [payload]))
    _run_refused(hostile, site, trust=True, reason="refused")
    leak = site["out"] / "leak.txt"
    assert _untouched(site) and (not leak.exists() or "DOE" not in leak.read_text(encoding="utf-8"))


def test_a_trusted_bundle_writes_nothing_to_shared_memory(bundle, site, tmp_path):
    """/dev/shm is among the folders a confined run may write, though the docs name only the bundle,
    the outputs and a private temporary folder: a file planted there outlives the run."""
    planted = Path("/dev/shm") / f"medtl-round3-{tmp_path.name}"
    payload = f"$open({str(planted)!r}, 'w').write('planted')"
    hostile = _hostile(bundle, tmp_path, lambda c, _: c.__setitem__("initialize", [payload]))
    try:
        _run_refused(hostile, site, trust=True, reason="refused")
        assert not planted.exists()
    finally:
        planted.unlink(missing_ok=True)


def test_a_trusted_bundle_sends_no_datagram(bundle, site, tmp_path):
    """Only socket.connect and getaddrinfo are refused; sendto on a UDP socket is another event."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(0.5)
    port = receiver.getsockname()[1]
    payload = f"$__import__('socket').socket(2, 2).sendto(b'DOE^JANE', ('127.0.0.1', {port}))"
    hostile = _hostile(bundle, tmp_path, lambda c, _: c.__setitem__("initialize", [payload]))
    try:
        _run_refused(hostile, site, trust=True, reason="refused")
        with pytest.raises(TimeoutError):
            receiver.recvfrom(64)
    finally:
        receiver.close()


# ------------------------------------------------------------------ without --trust


def test_a_meta_file_outside_configs_is_audited_before_it_runs(bundle, site, tmp_path):
    """``--meta_file`` may name any file inside the bundle, but only ``configs/metadata.json`` is
    audited as metadata (and ``configs/`` as configs): a ``$`` value in ``docs/metadata.json``,
    read through ``@_meta_#version``, is evaluated. With the ctypes gap above it runs a program."""
    marker = site["outside"] / "PWNED"

    def change(config: dict, root: Path) -> None:
        meta = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
        meta["version"] = f"$__import__('ctypes').CDLL(None).system(b'touch {marker}') and '1.0'"
        (root / "docs" / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
        config["initialize"] = ["@_meta_#version"]  # a plain reference: the audit accepts it

    hostile = _hostile(bundle, tmp_path, change)
    _run_refused(hostile, site, "--meta_file", "docs/metadata.json", reason="docs/metadata.json")
    assert _untouched(site)


def test_a_spawned_dataloader_worker_stays_confined(bundle, site, tmp_path):
    """A DataLoader with ``multiprocessing_context: spawn`` starts a fresh Python (multiprocessing's
    ``_posixsubprocess.fork_exec`` raises no audit event) with no hook in it. A bare
    ``PersistentDataset`` is not retargeted to the form checked when built, so its ``cache_dir``
    (``.``, the working directory) is first touched by that worker: the cache file lands there."""

    def change(config: dict, _root: Path) -> None:
        config["leak"] = {
            "_target_": "monai.data.DataLoader",
            "dataset": {
                "_target_": "PersistentDataset",
                "data": [{"x": 1}],
                "transform": {"_target_": "monai.transforms.EnsureTyped", "keys": "x"},
                "cache_dir": ".",
            },
            "num_workers": 1,
            "multiprocessing_context": "spawn",
            "batch_size": 1,
        }
        config["initialize"] = ["$len(list(@leak))"]

    hostile = _hostile(bundle, tmp_path, change)
    _run_refused(hostile, site, reason="multiprocessing_context must stay unset")
    # trusted past the audit: the bare name is still built in its confined form, refused when built
    _run_refused(hostile, site, trust=True, reason="PersistentDataset(cache_dir)")
    assert _untouched(site), sorted(p.name for p in site["cwd"].iterdir())


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail the test (not hang it) when the body runs past ``seconds``: the audit is pure Python."""

    def stop(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_config_lists_named_in_docs_do_not_multiply_the_audit(tmp_path):
    """Every ``config_file [a, b, ...]`` list in docs/ is audited as one more merged workflow, with no
    bound on how many: 11 configs of 2,000 values (each within every size bound) and 2,000 orderings
    of them in docs/ keep verify busy for minutes (about 85 s per 1,000 lists here). A bound on the
    lists, or on the values audited in all, refuses it in seconds."""
    bundle = Path(shutil.copytree(LIDC, tmp_path / "b", ignore=shutil.ignore_patterns("model.ts", "model.onnx")))
    names = [f"configs/c{i}.json" for i in range(11)]
    for name in names:
        (bundle / name).write_text(json.dumps({f"k{j}": "$1 + 1" for j in range(2000)}), encoding="utf-8")
    orderings = itertools.islice(itertools.permutations(names), 2000)  # distinct lists, 1.1 MB of text
    text = "\n".join(f"config_file [{', '.join(o)}]" for o in orderings)
    (bundle / "docs" / "runs.md").write_text(text, encoding="utf-8")
    with _deadline(20):
        report = verify_bundle(bundle)
    assert not report.ok
    with _deadline(20), pytest.raises(MedtlError) as refused:
        import_bundle(bundle, tmp_path / "site" / "b")
    assert "\n" not in str(refused.value)
