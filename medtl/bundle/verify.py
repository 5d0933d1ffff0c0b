"""Check a bundle before it is shared or run: a pass/fail table a receiving site can trust.

A received bundle is data, not code. Every check reads it without running anything from it: the
configs, ``metadata.json`` and ``logging.conf`` are audited against an allow-list
(``medtl.bundle.audit``), and ``network_def`` is built only when that audit passed (or with
``trust``). Weights are always loaded with ``weights_only=True``. ``model.ts`` is a program
(TorchScript runs its own code on load and forward): its parity is checked only with ``trust``,
in a child process with a time limit. A packed bundle must list every file in ``SHA256SUMS``; a
signature over that list names the sender when its key is one the site trusts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import torch
from monai.bundle import ConfigParser

from medtl.bundle import signing
from medtl.bundle.audit import (
    audit_config,
    audit_logging_conf,
    audit_metadata,
    path_findings,
    size_problem,
    string_values,
)
from medtl.bundle.files import (
    CHECKSUMS,
    MAX_UNPACKED_BYTES,
    PROVENANCE,
    SIGNATURE,
    bundle_files,
    open_bundle,
    parse_sha256sums,
    sha256sums,
)
from medtl.bundle.textscan import file_texts
from medtl.errors import MedtlError
from medtl.fileio import utf8_child_env
from medtl.privacy import find_identifiers

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "meta_schema_20240725.json"
REQUIRED = ("configs/metadata.json", "configs/inference.json", "LICENSE", "models/model.pt")
TOLERANCE = 1e-4
#: Seconds a trusted TorchScript parity check may run before it is stopped.
TORCHSCRIPT_SECONDS = 60
#: Files that hold code Python or the system would run: a bundle is configs, weights and documents.
CODE_SUFFIXES = frozenset(
    {".py", ".pyw", ".pyc", ".pyo", ".pyd", ".pth", ".so", ".dll", ".dylib", ".exe", ".sh", ".bat", ".whl", ".egg"}
)


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


def _load_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedtlError(f"not readable JSON ({exc.__class__.__name__}: {exc})", path=name) from None


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
        try:
            config = ConfigParser.load_config_file(path)
        except Exception as exc:  # noqa: BLE001 - any parse error is the bundle's problem, reported by file
            problems.append(f"{name}: does not parse ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})")
            continue
        if reason := size_problem(config):  # not walked by the checks below
            problems.append(f"{name}: {reason}")
        else:
            configs[name] = config
    report.add("configs parse", problems, passed=f"{len(configs)} configs read by MONAI's ConfigParser")
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
    findings = [f for name, config in configs.items() for f in audit_config(config, name)]
    try:
        findings += audit_metadata(_load_json(root / "configs" / "metadata.json", "configs/metadata.json"))
    except MedtlError:
        pass  # reported by the metadata check; without metadata nothing is built
    if (root / "configs" / "logging.conf").is_file():
        findings += audit_logging_conf(root / "configs" / "logging.conf")
    report.add(
        "expression audit",
        [str(f) for f in findings],
        trusted=trust,
        passed="configs, metadata and logging.conf hold only the accepted subset (docs/bundle-safety.md)",
    )
    return not findings


def _check_weights(root: Path, trust: bool, report: Verification) -> dict | None:
    path = root / "models" / "model.pt"
    if not path.is_file():
        report.skip("weights load (weights_only)", "no models/model.pt")
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError or EOFError by case
        text = str(exc)
        unsafe = re.search(r"(?:Unsupported global|GLOBAL) *:? *(?:GLOBAL )?([\w.]+)", text)
        what = unsafe.group(1) if unsafe else "pickle opcodes weights-only loading refuses"
        why = (
            f"holds pickled code ({what}), which would run on loading; refused"
            if unsafe or "Weights only load failed" in text
            else f"not a readable checkpoint ({exc.__class__.__name__})"
        )
        report.add(
            "weights load (weights_only)",
            [f"models/model.pt: {why}"],
            trusted=trust and bool(unsafe or "Weights only" in text),
        )
        return None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    problems = [] if tensors else ["models/model.pt: holds no weight tensors"]
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    problems += [f"models/model.pt: {k} has NaN or Inf values" for k in bad[:3]]
    report.add("weights load (weights_only)", problems, passed=f"{len(tensors)} tensors, all finite, no pickled code")
    return None if problems else tensors


def _sample_input(meta: dict) -> torch.Tensor:
    image = meta["network_data_format"]["inputs"]["image"]
    low, high = (image.get("value_range") or [0, 1])[:2]
    x = torch.rand(2, image["num_channels"], *image["spatial_shape"], generator=torch.Generator().manual_seed(0))
    return low + (high - low) * x


def _check_network(
    root: Path, meta: dict, state: dict, report: Verification
) -> tuple[torch.Tensor, torch.Tensor] | None:

    parser = ConfigParser()
    parser.read_config(root / "configs" / "inference.json")
    parser.read_meta(root / "configs" / "metadata.json")
    parser["bundle_root"] = str(root)
    try:
        network = parser.get_parsed_content("network_def")
    except Exception as exc:  # noqa: BLE001 - a broken network_def is the bundle's problem
        report.add(
            "network matches metadata",
            [f"configs/inference.json network_def does not build ({exc.__class__.__name__}: {exc})"],
        )
        return None
    result = network.load_state_dict(state, strict=False)
    problems = [f"models/model.pt: no weights for {', '.join(result.missing_keys[:4])}"] if result.missing_keys else []
    problems += (
        [f"models/model.pt: weights for no layer: {', '.join(result.unexpected_keys[:4])}"]
        if result.unexpected_keys
        else []
    )
    if problems:
        report.add("network matches metadata", problems)
        return None
    x = _sample_input(meta)
    with torch.no_grad():
        y = network.eval()(x)
    k = meta["network_data_format"]["outputs"]["pred"]["num_channels"]
    if tuple(y.shape) != (x.shape[0], k) or y.dtype != torch.float32:
        problems.append(
            f"network_def gives {tuple(y.shape)} {y.dtype} for input {tuple(x.shape)}; metadata "
            f"says ({x.shape[0]}, {k}) float32"
        )
    report.add("network matches metadata", problems, passed=f"{tuple(x.shape[1:])} -> {k} classes")
    return None if problems else (x, y)


def _check_export(
    name: str,
    path: Path,
    run: Callable[[Path, torch.Tensor], np.ndarray],
    reference: tuple[torch.Tensor, torch.Tensor] | None,
    report: Verification,
) -> None:
    rel = f"models/{path.name}"
    if not path.is_file():
        report.skip(name, f"no {rel}")
        return
    if reference is None:
        report.skip(name, "needs the network check to pass")
        return
    x, y = reference
    try:
        out = run(path, x)
    except ImportError as exc:
        report.skip(name, f"{exc.name} not installed")
        return
    except Exception as exc:  # noqa: BLE001 - a file that does not load is the bundle's problem
        report.add(name, [f"{rel}: does not load or run ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})"])
        return
    diff = float(np.abs(out - y.numpy()).max()) if out.shape == tuple(y.shape) else float("inf")
    report.add(
        name,
        [f"{rel}: output differs from models/model.pt by {diff:.2e} (> {TOLERANCE:g})"]
        if not diff <= TOLERANCE
        else [],
        passed=f"max abs difference {diff:.1e}",
    )


_TORCHSCRIPT_CHILD = """
import sys, numpy as np, torch
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], torch.jit.load(sys.argv[1], map_location="cpu").eval()(x).numpy())
"""


def _run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    """Run a trusted ``model.ts`` in a child process in an empty folder, stopped after
    ``TORCHSCRIPT_SECONDS``: a TorchScript program that loops forever cannot hang verification."""
    with tempfile.TemporaryDirectory(prefix="medtl-ts-") as tmp:
        np.save(Path(tmp) / "x.npy", x.numpy())
        try:
            done = subprocess.run(
                [sys.executable, "-c", _TORCHSCRIPT_CHILD, str(path.resolve()), "x.npy", "y.npy"],
                cwd=tmp,
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                env=utf8_child_env(),
                timeout=TORCHSCRIPT_SECONDS,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"still running after {TORCHSCRIPT_SECONDS} s; stopped") from None
        if done.returncode:
            raise RuntimeError((done.stderr.strip().splitlines() or ["failed"])[-1])
        return np.load(Path(tmp) / "y.npy")


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnx
    import onnxruntime

    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ValueError(f"weights stored outside the file ({external[0]}): ONNX would read them from any path")
    custom = sorted({o.domain for o in model.opset_import} - {"", "ai.onnx", "ai.onnx.ml"})
    if custom:
        raise ValueError(f"operators from custom domain {custom[0]!r}")

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _check_privacy(root: Path, identifiers: Iterable[str], report: Verification) -> None:
    known = sorted(set(identifiers))
    problems = []
    files = bundle_files(root)
    for rel in files:
        for scanned in file_texts(root / rel):
            if scanned.problem:  # not read (a zip bomb, an encrypted member): what was not seen cannot pass
                problems.append(f"{rel}{scanned.part}: {scanned.problem}")
            problems += [f"{rel}{scanned.part}: {f}" for f in find_identifiers(scanned.text, known)]
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

    ``trust`` turns audit failures into warnings, lets the network checks run anyway and runs
    ``model.ts`` (in a time-limited child process); pickled weights are still never loaded.
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
    state = _check_weights(root, trust, report)
    reference = None
    if meta is None or state is None or "configs/inference.json" not in configs:
        report.skip("network matches metadata", "needs valid metadata, weights and inference.json")
    elif not (audited or trust):
        report.skip("network matches metadata", "not built: the expression audit failed (--trust to build it anyway)")
    else:
        reference = _check_network(root, meta, state, report)
    if trust or not (root / "models" / "model.ts").is_file():
        _check_export("TorchScript parity", root / "models" / "model.ts", _run_torchscript, reference, report)
    else:
        report.skip(
            "TorchScript parity", "not run: model.ts is a program (--trust runs it in a time-limited child process)"
        )
    _check_export("ONNX parity", root / "models" / "model.onnx", _run_onnx, reference, report)
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
