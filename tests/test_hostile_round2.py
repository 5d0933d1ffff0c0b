"""Hostile bundles of the second round (issue 28): ``verify`` runs nothing of a bundle but its network
class built from literal arguments, stays within time and memory on any input, and passes a shipped
``model.ts``/``model.onnx`` only as what this site exports itself.

Every case starts from a copy of the shipped LIDC bundle. Payloads aim at ``outside/`` in the test's
folder (a marker file, a site manifest); each case asserts a one-line reason, that nothing was
written there, and that verify and import return within 60 s.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import monai.networks.nets
import pytest
import torch

from medtl.bundle import verify
from medtl.bundle.export import _torchscript, torchscript_bytes
from medtl.bundle.sandbox import Limits
from medtl.bundle.share import import_bundle
from medtl.bundle.verify import network_definition, verify_bundle
from medtl.errors import MedtlError
from tests.test_hostile_bundles import _SetstateWrites  # the TorchScript payload round 1 built

NAME = "lidc_nodule_malignancy"
LIDC = Path(__file__).resolve().parents[1] / "bundles" / NAME


@dataclass(frozen=True)
class Site:
    """The test's folder: ``outside`` holds the site's manifest and is where payloads aim."""

    tmp: Path
    outside: Path

    @property
    def marker(self) -> Path:
        return self.outside / "PWNED"

    def bundle(self, executables: bool = False) -> Path:
        """A copy of the LIDC bundle; without its model.ts/model.onnx unless asked (a faster check)."""
        ignore = None if executables else shutil.ignore_patterns("model.ts", "model.onnx")
        return Path(shutil.copytree(LIDC, self.tmp / NAME, ignore=ignore))

    def untouched(self) -> bool:
        return sorted(p.name for p in self.outside.iterdir()) == ["manifest.json"]


@pytest.fixture
def site(tmp_path, monkeypatch) -> Site:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "manifest.json").write_text(json.dumps({"training": [{"image": "p001.nii.gz", "patient": "MRN-1"}]}))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # payloads with a relative path would land here
    return Site(tmp_path, outside)


def _edit(bundle: Path, rel: str, change: Callable[[dict], None]) -> None:
    path = bundle / rel
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, indent=4), encoding="utf-8")


def _reasons(report) -> str:
    """The failed and warned rows: a trusted bundle's findings are warnings."""
    return "; ".join(f"{c.name}: {c.detail}" for c in report.checks if c.status in ("fail", "warn"))


def _refused(site: Site, bundle: Path, reason: str, *, trust_too: bool = False) -> None:
    """``reason`` is in verify's table, as one line; import refuses; nothing was written outside; in 60 s."""
    start = time.monotonic()
    report = verify_bundle(bundle)
    assert not report.ok, report.table()
    trusted = verify_bundle(bundle, trust=True) if trust_too else report
    assert reason in _reasons(trusted), trusted.table()
    assert all("\n" not in c.detail for c in [*report.checks, *trusted.checks])
    with pytest.raises(MedtlError) as refused:
        import_bundle(bundle, site.tmp / "site" / NAME)
    assert "\n" not in str(refused.value) and not (site.tmp / "site" / NAME).exists()
    assert time.monotonic() - start < 60
    assert site.untouched() and not (site.tmp / "cwd" / "PWNED").exists()


# ------------------------------------------------------------------ verify runs nothing of the bundle


