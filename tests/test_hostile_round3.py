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
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from medtl.bundle.run import run_bundle
from medtl.bundle.share import import_bundle
from medtl.bundle.verify import verify_bundle
from medtl.errors import MedtlError

LIDC = Path(__file__).resolve().parents[1] / "bundles" / "lidc_nodule_malignancy"


@pytest.fixture(scope="module")
def bundle(untrained_bundle) -> Path:
    return untrained_bundle


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


# ================================================================== round 2
# Written with the round-1 fixes in hand: the zip reader's own failures, ``import``'s zip path
# (which skips verify's directory checks), the privacy scan's cost, size bounds reached by
# reference, and a trusted run's relative opens.


def _lidc_zip(tmp_path: Path, members: list[tuple[str, bytes]]) -> Path:
    """The LIDC bundle (without model.ts/model.onnx) zipped under ``b/``, plus ``members``."""
    archive = tmp_path / "received.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(LIDC.rglob("*")):
            if path.is_file() and path.name not in ("model.ts", "model.onnx"):
                zf.write(path, "b/" + path.relative_to(LIDC).as_posix())
        for name, data in members:
            zf.writestr(name, data)
    return archive


def _zip_refused(archive: Path, tmp_path: Path, reason: str = "") -> None:
    """verify reports a one-line failure (it never raises), import refuses in one line, nothing installed."""
    report = verify_bundle(archive)
    failed = [c.detail for c in report.checks if c.status == "fail"]
    assert failed and all("\n" not in d for d in failed) and reason in "; ".join(failed), report.table()
    with pytest.raises(MedtlError) as refused:
        import_bundle(archive, tmp_path / "site" / "b")
    assert "\n" not in str(refused.value) and reason in str(refused.value), str(refused.value)
    assert not (tmp_path / "site" / "b").exists()


ZIP_LAYOUTS = {
    # the zip module writes docs/x, then cannot make the folder docs/x: NotADirectoryError
    "a file and a folder of one name": [("b/docs/x", b"a"), ("b/docs/x/y.txt", b"b")],
    # one name longer than the file system allows (255 bytes): OSError ENAMETOOLONG
    "a name of 300 characters": [("b/docs/" + "a" * 300 + ".txt", b"a")],
    # os.makedirs recurses once per folder: RecursionError (also for 1,200 levels, within PATH_MAX)
    "folders 1,200 deep": [("b/docs/" + "d/" * 1200 + "f.txt", b"a")],
}


@pytest.mark.parametrize("case", list(ZIP_LAYOUTS))
def test_a_zip_that_cannot_be_unpacked_is_refused_in_one_line(case, tmp_path):
    """Each layout passes every entry check and then fails inside ``extractall`` with a library
    exception (the CLI prints "unexpected NotADirectoryError ... please report it")."""
    _zip_refused(_lidc_zip(tmp_path, ZIP_LAYOUTS[case]), tmp_path)


def test_import_bounds_the_number_of_zip_entries_as_verify_does(tmp_path):
    """verify refuses a zip of more than 10,000 entries from its directory; import extracts, copies
    and scans them all (250,000 empty files: 104 s here) and then refuses for another reason."""
    archive = _lidc_zip(tmp_path, [(f"b/docs/m/{i}.txt", b"") for i in range(12_000)])
    with _deadline(20):
        _zip_refused(archive, tmp_path, reason="entries")


SLOW_TEXTS = {
    # the DICOM person-name pattern backtracks over the whole run from every word boundary:
    # quadratic, 1.3 s for 40 KB, minutes for a few hundred KB; a member under 1 MiB may compress
    # any amount, so this is a zip of a few hundred bytes
    "a quadratic text for the privacy scan": lambda: ("a-" * 150_000).encode(),
    # plain files are read whole and scanned at about 0.6 s/MB (the 64 MiB budget bounds only what
    # is decompressed): 100 MB of text take 74 s, and 2 GB (the size cap) hold several GB in memory
    "100 MB of text": lambda: b"0," * 50_000_000,
}


@pytest.mark.parametrize("case", list(SLOW_TEXTS))
def test_the_privacy_scan_is_bounded_in_time(case, tmp_path):
    """verify (and so import and pack) scans every file for patient data in this process, with no
    time or size bound: a document in docs/ keeps it past the 60 s bar."""
    bundle = Path(shutil.copytree(LIDC, tmp_path / "b", ignore=shutil.ignore_patterns("model.ts", "model.onnx")))
    (bundle / "docs" / "notes.md").write_bytes(SLOW_TEXTS[case]())
    with _deadline(30):
        report = verify_bundle(bundle)
    assert all("\n" not in c.detail for c in report.checks)


SIZES_BY_NAME = {
    "a reference": "@big",
    "a macro": "%big",
}


@pytest.mark.parametrize("case", list(SIZES_BY_NAME))
def test_image_sizes_given_by_reference_are_bounded(case, tmp_path):
    """ "bounded sizes" reads only literal lists under spatial_size, roi_size, ...: the same 1024^3
    Resized (4 GB per image at predict time) passes verify and import when the list is another id."""

    bundle = Path(shutil.copytree(LIDC, tmp_path / "b", ignore=shutil.ignore_patterns("model.ts", "model.onnx")))
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["big"] = [1024, 1024, 1024]
    config["preprocessing"]["transforms"].append(
        {"_target_": "monai.transforms.Resized", "keys": "image", "spatial_size": SIZES_BY_NAME[case]}
    )
    path.write_text(json.dumps(config, indent=4), encoding="utf-8")
    report = verify_bundle(bundle)
    sizes = next(c for c in report.checks if c.name == "bounded sizes")
    assert sizes.status == "fail" and "256^3" in sizes.detail, report.table()


def test_a_trusted_bundle_cannot_open_relative_to_a_folder_descriptor(bundle, site, tmp_path, monkeypatch):
    """The hook judges ``os.open``'s path against the working directory, but ``dir_fd`` makes it
    relative to another folder: from an output folder (``cd out && medtl bundle run ...``),
    ``/proc`` (readable) and ``self/root/...`` reach any file."""
    site["out"].mkdir()
    payload = ("$__import__('os').open('self/root' + {marker!r}, 65, dir_fd=__import__('os').open('/proc', 0))").format(
        marker=str(site["outside"] / "PWNED")
    )
    hostile = _hostile(bundle, tmp_path, lambda c, _: c.__setitem__("initialize", [payload]))
    monkeypatch.chdir(site["out"])
    _run_refused(hostile, site, trust=True, reason="refused")
    assert _untouched(site)
