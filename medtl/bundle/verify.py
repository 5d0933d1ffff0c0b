"""Check a bundle before it is shared or run: a pass/fail table a receiving site can trust.

A received bundle is data, not code. Verification runs nothing of it but one thing: the network
class ``network_def`` names, on the allow-list, called with literal arguments
(``network_definition``); no ``_requires_``, no expression, no other id is ever evaluated, nothing
is downloaded. The configs, ``metadata.json`` and ``logging.conf`` are audited against an
allow-list (``medtl.bundle.audit``). Sizes are bounded before anything is built: the metadata's
input shape, the sizes transforms ask for, zip members, the weights' tensor records. The checks
that build or run something (weights loaded with ``weights_only=True``, the network's forward,
fresh TorchScript and ONNX exports, the shipped copies' parity) run in a child process with
CPU-time, memory and wall-clock limits (``medtl.bundle.sandbox``). ``model.ts`` and ``model.onnx``
are programs MONAI Deploy and Triton run: they pass only as what this site exports from
``model.pt`` and ``network_def`` itself, and are run before ``trust`` only then. A packed bundle
must list every file in ``SHA256SUMS``; a signature over that list names the sender when its key
is one the site trusts.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import json
import math
import pickletools
import re
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import torch
from torch import nn

from medtl.bundle import signing
from medtl.bundle.allowlist import TARGETS
from medtl.bundle.audit import (
    audit_bundle,
    path_findings,
    read_config_file,
    string_values,
)
from medtl.bundle.export import _onnx_export, _torchscript, torchscript_bytes
from medtl.bundle.files import (
    CHECKSUMS,
    CODE_SUFFIXES,
    MAX_UNPACKED_BYTES,
    PROVENANCE,
    SIGNATURE,
    bundle_files,
    inflation_problem,
    open_bundle,
    parse_sha256sums,
    sha256sums,
)
from medtl.bundle.sandbox import Channel, Limits, out_of_memory, run_limited
from medtl.bundle.textscan import file_texts
from medtl.errors import MedtlError, first_line
from medtl.fileio import size_text
from medtl.privacy import find_identifiers

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "meta_schema_20240725.json"
INFERENCE = "configs/inference.json"
REQUIRED = ("configs/metadata.json", INFERENCE, "LICENSE", "models/model.pt")
TOLERANCE = 1e-4
#: The most values (channels x voxels) one input may hold: the network check builds two of them,
#: and a transform's output size is bounded the same way.
MAX_INPUT_VALUES = 256**3
#: The most output classes the metadata may declare.
MAX_CLASSES = 10_000
#: The most characters of text the privacy scan reads in one bundle (about 15 s; configs and
#: documents hold well under 1 M).
MAX_SCANNED_TEXT = 24 << 20
#: The most bytes the weights' tensor records may declare before ``model.pt`` is loaded.
MAX_WEIGHT_BYTES = 512 << 20
#: Limits of the child process that builds and runs the network and its exports: with the checks
#: around it, verify and import finish within a minute whatever the bundle holds.
CHECK_LIMITS = Limits(cpu_seconds=45, memory_bytes=2 << 30, wall_seconds=50)
#: ``network_def`` targets verification builds: the allow-list's networks.
NETWORKS = frozenset(t for t in TARGETS if t.startswith(("monai.networks.nets.", "medtl.encoders.")))
#: Config keys whose list (or single int, per dimension) is an image size a transform or inferer allocates.
SIZE_KEYS = frozenset({"spatial_size", "roi_size", "spatial_shape", "img_size", "patch_size"})
#: Keys whose value makes a transform's output grow: a voxel spacing in mm (as it shrinks), a zoom
#: factor, a crop in mm. Bounded well beyond any scanner's (0.1 mm, 4x, 1 m).
SPACING_KEYS = frozenset({"pixdim", "target_spacing", "spacing"})
ZOOM_KEYS = frozenset({"max_zoom", "zoom"})
CROP_KEYS = frozenset({"crop_mm"})
BOUNDED_KEYS = SIZE_KEYS | SPACING_KEYS | ZOOM_KEYS | CROP_KEYS
MIN_SPACING_MM, MAX_ZOOM, MAX_CROP_MM = 0.1, 4.0, 1000.0
WEIGHTS, NETWORK, EXPORTS = "weights load (weights_only)", "network matches metadata", "exports match the weights"
TS_PARITY, ONNX_PARITY = "TorchScript parity", "ONNX parity"


@dataclass
class Check:
    name: str
    status: str  # "pass", "fail", "warn" (failed but trusted) or "skip"
    detail: str = ""


@dataclass
class Verification:
    """The outcome: one row per check; ``ok`` when nothing failed."""

    bundle: str
    version: str | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def add(self, name: str, problems: list[str], *, passed: str = "", trusted: bool = False, limit: int = 8) -> None:
        if problems:
            shown = problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])
            self.checks.append(Check(name, "warn" if trusted else "fail", "; ".join(shown)))
        else:
            self.checks.append(Check(name, "pass", passed))

    def skip(self, name: str, why: str) -> None:
        self.checks.append(Check(name, "skip", why))

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"bundle {self.bundle} {self.version or '?'}: {'PASS' if self.ok else 'FAIL'}"]
        lines += [f"  {c.status.upper():<5} {c.name:<{width}}  {c.detail}".rstrip() for c in self.checks]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "version": self.version,
            "ok": self.ok,
            "checks": [asdict(c) for c in self.checks],
        }


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _load_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, huge integers
        raise MedtlError(f"not readable JSON ({exc.__class__.__name__}: {str(exc)[:160]})", path=name) from None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _format_problems(fmt: dict) -> list[str]:
    """The metadata's input and output sizes, bounded before anything is built from them."""
    where = "configs/metadata.json network_data_format"
    image = (fmt.get("inputs") or {}).get("image")
    pred = (fmt.get("outputs") or {}).get("pred")
    if not isinstance(image, dict) or not isinstance(pred, dict):
        return [f"{where}: needs inputs/image and outputs/pred"]
    problems = []
    channels, shape = image.get("num_channels"), image.get("spatial_shape")
    if not _positive_int(channels):
        problems.append(f"{where}/inputs/image/num_channels must be a positive integer, got {_short(channels)}")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 3 and all(_positive_int(v) for v in shape)):
        problems.append(f"{where}/inputs/image/spatial_shape must be 1 to 3 positive integers, got {_short(shape)}")
    elif _positive_int(channels) and channels * math.prod(shape) > MAX_INPUT_VALUES:
        problems.append(
            f"{where}/inputs/image: {channels} x {'x'.join(map(str, shape))} values, above the bound of "
            f"{MAX_INPUT_VALUES} (256^3) verification builds"
        )
    low_high = image.get("value_range") or [0, 1]
    if not (
        isinstance(low_high, list)
        and len(low_high) >= 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in low_high[:2])
    ):
        problems.append(f"{where}/inputs/image/value_range must be two finite numbers, got {_short(low_high)}")
    classes = pred.get("num_channels")
    if not (_positive_int(classes) and classes <= MAX_CLASSES):
        problems.append(
            f"{where}/outputs/pred/num_channels must be an integer from 1 to {MAX_CLASSES}, got {_short(classes)}"
        )
    return problems


