"""Read a received bundle's configs as data: accept only a small, declared subset of MONAI's syntax.

MONAI evaluates ``$`` expressions with Python's ``eval``, imports any ``_target_`` by its dotted
name, expands ``%`` macros from other files and hands ``logging.conf`` to ``fileConfig``, which
evaluates parts of it. Listing what is dangerous in arbitrary Python cannot be complete, so this
module does the opposite: it parses every value with ``ast`` and accepts only

- literals, ``@`` references inside the bundle and ``%`` macros without a file part;
- in ``$`` expressions: arithmetic, comparison, boolean logic, conditional expressions, f-strings,
  lists, tuples, dicts, indexing and slicing; calls only to the exact dotted names of
  ``allowlist.CALLS``; module attributes only from ``allowlist.VALUES``; on references, only the
  methods and fields of ``allowlist.METHODS``/``FIELDS``;
- ``_target_`` only from ``allowlist.TARGETS`` (a bare MONAI name only when MONAI resolves it to
  the same object), ``_mode_`` only ``default`` or ``callable``; a key ``a#_target_`` (MONAI sets
  it at that id) or ``+a`` (merged into ``a``) is judged by its last part;
- arguments that switch safe loading off (``weights_only``, ``allow_pickle``, ``reader``,
  ``trust``) refused wherever they appear;
- ``metadata.json``: plain values only; ``logging.conf``: a fixed handler set, no interpolation;
- at most ``MAX_VALUES`` values in one config (a YAML alias bomb is refused before it is walked).

Everything else (imports, lambdas, comprehensions, names, dunder or other attributes, starred
arguments, walrus) is refused with the file, the key and the reason. See ``docs/bundle-safety.md``.
"""

from __future__ import annotations

import ast
import configparser
import functools
import importlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from monai.bundle.config_item import ComponentLocator

from medtl.bundle.allowlist import ARGUMENT_RULES, CALLS, DENIED_KEYWORDS, FIELDS, METHODS, TARGETS, VALUES

#: MONAI's reference syntax (``ReferenceResolver.id_matcher``): ``@`` then ids joined by ``#`` or ``::``.
_REFERENCE = re.compile(r"@(?:\w*)(?:(?:#|::)\w*)*")
_CLEAN_REFERENCE = re.compile(r"@\w+(?:(?:#|::)\w+)*")
_CLEAN_MACRO = re.compile(r"%\w+(?:(?:#|::)\w+)*")
_REF_PREFIX = "_medtl_ref_"
_MAX_EXPRESSION = 2000
#: Values (mapping entries and list items, nested) a config may hold before it is refused unread.
MAX_VALUES = 100_000
_MODES = frozenset({"default", "callable"})
_SPECIAL_KEYS = frozenset({"_target_", "_mode_", "_requires_", "_disabled_", "_desc_"})
_OPERATORS = (
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.And,
    ast.Or,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.Is,
    ast.IsNot,
    ast.In,
    ast.NotIn,
)
_STRUCTURE = (
    ast.Expression,
    ast.Constant,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.IfExp,
    ast.Subscript,
    ast.Slice,
    ast.List,
    ast.Tuple,
    ast.Dict,
    ast.JoinedStr,
    ast.FormattedValue,
    ast.Load,
    ast.keyword,
)


