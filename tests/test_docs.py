"""The README and the user guide say what medtl does: the README's quick start runs as written, every
README command is run somewhere, the site builds in strict mode with a CLI reference holding every
option and links that resolve, and a built page renders in a headless browser without a network."""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from medtl.bundle.templates import TEMPLATES
from medtl.cli import build_parser
from medtl.fileio import utf8_child_env

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
QUICK_START = "## Your own data in five steps"
# The quick start's one long step, shortened for a test: the value the README shows is replaced, no flag added.
SHORTENED = {"--epochs": "1"}
# README commands too long for any test to run as written, and the test that runs them scaled down.
RUN_SCALED_DOWN = {
    ".venv/bin/medtl demo": ("tests/test_cli.py", "def test_demo_runs_the_whole_job_and_prints_where_everything_is"),
}
DOCS_INSTALLED = all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings_handlers"))


def _hook():
    """docs/hooks/reference.py as mkdocs loads it (by path, registered in sys.modules)."""
    if "medtl_docs_hook" not in sys.modules:
        spec = importlib.util.spec_from_file_location("medtl_docs_hook", REPO / "docs" / "hooks" / "reference.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["medtl_docs_hook"] = module
        spec.loader.exec_module(module)
    return sys.modules["medtl_docs_hook"]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def _commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def _quick_start() -> list[str]:
    text = README.read_text(encoding="utf-8")
    assert QUICK_START in text, f"README.md lost its section {QUICK_START!r}"
    section = text.split(QUICK_START, 1)[1].split("\n## ", 1)[0]
    blocks = _bash_blocks(section)
    assert len(blocks) == 1, "the quick start is one bash block"
    return _commands(blocks[0])


def _shortened(command: str) -> str:
    words = shlex.split(command)
    for i, word in enumerate(words[:-1]):
        if word in SHORTENED:
            words[i + 1] = SHORTENED[word]
    return shlex.join(words)


# --- the README ----------------------------------------------------------------------------------------


def _steps(command: str) -> list[str]:
    """``a && b`` -> ``["a", "b"]``, each written as _commands writes a command."""
    words, steps = shlex.split(command), [[]]
    for word in words:
        steps.append([]) if word == "&&" else steps[-1].append(word)
    return [shlex.join(step) for step in steps if step]


def test_readme_is_a_landing_page_whose_commands_all_run_somewhere():
    """Setup, test and docs commands run in .ci/run as written; the quick start in the test below."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 110
    ci_lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    ci = {step for line in ci_lines if line.strip() and not line.startswith("#") for step in _steps(line)}
    quick_start = _quick_start()
    assert quick_start and all(c.startswith("medtl ") for c in quick_start)
    for block in _bash_blocks(text):
        for command in _commands(block):
            if command in quick_start:
                continue
            for step in _steps(command):
                if step in RUN_SCALED_DOWN:
                    test_file, test = RUN_SCALED_DOWN[step]
                    assert test in (REPO / test_file).read_text(encoding="utf-8"), f"{step}: {test} is gone"
                else:
                    assert step in ci, f"README command {step!r} is run by no test and not by .ci/run"


def _github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (the README is read there)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_readme_links_and_anchors_resolve():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if urlsplit(link).scheme:
            continue
        path, _, anchor = link.partition("#")
        target = REPO / path
        assert target.is_file(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {_github_slug(h) for h in headings}, f"README links to {link}: no such heading"


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(demo_with_unlabeled, tmp_path):
    """The quick-start commands, parsed from the README, on the demo cohort's site B laid out as a user's
    folder: dicom/, masks/, labels.csv, the received LIDC bundle as a zip, and new series with a masks table."""
    site = tmp_path / "site"
    shutil.copytree(Path(demo_with_unlabeled["out"]) / "site_B", site)
    env = utf8_child_env()
    env["PATH"] = f"{Path(sys.executable).parent}{':' + env['PATH'] if env.get('PATH') else ''}"
    sender = TEMPLATES / "lidc_nodule_malignancy"
    _run(["medtl", "-q", "bundle", "pack", str(sender), "-o", "lidc_nodule_malignancy.zip"], site, env)
    site_a = Path(demo_with_unlabeled["out"]) / "site_A"
    new = sorted(p.name for p in (site_a / "dicom").iterdir())[:2]
    with (site / "new_masks.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["series", "mask"])
        for name in new:
            shutil.copytree(site_a / "dicom" / name, site / "new_dicom" / name)
            shutil.copy(site_a / "masks" / f"{name}.nii.gz", site / f"new_{name}.nii.gz")
            writer.writerow([name, f"new_{name}.nii.gz"])

    for command in _quick_start():
        _run(["bash", "-c", _shortened(command)], site, env)

    sent = json.loads((sender / "configs" / "metadata.json").read_text(encoding="utf-8"))
    major, minor, _ = (int(v) for v in sent["version"].split("."))
    version = f"{major}.{minor + 1}.0"
    adapted = site / "medtl-adapt" / "lidc_nodule_malignancy"
    meta = json.loads((adapted / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["version"] == version and f"`lidc_nodule_malignancy` {version}" in README.read_text(encoding="utf-8")
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == ["benign", "malignant"]
    assert (site / "medtl-adapt" / "report" / "report.html").is_file()
    with (site / "medtl-predictions" / "predictions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(new) and {r["pred"] for r in rows} <= {"benign", "malignant"}
    assert (site / f"lidc_nodule_malignancy_{version}.zip").is_file()


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run a command as a user would in ``cwd``; fail the test with its output on error."""
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=900
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


# --- the generated pages ------------------------------------------------------------------------------


def _every_option() -> dict[str, list[str]]:
    """Each command's option strings and positional names, as --help lists them."""
    import argparse

    found = {}
    for name, parser in _hook().commands(build_parser()):
        found[name] = [
            flag
            for action in parser._actions
            if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
            for flag in (action.option_strings or [action.metavar or action.dest])
        ]
    return found


def test_cli_reference_renders_every_verb_and_option():
    page = _hook().cli_reference(build_parser())
    options = _every_option()
    assert {"medtl adapt", "medtl manifest build", "medtl bundle pack", "medtl weights inspect"} <= set(options)
    for name, flags in options.items():
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0] if name != "medtl" else page
        assert f"usage: {name}" in section
        for flag in flags:
            assert flag in section, f"{name}: {flag} missing from the CLI reference"