def _value(value: Any, ids: Mapping[str, Any], depth: int = 0) -> Any:
    """``value`` as MONAI would hand it to a component, where that is plain to see: a reference or
    macro to another id (``@big``, ``%big``, ``$@big``) followed, a ``$`` literal read, list items too."""
    if depth > 8:
        return None
    if isinstance(value, list):
        return [_value(v, ids, depth + 1) for v in value]
    if not isinstance(value, str):
        return value
    text = value[1:].strip() if value.startswith("$") else value
    if text[:1] in ("@", "%") and text[1:] in ids:
        return _value(ids[text[1:]], ids, depth + 1)
    if value.startswith("$"):
        try:
            return _value(ast.literal_eval(text), ids, depth + 1)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return value


def _numbers(value: Any) -> list[float] | None:
    values = value if isinstance(value, list) else [value]
    ok = values and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return [float(v) for v in values] if ok else None


def _size_problems(config: Any, ids: Mapping[str, Any], where: str = "", depth: int = 0) -> Iterable[str]:
    """Every size, spacing, zoom and crop in ``config`` that would make a transform's output
    outgrow the bound on an input (``MAX_INPUT_VALUES``)."""
    if depth > 64:
        return
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, raw in items:
        here = f"{where}#{key}" if where else str(key)
        value = _numbers(_value(raw, ids)) if key in BOUNDED_KEYS else None
        if key in SIZE_KEYS and value is not None:
            voxels = math.prod(v for v in (value * 3 if len(value) == 1 else value) if v > 0)
            if voxels > MAX_INPUT_VALUES:
                yield f"{here}: {voxels:.0f} voxels, above the bound of {MAX_INPUT_VALUES} (256^3)"
        elif key in SPACING_KEYS and value is not None and min(value) < MIN_SPACING_MM:
            yield f"{here}: a spacing of {min(value):g} mm, below {MIN_SPACING_MM} (it multiplies the voxels)"
        elif key in ZOOM_KEYS and value is not None and max(value) > MAX_ZOOM:
            yield f"{here}: a zoom of {max(value):g}, above {MAX_ZOOM}"
        elif key in CROP_KEYS and value is not None and max(value) > MAX_CROP_MM:
            yield f"{here}: a crop of {max(value):g} mm, above {MAX_CROP_MM:g}"
        else:
            yield from _size_problems(raw, ids, here, depth + 1)


def _check_sizes(configs: dict[str, Any], report: Verification) -> None:
    """A transform or inferer allocates the size it is given (``Resized`` to 1024^3 is 4 GB per image),
    and the sizes spacings, zooms and crops make: what a received bundle asks for is bounded like its
    input, also when the value is another id's (``"spatial_size": "@big"``)."""
    ids = {k: v for config in configs.values() if isinstance(config, dict) for k, v in config.items()}
    problems = [f"{name} {p}" for name, config in configs.items() for p in _size_problems(config, ids)]
    report.add(
        "bounded sizes",
        problems,
        passed="every image size in the configs is at most 256^3 voxels; spacings, zooms and crops bounded",
    )


def _check_metadata(root: Path, report: Verification) -> dict | None:
    try:
        meta = _load_json(root / "configs" / "metadata.json", "configs/metadata.json")
    except MedtlError as exc:
        report.add("metadata schema", [str(exc)])
        return None
    if isinstance(meta, dict):
        report.version, report.bundle = meta.get("version"), meta.get("name", report.bundle)
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    problems = []
    for error in sorted(jsonschema.Draft7Validator(schema).iter_errors(meta), key=lambda e: list(e.path)):
        where = "/".join(str(p) for p in error.path) or "(top level)"
        problems.append(f"configs/metadata.json {where}: {error.message}")
    if not problems:
        problems = _format_problems(meta["network_data_format"])
    if not problems:
        if meta["version"] not in meta.get("changelog", {}):
            problems.append(f"configs/metadata.json: version {meta['version']} has no changelog entry")
        pred = meta["network_data_format"].get("outputs", {}).get("pred", {})
        k = pred.get("num_channels")
        if sorted(pred.get("channel_def", {})) != sorted(str(i) for i in range(k or 0)):
            problems.append(f"configs/metadata.json: outputs/pred/channel_def keys must be '0'..'{(k or 1) - 1}'")
    report.add("metadata schema", problems, passed=f"valid against {SCHEMA.name}")
    return None if problems else meta