@dataclass(frozen=True)
class Finding:
    """One value outside the accepted subset: where it is, its text, and why it is refused."""

    file: str
    where: str
    text: str
    reason: str

    def __str__(self) -> str:
        text = self.text if len(self.text) <= 120 else self.text[:117] + "..."
        return f"{self.file} {self.where}: {text!r}: {self.reason}"


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _on_reference(node: ast.AST) -> bool:
    """A reference, or an index into one (``@prepared['items']``)."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return isinstance(node, ast.Name) and node.id.startswith(_REF_PREFIX)


class _Expression:
    """Checks one parsed expression node by node; collects the reasons it is refused."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def refuse(self, reason: str) -> None:
        self.problems.append(reason)

    def check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Call):
            self._call(node)
        elif isinstance(node, ast.Attribute):
            self._attribute(node)
        elif isinstance(node, ast.Name):
            if not node.id.startswith(_REF_PREFIX):
                self.refuse(f"name {node.id!r} is not allowed (only @references, and allow-listed calls)")
        elif isinstance(node, ast.BinOp | ast.UnaryOp | ast.BoolOp | ast.Compare):
            ops = node.ops if isinstance(node, ast.Compare) else [node.op]
            bad = [type(op).__name__ for op in ops if not isinstance(op, _OPERATORS)]
            if bad:
                self.refuse(f"operator {bad[0]} is not allowed")
            self._children(node, skip=ops)
        elif isinstance(node, ast.FormattedValue) and node.conversion not in (-1, ord("s"), ord("r")):
            self.refuse("f-string conversion is not allowed")
        elif isinstance(node, _STRUCTURE):
            self._children(node)
        else:
            self.refuse(f"{type(node).__name__} is not allowed in a config expression")

    def _children(self, node: ast.AST, skip: list[ast.AST] = ()) -> None:
        for child in ast.iter_child_nodes(node):
            if child not in skip and not isinstance(
                child, ast.expr_context | ast.operator | ast.unaryop | ast.boolop | ast.cmpop
            ):
                self.check(child)

    def _attribute(self, node: ast.Attribute) -> None:
        if _on_reference(node.value):
            if node.attr not in FIELDS:
                self.refuse(f"field {node.attr!r} of a reference is not allowed (allowed: {', '.join(sorted(FIELDS))})")
            self.check(node.value)
            return
        name = _dotted(node)
        if name not in VALUES:
            self.refuse(f"{name or node.attr!r} is not an allowed value (attribute access is limited to an exact list)")

    def _call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and _on_reference(func.value):
            if func.attr not in METHODS:
                self.refuse(
                    f"method {func.attr!r} of a reference is not allowed (allowed: {', '.join(sorted(METHODS))})"
                )
            self.check(func.value)
        else:
            name = _dotted(func)
            if name not in CALLS:
                self.refuse(
                    f"call to {name or type(func).__name__!r} is not allowed (only the exact callables in "
                    "medtl.bundle.allowlist.CALLS)"
                )
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                self.refuse("starred arguments are not allowed")
            else:
                self.check(arg)
        for keyword in node.keywords:
            if keyword.arg is None:
                self.refuse("** arguments are not allowed")
            elif keyword.arg in DENIED_KEYWORDS:
                self.refuse(f"keyword {keyword.arg}= switches a safety check off")
            elif keyword.arg in ARGUMENT_RULES and (reason := ARGUMENT_RULES[keyword.arg](_literal(keyword.value))):
                self.refuse(reason)
            self.check(keyword.value)


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return node  # not a literal: the argument rules refuse anything but their literal


def audit_expression(expression: str) -> list[str]:
    """Reasons why the ``$`` expression (without its ``$``) is outside the accepted subset; empty if accepted."""
    if len(expression) > _MAX_EXPRESSION:
        return [f"longer than {_MAX_EXPRESSION} characters"]
    refs = _REFERENCE.findall(expression)
    if any(not _CLEAN_REFERENCE.fullmatch(r) for r in refs):
        return ["a relative or empty @reference (only @id#id... within the bundle)"]
    text = _REFERENCE.sub(lambda m: _REF_PREFIX + re.sub(r"\W", "_", m.group(0)[1:]), expression.strip())
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, SyntaxError) else exc.__class__.__name__
        statement = text.lstrip().startswith(("import ", "from "))
        return ["import statements are not allowed" if statement else f"not a Python expression ({reason})"]
    checker = _Expression()
    try:
        checker.check(tree)
        checker.problems += _path_problems(tree)
    except RecursionError:
        return ["nested too deeply"]
    return list(dict.fromkeys(checker.problems))


