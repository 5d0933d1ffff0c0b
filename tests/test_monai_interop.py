"""The templates in bundles/ as MONAI's own tools and its consumers read them, without a manifest,
input or trained weights: ``verify_net_in_out`` on every config, ``create_workflow(...).check_properties()``
for the train and inference workflows, ``monai.bundle.load``, and the ids MONAI Label and the MONAI
Deploy App SDK parse from ``inference.json`` without the metadata."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import monai_bundle

from medtl.errors import MedtlError, medtl_cause
from medtl.fileio import utf8_child_env

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
NAMES = [b.name for b in BUNDLES]
CONFIGS = ("train.json", "evaluate.json", "inference.json")
#: Templates whose train.json builds without any input. The fine-tune and distillation bundles load
#: their --source/--teacher and run AdaBN, teacher labelling and a first validation in
#: ``initialize`` (where NVIDIA FLARE clients need them), so they take data before they build.
BUILD_WITHOUT_DATA = ("tumor_cls_source", "lidc_nodule_malignancy")


def _config(bundle: Path, name: str) -> dict:
    return json.loads((bundle / "configs" / name).read_text(encoding="utf-8"))


def _classes(bundle: Path) -> int:
    return _config(bundle, "metadata.json")["network_data_format"]["outputs"]["pred"]["num_channels"]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_network_def_takes_a_literal_class_count_and_needs_no_metadata(bundle, config, tmp_path):
    """MONAI's ``verify_net_in_out`` on each config, and ``network_def`` parsed without ``_meta_``
    (as MONAI Label parses it) and without a manifest: the head has the metadata's class count."""
    from monai.bundle import ConfigParser, verify_net_in_out

    assert _config(bundle, config)["num_classes"] == _classes(bundle)  # a literal, the metadata's count
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / config),
        bundle_root=str(tmp_path),
        device="cpu",
    )
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / config)
    parser["bundle_root"] = str(tmp_path)
    assert parser.get_parsed_content("network_def").fc.out_features == _classes(bundle)


@pytest.mark.parametrize("bundle", [b for b in BUNDLES if b.name == "tumor_cls_finetune"], ids=lambda b: b.name)
def test_verify_net_in_out_cli_on_train_json(bundle):
    """What model-zoo CI types, on the config that used to need a manifest for its class count."""
    done = monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/train.json",
        "--bundle_root",
        ".",
        cwd=bundle,
    )
    assert "verified with no error" in done.stdout + done.stderr


_CHECKS = r"""
import json, shutil, sys, torch
from pathlib import Path
import monai
from monai.bundle import create_workflow

repo, work = Path(sys.argv[1]), Path(sys.argv[2])
names = json.loads(sys.argv[3])
build_without_data = json.loads(sys.argv[4])
results = {}
for name in names:
    configs = repo / "bundles" / name / "configs"
    root = work / "roots" / name
    cases = [("inference", "infer", {}), ("evaluate", "infer", {})]
    # consumers that bring their own data lists (MONAI Label sets train#dataset#data) skip the data-bound initialize
    given = {} if name in build_without_data else {
        "initialize": [], "train#dataset#data": [], "validate#dataset#data": []
    }
    cases.append(("train", "train", given))
    for config, kind, override in cases:
        workflow = create_workflow(config_file=str(configs / f"{config}.json"), workflow_type=kind, logging_file=False,
                                   bundle_root=str(root / config), **override)
        results[f"{name}/{config}"] = workflow.check_properties()

    # monai.bundle.load: weights in a copy; the default train workflow where it builds without data
    copy = work / "load" / name
    shutil.copytree(repo / "bundles" / name, copy, ignore=shutil.ignore_patterns("models"))
    (copy / "models").mkdir()
    meta = json.loads((configs / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    k = meta["network_data_format"]["outputs"]["pred"]["num_channels"]
    parser = monai.bundle.ConfigParser()
    parser.read_config(configs / "inference.json")
    torch.save(parser.get_parsed_content("network_def").state_dict(), copy / "models" / "model.pt")
    kind = "train" if name in build_without_data else "inference"
    net = monai.bundle.load(name, bundle_dir=str(work / "load"), device="cpu", workflow_type=kind)
    with torch.no_grad():
        out = net.eval()(torch.rand(1, image["num_channels"], *image["spatial_shape"]))
    results[f"{name}/load-{kind}"] = list(out.shape) == [1, k]
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def monai_checks(tmp_path_factory):
    """``create_workflow(...).check_properties()`` and ``monai.bundle.load`` for every template, in
    one child process: MONAI's workflow sets global state (logging, seeds, the working directory's
    runs/ for bundle_root ".") that a test process should not keep."""
    work = tmp_path_factory.mktemp("monai_checks")
    done = subprocess.run(
        [sys.executable, "-c", _CHECKS, str(REPO), str(work), json.dumps(NAMES), json.dumps(BUILD_WITHOUT_DATA)],
        cwd=work,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=utf8_child_env(),
        timeout=900,
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert done.returncode == 0 and line, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(line[len("RESULTS ") :])


@pytest.mark.parametrize("config", ("inference", "evaluate", "train"))
@pytest.mark.parametrize("name", NAMES)
def test_workflows_have_the_properties_monai_checks(monai_checks, name, config):
    """Required properties present (dataset_dir, dataset, evaluator, trainer, ...) and optional ones
    under the ids MONAI expects; built with no manifest, input or weights."""
    assert monai_checks[f"{name}/{config}"] == []


@pytest.mark.parametrize("name", NAMES)
def test_monai_bundle_load_builds_the_network(monai_checks, name):
    kind = "train" if name in BUILD_WITHOUT_DATA else "inference"
    assert monai_checks[f"{name}/load-{kind}"] is True


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    """A 40 x 36 x 16 CT volume (lung-like background, a dense lesion) as NIfTI."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    volume = rng.normal(-700.0, 150.0, size=(40, 36, 16)).astype(np.float32)
    volume[15:25, 12:22, 5:11] = 40.0
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    path = tmp_path_factory.mktemp("ct") / "case.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path