def _check_checksums(root: Path, report: Verification, required: bool) -> bool:
    """True when ``SHA256SUMS`` lists exactly the bundle's files with their digests."""
    listing = root / CHECKSUMS
    if not listing.is_file():
        if required:
            report.add(
                "checksums",
                [
                    f"a packed bundle must hold {CHECKSUMS} (medtl bundle pack writes one); "
                    "without it any file could be swapped"
                ],
            )
        else:
            report.skip("checksums", f"no {CHECKSUMS} (a working folder; medtl bundle pack writes one)")
        return False
    try:
        expected = parse_sha256sums(listing.read_text(encoding="utf-8"))
    except (MedtlError, UnicodeDecodeError) as exc:
        report.add("checksums", [str(exc)])
        return False
    actual = sha256sums(root)
    problems = [
        f"{name}: content changed since packing (sha256 mismatch)"
        for name in sorted(expected)
        if name in actual and actual[name] != expected[name]
    ]
    problems += [f"{name}: listed in {CHECKSUMS} but missing" for name in sorted(set(expected) - set(actual))]
    problems += [
        f"{name}: not listed in {CHECKSUMS} (added after packing)" for name in sorted(set(actual) - set(expected))
    ]
    report.add("checksums", problems, passed=f"{len(expected)} files match {CHECKSUMS}")
    return not problems


def _check_signature(root: Path, trusted: set[str] | None, checksums_ok: bool, report: Verification) -> None:
    if not (root / SIGNATURE).is_file():
        if trusted is not None:
            report.add("signature", [f"unsigned (no {SIGNATURE}); --trusted-keys asks for a signer you know"])
        else:
            report.skip("signature", "unsigned")
        return
    try:
        sig = signing.check(root, trusted)
    except MedtlError as exc:
        report.add("signature", [str(exc)])
        return
    who = f"signed by {sig.signer!r} (key {sig.fingerprint})"
    if not checksums_ok:
        report.add("signature", [f"{who}, but the files do not match the signed {CHECKSUMS}"])
    elif sig.trusted is None:
        report.skip(
            "signature", f"{who}; signature valid, key not checked (pass --trusted-keys to require a known signer)"
        )
    else:
        report.add(
            "signature",
            [] if sig.trusted else [f"{who}: the key is not among --trusted-keys"],
            passed=f"{who}, a trusted key",
        )


def _check_code_files(root: Path, report: Verification) -> None:
    # Windows drops trailing dots and spaces from names: "evil.py." is written as evil.py
    code = [f for f in bundle_files(root) if Path(f.rstrip(". ")).suffix.lower() in CODE_SUFFIXES]
    report.add(
        "no code files",
        [f"{f}: a code file (a bundle ships configs, weights and documents)" for f in code],
        passed="configs, weights and documents only",
    )


def _config_files(root: Path) -> list[Path]:
    """Every file under ``configs/`` MONAI would read as a config (it matches suffixes in any case)."""
    return sorted(
        p
        for p in (root / "configs").rglob("*")
        if p.suffix.lower() in (".json", ".yaml", ".yml") and p.is_file() and p != root / "configs" / "metadata.json"
    )


def _read_configs(root: Path, report: Verification) -> dict[str, Any]:

    configs, problems = {}, []
    for path in _config_files(root):
        name = path.relative_to(root).as_posix()
        try:  # bounded (size, depth, no YAML aliases) before MONAI's own parser reads it
            configs[name] = read_config_file(path, name)
        except MedtlError as exc:
            problems.append(str(exc))
    report.add("configs parse", problems, passed=f"{len(configs)} configs read as MONAI's ConfigParser reads them")
    return configs


def _references(config: Any) -> Iterable[str]:
    if isinstance(config, dict):
        for value in config.values():
            yield from _references(value)
    elif isinstance(config, list):
        for value in config:
            yield from _references(value)
    elif isinstance(config, str) and config.startswith(("@", "$", "%")):
        for ref in re.findall(r"@(\w+(?:(?:#|::)\w+)*)", config):
            yield ref.replace("::", "#")


def _overlay(base: dict, config: dict) -> dict:
    """``config`` over ``base`` the way MONAI merges several config files: ``a#b`` keys set nested ids."""
    merged = json.loads(json.dumps(base))
    for key, value in config.items():
        *parents, last = str(key).replace("::", "#").split("#")
        node = merged
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node
        if isinstance(node, dict):
            node[last] = value
    return merged