#: Text that starts a path at the root, a drive or home, or climbs with ``..``.
_ROOTED = re.compile(r"^(?:[/\\~]|[A-Za-z]:[/\\])")
_CLIMBS = re.compile(r"(?:^|[/\\])\.\.(?:[/\\]|$)")


def _sum_operands(node: ast.AST) -> list[ast.AST]:
    """``a + b + c`` (parsed as ``(a + b) + c``) as ``[a, b, c]``."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return [*_sum_operands(node.left), node.right]
    return [node]


def _path_problems(tree: ast.AST) -> list[str]:
    """Allow-listed savers write where their path arguments say, so an expression may build a path
    only under the bundle: text starting at the root or home counts only after ``@bundle_root +``,
    and ``..`` never."""
    anchored: set[int] = set()
    for node in ast.walk(tree):
        operands = _sum_operands(node)
        first = operands[0]
        if len(operands) > 1 and isinstance(first, ast.Name) and first.id == _REF_PREFIX + "bundle_root":
            anchored.update(id(n) for op in operands[1:] for n in ast.walk(op))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _CLIMBS.search(node.value):
                problems.append(f"{node.value!r} climbs out of the bundle with '..'")
            elif _ROOTED.match(node.value) and id(node) not in anchored:
                problems.append(
                    f"{node.value!r} starts a path outside the bundle (only @bundle_root + '/...' builds paths)"
                )
    return problems


def path_findings(config: Any, file: str) -> list[Finding]:
    """The values of ``config`` that name a path outside the bundle, by the audit's own rules: a
    plain value rooted at ``/``, ``~`` or a drive, or holding ``..``; an expression building one
    other than after ``@bundle_root +`` (``medtl bundle verify`` shows them as its own check)."""
    findings = []
    for where, value in string_values(config):
        if value.startswith("$"):
            try:
                problems = _path_problems(ast.parse(value[1:], mode="eval"))
            except SyntaxError:
                problems = []  # the expression audit reports it
        else:
            problems = (
                ["a path outside the bundle (use @bundle_root + '/...', or a command-line argument)"]
                if (_CLIMBS.search(value) or _ROOTED.match(value))
                else []
            )
        findings += [Finding(file, where, value, reason) for reason in problems]
    return findings


def string_values(config: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a config with its id path (``a#b#0``)."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            yield from string_values(value, f"{where}#{key}" if where else str(key))
    elif isinstance(config, list):
        for i, value in enumerate(config):
            yield from string_values(value, f"{where}#{i}")
    elif isinstance(config, str):
        yield where, config


@functools.cache
def _bare_target(name: str) -> str | None:
    """The allow-listed component MONAI's ``ComponentLocator`` resolves a bare ``_target_`` to, or None."""
    candidates = [t for t in TARGETS if t.startswith("monai.") and t.rsplit(".", 1)[1] == name]
    if not candidates:
        return None  # MONAI would fall back to importing it by name (builtins included)

    module = ComponentLocator().get_component_module_name(name)
    if not isinstance(module, str):
        return None
    found = getattr(importlib.import_module(module), name, None)
    for full in candidates:
        owner, _, attr = full.rpartition(".")
        if getattr(importlib.import_module(owner), attr, None) is found:
            return full
    return None


def _audit_target(value: Any) -> str | None:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", value):
        return "_target_ must be a plain dotted name (no expression, reference or macro)"
    if value in TARGETS:
        return None
    if "." not in value and _bare_target(value):
        return None
    return f"{value} is not an allowed component (only the exact names in medtl.bundle.allowlist.TARGETS)"