def _network_def(site: Site) -> dict[str, Callable[[dict], None]]:
    """Edits of inference.json that would run something if network_def were parsed by MONAI."""
    m, manifest = str(site.marker), str(site.outside / "manifest.json")
    record = {"_target_": "medtl.bundle.components.run_record", "output_dir": str(site.outside)}
    return {
        "_requires_ writes a run record": lambda c: c["network_def"].__setitem__("_requires_", record),
        "$ reads the site manifest": lambda c: c["network_def"].__setitem__(
            "num_classes", f"$len(monai.data.load_decathlon_datalist({manifest!r}))"
        ),
        "an allowed .run() reached": lambda c: c["network_def"].__setitem__("num_classes", "$@evaluator.run() or 2"),
        "nested component": lambda c: c["network_def"].__setitem__(
            "norm", {"_target_": "builtins.open", "file": m, "mode": "w"}
        ),
        "reference to an expression": lambda c: c.__setitem__("num_classes", f"$open({m!r}, 'w') and 2"),
        "_mode_ callable": lambda c: c["network_def"].__setitem__("_mode_", "callable"),
        "network_def#key merged from outside": lambda c: c.__setitem__("network_def#pretrained", True),
        "target not a network": lambda c: c["network_def"].__setitem__(
            "_target_", "medtl.bundle.components.run_record"
        ),
        "DenseNet121(pretrained=True)": lambda c: c.__setitem__(
            "network_def",
            {
                "_target_": "monai.networks.nets.DenseNet121",
                "spatial_dims": 3,
                "in_channels": 2,
                "out_channels": 2,
                "pretrained": True,
            },
        ),
        "EfficientNetBN downloads by default": lambda c: c.__setitem__(
            "network_def",
            {
                "_target_": "monai.networks.nets.EfficientNetBN",
                "model_name": "efficientnet-b0",
                "spatial_dims": 3,
                "in_channels": 2,
                "num_classes": 2,
            },
        ),
    }


REASONS = {
    "_requires_ writes a run record": "network_def#_requires_: not a constructor argument",
    "$ reads the site manifest": "is a $ expression; verify builds network_def only from literal arguments",
    "an allowed .run() reached": "is a $ expression",
    "nested component": "network_def#norm: holds _target_ (a nested component)",
    "reference to an expression": 'network_def#num_classes (@num_classes): "$open(',
    "_mode_ callable": "network_def#_mode_: not a constructor argument",
    "network_def#key merged from outside": "network_def#pretrained: sets network_def's arguments from outside it",
    "target not a network": "is not a network on the allow-list",
    "DenseNet121(pretrained=True)": "DenseNet121 with pretrained=True downloads weights",
    "EfficientNetBN downloads by default": "EfficientNetBN with pretrained=True downloads weights",
}


@pytest.mark.parametrize("case", list(REASONS))
def test_verify_builds_network_def_only_from_literals(case, site):
    """Even with --trust: a ConfigParser would run these (and an allowed download would be attempted)."""
    bundle = site.bundle()
    _edit(bundle, "configs/inference.json", _network_def(site)[case])
    _refused(site, bundle, REASONS[case], trust_too=True)
    rows = {c.name: c for c in verify_bundle(bundle, trust=True).checks}
    assert rows["network matches metadata"].status == "skip"  # not built at all
    assert site.untouched()


def test_literal_network_def_resolves_top_level_literals():
    config = json.loads((LIDC / "configs" / "inference.json").read_text(encoding="utf-8"))
    target, arguments = network_definition(config)
    assert target == "monai.networks.nets.resnet10"
    assert arguments == {"spatial_dims": 3, "n_input_channels": 2, "num_classes": 2, "widen_factor": 0.25}


# ------------------------------------------------------------------ bounds on time and memory


