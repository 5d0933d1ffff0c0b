"""mkdocs hook: the pages that must not drift from the code are written from it at build time.

``reference/cli.md`` gets the CLI reference rendered from ``medtl.cli.build_parser()`` (every verb and
sub-verb: usage, description, options with their defaults and help), and ``troubleshooting.md`` the
index of every ``MedtlError`` raised with a ``hint=``, read from medtl's source with ``ast`` (the message
pattern, the hint, the module), grouped by topic. Each page holds a marker comment where its part goes;
a page that lost its marker fails the build.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs.structure.pages import Page

CLI_MARKER = "<!-- generated: cli-reference -->"
ERRORS_MARKER = "<!-- generated: error-index -->"
REPO = Path(__file__).resolve().parents[2]
USAGE_WIDTH = 100  # columns of the usage blocks, whatever terminal builds the site
_BASE_ERRORS = {"MedtlError"}
_MAX_VARIANTS = 6  # one message or hint written out at most this many ways (an if/else, a dict of hints)
_OPEN, _CLOSE = "\x00", "\x01"  # around a run-time part in a text pattern; no source string holds them
_SHORT = 28  # a run-time part longer than this shows as {…}

# Modules to topics, first match wins; a module under none of them lands in "Other".
TOPICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("DICOM series and scanning", ("medtl/dicom.py", "medtl/seg.py")),
    (
        "Images, masks and preprocessing",
        ("medtl/nifti.py", "medtl/reader.py", "medtl/loading.py", "medtl/transforms.py", "medtl/cache.py"),
    ),
    ("Label sheets, manifests and public datasets", ("medtl/manifest.py", "medtl/importers.py")),
    ("Networks and pretrained weights", ("medtl/networks.py", "medtl/weights.py", "medtl/encoders.py")),
    ("Adapting, training and reports", ("medtl/adapt/", "medtl/evaluate.py", "medtl/explain.py", "medtl/demo.py")),
    ("Bundles run by MONAI (python -m monai.bundle run)", ("medtl/bundle/components/",)),
    ("Checking, sharing and signing bundles", ("medtl/bundle/",)),
    ("medtl predict and DICOM outputs", ("medtl/predict.py", "medtl/dicomwrite.py", "medtl/errors.py")),
    ("Federated runs (medtl fl)", ("medtl/fl/",)),
    ("Files, run records and privacy", ("medtl/fileio.py", "medtl/runlog.py", "medtl/privacy.py")),
)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Fill the generated part of the two pages that hold a marker."""
    from mkdocs.exceptions import PluginError  # here, so tests can render both parts without mkdocs

    generated = {"reference/cli.md": (CLI_MARKER, cli_reference), "troubleshooting.md": (ERRORS_MARKER, error_index)}
    if page.file.src_uri not in generated:
        return markdown
    marker, render = generated[page.file.src_uri]
    if marker not in markdown:
        raise PluginError(f"{page.file.src_uri}: the marker {marker} is missing, so its generated part has no place")
    return markdown.replace(marker, render())


# --- CLI reference -------------------------------------------------------------------------------------


def commands(parser: argparse.ArgumentParser, name: str = "medtl") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``(full command, parser)`` for ``parser`` and every sub-verb below it, in the order --help lists them."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from commands(sub, f"{name} {verb}")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=USAGE_WIDTH)


