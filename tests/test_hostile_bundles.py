"""A corpus of hostile bundles: each is refused with a one-line reason, and its payload never runs.

Every payload, if anything ever executed it, would create the marker file ``PWNED`` in the test's
folder (``open(MARKER, 'w')``, ``touch MARKER``, a pickle's ``__reduce__``, a TorchScript
``__setstate__``). Each case asserts the refusal by ``medtl bundle verify`` and ``medtl bundle
import`` (some also ``pack`` and ``medtl predict``), and that the marker is absent after each.
The classes follow the security review; docs/bundle-safety.md has the table of reasons.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from medtl.bundle import files as bundle_files_module
from medtl.bundle import share
from medtl.bundle.export import export_bundle
from medtl.bundle.files import CHECKSUMS, SIGNATURE, format_sha256sums, parse_sha256sums
from medtl.bundle.share import import_bundle, pack_bundle
from medtl.bundle.signing import generate_key
from medtl.bundle.verify import verify_bundle
from medtl.errors import MedtlError
from medtl.networks import resnet

NAME = "tumor_cls_distill"


# ------------------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Shipped:
    """The clean bundle every case starts from, as a folder, a zip, and a zip signed by ``site-a``."""

    folder: Path
    packed: Path
    signed: Path
    keys: dict[str, Path]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Verification builds the network once per check; on a shared machine one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Shipped:
    """A distilled bundle as medtl exports it (ResNet10 width 0.25: 3.6 MB of weights, so ~70 cases verify in seconds).
    No ``model.ts``: the TorchScript cases add their own."""
    root = tmp_path_factory.mktemp("shipped")
    torch.manual_seed(0)
    folder = export_bundle(resnet(0.25), root / NAME, template=NAME, onnx=False, torchscript=False)["path"]
    keys: dict[str, Path] = {}
    for name in ("site-a", "site-b"):
        keys[f"{name}.key"], keys[f"{name}.pub"] = generate_key(root / "keys", name)
    packed = pack_bundle(folder, root / "b.zip")["path"]
    signed = pack_bundle(folder, root / "signed.zip", sign_key=keys["site-a.key"])["path"]
    assert verify_bundle(folder).ok and verify_bundle(packed).ok
    assert verify_bundle(signed, trusted_keys=[keys["site-a.pub"]]).ok
    return Shipped(folder, packed, signed, keys)


@dataclass
class Kit:
    """What a case builds its hostile bundle from: the shipped bundle, the test's folder and its marker."""

    shipped: Shipped
    tmp: Path
    marker: Path

    @property
    def m(self) -> str:
        return str(self.marker)

    def folder(self) -> Path:
        return Path(shutil.copytree(self.shipped.folder, self.tmp / NAME))

    def config(self, rel: str = "configs/inference.json") -> dict:
        return json.loads((self.shipped.folder / rel).read_text(encoding="utf-8"))

    def rezip(
        self,
        src: Path | None = None,
        *,
        files: dict[str, bytes | None] | None = None,
        raw: list[tuple[zipfile.ZipInfo | str, bytes]] = (),
    ) -> Path:
        """A copy of a packed zip with ``files`` (bundle-relative) replaced, added or (None) left
        out, and ``raw`` entries written exactly as given."""
        src, files, dest = src or self.shipped.packed, files or {}, self.tmp / "hostile.zip"
        with (
            zipfile.ZipFile(src) as zin,
            zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate names some cases write
            for info in zin.infolist():
                if info.filename.split("/", 1)[1] not in files:
                    zout.writestr(info, zin.read(info))
            for rel, data in files.items():
                if data is not None:
                    zout.writestr(f"{NAME}/{rel}", data)
            for info, data in raw:
                zout.writestr(info, data)
        return dest


@pytest.fixture
def kit(shipped, tmp_path, monkeypatch) -> Kit:
    monkeypatch.chdir(tmp_path)  # payloads with a relative path (touch PWNED) would land here too
    return Kit(shipped, tmp_path, tmp_path / "PWNED")


# ------------------------------------------------------------------------------------------- payloads


class _Touch:
    """A pickled object that, when unpickled, creates the marker."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class _SetstateWrites(torch.nn.Module):
    """TorchScript whose ``__setstate__`` (run by ``torch.jit.load`` itself) creates the file at ``path``."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.n = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.n

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return self.path, self.n, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.path = state[0]
        self.training = state[2]
        self.n = torch.from_file(self.path, shared=True, size=1, dtype=torch.uint8).float()  # creates the file


class _ForwardWrites(torch.nn.Module):
    """TorchScript whose ``forward`` creates the file at ``path``."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.from_file(self.path, shared=True, size=1, dtype=torch.uint8).float().sum()


class _ForwardLoops(torch.nn.Module):
    """TorchScript whose ``forward`` runs for hours."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(1000000000000):
            x = x + 0
        return x


def _scripted(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


# ------------------------------------------------------------------------------------------- case builders


@dataclass(frozen=True)
class Case:
    klass: str
    build: Callable[[Kit], Path]
    reason: str  # a substring of the refusal's one-line reason
    options: Callable[[Kit], dict[str, Any]] = lambda kit: {}  # verify/import keyword arguments
    pack: bool = False  # a folder case that `medtl bundle pack` must refuse too
    predict: bool = False  # a folder case that `medtl predict` must refuse before running anything


def _edit(rel: str, change: Callable[[dict, str], None]) -> Callable[[Kit], Path]:
    """A folder whose JSON file ``rel`` was changed by ``change(content, marker)``."""

    def build(kit: Kit) -> Path:
        bundle = kit.folder()
        content = json.loads((bundle / rel).read_text(encoding="utf-8"))
        change(content, kit.m)
        (bundle / rel).write_text(json.dumps(content, indent=2), encoding="utf-8")
        return bundle

    return build


def _initialize(item: Callable[[str], Any], rel: str = "configs/inference.json") -> Callable[[Kit], Path]:
    """A folder whose config runs ``item(marker)`` first in ``initialize`` (MONAI runs that list before ``run``)."""
    return _edit(rel, lambda c, m: c.__setitem__("initialize", [item(m), *c.get("initialize", [])]))


def _expression(text: Callable[[str], str]) -> Callable[[Kit], Path]:
    return _initialize(lambda m: "$" + text(m))


def _target(target: str, **kwargs: Any) -> Callable[[Kit], Path]:
    """A component with ``_target_`` and keyword arguments (``MARKER`` in a string is the marker's path)."""

    def item(m: str) -> dict:
        return {
            "_target_": target,
            **{k: v.replace("MARKER", m) if isinstance(v, str) else v for k, v in kwargs.items()},
        }

    return _initialize(item)


def _top_level(entries: dict[str, Callable[[str], Any]]) -> Callable[[Kit], Path]:
    """A folder whose inference.json gains these top-level keys (in order) and runs ``@x`` first."""

    def change(config: dict, m: str) -> None:
        config.update({key: value(m) for key, value in entries.items()})
        config["initialize"] = ["@x", *config["initialize"]]

    return _edit("configs/inference.json", change)


def _metadata(change: Callable[[dict, str], None]) -> Callable[[Kit], Path]:
    return _edit("configs/metadata.json", change)


def _channel_def(value: Callable[[str], Any]) -> Callable[[Kit], Path]:
    """metadata.json whose class name is ``value``: inference.json reads it through ``@_meta_#...#channel_def``."""
    return _metadata(
        lambda meta, m: meta["network_data_format"]["outputs"]["pred"]["channel_def"].__setitem__("0", value(m))
    )


def _write(rel: str, content: Callable[[Kit], str | bytes]) -> Callable[[Kit], Path]:
    """A folder with one more (or a replaced) file."""

    def build(kit: Kit) -> Path:
        bundle = kit.folder()
        data = content(kit)
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        (bundle / rel).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return bundle

    return build


_LOGGING_HEAD = (
    "[loggers]\nkeys=root\n\n"
    "[handlers]\nkeys=console\n\n"
    "[formatters]\nkeys=plain\n\n"
    "[logger_root]\nlevel=INFO\nhandlers=console\n\n"
)
_HANDLER = "[handler_console]\nclass=StreamHandler\nlevel=INFO\nformatter=plain\nargs=(sys.stdout,)\n\n"
_FORMATTER = "[formatter_plain]\nformat=%(asctime)s %(levelname)s %(name)s: %(message)s\n"


def _logging(handler: str = _HANDLER, formatter: str = _FORMATTER, head: str = "") -> Callable[[Kit], Path]:
    """configs/logging.conf, which ``monai.bundle run`` hands to ``logging.config.fileConfig`` before anything else."""
    return _write(
        "configs/logging.conf", lambda kit: (head + _LOGGING_HEAD + handler + formatter).replace("MARKER", kit.m)
    )


def _pickled_weights(kit: Kit, whole: bool = False) -> bytes:
    path = kit.tmp / "payload.pt"
    state = torch.load(kit.shipped.folder / "models" / "model.pt", weights_only=True)
    torch.save(_Touch(kit.m) if whole else {**state, "extra": _Touch(kit.m)}, path)
    return path.read_bytes()


def _symlink(rel: str, target: Callable[[Kit], Path]) -> Callable[[Kit], Path]:
    def build(kit: Kit) -> Path:
        bundle = kit.folder()
        outside = target(kit)
        (bundle / rel).unlink(missing_ok=True)
        os.symlink(outside, bundle / rel)
        return bundle

    return build


def _secret(kit: Kit) -> Path:
    secret = kit.tmp / "secret.txt"
    secret.write_text("the site's private notes\n")
    return secret


def _outside_folder(kit: Kit) -> Path:
    folder = kit.tmp / "outside"
    folder.mkdir()
    (folder / "evil.py").write_text(f"open({kit.m!r}, 'w')\n")
    return folder


def _outside_pickle(kit: Kit) -> Path:
    path = kit.tmp / "weights.pt"
    path.write_bytes(_pickled_weights(kit))
    return path


def _fifo(kit: Kit) -> Path:
    bundle = kit.folder()
    os.mkfifo(bundle / "docs" / "pipe")
    return bundle


def _zip_entry(name: str, mode: int = 0o644 | stat.S_IFREG) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = mode << 16
    info.create_system = 3
    return info


def _hostile_inference(kit: Kit) -> bytes:
    config = kit.config()
    config["initialize"] = [f"$open({kit.m!r}, 'w')", *config["initialize"]]
    return json.dumps(config, indent=2).encode("utf-8")


def _sums(kit: Kit, src: Path, changed: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(src) as zf:
        sums = parse_sha256sums(zf.read(f"{NAME}/{CHECKSUMS}").decode("utf-8"))
    sums |= {rel: hashlib.sha256(data).hexdigest() for rel, data in changed.items()}
    return format_sha256sums(sums).encode("utf-8")


def _signature_record(kit: Kit, **changes: Any) -> bytes:
    with zipfile.ZipFile(kit.shipped.signed) as zf:
        record = json.loads(zf.read(f"{NAME}/{SIGNATURE}"))
    return json.dumps({**record, **changes}).encode("utf-8")


def _onnx(kit: Kit, *, domain: str | None = None, external: Path | None = None) -> bytes:
    """A one-node ONNX model from the image to pred: an operator from ``domain``, or a weight read from ``external``."""
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("image", "pred")]
    opsets = [helper.make_opsetid("", 17)]
    if domain:
        node, weights = helper.make_node("Evil", ["image"], ["pred"], domain=domain), []
        opsets.append(helper.make_opsetid(domain, 1))
    else:
        weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        weight.external_data.add(key="location", value=str(external))
        node, weights = helper.make_node("Add", ["image", "w"], ["pred"]), [weight]
    return helper.make_model(
        helper.make_graph([node], "g", [io[0]], [io[1]], initializer=weights), opset_imports=opsets
    ).SerializeToString()


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _yaml_bomb(kit: Kit) -> str:
    lines = ["a0: &a0 [PWNED, PWNED, PWNED, PWNED, PWNED, PWNED, PWNED, PWNED, PWNED, PWNED]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    return "\n".join(lines) + f"\nx: \"$open('{kit.m}', 'w')\"\n"


_EXEC = "__import__('os').system('touch {m}')"

CASES: dict[str, Case] = {
    # -- attributes reached through an allowed module
    "torch.os.system expression": Case(
        "allowed-module attribute",
        _expression(lambda m: f"torch.os.system('touch {m}')"),
        "call to 'torch.os.system' is not allowed",
        pack=True,
        predict=True,
    ),
    "torch.os.system target": Case(
        "allowed-module attribute",
        _target("torch.os.system", command="touch MARKER"),
        "torch.os.system is not an allowed component",
        predict=True,
    ),
    "numpy npyio load allow_pickle": Case(
        "allowed-module attribute",
        _expression(lambda m: "numpy.lib._npyio_impl.load(@bundle_root + '/docs/x.npy', allow_pickle=True)"),
        "call to 'numpy.lib._npyio_impl.load' is not allowed",
    ),
    "numpy npyio load target": Case(
        "allowed-module attribute",
        _target("numpy.lib._npyio_impl.load", file="MARKER", allow_pickle=True),
        "numpy.lib._npyio_impl.load is not an allowed component",
    ),
    "torch.storage._load_from_bytes": Case(
        "allowed-module attribute",
        _expression(lambda m: f"torch.storage._load_from_bytes({pickle.dumps(_Touch(m))!r})"),
        "call to 'torch.storage._load_from_bytes' is not allowed",
    ),
    "torch._ops.ops.load_library": Case(
        "allowed-module attribute",
        _expression(lambda m: "torch._ops.ops.load_library(@bundle_root + '/models/libevil.so')"),
        "call to 'torch._ops.ops.load_library' is not allowed",
    ),
    "torch.ops.load_library target": Case(
        "allowed-module attribute",
        _target("torch.ops.load_library", path="MARKER"),
        "torch.ops.load_library is not an allowed component",
    ),
    "__globals__ of an allowed call": Case(
        "allowed-module attribute",
        _expression(lambda m: f"torch.cuda.is_available.__globals__['os'].system('touch {m}')"),
        "call to 'Attribute' is not allowed",
    ),
    "monai.utils.optional_import": Case(
        "allowed-module attribute",
        _expression(lambda m: f"monai.utils.optional_import('os')[0].system('touch {m}')"),
        "is not allowed (only the exact callables",
    ),
    # -- subscripts and other non-dotted receivers, format tricks, f-string walks
    "[os][0].system": Case(
        "non-dotted receiver",
        _expression(lambda m: f"[__import__('os')][0].system('touch {m}')"),
        "call to 'Attribute' is not allowed",
    ),
    "().__class__.__base__.__subclasses__()": Case(
        "non-dotted receiver",
        _expression(lambda m: "().__class__.__base__.__subclasses__()[-1]"),
        "call to 'Attribute' is not allowed",
        pack=True,
    ),
    "str.format attribute walk": Case(
        "non-dotted receiver",
        _expression(lambda m: "'{0.__class__.__init__.__globals__}'.format(@network_def)"),
        "call to 'Attribute' is not allowed",
    ),
    "f-string attribute walk": Case(
        "non-dotted receiver",
        _expression(lambda m: "f'{@network_def.__class__.__init__.__globals__}'"),
        "not a Python expression once MONAI rewrote it",
    ),
    "f-string call": Case(
        "non-dotted receiver",
        _expression(lambda m: 'f"{' + _EXEC.format(m=m) + '}"'),
        "call to 'Attribute' is not allowed",
    ),
    "reference dunder walk": Case(
        "non-dotted receiver",
        _expression(lambda m: f"@network_def.__class__.__init__.__globals__['os'].system('touch {m}')"),
        "call to 'Attribute' is not allowed",
    ),
    "getattr on a reference": Case(
        "non-dotted receiver",
        _expression(lambda m: "getattr(@network_def, '__class__')"),
        "call to 'getattr' is not allowed",
    ),
    "MONAI's reference name written out": Case(
        "non-dotted receiver",
        _expression(lambda m: "__local_refs['network_def'].__class__"),
        "field '__class__' of a reference is not allowed",
    ),
    # -- builtins rebound as lambda parameters or comprehension variables, walrus, starred arguments
    "lambda parameter eval": Case(
        "rebinding",
        _expression(lambda m: f"(lambda len: len(\"open({m!r}, 'w')\"))(eval)"),
        "call to 'Lambda' is not allowed",
    ),
    "comprehension variable exec": Case(
        "rebinding",
        _expression(lambda m: f"[len(c) for len in [exec] for c in [\"open({m!r}, 'w')\"]]"),
        "ListComp is not allowed",
    ),
    "dict comprehension eval": Case(
        "rebinding",
        _expression(lambda m: f"{{len: len(\"open({m!r}, 'w')\") for len in [eval]}}"),
        "DictComp is not allowed",
    ),
    "generator frame builtins": Case(
        "rebinding",
        _expression(lambda m: f"(c for c in [1]).gi_frame.f_builtins['eval'](\"open({m!r}, 'w')\")"),
        "not allowed",
    ),
    "walrus rebinds len": Case(
        "rebinding", _expression(lambda m: f"[(len := eval), len(\"open({m!r}, 'w')\")]"), "NamedExpr is not allowed"
    ),
    "starred arguments": Case(
        "rebinding", _expression(lambda m: f"max(*[eval(\"open({m!r}, 'w')\")])"), "starred arguments are not allowed"
    ),
    "** arguments": Case(
        "rebinding",
        _expression(lambda m: f"dict(**{{'a': eval(\"open({m!r}, 'w')\")}})"),
        "** arguments are not allowed",
    ),
    "sorted key=eval": Case(
        "rebinding", _expression(lambda m: f"sorted([\"open({m!r}, 'w')\"], key=eval)"), "name 'eval' is not allowed"
    ),
    # -- _target_ through builtins, as an expression or reference, _mode_, keys MONAI sets at a nested id
    "bare _target_ eval": Case(
        "target", _target("eval", source=_EXEC.replace("{m}", "MARKER")), "eval is not an allowed component"
    ),
    "bare _target_ exec": Case(
        "target", _target("exec", source=_EXEC.replace("{m}", "MARKER")), "exec is not an allowed component"
    ),
    "bare _target_ open": Case(
        "target", _target("open", file="MARKER", mode="w"), "open is not an allowed component", predict=True
    ),
    "bare _target_ getattr": Case(
        "target", _target("getattr", o="@network_def", name="__class__"), "getattr is not an allowed component"
    ),
    "_target_ builtins.exec": Case(
        "target",
        _target("builtins.exec", source=_EXEC.replace("{m}", "MARKER")),
        "builtins.exec is not an allowed component",
    ),
    "_target_ as an expression": Case(
        "target", _target("$__import__('os').system", command="touch MARKER"), "_target_ must be a plain dotted name"
    ),
    "_target_ as a reference": Case("target", _target("@network_def"), "_target_ must be a plain dotted name"),
    "_target_ as a macro": Case("target", _target("%network_def#_target_"), "_target_ must be a plain dotted name"),
    "_mode_ debug": Case(
        "target",
        _initialize(lambda m: {"_target_": "monai.utils.set_determinism", "_mode_": "debug"}),
        "_mode_ may only be 'default' or 'callable'",
    ),
    "x#_target_ key (MONAI sets it at x)": Case(
        "target",
        _top_level(
            {
                "x": lambda m: {"_target_": "monai.utils.set_determinism"},
                "x#_target_": lambda m: "builtins.open",
                "x#file": lambda m: m,
                "x#mode": lambda m: "w",
            }
        ),
        "builtins.open is not an allowed component",
        pack=True,
        predict=True,
    ),
    "x::_target_ key": Case(
        "target",
        _top_level(
            {
                "x": lambda m: {"_target_": "monai.utils.set_determinism"},
                "x::_target_": lambda m: "os.system",
                "x::command": lambda m: f"touch {m}",
            }
        ),
        "os.system is not an allowed component",
    ),
    "x#_mode_ key": Case(
        "target",
        _top_level({"x": lambda m: {"_target_": "monai.utils.set_determinism"}, "x#_mode_": lambda m: "debug"}),
        "_mode_ may only be 'default' or 'callable'",
    ),
    "+x merge key": Case(
        "target",
        _top_level(
            {
                "x": lambda m: {"_target_": "monai.utils.set_determinism"},
                "+x": lambda m: {"_target_": "builtins.open", "file": m, "mode": "w"},
            }
        ),
        "builtins.open is not an allowed component",
    ),
    # -- switches that turn safe loading off
    "trust=True keyword": Case(
        "safety switch",
        _expression(lambda m: "@network_def.to('cpu', trust=True)"),
        "keyword trust= switches a safety check off",
    ),
    "weights_only=False keyword": Case(
        "safety switch", _expression(lambda m: "@network_def.to(weights_only=False)"), "weights_only must stay true"
    ),
    "trust: true argument": Case(
        "safety switch",
        _target("medtl.bundle.components.load_bundle_network", bundle="@bundle_root", trust=True),
        "switches a safety check off",
    ),
    "x#trust key (MONAI sets it at x)": Case(
        "safety switch",
        _edit("configs/train.json", lambda c, m: c.__setitem__("teacher_network#trust", True)),
        "teacher_network#trust: 'trust: True': switches a safety check off",
        pack=True,
    ),
    "weights_only: false": Case(
        "safety switch",
        _target(
            "monai.handlers.CheckpointLoader",
            load_path="@ckpt_path",
            load_dict={"model": "@network"},
            weights_only=False,
        ),
        "weights_only must stay true",
    ),
    "allow_pickle: true": Case(
        "safety switch",
        _target("monai.transforms.LoadImaged", keys="image", reader="NibabelReader", allow_pickle=True),
        "allow_pickle must stay false",
    ),
    "reader: a dotted callable": Case(
        "safety switch",
        _target("monai.transforms.LoadImaged", keys="image", reader="numpy.lib._npyio_impl.load"),
        "reader must be one of",
    ),
    "reader: NumpyReader": Case(
        "safety switch",
        _target("monai.transforms.LoadImaged", keys="image", reader="NumpyReader"),
        "reader must be one of",
    ),
    "pickle_module argument": Case(
        "safety switch",
        _target("monai.data.PersistentDataset", data=[], cache_dir="cache", pickle_module="dill"),
        "pickle_module: dill",
    ),
    # -- % macros that read a file
    "% macro /etc/passwd": Case("macro", _initialize(lambda m: "%/etc/passwd#x"), "a % macro may only copy another id"),
    "% macro ../other.json": Case(
        "macro", _initialize(lambda m: "%../other.json#key"), "a % macro may only copy another id"
    ),
    "% macro to a json outside": Case(
        "macro",
        _initialize(lambda m: f"%{Path(m).parent}/evil.json#payload"),
        "a % macro may only copy another id",
        predict=True,
    ),
    "% macro to another bundle config": Case(
        "macro", _initialize(lambda m: "%configs/train.json::network_def"), "a % macro may only copy another id"
    ),
    # -- metadata.json is read into every workflow as @_meta_
    "metadata $ expression (read by class_names)": Case(
        "metadata",
        _channel_def(lambda m: f"$open({m!r}, 'w')"),
        "MONAI would evaluate this through @_meta_",
        pack=True,
        predict=True,
    ),
    "metadata @ reference": Case(
        "metadata",
        _metadata(lambda meta, m: meta.__setitem__("description", "@network_def")),
        "MONAI would evaluate this through @_meta_",
    ),
    "metadata _target_": Case(
        "metadata",
        _channel_def(lambda m: {"_target_": "builtins.open", "file": m, "mode": "w"}),
        "metadata holds plain values, not components",
        predict=True,
    ),
    "metadata % macro": Case(
        "metadata",
        _metadata(lambda meta, m: meta.__setitem__("description", "%network_def")),
        "MONAI would evaluate this through @_meta_",
    ),
    # -- MONAI components that unpickle or fetch files themselves, or anything not in the allow-list
    "monai.data.LMDBDataset": Case(
        "component",
        _target("monai.data.LMDBDataset", data=[], cache_dir="cache"),
        "monai.data.LMDBDataset is not an allowed component",
    ),
    "monai.apps.download_url": Case(
        "component",
        _target("monai.apps.download_url", url="https://example.org/x", filepath="MARKER"),
        "monai.apps.download_url is not an allowed component",
    ),
    "monai.bundle.load": Case(
        "component",
        _target("monai.bundle.load", name="evil", source="github"),
        "monai.bundle.load is not an allowed component",
    ),
    "monai.data.NumpyReader allow_pickle": Case(
        "component",
        _target("monai.data.NumpyReader", allow_pickle=True),
        "monai.data.NumpyReader is not an allowed component",
    ),
    "PersistentDataset weights_only: false": Case(
        "component",
        _target("monai.data.PersistentDataset", data=[], cache_dir="cache", weights_only=False),
        "weights_only must stay true",
    ),
    "torch.load target": Case(
        "component", _target("torch.load", f="@ckpt_path", weights_only=False), "torch.load is not an allowed component"
    ),
    "pickle.loads target": Case(
        "component", _target("pickle.loads", data="x"), "pickle.loads is not an allowed component"
    ),
    # -- logging.conf: fileConfig imports class= and evaluates args, kwargs, defaults
    "logging %(name)s interpolation": Case(
        "logging.conf",
        _logging("[handler_console]\nclass=StreamHandler\np1=open('MARKER',\np2='w')\nargs=(%(p1)s%(p2)s,)\n\n"),
        "% interpolation is not allowed",
    ),
    "logging [DEFAULT] value": Case(
        "logging.conf",
        _logging(
            "[handler_console]\nclass=StreamHandler\nargs=(%(sink)s,)\n\n",
            head="[DEFAULT]\nsink=open('MARKER', 'w')\n\n",
        ),
        "[DEFAULT] values are interpolated",
    ),
    "logging FileHandler": Case(
        "logging.conf",
        _logging("[handler_console]\nclass=FileHandler\nargs=('MARKER', 'w')\n\n"),
        "handler class must be StreamHandler or NullHandler",
        pack=True,
    ),
    "logging handlers.RotatingFileHandler": Case(
        "logging.conf",
        _logging("[handler_console]\nclass=handlers.RotatingFileHandler\nargs=('MARKER',)\n\n"),
        "handler class must be StreamHandler",
    ),
    "logging args with a call": Case(
        "logging.conf",
        _logging("[handler_console]\nclass=StreamHandler\nargs=(open('MARKER', 'w'),)\n\n"),
        "handler args must be (sys.stdout,), (sys.stderr,) or ()",
    ),
    "logging kwargs=": Case(
        "logging.conf",
        _logging("[handler_console]\nclass=StreamHandler\nargs=()\nkwargs={'stream': open('MARKER', 'w')}\n\n"),
        "kwargs is not allowed here",
    ),
    "logging formatter defaults=": Case(
        "logging.conf",
        _logging(formatter="[formatter_plain]\nformat=%(x)s\ndefaults={'x': open('MARKER', 'w')}\n"),
        "defaults is not allowed here",
    ),
    "logging () factory key": Case(
        "logging.conf",
        _logging("[handler_console]\n()=os.system\nargs=('touch MARKER',)\n\n"),
        "() is not allowed here",
    ),
    "logging formatter class": Case(
        "logging.conf",
        _logging(formatter="[formatter_plain]\nclass=os.system\nformat=x\n"),
        "formatter class must be logging.Formatter",
    ),
    # -- configs MONAI reads that a narrower audit could miss
    "YAML python tag": Case(
        "config file",
        _write("configs/extra.yaml", lambda kit: f"x: !!python/object/apply:os.system ['touch {kit.m}']\n"),
        "configs/extra.yaml: does not parse",
    ),
    "YAML alias bomb": Case("config file", _write("configs/extra.yaml", _yaml_bomb), "uses YAML anchors or aliases"),
    "config with an upper-case suffix": Case(
        "config file",
        _write("configs/Evil.JSON", lambda kit: json.dumps({"initialize": [f"$open({kit.m!r}, 'w')"]})),
        "configs/Evil.JSON initialize#0",
    ),
    "config in a subfolder": Case(
        "config file",
        _write("configs/extra/run.json", lambda kit: json.dumps({"initialize": [f"$open({kit.m!r}, 'w')"]})),
        "configs/extra/run.json initialize#0",
    ),
    # -- the bundle's files: links, special files, zip entries
    "symlink to a file outside": Case(
        "files", _symlink("docs/notes.txt", _secret), "docs/notes.txt is a symbolic link", pack=True
    ),
    "symlink to a folder outside": Case(
        "files", _symlink("docs/extra", _outside_folder), "docs/extra is a symbolic link", pack=True
    ),
    "symlinked model.pt to a pickle outside": Case(
        "files", _symlink("models/model.pt", _outside_pickle), "models/model.pt is a symbolic link", pack=True
    ),
    "FIFO": Case("files", _fifo, "docs/pipe is not a plain file", pack=True),
    "folder above --max-size": Case(
        "files",
        _write("docs/zeros.bin", lambda kit: bytes(2 << 20)),
        "above the",
        options=lambda kit: {"max_bytes": _folder_size(kit.shipped.folder) + (1 << 20)},
    ),
    "zip entry twice": Case(
        "files",
        lambda kit: kit.rezip(raw=[(f"{NAME}/configs/inference.json", _hostile_inference(kit))]),
        "appears twice",
    ),
    "zip entry twice, differing case": Case(
        "files",
        lambda kit: kit.rezip(raw=[(f"{NAME}/configs/INFERENCE.json", _hostile_inference(kit))]),
        "appears twice",
    ),
    "zip entry twice, differing normalization": Case(
        "files",
        lambda kit: kit.rezip(raw=[(f"{NAME}/docs/caf\u00e9.txt", b"one"), (f"{NAME}/docs/cafe\u0301.txt", b"other")]),
        "appears twice",
    ),
    "zip entry with ..": Case(
        "files",
        lambda kit: kit.rezip(raw=[(f"{NAME}/../../evil.pth", b"import os; os.system('touch PWNED')\n")]),
        "would be written outside the bundle folder",
    ),
    "zip entry absolute": Case(
        "files",
        lambda kit: kit.rezip(raw=[(_zip_entry(f"{kit.tmp}/evil.pth"), b"import os\n")]),
        "would be written outside the bundle folder",
    ),
    "zip entry with backslashes": Case(
        "files",
        lambda kit: kit.rezip(raw=[(f"{NAME}\\..\\..\\evil.pth", b"import os\n")]),
        "would be written outside the bundle folder",
    ),
    "zip entry with a drive": Case(
        "files",
        lambda kit: kit.rezip(raw=[("C:/evil.pth", b"import os\n")]),
        "would be written outside the bundle folder",
    ),
    "zip entry naming no file": Case("files", lambda kit: kit.rezip(raw=[(".", b"x")]), "names no file"),
    "zip symlink entry": Case(
        "files",
        lambda kit: kit.rezip(raw=[(_zip_entry(f"{NAME}/docs/link", 0o777 | stat.S_IFLNK), b"/etc/passwd")]),
        "is a symbolic link",
    ),
    "zip FIFO entry": Case(
        "files",
        lambda kit: kit.rezip(raw=[(_zip_entry(f"{NAME}/docs/pipe", 0o644 | stat.S_IFIFO), b"")]),
        "is not a plain file",
    ),
    "zip bomb above --max-size": Case(
        "files",
        lambda kit: kit.rezip(files={"docs/zeros.bin": bytes(32 << 20)}),
        "above the",
        options=lambda kit: {"max_bytes": _folder_size(kit.shipped.folder) + (1 << 20)},
    ),
    "zip bomb within --max-size": Case(  # one member of a 1000-fold ratio: refused before it is written
        "files", lambda kit: kit.rezip(files={"docs/zeros.bin": bytes(8 << 20)}), "inflates 1"
    ),
    # -- checksums and signatures
    "no SHA256SUMS, file tampered": Case(
        "signing",
        lambda kit: kit.rezip(files={CHECKSUMS: None, "configs/inference.json": _hostile_inference(kit)}),
        "a packed bundle must hold SHA256SUMS",
    ),
    "file added after packing": Case(
        "signing", lambda kit: kit.rezip(files={"docs/extra.json": b"{}"}), "docs/extra.json: not listed in SHA256SUMS"
    ),
    "TorchScript added after packing": Case(
        "signing",
        lambda kit: kit.rezip(
            files={"models/model.ts": _scripted(_SetstateWrites(kit.m), kit.tmp / "m.ts").read_bytes()}
        ),
        "models/model.ts: not listed in SHA256SUMS",
    ),
    "tampered after signing": Case(
        "signing",
        lambda kit: kit.rezip(kit.shipped.signed, files={"configs/inference.json": _hostile_inference(kit)}),
        "configs/inference.json: content changed since packing",
    ),
    "tampered, SHA256SUMS rewritten": Case(
        "signing",
        lambda kit: kit.rezip(
            kit.shipped.signed,
            files={
                "configs/inference.json": _hostile_inference(kit),
                CHECKSUMS: _sums(kit, kit.shipped.signed, {"configs/inference.json": _hostile_inference(kit)}),
            },
        ),
        "the signature does not match SHA256SUMS (changed after signing)",
    ),
    "signed by an untrusted key": Case(
        "signing",
        lambda kit: kit.shipped.signed,
        "the key is not among --trusted-keys",
        options=lambda kit: {"trusted_keys": [kit.shipped.keys["site-b.pub"]]},
    ),
    "signature removed, --trusted-keys": Case(
        "signing",
        lambda kit: kit.rezip(kit.shipped.signed, files={SIGNATURE: None}),
        "unsigned (no SHA256SUMS.sig)",
        options=lambda kit: {"trusted_keys": [kit.shipped.keys["site-a.pub"]]},
    ),
    "damaged signature file": Case(
        "signing",
        lambda kit: kit.rezip(kit.shipped.signed, files={SIGNATURE: b"{not json"}),
        "not a readable signature",
    ),
    "signature with another algorithm": Case(
        "signing",
        lambda kit: kit.rezip(kit.shipped.signed, files={SIGNATURE: _signature_record(kit, algorithm="none")}),
        "not a readable signature (ValueError: algorithm 'none')",
    ),
    "signature's public key replaced": Case(
        "signing",
        lambda kit: kit.rezip(kit.shipped.signed, files={SIGNATURE: _signature_record(kit, public_key="A" * 43 + "=")}),
        "the signature does not match SHA256SUMS",
    ),
    # -- code files
    "scripts/evil.py": Case(
        "code file",
        _write("scripts/evil.py", lambda kit: f"open({kit.m!r}, 'w')\n"),
        "scripts/evil.py: a code file",
        pack=True,
    ),
    "torch.py at the root": Case(
        "code file", _write("torch.py", lambda kit: f"open({kit.m!r}, 'w')\n"), "torch.py: a code file"
    ),
    ".pth file": Case(
        "code file",
        _write("models/evil.pth", lambda kit: f"import os; os.system('touch {kit.m}')\n"),
        "models/evil.pth: a code file",
    ),
    ".so file": Case(
        "code file", _write("models/libevil.so", lambda kit: b"\x7fELF" + bytes(60)), "models/libevil.so: a code file"
    ),
    "upper-case .PY": Case(
        "code file",
        _write("docs/SITECUSTOMIZE.PY", lambda kit: f"open({kit.m!r}, 'w')\n"),
        "docs/SITECUSTOMIZE.PY: a code file",
    ),
    ".pyc file": Case(
        "code file", _write("scripts/evil.pyc", lambda kit: b"\x00" * 16), "scripts/evil.pyc: a code file"
    ),
    ".pyw file (imported on Windows)": Case(
        "code file", _write("nibabel.pyw", lambda kit: f"open({kit.m!r}, 'w')\n"), "nibabel.pyw: a code file"
    ),
    "evil.py. (Windows drops the dot)": Case(
        "code file", _write("scripts/evil.py.", lambda kit: f"open({kit.m!r}, 'w')\n"), "scripts/evil.py.: a code file"
    ),
    # -- ONNX: run by onnxruntime before trust, so only a self-contained standard graph
    "ONNX custom-domain operator": Case(
        "onnx",
        _write("models/model.onnx", lambda kit: _onnx(kit, domain="com.evil")),
        "operators from custom domain 'com.evil'",
    ),
    "ONNX weights read from outside": Case(
        "onnx",
        _write("models/model.onnx", lambda kit: _onnx(kit, external=_secret(kit))),
        "weights stored outside the file",
    ),
    # -- writes outside the bundle by allow-listed savers, once the bundle runs
    "saver path built from the root": Case(
        "write outside",
        _initialize(lambda m: {"_target_": "monai.handlers.MetricsSaver", "save_dir": f"$'/' + {m[1:]!r}"}),
        "starts a path outside the bundle",
        predict=True,
    ),
    "saver path climbing out of bundle_root": Case(
        "write outside",
        _initialize(lambda m: {"_target_": "monai.handlers.MetricsSaver", "save_dir": "$@bundle_root + '/../..'"}),
        "is not a plain path inside the bundle",
    ),
    "bundle_root pointing outside": Case(
        "write outside",
        _edit("configs/inference.json", lambda c, m: c.__setitem__("bundle_root", "..")),
        "bundle_root must be '.'",
        predict=True,
    ),
    "literal absolute output_dir": Case(
        "write outside",
        _edit("configs/inference.json", lambda c, m: c.__setitem__("output_dir", m)),
        "a path outside the bundle",
        predict=True,
    ),
    # -- pickled code in the weights
    "model.pt with a __reduce__ payload": Case(
        "pickle", _write("models/model.pt", _pickled_weights), "models/model.pt: holds pickled code", pack=True
    ),
    "model.pt that is only a payload": Case(
        "pickle",
        _write("models/model.pt", lambda kit: _pickled_weights(kit, whole=True)),
        "models/model.pt: holds pickled code",
    ),
    "model.pt as a plain pickle": Case(
        "pickle",
        _write("models/model.pt", lambda kit: pickle.dumps(_Touch(kit.m))),
        "models/model.pt: holds pickled code",
    ),
}


def _failed(report) -> str:
    return "; ".join(f"{c.name}: {c.detail}" for c in report.checks if c.status == "fail")


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_bundle_is_refused_and_its_payload_never_runs(name, kit):
    _assert_refused(CASES[name], kit)


def _assert_refused(case: Case, kit: Kit) -> None:
    """``verify`` and ``import`` (and ``pack`` when the case says so) refuse the bundle with a one-line
    reason holding ``case.reason``, and the marker never appears."""
    (kit.tmp / "evil.json").write_text(
        json.dumps({"payload": f"$open({kit.m!r}, 'w')"})
    )  # what an outside % macro would read
    hostile = case.build(kit)
    options = case.options(kit)

    report = verify_bundle(hostile, **options)
    assert not report.ok, report.table()
    assert case.reason in _failed(report), report.table()
    assert all("\n" not in c.detail for c in report.checks), report.table()  # one line per reason
    assert not kit.marker.exists()

    site = kit.tmp / "site" / NAME
    with pytest.raises(MedtlError) as refused:
        import_bundle(hostile, site, **options)
    assert case.reason in str(refused.value) and "\n" not in str(refused.value)
    assert not site.exists() and not kit.marker.exists()

    if case.pack:
        with pytest.raises(MedtlError) as refused:
            pack_bundle(hostile, kit.tmp / "out.zip")
        assert case.reason in str(refused.value)
        assert not (kit.tmp / "out.zip").exists() and not kit.marker.exists()


def test_the_corpus_covers_every_class():
    classes = {}
    for case in CASES.values():
        classes[case.klass] = classes.get(case.klass, 0) + 1
    assert len(CASES) >= 60 and min(classes.values()) >= 2, classes
    assert set(classes) == {
        "allowed-module attribute",
        "non-dotted receiver",
        "rebinding",
        "target",
        "safety switch",
        "macro",
        "metadata",
        "component",
        "logging.conf",
        "config file",
        "files",
        "signing",
        "code file",
        "onnx",
        "pickle",
        "write outside",
    }


# ------------------------------------------------------------------------------------------- medtl predict


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.predict])
def test_predict_refuses_a_hostile_bundle_before_running_it(name, kit):
    case = CASES[name]
    (kit.tmp / "evil.json").write_text(json.dumps({"payload": f"$open({kit.m!r}, 'w')"}))
    hostile = case.build(kit)
    (kit.tmp / "dicom").mkdir()
    from medtl.predict import predict

    with pytest.raises(MedtlError, match="refusing to run") as refused:
        predict(kit.tmp / "dicom", hostile, kit.tmp / "out", progress=False)
    assert case.reason in str(refused.value)
    assert not kit.marker.exists() and not (kit.tmp / "out" / "predictions.csv").exists()


def test_cli_predict_refuses_a_hostile_bundle(kit, capsys):
    from medtl.cli import main

    hostile = CASES["x#_target_ key (MONAI sets it at x)"].build(kit)
    (kit.tmp / "dicom").mkdir()
    assert main(["predict", str(kit.tmp / "dicom"), "--bundle", str(hostile), "-o", str(kit.tmp / "out")]) == 2
    err = capsys.readouterr().err
    assert "refusing to run" in err and "builtins.open is not an allowed component" in err and "Traceback" not in err
    assert not kit.marker.exists()


def test_nested_keys_reach_the_component_as_monai_reads_them(kit):
    """Why ``x#_target_`` needs the audit: MONAI's own reader sets it inside ``x`` (nothing is instantiated here)."""
    from monai.bundle import ConfigParser

    hostile = CASES["x#_target_ key (MONAI sets it at x)"].build(kit)
    parser = ConfigParser()
    parser.read_config(hostile / "configs" / "inference.json")
    assert parser.get("x") == {"_target_": "builtins.open", "file": kit.m, "mode": "w"}
    assert not kit.marker.exists()


# ------------------------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize(
    "program", [_SetstateWrites, _ForwardWrites, _ForwardLoops], ids=lambda p: p.__name__.strip("_")
)
def test_torchscript_is_not_run_before_trust(program, kit):
    bundle = kit.folder()
    _scripted(program() if program is _ForwardLoops else program(kit.m), bundle / "models" / "model.ts")
    start = time.monotonic()
    report = verify_bundle(bundle)
    assert time.monotonic() - start < 30  # a looping forward would never return
    row = {c.name: c for c in report.checks}["TorchScript parity"]
    assert row.status == "skip" and "model.ts is a program" in row.detail
    assert not kit.marker.exists()
    try:
        import_bundle(bundle, kit.tmp / "site" / NAME)
    except MedtlError as exc:  # the privacy scan finds the paths the program holds; nothing ran to find out
        assert "TorchScript" not in str(exc)
    assert not kit.marker.exists()


