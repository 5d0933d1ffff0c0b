"""Sending and receiving bundles: ``pack`` into a reproducible zip, ``import`` after verification,
``diff`` two versions.

A packed zip holds one folder named after the bundle with its files, ``provenance.json``,
``SHA256SUMS`` and, when signed, ``SHA256SUMS.sig``. Entries are sorted and carry fixed timestamps
and permissions, so the same bundle always packs to the same bytes and its hash can be published.
The packed content is verified before the zip is written. An import unpacks the archive once into a
private folder beside the destination, verifies that copy, and renames that same copy into place:
the file is never read twice, so it cannot change between the check and the use.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medtl.bundle import signing
from medtl.bundle.files import (
    CHECKSUMS,
    MAX_UNPACKED_BYTES,
    PROVENANCE,
    SIGNATURE,
    bundle_files,
    check_plain_tree,
    extract_zip,
    format_sha256sums,
    open_bundle,
    sha256sums,
)
from medtl.bundle.provenance import provenance
from medtl.bundle.verify import Verification, verify_bundle
from medtl.errors import MedtlError
from medtl.fileio import atomic_write, canonical_json
from medtl.weights import read_checkpoint, state_sha256

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _refusal(report: Verification, action: str) -> MedtlError:
    failed = [c for c in report.checks if c.status == "fail"]
    hinted = any("(hint:" in c.detail for c in failed)  # the failed check already says what to do
    return MedtlError(
        f"{action} refused: {len(failed)} check(s) failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed),
        path=report.bundle,
        hint=None if hinted else "`medtl bundle verify` shows the whole table",
    )


def _copy_files(root: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the shareable files; a link is copied as a link (and then refused), never followed."""
    for rel in bundle_files(root):
        if rel not in skip:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dest / rel, follow_symlinks=False)


def _stage(root: Path, stage: Path) -> dict[str, Any]:
    """Copy the shareable files of ``root`` to ``stage`` with a fresh provenance record and checksum list."""
    _copy_files(root, stage, skip=(CHECKSUMS, SIGNATURE, PROVENANCE))
    record = provenance(root)
    (stage / PROVENANCE).write_text(canonical_json(record), encoding="utf-8")
    (stage / CHECKSUMS).write_text(format_sha256sums(sha256sums(stage)), encoding="utf-8")
    return record


def pack_bundle(
    bundle: str | Path,
    out: str | Path | None = None,
    *,
    identifiers: Iterable[str] = (),
    sign_key: str | Path | None = None,
    signer: str | None = None,
) -> dict[str, Any]:
    """Verify ``bundle`` (a folder) as it will be shipped and write ``NAME_VERSION.zip``, signed
    with the Ed25519 key file ``sign_key`` (``medtl bundle keygen``) when given.

    Returns ``{"path", "name", "version", "files", "verification", "signature"}``. Raises
    ``MedtlError`` listing the failed checks when the bundle does not pass verification (nothing
    is written then).
    """
    root = Path(bundle)
    if not (root / "configs" / "metadata.json").is_file():
        raise MedtlError("not a bundle folder (no configs/metadata.json)", path=root.name)
    check_plain_tree(root)
    with tempfile.TemporaryDirectory(prefix="medtl-pack-") as tmp:
        stage = Path(tmp) / root.name
        stage.mkdir()
        record = _stage(root, stage)
        name, version = record["bundle"]["name"], record["bundle"]["version"]
        signature = signing.sign(stage, sign_key, signer or Path(sign_key).stem) if sign_key else None
        report = verify_bundle(stage, identifiers=identifiers, packed=True)
        report.bundle = name
        if not report.ok:
            raise _refusal(report, "packing")
        out = Path(out) if out else Path(f"{name}_{version}.zip")
        files = bundle_files(stage)

        def write(tmp_zip: Path) -> None:
            with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
                for rel in files:
                    info = zipfile.ZipInfo(f"{name}/{rel}", date_time=_ZIP_DATE)
                    info.external_attr = 0o644 << 16
                    info.create_system = 3
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, (stage / rel).read_bytes(), compresslevel=9)

        atomic_write(out, write)
    return {
        "path": out,
        "name": name,
        "version": version,
        "files": len(files),
        "verification": report,
        "signature": signature,
    }