def _lookup(config: dict, meta: dict, ref: str) -> bool:
    node: Any = {**config, "_meta_": meta}
    for part in ref.split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _check_references(root: Path, configs: dict[str, Any], meta: dict, report: Verification) -> None:
    """Every ``@id`` resolves (an overlay such as multi_gpu_train.json over train.json) and every
    bundle file an inference or evaluation config reads is there."""
    base = configs.get("configs/train.json", {})
    problems = []
    for name, config in configs.items():
        if not isinstance(config, dict):
            problems.append(f"{name}: top level must be a mapping of ids")
            continue
        merged = _overlay(base, config) if name not in ("configs/train.json", "configs/inference.json") else config
        for ref in sorted(set(_references(config))):
            if not _lookup(merged, meta, ref):
                problems.append(f"{name}: @{ref} is not defined")
        if name in ("configs/train.json", "configs/multi_gpu_train.json"):
            continue  # training writes models/, it does not read them
        for where, text in string_values(config):
            for rel in re.findall(r"@bundle_root\s*\+\s*['\"]/((?:models|configs|docs)/[^'\"]+\.\w+)['\"]", text):
                if not (root / rel).is_file():
                    problems.append(f"{name} {where}: reads {rel}, which is not in the bundle")
    report.add("references and files", problems, passed="every @id resolves; every file read is present")


def _check_paths(configs: dict[str, Any], report: Verification) -> None:
    problems = [str(f) for name, config in configs.items() for f in path_findings(config, name)]
    report.add("portable paths", problems, passed="no absolute paths, nothing outside bundle_root")


def _check_expressions(root: Path, configs: dict[str, Any], trust: bool, report: Verification) -> bool:
    # every workflow the bundle can run, merged as MONAI merges it (a second config can flip a value
    # the first set), with metadata and logging.conf; configs that did not parse are reported above
    findings = audit_bundle(root, tuple(configs))
    report.add(
        "expression audit",
        [str(f) for f in findings],
        trusted=trust,
        passed="configs, metadata and logging.conf hold only the accepted subset (docs/bundle-safety.md)",
    )
    return not findings


# ------------------------------------------------------------------ the network, built from literals only