PLANTED = """
from medtl.errors import MedtlError

class TableError(MedtlError):
    pass

class RowError(TableError):
    pass

_HINT = "give a UTF-8 table"
_BY_CODE = {1: "free disk space", 2: "check permissions"}

def read(path, code, rows, hinted):
    raise TableError("cannot read the table", path=path, hint=_HINT)

def row(n, width):
    hint = f"rows need {width} columns"
    raise RowError(f"row {n} is short", hint=hint)

def write(code):
    raise MedtlError("cannot write", hint=_BY_CODE.get(code, "check the folder"))

def check(rows, hinted):
    raise MedtlError("bad " + "rows", hint=None if hinted else "; ".join(["fix them", "run again"]))

def rewrap(cause):
    raise MedtlError(cause.message, hint=cause.hint)

def no_hint():
    raise MedtlError("no hint here")

def not_an_error():
    return dict(message="x", hint="y")
"""


def test_error_index_reads_every_hint_from_the_source(tmp_path):
    """Constants, f-strings, module constants, local variables, if/else, joins and dict lookups become
    text patterns; a re-raised hint and errors without a hint are left out; subclasses are found."""
    (tmp_path / "medtl").mkdir()
    (tmp_path / "medtl" / "tables.py").write_text(PLANTED, encoding="utf-8")
    entries = {e.function: e for e in _hook().hint_entries(tmp_path)}
    assert set(entries) == {"read", "row", "write", "check"}
    assert entries["read"].hints == ("give a UTF-8 table",) and entries["read"].messages == ("cannot read the table",)
    assert entries["row"].messages == ("row \x00n\x01 is short",) and entries["row"].hints == (
        "rows need \x00width\x01 columns",
    )
    assert entries["write"].hints == ("free disk space", "check permissions", "check the folder")
    assert entries["check"].messages == ("bad rows",) and entries["check"].hints == ("fix them; run again",)
    assert {e.module for e in entries.values()} == {"medtl.tables"}
    text = _hook().error_index(list(entries.values()))
    assert "`row {n} is short`" in text and "rows need `{width}` columns" in text