def _audit_string(value: str) -> list[str]:
    if value.startswith("$"):
        return audit_expression(value[1:])
    if value.startswith("%") and not _CLEAN_MACRO.fullmatch(value):
        return ["a % macro may only copy another id of the same config (%id#key), not read a file"]
    if _CLIMBS.search(value) or _ROOTED.match(value):
        return ["a path outside the bundle (use @bundle_root + '/...', or a command-line argument)"]
    return []


def _audit(config: Any, file: str, where: str, findings: list[Finding], off: frozenset[str]) -> None:
    if isinstance(config, list):
        for i, value in enumerate(config):
            _audit(value, file, f"{where}#{i}" if where else str(i), findings, off)
        return
    if isinstance(config, str):
        findings += [Finding(file, where, config, r) for r in _audit_string(config)]
        return
    if not isinstance(config, dict):
        return
    for key, value in config.items():
        here = f"{where}#{key}" if where else str(key)
        # MONAI sets a key "a#b" (or "a::b") at the id a#b and merges "+a" into a: judge the last part
        key = str(key).lstrip("+").replace("::", "#").rsplit("#", 1)[-1]
        if key == "_target_":
            if reason := _audit_target(value):
                findings.append(Finding(file, here, str(value), reason))
            continue
        if key == "_mode_" and value not in _MODES:
            findings.append(Finding(file, here, str(value), "_mode_ may only be 'default' or 'callable'"))
            continue
        if key.startswith("_") and key.endswith("_") and key not in _SPECIAL_KEYS:
            findings.append(Finding(file, here, key, "not a MONAI config keyword"))
        rule = ARGUMENT_RULES.get(key)
        if key in DENIED_KEYWORDS and value is not False and value not in off:
            findings.append(
                Finding(
                    file,
                    here,
                    f"{key}: {value}",
                    "switches a safety check off (only false, or a reference "
                    "to a top-level false the receiving site may override, is accepted)",
                )
            )
        elif rule and (reason := rule(value)):
            findings.append(Finding(file, here, f"{key}: {value}", reason))
        _audit(value, file, here, findings, off)


def size_problem(config: Any) -> str | None:
    """Why a parsed config is too large to walk, or None: YAML aliases let a file of a few lines
    repeat a part billions of times without copying it."""
    stack, count = [config], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return (
                f"holds more than {MAX_VALUES} values (YAML aliases repeating a part?); a "
                "bundle config holds a few hundred"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def audit_config(config: Any, file: str) -> list[Finding]:
    """Every value of one parsed config file outside the accepted subset."""
    if reason := size_problem(config):
        return [Finding(file, "", "", reason)]
    findings: list[Finding] = []
    off = frozenset(f"@{k}" for k, v in config.items() if v is False) if isinstance(config, dict) else frozenset()
    if isinstance(config, dict) and config.get("bundle_root", ".") not in (".", ""):
        findings.append(
            Finding(
                file,
                "bundle_root",
                str(config["bundle_root"]),
                "bundle_root must be '.': the site running the bundle sets it (--bundle_root)",
            )
        )
    _audit(config, file, "", findings, off)
    return findings


def _plain(value: Any, file: str, where: str, findings: list[Finding]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}#{key}" if where else str(key)
            if str(key) in _SPECIAL_KEYS:
                findings.append(Finding(file, here, str(key), "metadata holds plain values, not components"))
            _plain(item, file, here, findings)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain(item, file, f"{where}#{i}", findings)
    elif isinstance(value, str) and value[:1] in ("$", "@", "%"):
        findings.append(
            Finding(file, where, value, "metadata holds plain values: MONAI would evaluate this through @_meta_")
        )


def audit_metadata(meta: Any, file: str = "configs/metadata.json") -> list[Finding]:
    """``metadata.json`` is read into every workflow as ``_meta_``: it may hold no expression,
    reference, macro or component."""
    findings: list[Finding] = []
    _plain(meta, file, "", findings)
    return findings


_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "NOTSET"})
_HANDLER_CLASSES = frozenset({"StreamHandler", "logging.StreamHandler", "NullHandler", "logging.NullHandler"})
_HANDLER_ARGS = frozenset({"()", "(sys.stdout,)", "(sys.stderr,)"})
_SECTION_KEYS = {
    "logger": {"level", "handlers", "propagate", "qualname"},
    "handler": {"class", "level", "formatter", "args"},
    "formatter": {"format", "datefmt", "style", "class"},
}