def test_the_torchscript_payload_is_real(kit):
    """The control for the cases above: loading the file is enough to run ``__setstate__``."""
    path = _scripted(_SetstateWrites(kit.m), kit.tmp / "m.ts")
    assert not kit.marker.exists()
    torch.jit.load(str(path))
    assert kit.marker.exists()


# --------------------------------------------------------------------------- import uses what it verified


def test_import_reads_the_zip_once(kit, monkeypatch):
    opened = []
    real = zipfile.ZipFile

    def counting(file, *args, **kwargs):
        opened.append(Path(file).name if isinstance(file, (str, Path)) else file)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(bundle_files_module.zipfile, "ZipFile", counting)
    import_bundle(kit.shipped.packed, kit.tmp / "site" / NAME)
    assert opened.count(kit.shipped.packed.name) == 1


@pytest.mark.parametrize("source", ["zip", "folder"])
def test_swapping_the_source_during_verification_changes_nothing_installed(source, kit, monkeypatch):
    """The sender (or anyone who can write there) replaces the bundle while import verifies it:
    the installed files are the copy that was verified, never the new content."""
    if source == "zip":
        received = shutil.copy(kit.shipped.packed, kit.tmp / "received.zip")
        hostile = kit.rezip(
            files={
                "configs/inference.json": _hostile_inference(kit),
                CHECKSUMS: _sums(kit, kit.shipped.packed, {"configs/inference.json": _hostile_inference(kit)}),
            }
        )

        def swap() -> None:
            shutil.copy(hostile, received)

    else:
        received = Path(shutil.copytree(kit.shipped.folder, kit.tmp / "received"))

        def swap() -> None:
            (received / "configs" / "inference.json").write_bytes(_hostile_inference(kit))

    real_verify, verified = share.verify_bundle, {}

    def verify_then_swap(path, **kwargs):
        verified.update(
            {rel.relative_to(path).as_posix(): rel.read_bytes() for rel in Path(path).rglob("*") if rel.is_file()}
        )
        swap()
        return real_verify(path, **kwargs)

    monkeypatch.setattr(share, "verify_bundle", verify_then_swap)
    installed = import_bundle(received, kit.tmp / "site" / NAME)["path"]
    files = {p.relative_to(installed).as_posix(): p.read_bytes() for p in installed.rglob("*") if p.is_file()}
    assert files == verified
    assert files["configs/inference.json"] == (kit.shipped.folder / "configs" / "inference.json").read_bytes()
    swapped = (
        (received / "configs" / "inference.json").read_bytes() if source == "folder" else Path(received).read_bytes()
    )
    assert swapped == (_hostile_inference(kit) if source == "folder" else hostile.read_bytes())  # the swap did happen
    assert not kit.marker.exists()