def _parsed_as_consumers_do(bundle: Path, root: Path):
    """``inference.json`` the way MONAI Label and MONAI Deploy's operator read it: no ``read_meta``
    for MONAI Label, ``bundle_root`` set, the ids they name parsed one by one."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(root)
    return parser


@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_inference_ids_parse_without_metadata_and_preprocessing_starts_with_a_loader(bundle, tmp_path):
    from monai.transforms import Compose, LoadImaged

    from medtl.reader import LoadVolumed

    parser = _parsed_as_consumers_do(bundle, tmp_path)
    for key in ("device", "network_def", "inferer", "postprocessing"):
        assert parser.get_parsed_content(key) is not None, key
    pre = parser.get_parsed_content("preprocessing")
    assert isinstance(pre, Compose) and isinstance(pre.transforms[0], LoadVolumed)
    # no LoadImaged: MONAI Label's BundleInferTask would wrap it and require every key (tests/test_monai_label.py)
    assert not any(isinstance(t, LoadImaged) for t in pre.transforms)
    assert "loading" not in parser.config  # one pipeline: the run, MONAI Label and Deploy share it
    assert parser.config["prepared"]["transform"] == "@preprocessing"


def test_one_preprocessing_serves_files_and_in_memory_images(ct_file, tmp_path):
    """The medtl run and MONAI Label hand ``preprocessing`` a path; MONAI Deploy's operator drops
    transforms named LoadImage*/SaveImage* and hands it the image it loaded. Both give one input."""
    from medtl.reader import LoadVolumed

    pre = _parsed_as_consumers_do(REPO / "bundles" / "tumor_cls_source", tmp_path).get_parsed_content("preprocessing")
    from_file = pre({"image": str(ct_file)})["image"]
    assert tuple(from_file.shape) == (1, 32, 32, 32)

    loaded = LoadVolumed(keys="image", ensure_channel_first=False)({"image": str(ct_file)})[
        "image"
    ]  # channel-less, as Deploy's is
    pre.transforms = tuple(
        t for t in pre.transforms if not any(s in type(t).__name__ for s in ("LoadImage", "SaveImage"))
    )
    in_memory = pre({"image": loaded})["image"]
    assert torch.allclose(torch.as_tensor(in_memory), torch.as_tensor(from_file))


def test_loader_leaves_images_already_loaded(ct_file):
    from monai.data import MetaTensor

    from medtl.reader import LoadVolumed

    image = MetaTensor(torch.zeros(4, 5, 6))
    load = LoadVolumed(keys=["image", "mask"], allow_missing_keys=True)
    out = load({"image": image, "mask": str(ct_file)})
    assert out["image"] is image and tuple(out["mask"].shape) == (1, 40, 36, 16)


@pytest.mark.parametrize(
    ("config", "give"),
    [("inference.json", "--input_dir"), ("evaluate.json", "--manifest"), ("train.json", "--manifest")],
)
def test_a_run_without_input_says_what_to_pass(config, give, tmp_path):
    """Built without input, the workflow's ``run`` stops at its first step instead of MONAI
    skipping an empty run with a warning."""
    from monai.bundle import ConfigParser

    bundle = REPO / "bundles" / "tumor_cls_source"
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / config)
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser.update({"bundle_root": str(tmp_path), "device": "$torch.device('cpu')"})
    with pytest.raises(RuntimeError) as failed:
        parser.get_parsed_content("run#0")
    cause = medtl_cause(failed.value)
    assert cause is not None and "no cases to run on" in cause.message and give in cause.hint


def test_training_data_must_have_the_bundles_class_count(monkeypatch, tmp_path):
    from medtl.bundle import components
    from medtl.bundle.components import data

    monkeypatch.setattr(data, "class_names", lambda manifest: ["benign", "malignant"])
    with pytest.raises(MedtlError, match=r"the manifest has 2 classes \(benign, malignant\).*num_classes=3") as failed:
        components.datalist(str(tmp_path / "site.json"), tmp_path, "train", num_classes=3)
    assert "--num_classes 2" in failed.value.hint
    assert components.datalist("", tmp_path, "train", missing_ok=True) == []
    with pytest.raises(MedtlError, match="no manifest given"):
        components.datalist("", tmp_path, "train", num_classes=2)


def test_export_writes_the_networks_class_count_into_the_configs(tmp_path):
    """A head for three classes: the configs' literal num_classes follows the network, and a
    metadata that names another number of classes is refused."""
    from monai.networks.nets import resnet10

    from medtl.bundle.export import export_bundle, network_data_format_with_classes

    names = ["benign", "malignant", "uncertain"]
    net = resnet10(spatial_dims=3, n_input_channels=1, num_classes=3, widen_factor=0.5)
    dest = tmp_path / "tumor_cls_finetune"
    export_bundle(
        net,
        dest,
        template="tumor_cls_finetune",
        metadata={"network_data_format": network_data_format_with_classes(names)},
        torchscript=False,
        onnx=False,
    )
    for name in ("train.json", "evaluate.json", "inference.json"):
        assert _config(dest, name)["num_classes"] == 3, name
    assert _config(dest, "multi_gpu_train.json").get("num_classes") is None  # an overlay: train.json's count applies
    with pytest.raises(MedtlError, match="the network gives 3 classes but the metadata"):
        export_bundle(net, tmp_path / "other", template="tumor_cls_finetune", torchscript=False, onnx=False)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_templates_pass_the_expression_audit(bundle, tmp_path):
    """Every config stays in the accepted subset ``medtl bundle verify`` enforces."""
    from medtl.bundle.audit import audit_bundle

    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("models"))
    configs = tuple(f"configs/{p.name}" for p in sorted((copy / "configs").glob("*.json")) if p.name != "metadata.json")
    assert [str(f) for f in audit_bundle(copy, configs)] == []


@pytest.mark.slow
def test_onnx_export_cli_gives_the_networks_outputs(tmp_path):
    """``python -m monai.bundle onnx_export`` on the shipped LIDC bundle's weights (torch's exporter
    needs onnxscript: the export extra); ONNX Runtime then gives model.pt's outputs."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from monai.bundle import ConfigParser

    bundle = REPO / "bundles" / "lidc_nodule_malignancy"
    copy = tmp_path / bundle.name
    shutil.copytree(bundle / "configs", copy / "configs")
    onnx_file, weights = tmp_path / "model.onnx", bundle / "models" / "model.pt"
    monai_bundle(
        "onnx_export",
        "network_def",
        "--filepath",
        str(onnx_file),
        "--ckpt_file",
        str(weights),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        ".",
        cwd=copy,
    )
    parser = ConfigParser()
    parser.read_config(copy / "configs" / "inference.json")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(weights, weights_only=True))
    x = torch.rand(1, 2, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = net.eval()(x).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], expected, atol=1e-4)