def _literal(value: Any, where: str, config: dict, *, resolve: bool = True, depth: int = 0) -> Any:
    """``value`` as plain JSON data; an ``@name`` resolved to a top-level literal of ``config``.
    Anything MONAI would evaluate or instantiate is refused."""
    if depth > 16:
        raise MedtlError(f"{where}: nested more than 16 levels deep", path=INFERENCE)
    if isinstance(value, str):
        if resolve and re.fullmatch(r"@[A-Za-z_]\w*", value):
            name = value[1:]
            if name not in config:
                raise MedtlError(f"{where}: {value} is not defined", path=INFERENCE)
            return _literal(config[name], f"{where} ({value})", config, resolve=False, depth=depth + 1)
        if value.startswith(("$", "@", "%")):
            kind = {"$": "a $ expression", "@": "a reference to something other than a top-level literal"}
            raise MedtlError(
                f"{where}: {_short(value)} is {kind.get(value[0], 'a % macro')}; verify builds network_def only "
                "from literal arguments",
                path=INFERENCE,
            )
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, list):
        return [_literal(v, f"{where}#{i}", config, resolve=resolve, depth=depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        special = sorted(str(k) for k in value if str(k).startswith("_"))
        if special:
            raise MedtlError(
                f"{where}: holds {special[0]} (a nested component); verify builds network_def only from literal "
                "arguments",
                path=INFERENCE,
            )
        return {k: _literal(v, f"{where}#{k}", config, resolve=resolve, depth=depth + 1) for k, v in value.items()}
    raise MedtlError(f"{where}: {type(value).__name__} is not a JSON value", path=INFERENCE)


def network_definition(config: Any) -> tuple[str, dict[str, Any]]:
    """``network_def`` of an inference config as an allow-listed network class and literal arguments.

    Verification builds the network from this alone: no ``_requires_``, no ``$`` expression, no
    other id of the bundle is ever evaluated, and no weights are downloaded. Raises ``MedtlError``
    with a one-line reason for anything else.
    """
    if not isinstance(config, dict) or not isinstance(config.get("network_def"), dict):
        raise MedtlError("network_def must be a mapping with a _target_", path=INFERENCE)
    shadowing = sorted(str(k) for k in config if re.match(r"network_def(#|::)", str(k)))
    if shadowing:
        raise MedtlError(
            f"{shadowing[0]}: sets network_def's arguments from outside it (MONAI merges it in); write them "
            "inside network_def",
            path=INFERENCE,
        )
    definition = config["network_def"]
    target = definition.get("_target_")
    if target not in NETWORKS:
        raise MedtlError(f"network_def#_target_ {_short(target)} is not a network on the allow-list", path=INFERENCE)
    arguments = {}
    for key, value in definition.items():
        if key == "_target_":
            continue
        if str(key).startswith("_") or not str(key).isidentifier():
            raise MedtlError(
                f"network_def#{str(key)[:60]}: not a constructor argument; verify builds network_def only from "
                "literal arguments",
                path=INFERENCE,
            )
        arguments[key] = _literal(value, f"network_def#{key}", config)
    module, _, name = target.rpartition(".")
    builder = getattr(importlib.import_module(module), name)
    default = inspect.signature(builder).parameters.get("pretrained")
    pretrained = arguments.get("pretrained", default.default if default else False)
    if pretrained is not False:
        raise MedtlError(
            f"network_def: {name} with pretrained={pretrained!r} downloads weights; a received bundle's weights "
            'are its models/model.pt (set "pretrained": false)',
            path=INFERENCE,
        )
    return target, arguments


# ------------------------------------------------------------------ heavy checks, in a bounded child process


@dataclass(frozen=True)
class _Plan:
    """What the child checks: the literal network (or why it is not built) and its input."""

    network: tuple[str, dict[str, Any]] | None
    not_built: str
    channels: int = 1
    shape: tuple[int, ...] = ()
    value_range: tuple[float, float] = (0.0, 1.0)
    classes: int = 0
    trust: bool = False


_Built = tuple[nn.Module, torch.Tensor, torch.Tensor]  # the network, its sample input and output


def _weights_record_problem(path: Path) -> str | None:
    """Why the weights must not be loaded, read from the zip's directory alone (torch's format is a
    zip of tensor records): more bytes than ``MAX_WEIGHT_BYTES`` once inflated, or a record that
    inflates like a zip bomb. A file in the older pickle format is bounded by its size."""
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        return (
            None
            if size <= MAX_WEIGHT_BYTES
            else f"models/model.pt: {size_text(size)}, above {size_text(MAX_WEIGHT_BYTES)}"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"models/model.pt: not a readable checkpoint ({exc.__class__.__name__})"
    total = sum(i.file_size for i in infos)
    if total > MAX_WEIGHT_BYTES:
        return (
            f"models/model.pt: its tensor records declare {size_text(total)}, "
            f"above {size_text(MAX_WEIGHT_BYTES)}; not loaded"
        )
    return inflation_problem(infos, "models/model.pt")


def _load_weights(root: Path, channel: Channel) -> dict[str, torch.Tensor] | None:
    try:
        state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError or EOFError by case
        if out_of_memory(exc):
            raise
        text = str(exc)
        unsafe = re.search(r"(?:Unsupported global|GLOBAL) *:? *(?:GLOBAL )?([\w.]+)", text)
        what = unsafe.group(1) if unsafe else "pickle opcodes weights-only loading refuses"
        pickled = bool(unsafe or "Weights only" in text)
        why = (
            f"holds pickled code ({what}), which would run on loading; refused"
            if pickled
            else f"not a readable checkpoint ({exc.__class__.__name__})"
        )
        channel.put(("add", WEIGHTS, [f"models/model.pt: {why}"], "", pickled))
        return None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    problems = [] if tensors else ["models/model.pt: holds no weight tensors"]
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    problems += [f"models/model.pt: {k} has NaN or Inf values" for k in bad[:3]]
    channel.put(("add", WEIGHTS, problems, f"{len(tensors)} tensors, all finite, no pickled code", False))
    return None if problems else tensors


def _build_network(
    target: str, arguments: dict[str, Any], plan: _Plan, state: dict[str, torch.Tensor], channel: Channel
) -> _Built | None:
    module, _, name = target.rpartition(".")
    try:
        network = getattr(importlib.import_module(module), name)(**arguments)
    except Exception as exc:  # noqa: BLE001 - arguments the constructor refuses are the bundle's problem
        channel.put(("add", NETWORK, [f"{INFERENCE} network_def does not build ({first_line(exc)})"], "", False))
        return None
    result = network.load_state_dict(state, strict=False)
    problems = [f"models/model.pt: no weights for {', '.join(result.missing_keys[:4])}"] if result.missing_keys else []
    if result.unexpected_keys:
        problems.append(f"models/model.pt: weights for no layer: {', '.join(result.unexpected_keys[:4])}")
    if problems:
        channel.put(("add", NETWORK, problems, "", False))
        return None
    low, high = plan.value_range
    x = low + (high - low) * torch.rand(2, plan.channels, *plan.shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            y = network.eval()(x)
    except Exception as exc:  # noqa: BLE001 - an input the network cannot take is the bundle's problem
        if out_of_memory(exc):
            raise
        channel.put(
            ("add", NETWORK, [f"network_def does not run on the metadata's input ({first_line(exc)})"], "", False)
        )
        return None
    if tuple(y.shape) != (x.shape[0], plan.classes) or y.dtype != torch.float32:
        problems.append(
            f"network_def gives {tuple(y.shape)} {y.dtype} for input {tuple(x.shape)}; metadata "
            f"says ({x.shape[0]}, {plan.classes}) float32"
        )
    channel.put(("add", NETWORK, problems, f"{tuple(x.shape[1:])} -> {plan.classes} classes", False))
    return None if problems else (network, x, y)


def _canonical_code(text: bytes) -> bytes:
    """TorchScript code with each run of class-level declarations sorted: torch writes them in set
    order, which differs between Python processes; the order of declarations means nothing."""
    out: list[bytes] = []
    block: list[bytes] = []
    for line in text.split(b"\n"):
        if re.match(rb"  [A-Za-z_]\w* : ", line) or re.match(rb"  __\w+__ = ", line):
            block.append(line)
            continue
        out += sorted(block) + [line]
        block = []
    return b"\n".join(out + sorted(block))


#: TorchScript's numbered class names (``conv.___torch_mangle_7.Conv3d``): the numbers count the
#: classes the exporting process compiled before, so they depend on what else ran there.
_MANGLED = re.compile(r"\.___torch_mangle_\d+(?=[. ])")


def _pickle_text(data: bytes) -> str:
    """A pickle as its opcodes and arguments without class numbers; parsed, never run. Frame lengths
    are left out: the numbers' digits change string lengths."""
    ops = [
        (op.name, _MANGLED.sub("", arg) if isinstance(arg, str) else arg)
        for op, arg, _ in pickletools.genops(data)
        if op.name != "FRAME"
    ]
    return repr(ops)


def _renumbered(block: bytes) -> bytes:
    """A class definition with its temporaries (``_0``, ``_1``...) numbered by first use: torch
    numbers them on from the functions the process compiled before."""
    numbers: dict[bytes, int] = {}
    return re.sub(rb"\b_(\d+)\b", lambda m: b"_%d" % numbers.setdefault(m.group(1), len(numbers)), block)


def _canonical_torchscript(zf: zipfile.ZipFile) -> tuple[dict[str, str | bytes], list[bytes]]:
    """A TorchScript archive up to what differs between two exports of the same network in two
    processes: the pickles (module tree, constants) and other members by name, and the code as a
    sorted list of class definitions, all without class numbers (which also decide which file a
    class is written to) and with declarations in sorted order. The classes compared are this
    site's own export's, so whichever numbered variant a name stands for, no other code runs."""
    members: dict[str, str | bytes] = {}
    classes: list[bytes] = []
    for info in zf.infolist():
        name = info.filename
        if name.endswith("/.data/serialization_id"):
            continue
        if "/code/" in name:
            code = _canonical_code(_MANGLED.sub("", zf.read(info).decode("utf-8")).encode("utf-8"))
            classes += [_renumbered(block.strip(b"\n")) for block in re.split(rb"\n(?=class )", code) if block.strip()]
        elif name.endswith(".pkl"):
            members[name] = _pickle_text(zf.read(info))
        else:
            members[name] = zf.read(info)
    return members, sorted(classes)


def _torchscript_matches(path: Path, fresh: bytes) -> bool:
    """Whether ``path`` is ``fresh`` (this site's export of the same weights and network_def) up to
    ``_canonical_torchscript``: the same code, module tree, constants and tensor bytes. The shipped
    file is read only when its members declare about the fresh export's size: no bomb is inflated."""
    try:
        with zipfile.ZipFile(io.BytesIO(fresh)) as ours, zipfile.ZipFile(path) as theirs:
            if sum(i.file_size for i in theirs.infolist()) > 2 * sum(i.file_size for i in ours.infolist()):
                return False
            return _canonical_torchscript(ours) == _canonical_torchscript(theirs)
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, EOFError, zlib.error, UnicodeDecodeError):
        return False


def _onnx_matches(path: Path, fresh: Path) -> bool:
    """Whether ``path`` is this site's export ``fresh``: the same graph, operators and attributes, and
    initializers within float rounding (folded batch norms differ in their last bits between builds)."""
    import onnx
    from onnx import numpy_helper

    try:
        ours, theirs = onnx.load(str(fresh)), onnx.load(str(path), load_external_data=False)
        a, b = list(ours.graph.initializer), list(theirs.graph.initializer)
        if [(t.name, t.data_type, list(t.dims)) for t in a] != [(t.name, t.data_type, list(t.dims)) for t in b]:
            return False
        for x, y in zip(a, b, strict=True):
            if not np.allclose(numpy_helper.to_array(x), numpy_helper.to_array(y), rtol=1e-5, atol=1e-6):
                return False
        ours.graph.ClearField("initializer")
        theirs.graph.ClearField("initializer")
        return ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    except Exception:  # noqa: BLE001 - a file onnx cannot read is not what this site exported
        return False


def _onnx_problems(path: Path) -> list[str]:
    """What makes an ONNX file unsafe to run whoever made it: weights read from other files, custom
    operators, loops whose trip count the file sets."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's errors share no base class
        return [f"models/model.onnx: not a readable ONNX model ({exc.__class__.__name__})"]
    problems = []
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        problems.append(
            f"models/model.onnx: weights stored outside the file ({external[0]}): ONNX would read them from any path"
        )
    custom = sorted({o.domain for o in model.opset_import} - {"", "ai.onnx", "ai.onnx.ml"})
    if custom:
        problems.append(f"models/model.onnx: operators from custom domain {custom[0]!r}")
    loops = sorted({n.op_type for n in _onnx_nodes(model.graph) if n.op_type in ("Loop", "Scan", "If")})
    if loops:
        problems.append(
            f"models/model.onnx: holds {loops[0]} nodes (control flow whose extent the file sets; a classifier's "
            "export has none)"
        )
    return problems


def _onnx_nodes(graph: Any) -> Iterable[Any]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            subgraphs = [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]
            for sub in subgraphs:
                yield from _onnx_nodes(sub)


def _exports(root: Path, plan: _Plan, built: _Built | None, channel: Channel) -> set[str]:
    """Export the network afresh and compare the shipped copies with it; returns which match."""
    shipped = [name for name in ("model.ts", "model.onnx") if (root / "models" / name).is_file()]
    if not shipped:
        channel.put(("skip", EXPORTS, "no models/model.ts or models/model.onnx"))
        return set()
    if built is None:
        channel.put(
            ("add", EXPORTS, [f"models/{n}: not compared (the network check failed)" for n in shipped], "", True)
        )
        return set()
    network, shape = built[0], [plan.channels, *plan.shape]
    verified: set[str] = set()
    problems: list[str] = []
    if "model.ts" in shipped:
        channel.step("exporting models/model.ts afresh")
        configs = root / "configs"
        embedded = {name: (configs / name).read_text(encoding="utf-8") for name in ("metadata.json", "inference.json")}
        try:
            fresh = torchscript_bytes(_torchscript(network, shape), embedded)
        except RuntimeError as exc:
            problems.append(f"models/model.ts: this network has no TorchScript export to compare ({first_line(exc)})")
        else:
            if _torchscript_matches(root / "models" / "model.ts", fresh):
                verified.add("model.ts")
    if "model.onnx" in shipped:
        channel.step("exporting models/model.onnx afresh")
        try:
            exported = _onnx_export(network, Path("fresh.onnx"), shape)
        except Exception as exc:  # noqa: BLE001 - the exporter's and ONNX Runtime's errors share no base class
            problems.append(f"models/model.onnx: this network has no ONNX export to compare ({first_line(exc)})")
        else:
            if exported is None:
                problems.append(
                    "models/model.onnx: not compared with this site's export: onnxruntime is not installed "
                    "(pip install onnx onnxruntime, or delete the file)"
                )
            elif _onnx_matches(root / "models" / "model.onnx", Path("fresh.onnx")):
                verified.add("model.onnx")
    problems += [
        f"models/{name} is not what models/model.pt and network_def export to; it was not loaded, and MONAI "
        "Deploy or Triton would run it (re-export the bundle, delete the file, or --trust to keep it)"
        for name in shipped
        if name not in verified and not any(p.startswith(f"models/{name}:") for p in problems)
    ]
    channel.put(
        ("add", EXPORTS, problems, ", ".join(f"models/{n}" for n in shipped) + ": fresh exports of model.pt", True)
    )
    return verified


def _parity(name: str, out: np.ndarray, y: torch.Tensor) -> tuple[list[str], str]:
    diff = float(np.abs(out - y.numpy()).max()) if out.shape == tuple(y.shape) else float("inf")
    problems = (
        [] if diff <= TOLERANCE else [f"{name}: output differs from models/model.pt by {diff:.2e} (> {TOLERANCE:g})"]
    )
    return problems, f"max abs difference {diff:.1e}"


def _run_exports(root: Path, plan: _Plan, built: _Built | None, verified: set[str], channel: Channel) -> None:
    """Parity of the shipped copies with the network, each run only when it is this site's export
    (or with ``trust``); ONNX files are first read for what no export of a classifier holds."""
    ts, onnx_path = root / "models" / "model.ts", root / "models" / "model.onnx"
    if not ts.is_file():
        channel.put(("skip", TS_PARITY, "no models/model.ts"))
    elif built is None:
        channel.put(("skip", TS_PARITY, "needs the network check to pass"))
    elif "model.ts" not in verified and not plan.trust:
        channel.put(
            (
                "skip",
                TS_PARITY,
                "not run: model.ts is a program and not this site's export of model.pt "
                "(--trust runs it in a bounded child process)",
            )
        )
    else:
        channel.step("running models/model.ts")
        try:
            with torch.no_grad():
                out = torch.jit.load(str(ts), map_location="cpu").eval()(built[1]).numpy()
        except Exception as exc:  # noqa: BLE001 - a file that does not load is the bundle's problem
            channel.put(("add", TS_PARITY, [f"models/model.ts: does not load or run ({first_line(exc)})"], "", False))
        else:
            channel.put(("add", TS_PARITY, *_parity("models/model.ts", out, built[2]), False))
    if not onnx_path.is_file():
        channel.put(("skip", ONNX_PARITY, "no models/model.onnx"))
        return
    channel.step("reading models/model.onnx")
    try:
        problems = _onnx_problems(onnx_path)
    except ImportError as exc:
        channel.put(("skip", ONNX_PARITY, f"{exc.name} not installed"))
        return
    if problems:
        channel.put(("add", ONNX_PARITY, problems, "", False))
    elif built is None:
        channel.put(("skip", ONNX_PARITY, "needs the network check to pass"))
    elif "model.onnx" not in verified and not plan.trust:
        channel.put(
            (
                "skip",
                ONNX_PARITY,
                "not run: not this site's export of model.pt (--trust runs it in a bounded child process)",
            )
        )
    else:
        channel.step("running models/model.onnx")
        import onnxruntime

        try:
            session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            out = session.run(None, {session.get_inputs()[0].name: built[1].numpy()})[0]
        except Exception as exc:  # noqa: BLE001 - a file that does not load is the bundle's problem
            channel.put(
                ("add", ONNX_PARITY, [f"models/model.onnx: does not load or run ({first_line(exc)})"], "", False)
            )
        else:
            channel.put(("add", ONNX_PARITY, *_parity("models/model.onnx", out, built[2]), False))


def _heavy_checks(channel: Channel, root_text: str, plan: _Plan) -> None:
    """The checks that build or run something, in the bounded child: weights, network, exports."""
    torch.set_num_threads(1)
    root = Path(root_text)
    channel.step("loading models/model.pt")
    state = _load_weights(root, channel)
    built = None
    if plan.network is None or state is None:
        channel.put(("skip", NETWORK, plan.not_built if plan.network is None else "needs the weights to load"))
    else:
        channel.step("building network_def and running it")
        built = _build_network(*plan.network, plan, state, channel)
    verified = _exports(root, plan, built, channel)
    _run_exports(root, plan, built, verified, channel)


def _check_heavy(root: Path, plan: _Plan, trust: bool, report: Verification) -> None:
    """Run ``_heavy_checks`` within ``CHECK_LIMITS`` and add its rows; a breach is one more row."""
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        report.skip(WEIGHTS, "no models/model.pt")
        report.skip(NETWORK, "needs valid metadata, weights and inference.json")
        return
    if problem := _weights_record_problem(weights):
        report.add(WEIGHTS, [problem])
        report.skip(NETWORK, "needs the weights to load")
        return
    outcome = run_limited(
        _heavy_checks, str(root.resolve()), plan, what="network check", limits=CHECK_LIMITS, reads=[str(root)]
    )
    for kind, name, *rest in outcome.items:
        if kind == "skip":
            report.skip(name, rest[0])
        else:
            problems, passed, trustable = rest
            report.add(name, problems, passed=passed, trusted=trust and trustable)
    if outcome.breach:
        report.add("resource limits", [outcome.breach])


def _check_privacy(root: Path, identifiers: Iterable[str], report: Verification) -> None:
    known = sorted(set(identifiers))
    problems = []
    files = bundle_files(root)
    left = MAX_SCANNED_TEXT
    for rel in files:
        for scanned in file_texts(root / rel):
            if scanned.problem:  # not read (a zip bomb, an encrypted member): what was not seen cannot pass
                problems.append(f"{rel}{scanned.part}: {scanned.problem}")
            left -= len(scanned.text)
            if left < 0:
                problems.append(
                    f"{rel}{scanned.part}: not scanned: the bundle holds more than {MAX_SCANNED_TEXT >> 20} M "
                    "characters of text (configs and documents are small)"
                )
                break
            problems += [f"{rel}{scanned.part}: {f}" for f in find_identifiers(scanned.text, known)]
        if left < 0:
            break
    source = f", {len(known)} identifiers from the training data" if known else ""
    report.add(
        "privacy scan",
        problems,
        passed=f"{len(files)} files: no names, IDs, MRNs, UIDs, birth dates or home paths{source}",
    )


def verify_bundle(
    path: str | Path,
    *,
    trust: bool = False,
    identifiers: Iterable[str] = (),
    trusted_keys: Iterable[str | Path] | None = None,
    max_bytes: int = MAX_UNPACKED_BYTES,
    packed: bool | None = None,
) -> Verification:
    """Run every check on a bundle folder or zip; never raises for a bad bundle, reports it.

    ``trust`` turns audit failures into warnings, lets the network checks run anyway and runs a
    ``model.ts`` or ``model.onnx`` that is not this site's own export (in the bounded child process);
    pickled weights are still never loaded, and ``network_def`` is still built from literals only.
    ``identifiers`` are values from the training data (``medtl.privacy.identifiers_from_dicom``)
    the privacy scan must not find. ``trusted_keys`` (``.pub`` files or folders) makes a signature
    by one of them required. A zip may unpack to at most ``max_bytes``. ``packed`` (default: ``path``
    is a zip) requires ``SHA256SUMS``, as a bundle that arrived from elsewhere must carry one.
    """
    path = Path(path)
    report = Verification(path.name)
    try:
        trusted = signing.trusted_fingerprints(trusted_keys) if trusted_keys is not None else None
        with open_bundle(path, max_bytes=max_bytes) as root:
            return _verify_root(
                root,
                report,
                packed=path.is_file() if packed is None else packed,
                trust=trust,
                identifiers=identifiers,
                trusted=trusted,
            )
    except MedtlError as exc:
        report.add("archive", [str(exc)])
    return report


def _plan(meta: dict | None, configs: dict[str, Any], audited: bool, trust: bool, report: Verification) -> _Plan:
    """What the bounded child checks; a ``network_def`` that is not literal is a failed row here."""
    if meta is None or INFERENCE not in configs:
        return _Plan(None, "needs valid metadata, weights and inference.json")
    if not (audited or trust):
        return _Plan(None, "not built: the expression audit failed (--trust to build it anyway)")
    try:
        network = network_definition(configs[INFERENCE])
    except MedtlError as exc:
        report.add("network definition", [str(exc)], trusted=trust)
        return _Plan(None, "not built: network_def is not an allow-listed network with literal arguments")
    report.add("network definition", [], passed=f"{network[0]} with literal arguments")
    image = meta["network_data_format"]["inputs"]["image"]
    low, high = (image.get("value_range") or [0, 1])[:2]
    return _Plan(
        network,
        "",
        channels=image["num_channels"],
        shape=tuple(image["spatial_shape"]),
        value_range=(float(low), float(high)),
        classes=meta["network_data_format"]["outputs"]["pred"]["num_channels"],
        trust=trust,
    )


def _verify_root(
    root: Path, report: Verification, *, packed: bool, trust: bool, identifiers: Iterable[str], trusted: set[str] | None
) -> Verification:
    """The checks on an unpacked bundle folder, in the order a reader would ask them."""
    if not packed:
        report.bundle = root.name
    missing = [f for f in REQUIRED if not (root / f).is_file()]
    report.add("required files", [f"{f} is missing" for f in missing], passed=", ".join(REQUIRED))
    _check_code_files(root, report)
    meta = _check_metadata(root, report) if (root / "configs" / "metadata.json").is_file() else None
    checksums_ok = _check_checksums(root, report, required=packed)
    _check_signature(root, trusted, checksums_ok, report)
    configs = _read_configs(root, report) if (root / "configs").is_dir() else {}
    if meta is not None:
        _check_references(root, configs, meta, report)
    _check_paths(configs, report)
    audited = _check_expressions(root, configs, trust, report)
    _check_sizes(configs, report)
    _check_heavy(root, _plan(meta, configs, audited, trust, report), trust, report)
    _check_privacy(root, identifiers, report)
    if (root / PROVENANCE).is_file():
        try:
            provenance = _load_json(root / PROVENANCE, PROVENANCE)
            problems = (
                []
                if provenance.get("bundle", {}).get("version") == report.version
                else [
                    f"{PROVENANCE}: version {provenance.get('bundle', {}).get('version')} differs "
                    f"from metadata {report.version}"
                ]
            )
        except (MedtlError, AttributeError) as exc:
            problems = [str(exc)]
        report.add("provenance", problems, passed="provenance.json matches the metadata version")
    return report


__all__ = ["Check", "Verification", "verify_bundle"]