def import_bundle(
    archive: str | Path,
    to: str | Path,
    *,
    trust: bool = False,
    identifiers: Iterable[str] = (),
    replace: bool = False,
    trusted_keys: Iterable[str | Path] | None = None,
    max_bytes: int = MAX_UNPACKED_BYTES,
) -> dict[str, Any]:
    """Verify a received bundle (zip or folder) and place it at ``to`` in one rename.

    The archive is unpacked once into a private folder beside ``to``; that copy is verified and
    renamed into place. Refused (``MedtlError``, nothing written) when any check fails; ``trust``
    accepts configs outside the allow-list, checkpoints with pickled code, and a ``model.ts`` or
    ``model.onnx`` that is not what this site exports from ``model.pt`` (kept, and stated as a
    warning in the verification) from a sender you trust; ``trusted_keys`` requires a signature
    by one of those keys. An existing ``to`` is only
    replaced with ``replace``.
    """
    source, to = Path(archive), Path(to)
    if to.exists() and not replace:
        raise MedtlError(
            "destination exists",
            path=to.name,
            hint="choose a new folder, or --replace to swap it for the imported bundle",
        )
    if not source.exists():
        raise MedtlError("no such bundle folder or zip", path=source.name)
    to.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=to.parent, prefix=f".{to.name}-") as tmp:
        build = Path(tmp) / to.name
        build.mkdir()
        try:
            if source.is_file():
                _copy_files(extract_zip(source, Path(tmp) / "unpacked", max_bytes=max_bytes), build)
            else:
                check_plain_tree(source, max_bytes=max_bytes)
                _copy_files(source, build)
            check_plain_tree(build, max_bytes=max_bytes)
        except MedtlError as exc:
            raise MedtlError(f"import refused: {exc}") from None
        report = verify_bundle(
            build,
            trust=trust,
            identifiers=identifiers,
            trusted_keys=trusted_keys,
            max_bytes=max_bytes,
            packed=source.is_file(),
        )
        if not report.ok:
            raise _refusal(report, "import")
        if to.exists():
            to.rename(Path(tmp) / "previous")  # removed with the temporary folder
        build.rename(to)
    return {"path": to, "name": report.bundle, "version": report.version, "verification": report}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out |= _flatten(value, f"{prefix}#{key}" if prefix else str(key))
        return out
    return {prefix: obj}


def _changes(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    fa, fb = _flatten(a), _flatten(b)
    return [
        (k, fa.get(k, "<absent>"), fb.get(k, "<absent>"))
        for k in sorted(set(fa) | set(fb))
        if fa.get(k, "<absent>") != fb.get(k, "<absent>")
    ]


def _weights_digest(root: Path) -> str | None:
    """The weights' content hash (``state_sha256``), so a re-export of the same weights reads as
    identical; a file that cannot be read without unpickling code falls back to its file hash."""
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        return None
    try:
        return state_sha256(read_checkpoint(weights))
    except MedtlError:
        return sha256sums(root).get("models/model.pt")


def _read_bundle(path: str | Path) -> dict[str, Any]:
    out: dict[str, Any] = {"configs": {}}
    with open_bundle(path) as root:
        for file in sorted((root / "configs").glob("*.json")):
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise MedtlError(f"not readable JSON ({exc.__class__.__name__})", path=f"configs/{file.name}") from None
            if file.name == "metadata.json":
                out["metadata"] = data
            else:
                out["configs"][file.name] = data
        out["weights"] = _weights_digest(root)
    if "metadata" not in out:
        raise MedtlError("not a bundle (no configs/metadata.json)", path=Path(path).name)
    return out


def diff_bundles(a: str | Path, b: str | Path) -> dict[str, Any]:
    """What changed from bundle ``a`` to ``b``: config values, metadata fields (changelog and metrics
    apart), metrics side by side, and whether the weights differ."""
    old, new = _read_bundle(a), _read_bundle(b)
    configs = {
        name: _changes(old["configs"].get(name, {}), new["configs"].get(name, {}))
        for name in sorted(set(old["configs"]) | set(new["configs"]))
    }
    skip = ("eval_metrics", "changelog")
    metadata = _changes(
        {k: v for k, v in old["metadata"].items() if k not in skip},
        {k: v for k, v in new["metadata"].items() if k not in skip},
    )
    ma, mb = old["metadata"].get("eval_metrics", {}), new["metadata"].get("eval_metrics", {})
    metrics = [(k, ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb)) if not k.endswith("_ci95")]
    added = {
        v: t for v, t in new["metadata"].get("changelog", {}).items() if v not in old["metadata"].get("changelog", {})
    }
    return {
        "a": {"name": old["metadata"].get("name"), "version": old["metadata"].get("version")},
        "b": {"name": new["metadata"].get("name"), "version": new["metadata"].get("version")},
        "configs": {k: v for k, v in configs.items() if v},
        "metadata": metadata,
        "metrics": metrics,
        "changelog_added": added,
        "weights_changed": old["weights"] != new["weights"],
    }


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def format_diff(diff: dict[str, Any]) -> str:
    a, b = diff["a"], diff["b"]
    lines = [
        f"{a['name']} {a['version']} -> {b['name']} {b['version']}",
        f"weights: {'changed' if diff['weights_changed'] else 'identical'}",
    ]
    for version, text in diff["changelog_added"].items():
        lines.append(f"changelog {version}: {text}")
    for name, changes in diff["configs"].items():
        lines.append(f"configs/{name}:")
        lines += [f"  {key}: {_short(x)} -> {_short(y)}" for key, x, y in changes]
    if diff["metadata"]:
        lines.append("configs/metadata.json:")
        lines += [f"  {key}: {_short(x)} -> {_short(y)}" for key, x, y in diff["metadata"]]
    if diff["metrics"]:
        lines.append(f"{'metric':<34}{a['version']:>12}{b['version']:>12}{'change':>10}")
        for key, x, y in diff["metrics"]:
            delta = f"{y - x:+.3f}" if isinstance(x, (int, float)) and isinstance(y, (int, float)) else ""
            fx, fy = ("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in (x, y))
            lines.append(f"{key:<34}{fx:>12}{fy:>12}{delta:>10}")
    if len(lines) == 2 and not diff["weights_changed"]:
        lines.append("no differences")
    return "\n".join(lines)


__all__ = ["diff_bundles", "format_diff", "import_bundle", "pack_bundle"]