def _code_span(text: str) -> str:
    """``text`` as one inline code span, whatever backticks it holds."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _option_line(action: argparse.Action, prog: str) -> str:
    formatter = _formatter(prog)
    if action.option_strings:
        takes_value = action.nargs != 0
        metavar = formatter._format_args(action, action.dest.upper()) if takes_value else ""
        names = f"{', '.join(action.option_strings)} {metavar}".strip()
    else:
        names = action.metavar or action.dest
    notes = []
    if action.required and action.option_strings:
        notes.append("required")
    default = action.default
    if action.option_strings and default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        notes.append(f"default: {_code_span(shown)}")
    help_text = _markdown_text(formatter._expand_help(action)) if action.help else ""
    suffix = f" ({'; '.join(notes)})" if notes else ""
    return f"- {_code_span(names)}{suffix}: {help_text}".rstrip(": ")


def _description(parser: argparse.ArgumentParser) -> str:
    """The description as argparse prints it: ``%(prog)s`` filled only where it appears."""
    text = parser.description or ""
    return text % {"prog": parser.prog} if "%(prog)" in text else text


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """Markdown for every command: its usage, description, sub-verbs and options by --help's groups."""
    if parser is None:
        from medtl.cli import build_parser

        parser = build_parser()
    blocks = []
    for name, command in commands(parser):
        formatter = _formatter(command.prog)
        formatter.add_usage(command.usage, command._actions, command._mutually_exclusive_groups)
        lines = [f"## {name}", "", "```text", formatter.format_help().strip(), "```", ""]
        if _description(command):
            lines += [_markdown_text(_description(command)), ""]
        for group in command._action_groups:
            shown = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            verbs = [a for a in shown if isinstance(a, argparse._SubParsersAction)]
            options = [a for a in shown if not isinstance(a, argparse._SubParsersAction)]
            for action in verbs:
                lines += [f"**{action.metavar or 'commands'}**", ""]
                for choice in action._choices_actions:
                    anchor = f"{name} {choice.dest}".replace(" ", "-")
                    said = _markdown_text(choice.help or "")
                    lines.append(f"- [`{name} {choice.dest}`](#{anchor}): {said}".rstrip(": "))
                lines.append("")
            if options:
                lines += [f"**{group.title}**", ""]
                lines += [_option_line(action, command.prog) for action in options]
                lines.append("")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


# --- error index -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HintEntry:
    """One ``raise SomeError(message, hint=...)`` site: the message and hint as text patterns."""

    topic: str
    module: str  # dotted, e.g. medtl.manifest
    function: str
    messages: tuple[str, ...]
    hints: tuple[str, ...]


def _error_classes(trees: dict[Path, ast.Module]) -> set[str]:
    """``MedtlError`` and every class in medtl deriving from it, by name."""
    names = set(_BASE_ERRORS)
    classes = [node for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    grew = True
    while grew:
        found = {c.name for c in classes if any(ast.unparse(b).split(".")[-1] in names for b in c.bases)}
        grew = not found <= names
        names |= found
    return names


class _Scope:
    """What names mean where a hint is raised: the enclosing function's assignments, then the module's."""

    def __init__(self, module: ast.Module, function: ast.AST | None):
        self.layers = [self._assignments(function)] if function is not None else []
        self.layers.append(self._assignments(module, top_level=True))

    @staticmethod
    def _assignments(node: ast.AST, *, top_level: bool = False) -> dict[str, list[ast.expr]]:
        found: dict[str, list[ast.expr]] = {}
        body = node.body if top_level else list(ast.walk(node))
        for item in body:
            if isinstance(item, ast.Assign | ast.AnnAssign) and item.value is not None:
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        found.setdefault(target.id, []).append(item.value)
        return found

    def lookup(self, name: str) -> list[ast.expr]:
        return next((layer[name] for layer in self.layers if name in layer), [])


def _texts(node: ast.expr | None, scope: _Scope, depth: int = 0) -> list[str]:
    """The text patterns an expression can give, ``{expr}`` standing for what is only known at run time."""
    if node is None or depth > 4:
        return []
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) else []
    if isinstance(node, ast.JoinedStr):
        parts = [
            v.value if isinstance(v, ast.Constant) else _placeholder(v.value)
            for v in node.values
            if isinstance(v, ast.Constant | ast.FormattedValue)
        ]
        return ["".join(parts)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _texts(node.left, scope, depth + 1), _texts(node.right, scope, depth + 1)
        return ["".join(pair) for pair in itertools.islice(itertools.product(left, right), _MAX_VARIANTS)]
    if isinstance(node, ast.IfExp):
        return (_texts(node.body, scope, depth + 1) + _texts(node.orelse, scope, depth + 1))[:_MAX_VARIANTS]
    if isinstance(node, ast.Name):
        values = scope.lookup(node.id)
        texts = [text for value in values for text in _texts(value, scope, depth + 1)]
        return texts[:_MAX_VARIANTS] or [_placeholder(node)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return _call_texts(node, scope, depth)
    return [_placeholder(node)]


def _placeholder(node: ast.expr) -> str:
    """A run-time part of a message, marked so that rendering can set it apart."""
    return _OPEN + ast.unparse(node) + _CLOSE


def _call_texts(node: ast.Call, scope: _Scope, depth: int) -> list[str]:
    """``"sep".join([...literal texts])`` and ``TABLE.get(key, default)`` over a dict of texts."""
    func = node.func
    assert isinstance(func, ast.Attribute)
    if func.attr == "join" and isinstance(func.value, ast.Constant) and node.args:
        items = node.args[0]
        if isinstance(items, ast.List | ast.Tuple):
            parts = [_texts(item, scope, depth + 1)[:1] for item in items.elts]
            if all(parts):
                return [func.value.value.join(part[0] for part in parts)]
    if func.attr == "get" and isinstance(func.value, ast.Name):
        tables = [v for v in scope.lookup(func.value.id) if isinstance(v, ast.Dict)]
        if tables:
            values = [t for v in tables[0].values for t in _texts(v, scope, depth + 1)]
            default = _texts(node.args[1], scope, depth + 1) if len(node.args) > 1 else []
            return (values + default)[:_MAX_VARIANTS]
    return [_placeholder(node)]


def _topic(relative: str) -> str:
    return next((title for title, prefixes in TOPICS if relative.startswith(prefixes)), "Other")


def hint_entries(root: Path = REPO) -> list[HintEntry]:
    """Every error raised with a ``hint=`` in ``root/medtl``, in source order, module by module.

    A hint passed on from a wrapped error (``hint=cause.hint``) is the wrapped error's, indexed where
    that one is raised, so the wrapping site is left out."""
    files = sorted((root / "medtl").rglob("*.py"))
    trees = {path: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for path in files}
    errors = _error_classes(trees)
    entries: list[HintEntry] = []
    for path, tree in trees.items():
        relative = path.relative_to(root).as_posix()
        module = relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        calls = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
        for call in calls:
            hint = next((k.value for k in call.keywords if k.arg == "hint"), None)
            if hint is None or ast.unparse(call.func).split(".")[-1] not in errors:
                continue
            if isinstance(hint, ast.Attribute) and hint.attr == "hint":
                continue
            inside = [f for f in functions if f.lineno <= call.lineno <= (f.end_lineno or f.lineno)]
            function = max(inside, key=lambda f: f.lineno) if inside else None
            scope = _Scope(tree, function)
            message = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "message"), None)
            entries.append(
                HintEntry(
                    topic=_topic(relative),
                    module=module,
                    function=function.name if function else "",
                    messages=tuple(dict.fromkeys(_texts(message, scope))),
                    hints=tuple(dict.fromkeys(_texts(hint, scope))),
                )
            )
    return sorted(entries, key=lambda e: (_topic_order(e.topic), e.module))


