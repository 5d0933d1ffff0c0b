"""Run model-zoo's own CI checks on every medtl bundle, in a model-zoo-shaped tree.

model-zoo is not vendored: pass the path of a checkout (``git clone
https://github.com/Project-MONAI/model-zoo``) as ``--model-zoo`` or in ``MEDTL_MODEL_ZOO``. In a temporary
folder this builds what a pull request to model-zoo would hold, ``models/<model-zoo name>/`` per bundle
(``model_zoo_name``: the task last, ``classification`` in the folder name, which is how MONAI Label
picks a bundle's type), then runs, from the checkout and as its CI does:

1. the pre-commit hooks model-zoo configures from pre-commit-hooks (``HOOKS``, with the args and
   excludes of its ``.pre-commit-config.yaml``), on the staged files of a fresh git repository;
2. ``ci/get_bundle_requirements.py`` (the pins its CI installs), compared with this environment;
3. ``ci/verify_bundle.py -m min`` per bundle (CPU premerge) and, with ``--mode full``, the default
   mode of its GPU premerge (metadata, network in/out, TorchScript export), which runs on CPU too.

The weights are not in the committed tree: as model-zoo asks, each bundle's ``large_files.yml`` names
them, here with ``file://`` URLs into a ``release/`` folder beside the tree standing in for the release
they would be uploaded to, and ``verify_bundle.py`` downloads them from there and checks their sha256.
The ``tumor_cls_*`` templates are exported by ``export_bundle`` with their ``network_def``'s random
initial weights; ``lidc_nodule_malignancy`` is copied as shipped. Two steps of model-zoo's CI need the
network and are replaced: ``prepare_schema.py`` downloads the metadata schema (medtl ships the same
file, copied to ``eval/schema.json`` as that script would) and its CI pip-installs the pins (this
environment is used; step 2 says where it differs).

Usage: ``.venv/bin/python scripts/model_zoo_check.py --model-zoo ../model-zoo [--mode full] [--keep DIR]``
(needs ``pip install 'medtl[model-zoo]'`` for the hooks). Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from monai.bundle import ConfigParser

import medtl
from medtl.bundle.export import export_bundle
from medtl.bundle.files import LARGE_FILES, bundle_files
from medtl.bundle.templates import template_dir, template_names

ENV_VAR = "MEDTL_MODEL_ZOO"
#: model-zoo's pre-commit hooks from pre-commit-hooks that judge bundle files: hook id -> (console
#: script, the files it takes as pre-commit's ``types`` select them). The others model-zoo configures
#: look at Python, TOML, executables or submodules, which no medtl bundle holds.
HOOKS = {
    "pretty-format-json": ("pretty-format-json", "json"),
    "check-added-large-files": ("check-added-large-files", "file"),
    "check-yaml": ("check-yaml", "yaml"),
    "end-of-file-fixer": ("end-of-file-fixer", "text"),
    "trailing-whitespace": ("trailing-whitespace-fixer", "text"),
    "mixed-line-ending": ("mixed-line-ending", "text"),
    "detect-private-key": ("detect-private-key", "text"),
    "check-case-conflict": ("check-case-conflict", "file"),
}
SUFFIXES = {"json": (".json",), "yaml": (".yml", ".yaml")}
#: Replaces the header of medtl's large_files.yml, whose urls are empty until a release exists.
RELEASE_NOTE = "# file:// urls: a local folder standing in for the release (scripts/model_zoo_check.py)."
TIMEOUT_S = 900


@dataclass
class Step:
    """One check: what ran, whether it passed, the tail of what it printed."""

    name: str
    passed: bool
    output: str = ""


@dataclass
class Report:
    tree: Path
    bundles: dict[str, str] = field(default_factory=dict)  # model-zoo name -> medtl name
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(step.passed for step in self.steps)


def model_zoo_name(name: str) -> str:
    """The bundle's folder name in model-zoo: its task last, as model-zoo names bundles
    (``spleen_ct_segmentation``), and ``classification`` in it, from which MONAI Label's bundle infer
    task takes its type (a name without it is run as segmentation).

    Examples:
        >>> model_zoo_name("tumor_cls_source"), model_zoo_name("lidc_nodule_malignancy")
        ('tumor_source_classification', 'lidc_nodule_malignancy_classification')
    """
    stem = "_".join(part for part in name.split("_") if part not in ("cls", "classification"))
    return f"{stem}_classification"


def model_zoo_checkout(path: str | os.PathLike | None = None) -> Path | None:
    """The model-zoo checkout named by ``path`` or ``MEDTL_MODEL_ZOO``; None when neither names one
    holding ``ci/verify_bundle.py``."""
    path = path or os.environ.get(ENV_VAR)
    if not path or not (Path(path) / "ci" / "verify_bundle.py").is_file():
        return None
    return Path(path).resolve()


def _export_template(name: str, dest: Path) -> None:
    """The template as ``export_bundle`` ships it, with its own ``network_def``'s initial weights."""
    parser = ConfigParser()
    parser.read_config(template_dir(name) / "configs" / "inference.json")
    torch.manual_seed(0)
    export_bundle(parser.get_parsed_content("network_def"), dest, template=name)