_LOAD = r"""
import json, shutil, sys, torch, monai
from pathlib import Path
from medtl.errors import medtl_cause

repo, work = Path(sys.argv[1]), Path(sys.argv[2])
results = {}
for name in json.loads(sys.argv[3]):
    copy = work / "bundles" / name
    shutil.copytree(repo / "bundles" / name, copy, ignore=shutil.ignore_patterns("models", "runs", "eval", "cache"))
    (copy / "models").mkdir()
    parser = monai.bundle.ConfigParser()
    parser.read_config(copy / "configs" / "inference.json")
    # weights no fresh network_def has, so a load that kept its own initialisation shows
    fresh = parser.get_parsed_content("network_def").state_dict()
    state = {k: v * 2 + 0.1 if v.is_floating_point() else v for k, v in fresh.items()}
    torch.save(state, copy / "models" / "model.pt")
    load = dict(name=name, bundle_dir=str(work / "bundles"), source="github", device="cpu")
    some = {"manifest": "DATA/site.json", "dataset_dir": "DATA", "bundle_root": str(copy)}
    (work / "some_inputs.json").write_text(json.dumps(some))
    for key, args_file in (("train", None), ("train-some", str(work / "some_inputs.json"))):
        try:
            monai.bundle.load(**load, workflow_type="train", args_file=args_file)
            results[f"{name}/{key}"] = "loaded"
        except RuntimeError as exc:
            cause = medtl_cause(exc)
            results[f"{name}/{key}"] = str(cause) if cause else repr(exc)
    net = monai.bundle.load(**load, workflow_type="inference")
    results[f"{name}/inference"] = all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    results[f"{name}/written"] = sorted(p.name for p in copy.iterdir())
results["cwd"] = sorted(p.name for p in Path.cwd().iterdir())
print("RESULTS " + json.dumps(results))
"""