def _topic_order(topic: str) -> int:
    titles = [title for title, _ in TOPICS]
    return titles.index(topic) if topic in titles else len(titles)


def _shown(expression: str) -> str:
    """A run-time part as the index shows it: ``{name}``, or ``{…}`` for a long expression."""
    return "{" + (expression if len(expression) <= _SHORT else "…") + "}"


def _pattern(text: str) -> str:
    """A message pattern as one code span, run-time parts as ``{name}``."""
    return _code_span(re.sub(f"{_OPEN}(.*?){_CLOSE}", lambda m: _shown(m.group(1)), text, flags=re.S))


def _prose(text: str) -> str:
    """A hint as Markdown: run-time parts as code, characters Markdown would take as markup escaped."""
    pieces = []
    for i, part in enumerate(re.split(f"{_OPEN}(.*?){_CLOSE}", text, flags=re.S)):
        if i % 2:
            pieces.append(_code_span(_shown(part)))
            continue
        pieces.append(_markdown_text(part))
    return "".join(pieces)


def _markdown_text(text: str) -> str:
    """Plain text as Markdown: what Markdown would take as markup escaped, code spans the text writes kept."""
    spans = re.split(r"(`[^`]*`)", text)
    return "".join(span if i % 2 else re.sub(r"([\\*_<>\[\]])", r"\\\1", span) for i, span in enumerate(spans))


def error_index(entries: list[HintEntry] | None = None) -> str:
    """Markdown of the hint index: one section per topic, one item per raise site."""
    entries = hint_entries() if entries is None else entries
    lines: list[str] = []
    for topic, group in itertools.groupby(entries, key=lambda e: e.topic):
        lines += [f"### {topic}", ""]
        for entry in group:
            message = " / ".join(_pattern(m) for m in entry.messages) or "(message built at run time)"
            where = f"`{entry.module}`" + (f", `{entry.function}`" if entry.function else "")
            lines.append(f"- {message}  ")
            lines.append(f"  **hint:** {' / '.join(_prose(h) for h in entry.hints)}  ")
            lines.append(f"  <small>{where}</small>")
        lines.append("")
    return "\n".join(lines)