def _copy_shipped(src: Path, dest: Path) -> None:
    for rel in bundle_files(src):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dest / rel)


def publish_large_files(bundle: Path, release: Path) -> None:
    """Move the files ``large_files.yml`` lists to ``release`` and point its URLs there, so the
    committed tree holds only the list, as model-zoo asks of files over its size limit."""
    text = (bundle / LARGE_FILES).read_text(encoding="utf-8")
    for entry in yaml.safe_load(text)["large_files"]:
        target = release / bundle.name / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(bundle / entry["path"], target)
        url = json.dumps(target.as_uri())
        text, n = re.subn(
            rf'(- path: {re.escape(json.dumps(entry["path"]))}\n\s+url: )"[^"\n]*"',
            lambda m, url=url: m.group(1) + url,
            text,
        )
        if n != 1:
            raise ValueError(f"{bundle.name}/{LARGE_FILES}: no url line for {entry['path']}")
    body = text[text.index("large_files:") :]
    (bundle / LARGE_FILES).write_text(f"{RELEASE_NOTE}\n{body}", encoding="utf-8")


def _add_schema(bundle: Path) -> None:
    """``eval/schema.json`` as model-zoo's ``prepare_schema.py`` writes it, from medtl's copy of the
    schema the metadata names (that script downloads it)."""
    url = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))["schema"]
    schema = Path(medtl.__file__).parent / "schemas" / url.rsplit("/", 1)[-1]
    if not schema.is_file():
        raise FileNotFoundError(
            f"{bundle.name}: no local copy of {url}; run model-zoo's ci/prepare_schema.py with network access"
        )
    (bundle / "eval").mkdir(exist_ok=True)
    shutil.copyfile(schema, bundle / "eval" / "schema.json")


def build_tree(root: Path, model_zoo: Path) -> dict[str, str]:
    """``root/models/<model-zoo name>/`` for every bundle (weights moved to ``root/release/``), with
    model-zoo's ``models/model_info.json`` beside them (its CI refuses a version already published).
    Returns model-zoo name -> medtl name."""
    models, release = root / "models", root / "release"
    models.mkdir(parents=True)
    shutil.copyfile(model_zoo / "models" / "model_info.json", models / "model_info.json")
    shutil.copyfile(model_zoo / ".gitignore", root / ".gitignore")  # what a pull request would leave out
    names = {}
    for name in template_names():
        dest = models / model_zoo_name(name)
        if (template_dir(name) / "models" / "model.pt").is_file():
            _copy_shipped(template_dir(name), dest)
        else:
            _export_template(name, dest)
        publish_large_files(dest, release)
        names[dest.name] = name
    return names