def test_monai_bundle_load_train_names_the_inputs_and_inference_loads_the_weights(tmp_path):
    """``monai.bundle.load``'s default ``workflow_type='train'`` runs train.json's ``initialize``, which
    for the fine-tune and distillation bundles needs a source/teacher and data: it stops at its first
    step, before any work, with one error naming every missing config value (values given through
    ``args_file`` count); ``workflow_type='inference'`` builds the network with model.pt's weights."""
    names = {"tumor_cls_finetune": "source", "tumor_cls_distill": "teacher"}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, str(REPO), str(tmp_path), json.dumps(list(names))],
        cwd=tmp_path,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=utf8_child_env(),
        timeout=300,
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert done.returncode == 0 and line, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(line[len("RESULTS ") :])
    for name, first in names.items():
        error = results[f"{name}/train"]
        assert error.startswith(f"configs/train.json: this workflow needs {first}, manifest, dataset_dir, not given")
        assert f"--{first} {first.upper()}_BUNDLE --manifest" in error and "workflow_type='inference'" in error
        assert results[f"{name}/train-some"].startswith(f"configs/train.json: this workflow needs {first}, not given")
        assert results[f"{name}/inference"] is True
        assert results[f"{name}/written"] == ["LICENSE", "configs", "docs", "models"]  # no runs/: nothing ran
    assert results["cwd"] == ["bundles", "some_inputs.json"]


_LOAD_WITH_INPUTS = r"""
import json, shutil, sys, torch, monai, numpy as np
from pathlib import Path
from medtl.importers import import_medmnist

repo, work = Path(sys.argv[1]), Path(sys.argv[2])
rng = np.random.default_rng(0)
np.savez(work / "site.npz", **{
    f"{split}_{kind}": rng.integers(0, 256, size=(n, 28, 28, 28), dtype=np.uint8) if kind == "images"
    else (np.arange(n) % 2).astype(np.uint8)[:, None]
    for split, n in (("train", 4), ("val", 2), ("test", 2)) for kind in ("images", "labels")
})
data = import_medmnist(work / "site.npz", work / "data", classes=("benign", "malignant"), progress=False)


def bundle_with_weights(name, dest):
    shutil.copytree(repo / "bundles" / name, dest, ignore=shutil.ignore_patterns("models", "runs", "eval", "cache"))
    (dest / "models").mkdir()
    parser = monai.bundle.ConfigParser()
    parser.read_config(dest / "configs" / "inference.json")
    parser.read_meta(dest / "configs" / "metadata.json")
    state = parser.get_parsed_content("network_def").state_dict()
    torch.save(state, dest / "models" / "model.pt")
    return state


bundle_with_weights("tumor_cls_source", work / "source")
bundle_with_weights("tumor_cls_finetune", work / "teacher")
results = {}
for name, given in (("tumor_cls_finetune", {"source": str(work / "source")}),
                    ("tumor_cls_distill", {"teacher": str(work / "teacher")})):
    copy = work / "bundles" / name
    state = bundle_with_weights(name, copy)
    inputs = {**given, "manifest": str(work / "data" / data["manifest"]), "dataset_dir": str(work / "data"),
              "bundle_root": str(copy)}
    (work / f"{name}.json").write_text(json.dumps(inputs))
    net = monai.bundle.load(name, bundle_dir=str(work / "bundles"), source="github", device="cpu",
                            workflow_type="train", args_file=str(work / f"{name}.json"))
    results[name] = {
        "weights": all(torch.equal(net.state_dict()[k], v) for k, v in state.items()),
        "run_record": (copy / "runs" / "run.json").is_file(),
    }
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.slow
def test_monai_bundle_load_train_runs_with_the_inputs_in_args_file(tmp_path):
    """The documented way through the train workflow: source/teacher, manifest, dataset_dir and
    bundle_root in ``args_file``; ``initialize`` runs (its run record lands in bundle_root/runs) and
    MONAI then loads models/model.pt."""
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_WITH_INPUTS, str(REPO), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=utf8_child_env(),
        timeout=600,
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert done.returncode == 0 and line, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(line[len("RESULTS ") :])
    for name in ("tumor_cls_finetune", "tumor_cls_distill"):
        assert results[name] == {"weights": True, "run_record": True}, name