# =========================================================================================== round 2
# Issue 28: bundles written by someone who read audit.py and allowlist.py. The audit must judge the
# text MONAI evaluates (after its own '#', '@', '%' rewriting), every workflow as MONAI merges it,
# paths only as @bundle_root + '/relative/literal', bounded configs, and no folder that shadows a
# module on sys.path.

# where a saver would write if a built path escaped: an absolute folder of this machine's temp dir
_OUTSIDE_DIR = str(Path(tempfile.gettempdir()) / "medtl-round2")


def _saver(save_dir: str) -> Callable[[Kit], Path]:
    """An allow-listed writer whose folder is ``save_dir`` (an expression building a path)."""
    return _initialize(lambda m: {"_target_": "monai.handlers.MetricsSaver", "save_dir": save_dir})


def _saver_from_metadata(kit: Kit) -> Path:
    """metadata.json names a folder outside; the saver reads it with ``@_meta_#where``."""
    bundle = _saver("@_meta_#where")(kit)
    meta = json.loads((bundle / "configs/metadata.json").read_text(encoding="utf-8"))
    meta["where"] = _OUTSIDE_DIR
    (bundle / "configs/metadata.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return bundle


def _nested_json(depth: int) -> Callable[[Kit], str]:
    return lambda kit: json.dumps({"x": json.loads("[" * depth + "]" * depth)})


def _yaml_string_aliases(kit: Kit) -> str:
    """A 300 KB string repeated 30 times by aliases: 9 MB once expanded, from a small file."""
    return f'a: &a "{"x" * 300_000}"\nb: [{", ".join(["*a"] * 30)}]\n'


#: The comment MONAI does not see: ``#`` becomes ``::``, so the slice step after it runs.
_HASH_PAYLOAD = "[1][0#open({m!r}, 'w') and None\n]"

ROUND_2: dict[str, Case] = {
    # -- the audit parsed text MONAI rewrites before it evaluates
    "# comment that MONAI turns into a slice step": Case(
        "rewritten text",
        _expression(lambda m: _HASH_PAYLOAD.format(m=m)),
        "call to 'open' is not allowed",
        pack=True,
        predict=True,
    ),
    "fullwidth @ｂundle_root": Case(
        "rewritten text",
        _saver(f"$@ｂundle_root + '{_OUTSIDE_DIR}'"),
        "holds a non-ASCII character",
        predict=True,
    ),
    "fullwidth key ｂundle_root": Case(
        "rewritten text",
        _edit("configs/inference.json", lambda c, m: c.__setitem__("ｂundle_root", "@output_dir")),
        "a non-ASCII key",
    ),
    "@bundle#root is another id": Case(
        "rewritten text",
        _saver(f"$@bundle#root + '{_OUTSIDE_DIR}'"),
        "+ joins only numbers or lists of the config",
    ),
    "metadata key x#_target_ (read_meta sets it inside x)": Case(
        "rewritten text",
        _metadata(lambda meta, m: meta.update({"x": {"file": m, "mode": "w"}, "x#_target_": "builtins.open"})),
        "x#_target_: 'x#_target_': metadata holds plain values, not components",
    ),
    "an @ inside a string literal": Case(
        "rewritten text",
        _expression(lambda m: "'@network_def'"),
        "not a Python expression once MONAI rewrote it",
    ),
    # -- paths built by operations the first grammar allowed
    "'/.' + '.'": Case("path building", _saver("$'/.' + '.'"), "+ joins only numbers or lists of the config"),
    "'x/abs'[1:]": Case("path building", _saver("$'x/tmp'[1:]"), "only a reference may be indexed"),
    "'%ctmp' % 47": Case("path building", _saver("$'%ctmp' % 47"), "operator Mod is not allowed"),
    "'.' * 2": Case("path building", _saver("$'.' * 2"), "* multiplies only two number literals"),
    "f'{47:c}'": Case("path building", _saver("$f'{47:c}tmp'"), "f-string format specs are not allowed"),
    "f'{@x!s}'": Case("path building", _saver('$f"{@output_dir!s}"'), "f-string conversions"),
    "@bundle_root + './x' (a sibling folder)": Case(
        "path building", _saver("$@bundle_root + './x'"), "is not a plain path inside the bundle", predict=True
    ),
    "metadata value read by reference": Case(
        "path building",
        _saver_from_metadata,
        "configs read metadata through @_meta_",
    ),
    "metadata value sliced into a path": Case(
        "path building",
        _saver("$@_meta_#version[1:]"),
        "only a list of the config may be sliced",
    ),
    # -- expressions that would run for ever or fill memory
    "sum(range(10**13))": Case(
        "bounds", _expression(lambda m: "sum(range(10**13))"), "call to 'sum' is not allowed", predict=True
    ),
    "[0] * 650000000": Case("bounds", _expression(lambda m: "[0] * 650000000"), "* multiplies only two number"),
    "a number beyond the bound": Case("bounds", _expression(lambda m: "max(1, 10000000 * 1000000)"), "is out of range"),
    "JSON nested 100 deep": Case(
        "bounds", _write("configs/extra.json", _nested_json(100)), "configs/extra.json: nested more than 64 deep"
    ),
    "YAML aliases of a long string": Case(
        "bounds", _write("configs/extra.yaml", _yaml_string_aliases), "uses YAML anchors or aliases"
    ),
    # -- folders and files Python would import from the bundle folder
    "medtl/ folder without code": Case(
        "shadowing",
        _write("medtl/README.md", lambda kit: "notes\n"),
        "medtl: named like the importable module 'medtl'",
        pack=True,
    ),
    "Torch/ folder (case-insensitive disks)": Case(
        "shadowing", _write("Torch/notes.txt", lambda kit: "x\n"), "Torch: named like the importable module 'Torch'"
    ),
    "yaml.json at the top": Case(
        "shadowing", _write("yaml.json", lambda kit: "{}"), "yaml.json: named like the importable module 'yaml'"
    ),
    "monai/ folder in a packed zip": Case(
        "shadowing",
        lambda kit: kit.rezip(files={"monai/notes.txt": b"x"}),
        "monai: named like the importable module 'monai'",
    ),
    ".dylib in docs": Case(
        "shadowing", _write("docs/libx.dylib", lambda kit: b"\xcf\xfa\xed\xfe"), "docs/libx.dylib: a code file"
    ),
    ".pyd in models": Case("shadowing", _write("models/x.pyd", lambda kit: b"MZ"), "models/x.pyd: a code file"),
}


@pytest.mark.parametrize("name", list(ROUND_2))
def test_round_2_bundle_is_refused_and_its_payload_never_runs(name, kit):
    _assert_refused(ROUND_2[name], kit)
    assert not Path(_OUTSIDE_DIR).exists()


@pytest.mark.parametrize("name", [n for n, c in ROUND_2.items() if c.predict])
def test_round_2_predict_refuses_before_running(name, kit):
    case = ROUND_2[name]
    hostile = case.build(kit)
    (kit.tmp / "dicom").mkdir()
    from medtl.predict import predict

    with pytest.raises(MedtlError, match="refusing to run") as refused:
        predict(kit.tmp / "dicom", hostile, kit.tmp / "out", progress=False)
    assert case.reason in str(refused.value) and "\n" not in str(refused.value)
    assert not kit.marker.exists() and not (kit.tmp / "out" / "predictions.csv").exists()


def test_round_2_covers_every_class():
    classes = {c.klass for c in ROUND_2.values()}
    assert classes == {"rewritten text", "path building", "bounds", "shadowing"}
    assert min(sum(c.klass == k for c in ROUND_2.values()) for k in classes) >= 3


def test_the_hash_payload_is_real(kit):
    """The control for the first case: MONAI's own parser runs what follows the ``#``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({"x": "$" + _HASH_PAYLOAD.format(m=kit.m)})
    assert not kit.marker.exists()
    parser.get_parsed_content("x")
    assert kit.marker.exists()


def _merged_trust(kit: Kit) -> Path:
    """train.json alone passes (trust names a top-level false); multi_gpu_train.json, merged over it
    by torchrun's --config_file "['configs/train.json', 'configs/multi_gpu_train.json']", flips it."""
    bundle = kit.folder()
    train = json.loads((bundle / "configs/train.json").read_text(encoding="utf-8"))
    train["keep_safe"] = False
    train["teacher_network"]["trust"] = "@keep_safe"
    (bundle / "configs/train.json").write_text(json.dumps(train, indent=2), encoding="utf-8")
    multi = json.loads((bundle / "configs/multi_gpu_train.json").read_text(encoding="utf-8"))
    multi["keep_safe"] = True
    (bundle / "configs/multi_gpu_train.json").write_text(json.dumps(multi, indent=2), encoding="utf-8")
    return bundle


def test_round_2_a_merged_workflow_is_audited_as_monai_merges_it(kit):
    from medtl.bundle.audit import audit_bundle, audit_config

    bundle = _merged_trust(kit)
    for name in ("configs/train.json", "configs/multi_gpu_train.json"):  # each passes alone
        assert audit_config(json.loads((bundle / name).read_text(encoding="utf-8")), name) == []
    findings = [str(f) for f in audit_bundle(bundle)]
    assert any(
        f.startswith("configs/train.json+configs/multi_gpu_train.json teacher_network#trust")
        and "switches a safety check off" in f
        for f in findings
    ), findings
    assert all("\n" not in f for f in findings)
    (kit.tmp / "dicom").mkdir()
    from medtl.predict import predict

    with pytest.raises(MedtlError, match="switches a safety check off"):
        predict(kit.tmp / "dicom", bundle, kit.tmp / "out", progress=False)
    from medtl.bundle.verify import verify_bundle

    report = verify_bundle(bundle)  # verify and import audit the merged workflow too
    assert not report.ok and "configs/train.json+configs/multi_gpu_train.json" in report.table()
    assert not kit.marker.exists()


def test_round_2_a_macro_chain_is_bounded(kit):
    """Macros copy resolved parts, so a chain doubles a part at every step: refused, not expanded."""
    from medtl.bundle.audit import audit_config

    chain = {"a0": ["x"] * 10, **{f"a{i}": [f"%a{i - 1}"] * 10 for i in range(1, 12)}}
    start = time.monotonic()
    findings = audit_config(chain, "configs/extra.json")
    assert time.monotonic() - start < 5
    assert [f.reason for f in findings] == ["% macros copy more than 100000 values"]