def test_error_index_covers_medtls_own_hints():
    entries = _hook().hint_entries()
    hinted = 0
    for path in (REPO / "medtl").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            hint = next((k.value for k in call.keywords if k.arg == "hint"), None)
            if hint is not None and not (isinstance(hint, ast.Attribute) and hint.attr == "hint"):
                hinted += ast.unparse(call.func).endswith("Error")
    assert len(entries) == hinted > 100
    assert all(e.hints and e.messages for e in entries)
    text = _hook().error_index(entries)
    assert "**hint:** e.g. --classes benign,malignant" in text
    assert "### Other" not in text, "a module outside every topic: add it to TOPICS in docs/hooks/reference.py"


# --- the built site ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``mkdocs build --strict`` of the user guide, as CI runs it (about 10 s)."""
    if not DOCS_INSTALLED:
        pytest.skip("the docs extra is not installed (pip install -e '.[docs]'), so the site cannot build")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env={**utf8_child_env(), "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


class _Page(HTMLParser):
    """The ids a page defines and the local links and resources it refers to."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(found["id"])
        for name in ("href", "src"):
            if found.get(name) and tag in ("a", "link", "script", "img"):
                self.refs.append(found[name])


def _parsed(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.mark.slow
def test_site_builds_with_every_option_and_no_broken_internal_link(site):
    cli = (site / "reference" / "cli.html").read_text(encoding="utf-8")
    for name, flags in _every_option().items():
        assert f'id="{name.replace(" ", "-")}"' in cli, name
        for flag in flags:
            assert f"{flag}" in cli, f"{name}: {flag} missing from the built CLI reference"
    troubleshooting = (site / "troubleshooting.html").read_text(encoding="utf-8")
    assert troubleshooting.count("<strong>hint:</strong>") == len(_hook().hint_entries())

    site = site.resolve()
    pages = {path.resolve(): _parsed(path) for path in site.rglob("*.html")}
    broken, anchors = [], 0
    for path, page in pages.items():
        for ref in page.refs:
            parts = urlsplit(ref)
            if parts.scheme or parts.netloc:
                assert parts.scheme in ("http", "https", "mailto", "data"), f"{path.name}: {ref}"
                assert not ref.endswith((".js", ".css", ".woff", ".woff2")), f"{path.name} loads {ref} from elsewhere"
                continue
            if parts.path.startswith("/"):  # 404.html's paths, from the server's root
                target = site / unquote(parts.path).lstrip("/")
            else:
                target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{path.relative_to(site)}: {ref}")
            elif parts.fragment and target in pages:
                anchors += 1
                if parts.fragment not in pages[target].ids:
                    broken.append(f"{path.relative_to(site)}: {ref} (no such anchor)")
    assert not broken, "\n".join(broken)
    assert anchors > 100  # the check reached the anchors (table-of-contents, CLI and API links among them)
    # the site is self-contained: no stylesheet, script or font from another host
    for path, page in pages.items():
        loaded = [r for r in page.refs if urlsplit(r).scheme and r.endswith((".css", ".js"))]
        assert not loaded, f"{path.name} loads {loaded}"


@pytest.mark.slow
def test_a_built_page_renders_offline_in_a_headless_browser(site, tmp_path):
    """The CLI reference in Chromium (Qt WebEngine): the theme's scripts run, the offline search finds
    pages, and nothing is requested from outside the site's folder."""
    if importlib.util.find_spec("PyQt6") is None or importlib.util.find_spec("PyQt6.QtWebEngineWidgets") is None:
        pytest.skip("no headless browser: PyQt6-WebEngine (in the docs extra) is not installed")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_page.py"), str(site / "reference" / "cli.html")]
        + ["--search", "manifest", "--screenshot", str(tmp_path / "cli.png")],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=utf8_child_env(),
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = json.loads(done.stdout)
    assert shown["loaded"] and not shown.get("timed_out"), shown
    assert shown["title"].startswith("Command line") and shown["h1"].startswith("Command line")
    assert shown["theme_script_ran"] and shown["nav_links"] > 20
    assert shown["code_blocks"] >= len(_every_option())  # one usage block per command
    assert any("own-data.html" in href for href in shown["search_results"]), shown["search_results"]
    assert shown["outside_requests"] == [] and shown["console_errors"] == [], shown
    assert (tmp_path / "cli.png").stat().st_size > 10_000