def _run(cmd: list[str], cwd: Path) -> tuple[bool, str]:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    return done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def _hook_config(model_zoo: Path) -> tuple[str | None, str, dict[str, dict]]:
    """model-zoo's global exclude, the pre-commit-hooks release it pins and its hooks from there
    (id -> args, exclude)."""
    config = yaml.safe_load((model_zoo / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    repo = next(r for r in config["repos"] if r["repo"].endswith("/pre-commit/pre-commit-hooks"))
    return config.get("exclude"), str(repo.get("rev", "")), {hook["id"]: hook for hook in repo["hooks"]}


def _is_text(path: Path) -> bool:
    return b"\0" not in path.read_bytes()[:8192]


def _selected(files: list[str], root: Path, kind: str, excludes: list[str | None]) -> list[str]:
    out = [f for f in files if not any(e and re.search(e, f) for e in excludes)]
    if kind in SUFFIXES:
        return [f for f in out if f.endswith(SUFFIXES[kind])]
    return [f for f in out if _is_text(root / f)] if kind == "text" else out


def hooks_version(model_zoo: Path) -> str:
    """The pre-commit-hooks release installed here against the one model-zoo pins (the hooks' output
    may change between releases)."""
    try:
        installed = importlib.metadata.version("pre-commit-hooks")
    except importlib.metadata.PackageNotFoundError:
        installed = "not installed"
    return f"pre-commit-hooks {installed} (model-zoo pins {_hook_config(model_zoo)[1]})"


def run_hooks(root: Path, model_zoo: Path) -> list[Step]:
    """The ``HOOKS`` model-zoo configures, on the files ``git add`` stages in ``root`` (pre-commit runs
    them on a commit's staged files; ``check-added-large-files`` looks only at added ones)."""
    _run(["git", "init", "-q"], root)
    ok, out = _run(["git", "add", "models"], root)
    if not ok:
        return [Step("git add", False, out)]
    files = subprocess.run(
        ["git", "diff", "--cached", "--name-only", "-z"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    files = [f for f in files if f]
    exclude, _, configured = _hook_config(model_zoo)
    steps = []
    for hook_id, (script, kind) in HOOKS.items():
        if hook_id not in configured:
            continue
        exe = shutil.which(script, path=str(Path(sys.executable).parent)) or shutil.which(script)
        if exe is None:
            steps.append(Step(f"hook {hook_id}", False, f"{script} not found: pip install 'medtl[model-zoo]'"))
            continue
        chosen = _selected(files, root, kind, [exclude, configured[hook_id].get("exclude")])
        passed, out = _run([exe, *configured[hook_id].get("args", []), *chosen], root) if chosen else (True, "no files")
        steps.append(Step(f"hook {hook_id} ({len(chosen)} files)", passed, out))
    return steps


def _base(version: str) -> str:
    return version.split("+")[0]


def check_requirements(root: Path, model_zoo: Path, bundle: str) -> Step:
    """The pins model-zoo's CI would ``pip install`` for the bundle, against this environment. It
    passes when each is installed at that version; medtl is not on PyPI, so there CI would fail."""
    ok, out = _run(
        [sys.executable, str(model_zoo / "ci" / "get_bundle_requirements.py"), "-b", bundle, "-p", "models"], root
    )
    if not ok:
        return Step(f"{bundle}: get_bundle_requirements.py", False, out)
    lines = (root / out.strip().splitlines()[-1]).read_text(encoding="utf-8").split()
    notes = []
    for line in lines:
        name, _, pinned = line.partition("==")
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or _base(installed) != pinned:
            notes.append(f"{line}: installed {installed}")
    return Step(f"{bundle}: pins {' '.join(lines)}", not notes, "; ".join(notes))


def verify(root: Path, model_zoo: Path, bundle: str, mode: str) -> Step:
    """``ci/verify_bundle.py`` from the checkout, as model-zoo's CI calls it, on the tree's bundle."""
    ok, out = _run(
        [sys.executable, str(model_zoo / "ci" / "verify_bundle.py"), "-b", bundle, "-p", "models", "-m", mode], root
    )
    return Step(f"{bundle}: verify_bundle.py -m {mode}", ok, out)


def check(model_zoo: Path, root: Path, modes: tuple[str, ...] = ("min",)) -> Report:
    """Build the tree in ``root`` (empty or absent) and run every check; see the module docstring."""
    report = Report(root, build_tree(root, model_zoo), notes=[hooks_version(model_zoo)])
    report.steps += run_hooks(root, model_zoo)
    for bundle in report.bundles:
        _add_schema(root / "models" / bundle)  # after the hooks: CI writes it, no pull request holds it
    for bundle in report.bundles:
        report.steps.append(check_requirements(root, model_zoo, bundle))
        report.steps += [verify(root, model_zoo, bundle, mode) for mode in modes]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-zoo", help=f"a model-zoo checkout (default: ${ENV_VAR})")
    parser.add_argument(
        "--mode",
        choices=("min", "full"),
        action="append",
        help="verify_bundle.py mode; repeat for both (default: min, the CPU premerge)",
    )
    parser.add_argument("--keep", help="build the tree in this (new) folder and keep it")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each check's output")
    args = parser.parse_args(argv)
    model_zoo = model_zoo_checkout(args.model_zoo)
    if model_zoo is None:
        parser.error(
            f"no model-zoo checkout: pass --model-zoo or set {ENV_VAR} "
            "(git clone https://github.com/Project-MONAI/model-zoo)"
        )
    with tempfile.TemporaryDirectory(prefix="model-zoo-tree-") as tmp:
        report = check(model_zoo, Path(args.keep) if args.keep else Path(tmp), tuple(args.mode or ["min"]))
        for step in report.steps:
            print(f"{'PASS' if step.passed else 'FAIL'}  {step.name}")
            if args.verbose or not step.passed:
                print("      " + step.output.strip().replace("\n", "\n      "))
    print(f"bundles: {', '.join(f'{zoo} ({name})' for zoo, name in report.bundles.items())}")
    print("\n".join(report.notes))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