def _logging_problem(section: str, key: str, value: str) -> str | None:
    kind = section.split("_", 1)[0] if "_" in section else None
    text = re.sub(r"\s+", "", value)
    if section in ("loggers", "handlers", "formatters"):
        return None if key == "keys" and re.fullmatch(r"(\w+(,\w+)*)?", text) else "lists may only name sections"
    if kind not in _SECTION_KEYS:
        return f"section [{section}] is not a logger, handler or formatter"
    if key not in _SECTION_KEYS[kind]:
        return f"{key} is not allowed here (fileConfig evaluates some keys)"
    if kind != "formatter" and "%" in value:
        return "% interpolation is not allowed (it builds code from harmless-looking parts)"
    if key == "level" and text not in _LEVELS:
        return "level must be a standard level name"
    if key == "class" and kind == "handler" and text not in _HANDLER_CLASSES:
        return "handler class must be StreamHandler or NullHandler"
    if key == "class" and kind == "formatter" and text not in ("Formatter", "logging.Formatter"):
        return "formatter class must be logging.Formatter"
    if key == "args" and text not in _HANDLER_ARGS:
        return "handler args must be (sys.stdout,), (sys.stderr,) or ()"
    if key in ("handlers", "formatter", "qualname") and text and not re.fullmatch(r"\w+([,.]\w+)*", text):
        return "must name sections or loggers"
    if key == "propagate" and text not in ("0", "1"):
        return "propagate must be 0 or 1"
    if key == "style" and text not in ("%", "{", "$"):
        return "style must be %, { or $"
    return None


def audit_logging_conf(path: str | Path, file: str = "configs/logging.conf") -> list[Finding]:
    """MONAI hands ``configs/logging.conf`` to ``logging.config.fileConfig``, which imports
    ``class`` and evaluates ``args``, ``kwargs`` and formatter ``defaults`` after ``%``
    interpolation. Only stream handlers to stdout/stderr, standard levels and plain formatters pass."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as exc:
        return [Finding(file, "", "", f"not a readable logging config ({exc.__class__.__name__})")]
    findings = [
        Finding(file, "[DEFAULT]", f"{k}={v}", "[DEFAULT] values are interpolated into every section")
        for k, v in parser.defaults().items()
    ]
    for section in parser.sections():
        for key, value in parser.items(section, raw=True):
            if key in parser.defaults():
                continue
            if reason := _logging_problem(section, key, value):
                findings.append(Finding(file, f"[{section}]", f"{key}={value}", reason))
    return findings


def audit_bundle(root: str | Path, configs: tuple[str, ...] = ("configs/inference.json",)) -> list[Finding]:
    """Findings in the configs a caller is about to parse with MONAI, plus ``metadata.json``
    (read into every workflow as ``@_meta_``); a file that does not parse is a finding too."""

    root = Path(root)
    findings = []
    for name in (*configs, "configs/metadata.json"):
        try:
            text = (root / name).read_text(encoding="utf-8")
            config = yaml.safe_load(text) if name.endswith((".yaml", ".yml")) else json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            findings.append(Finding(name, "", "", f"not readable ({exc.__class__.__name__})"))
            continue
        findings += audit_metadata(config, name) if name.endswith("metadata.json") else audit_config(config, name)
    return findings


__all__ = [
    "Finding",
    "audit_bundle",
    "audit_config",
    "audit_expression",
    "audit_logging_conf",
    "audit_metadata",
    "path_findings",
    "string_values",
]