def _meta(change: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda meta: change(meta["network_data_format"])


BOUNDS = {
    "spatial_shape 512^3": (
        _meta(lambda f: f["inputs"]["image"].__setitem__("spatial_shape", [512, 512, 512])),
        "above the bound of 16777216 (256^3)",
    ),
    "spatial_shape as strings": (
        _meta(lambda f: f["inputs"]["image"].__setitem__("spatial_shape", ["32", "32", "32"])),
        "spatial_shape must be 1 to 3 positive integers",
    ),
    "num_channels huge": (
        _meta(lambda f: f["outputs"]["pred"].__setitem__("num_channels", 10**12)),
        "num_channels must be an integer from 1 to 10000",
    ),
}


@pytest.mark.parametrize("case", list(BOUNDS))
def test_metadata_sizes_are_bounded_before_anything_is_built(case, site):
    change, reason = BOUNDS[case]
    bundle = site.bundle()
    _edit(bundle, "configs/metadata.json", change)
    _refused(site, bundle, reason)


@pytest.mark.parametrize(
    "expression", ["$sum(range(10**13))", "$[0] * 650000000"], ids=["sum of a huge range", "5 GB list"]
)
def test_expressions_in_network_def_never_run(expression, site):
    bundle = site.bundle()
    _edit(bundle, "configs/inference.json", lambda c: c["network_def"].__setitem__("num_classes", expression))
    _refused(site, bundle, "is a $ expression", trust_too=True)


def test_a_transform_size_is_bounded(site):
    bundle = site.bundle()
    resize = {"_target_": "monai.transforms.Resized", "keys": "image", "spatial_size": [1024, 1024, 1024]}
    _edit(bundle, "configs/inference.json", lambda c: c.__setitem__("resize", resize))
    _refused(site, bundle, "configs/inference.json resize#spatial_size: 1073741824 voxels, above the bound")


def _deflated_zeros(zf: zipfile.ZipFile, name: str, size: int) -> None:
    zf.writestr(zipfile.ZipInfo(name), b"\0" * size, compress_type=zipfile.ZIP_DEFLATED)


def test_a_weights_record_that_inflates_is_not_loaded(site):
    bundle = site.bundle()
    with zipfile.ZipFile(bundle / "models" / "model.pt", "a") as zf:
        _deflated_zeros(zf, "model/data/999", 64 << 20)
    _refused(site, bundle, "models/model.pt: member 'model/data/999' inflates")


def test_weights_over_the_declared_bound_are_not_loaded(site, monkeypatch):
    monkeypatch.setattr(verify, "MAX_WEIGHT_BYTES", 1 << 20)
    _refused(site, site.bundle(), "models/model.pt: its tensor records declare 3.48 MiB, above 1 MiB; not loaded")


def test_a_zip_member_that_inflates_is_not_extracted(site):
    bundle = site.bundle()
    archive = site.tmp / "received.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                zf.write(path, f"{NAME}/{path.relative_to(bundle).as_posix()}")
        _deflated_zeros(zf, f"{NAME}/docs/notes.txt", 64 << 20)
    start = time.monotonic()
    report = verify_bundle(archive)
    assert "received.zip: member 'lidc_nodule_malignancy/docs/notes.txt' inflates" in _reasons(report)
    assert time.monotonic() - start < 60 and site.untouched()


def _onnx_loop() -> bytes:
    """A graph that adds 1 to the image 2^62 times."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Add", ["x_in", "one"], ["x_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None),
        ],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "image"], ["pred"], body=body)],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("pred", TensorProto.FLOAT, None)],
        initializer=[
            helper.make_tensor("trips", TensorProto.INT64, [], [2**62]),
            helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_an_onnx_loop_is_refused_even_with_trust(site):
    pytest.importorskip("onnxruntime")
    bundle = site.bundle()
    (bundle / "models" / "model.onnx").write_bytes(_onnx_loop())
    _refused(site, bundle, "models/model.onnx: holds Loop nodes", trust_too=True)
    assert verify_bundle(bundle, trust=True).ok is False


@pytest.fixture
def tight(monkeypatch) -> Callable[..., Limits]:
    def set_limits(**limits: int) -> Limits:
        chosen = Limits(**{"cpu_seconds": 2, "memory_bytes": 2 << 30, "wall_seconds": 30, **limits})
        monkeypatch.setattr(verify, "CHECK_LIMITS", chosen)
        return chosen

    return set_limits


def test_a_network_check_over_its_cpu_time_is_stopped(site, tight):
    """A large input within the bound: the forward pass needs far more than the 2 s given here."""
    tight(cpu_seconds=2)
    bundle = site.bundle()
    _edit(
        bundle, "configs/metadata.json", _meta(lambda f: f["inputs"]["image"].__setitem__("spatial_shape", [160] * 3))
    )
    _refused(site, bundle, "resource limits: network check exceeded 2 s of CPU time while building network_def")


def test_a_network_check_over_its_memory_is_stopped(site, tight):
    tight(memory_bytes=96 << 20)
    bundle = site.bundle()
    _edit(
        bundle, "configs/metadata.json", _meta(lambda f: f["inputs"]["image"].__setitem__("spatial_shape", [160] * 3))
    )
    _refused(site, bundle, "resource limits: network check exceeded 96 MiB of memory")


# ------------------------------------------------------------------ executables: this site's exports only


class _Loops(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(1000000000000):
            x = x + 0
        return x


def test_the_shipped_exports_are_what_this_site_exports(site):
    report = verify_bundle(site.bundle(executables=True))
    rows = {c.name: c for c in report.checks}
    assert report.ok, report.table()
    assert rows["exports match the weights"].status == "pass"
    assert rows["TorchScript parity"].status == rows["ONNX parity"].status == "pass"


def test_a_torchscript_payload_is_refused_unloaded(site):
    bundle = site.bundle(executables=True)
    (bundle / "models" / "model.ts").write_bytes(torchscript_bytes(torch.jit.script(_SetstateWrites(str(site.marker)))))
    _refused(site, bundle, "models/model.ts is not what models/model.pt and network_def export to")
    row = {c.name: c for c in verify_bundle(bundle).checks}["TorchScript parity"]
    assert row.status == "skip" and "model.ts is a program" in row.detail
    assert not site.marker.exists()


def test_a_trusted_torchscript_that_loops_is_stopped(site, tight):
    tight(cpu_seconds=2)
    bundle = site.bundle()
    (bundle / "models" / "model.ts").write_bytes(torchscript_bytes(torch.jit.script(_Loops())))
    start = time.monotonic()
    report = verify_bundle(bundle, trust=True)
    assert "network check exceeded 2 s of CPU time while running models/model.ts" in _reasons(report), report.table()
    assert time.monotonic() - start < 60


def _lidc_network(bundle: Path) -> torch.nn.Module:
    """The bundle's network with its weights, built in this process."""
    config = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    target, arguments = network_definition(config)
    network = getattr(monai.networks.nets, target.rsplit(".", 1)[1])(**arguments)
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    return network.eval()


def test_an_export_from_a_process_that_compiled_other_networks_matches(site):
    """TorchScript numbers classes and temporaries on from what the process compiled before: a
    sender's export from a long session reads differently, and is still this site's export."""
    for width in (0.5, 1.0):
        other = monai.networks.nets.resnet10(spatial_dims=3, n_input_channels=2, widen_factor=width).eval()
        torch.jit.script(other)
        torch.jit.trace(other, torch.rand(1, 2, 16, 16, 16))
    bundle = site.bundle()
    embedded = {n: (bundle / "configs" / n).read_text(encoding="utf-8") for n in ("metadata.json", "inference.json")}
    (bundle / "models" / "model.ts").write_bytes(
        torchscript_bytes(_torchscript(_lidc_network(bundle), [2, 32, 32, 32]), embedded)
    )
    rows = {c.name: c for c in verify_bundle(bundle).checks}
    assert rows["exports match the weights"].status == "pass", rows["exports match the weights"].detail
    assert rows["TorchScript parity"].status == "pass"


def test_a_traced_copy_is_kept_with_trust_and_said_so(site):
    """The same numbers from another program: refused without --trust, kept and stated with it."""
    bundle = site.bundle()
    network = _lidc_network(bundle)
    traced = torch.jit.trace(network.eval(), torch.rand(2, 2, 32, 32, 32))
    (bundle / "models" / "model.ts").write_bytes(torchscript_bytes(traced))
    _refused(site, bundle, "models/model.ts is not what models/model.pt and network_def export to")
    installed = import_bundle(bundle, site.tmp / "site" / NAME, trust=True)
    rows = {c.name: c for c in installed["verification"].checks}
    assert (
        rows["exports match the weights"].status == "warn"
        and "models/model.ts" in rows["exports match the weights"].detail
    )
    assert rows["TorchScript parity"].status == "pass"
    assert (installed["path"] / "models" / "model.ts").read_bytes() == (bundle / "models" / "model.ts").read_bytes()
