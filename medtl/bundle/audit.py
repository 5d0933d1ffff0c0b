"""Audit what a bundle would execute before anyone runs it.

MONAI evaluates ``$`` expressions with Python's ``eval``, imports any ``_target_`` by its dotted
name and hands ``logging.conf`` to ``logging.config.fileConfig``, which evaluates its ``args``. A
received bundle can therefore run arbitrary code (MONAI advisory GHSA-873f-pvrv-4x83). This module
reads configs without evaluating them and lists every construct outside an allow-list: names from
medtl, MONAI, ignite and torch, config references, arithmetic, comparisons, comprehensions, string
formatting and method calls on config values. Anything else (``__import__``, ``eval``, ``open``,
``os.system``, ``subprocess``, dunder attributes, ``torch.load``) is reported with the expression.
"""

from __future__ import annotations

import ast
import configparser
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Modules a config may import and name; their sub-modules are allowed unless denied below.
ALLOWED_ROOTS = frozenset({"medtl", "monai", "ignite", "torch", "numpy", "math"})
#: Callables inside allowed modules that load pickles, run code or reach the network/filesystem.
DENIED = (
    "torch.load", "torch.hub", "torch.package", "torch.utils.cpp_extension", "torch.ops.load_library",
    "torch.classes.load_library", "torch.compile", "torch.utils.data.datapipes", "torch.jit.load",
    "numpy.load", "numpy.ctypeslib", "numpy.distutils", "monai.utils.optional_import", "monai.utils.module.optional_import",
    "torch.serialization", "torch.utils.model_zoo", "torch.save", "numpy.save", "numpy.savez", "numpy.savetxt",
    "monai.bundle", "monai.apps.download_url", "monai.apps.download_and_extract", "monai.apps.extractall", "monai.apps.utils",
    "monai.utils.instantiate", "monai.utils.module", "monai.utils.locate", "monai.utils.run_cmd", "monai.utils.misc.run_cmd",
)
#: Standard-library names allowed as bare calls or imports in expressions.
ALLOWED_BUILTINS = frozenset({
    "len", "range", "min", "max", "sum", "abs", "round", "int", "float", "str", "bool", "list", "dict", "tuple", "set",
    "sorted", "reversed", "enumerate", "zip", "any", "all", "isinstance", "type", "None", "True", "False",
})
#: ``os`` is allowed for reading the environment only (``os.environ[...]``, torchrun's LOCAL_RANK).
ALLOWED_ATTRIBUTE_CHAINS = frozenset({"os.environ", "os.environ.get", "os.path.join", "os.path.basename", "os.path.dirname",
                                      "os.path.splitext", "os.sep"})
#: Dunder attributes that only read a name.
SAFE_DUNDERS = frozenset({"__name__", "__qualname__"})

_REFERENCE = re.compile(r"@(\w+(?:(?:#|::)\w+)*)")
_LOGGING_CLASSES = frozenset({"StreamHandler", "FileHandler", "NullHandler", "logging.StreamHandler", "logging.FileHandler",
                              "logging.NullHandler", "handlers.RotatingFileHandler", "logging.handlers.RotatingFileHandler",
                              "Formatter", "logging.Formatter"})
_LOGGING_STREAMS = frozenset({"sys.stdout", "sys.stderr"})


@dataclass(frozen=True)
class Finding:
    """One construct outside the allow-list: where it is, the text, and why it is refused."""

    file: str
    where: str
    text: str
    reason: str

    def __str__(self) -> str:
        text = self.text if len(self.text) <= 120 else self.text[:117] + "..."
        return f"{self.file} {self.where}: {text!r}: {self.reason}"


def _allowed_dotted(name: str) -> str | None:
    """None when a dotted name may be imported or called, else the reason it may not."""
    if name in ALLOWED_ATTRIBUTE_CHAINS:
        return None
    root = name.split(".")[0]
    if root not in ALLOWED_ROOTS:
        return f"{name} is outside the allowed modules ({', '.join(sorted(ALLOWED_ROOTS))})"
    for denied in DENIED:
        if name == denied or name.startswith(denied + "."):
            return f"{name} can load pickled code or run programs"
    return None


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


class _ExpressionAudit(ast.NodeVisitor):
    """Walks one expression; config references were replaced by names in ``refs``."""

    _PLAIN = (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.operator,
              ast.unaryop, ast.boolop, ast.cmpop, ast.expr_context, ast.Subscript, ast.Slice, ast.List, ast.Tuple, ast.Dict,
              ast.Set, ast.JoinedStr, ast.FormattedValue, ast.keyword, ast.ListComp, ast.SetComp, ast.DictComp,
              ast.GeneratorExp, ast.comprehension, ast.Lambda, ast.arguments, ast.arg, ast.Starred)

    def __init__(self, refs: set[str], aliases: dict[str, str]):
        self.refs = refs
        self.aliases = aliases
        self.local: set[str] = set()
        self.problems: list[str] = []

    def generic_visit(self, node: ast.AST) -> None:
        if not isinstance(node, (*self._PLAIN, ast.Name, ast.Attribute, ast.Call)):
            self.problems.append(f"{type(node).__name__} is not allowed in a config expression")
            return
        if isinstance(node, ast.Lambda):  # bind locals before the body that uses them is visited
            self.local.update(a.arg for a in node.args.args)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            self.local.update(n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name))
        super().generic_visit(node)

    def _known(self, name: str) -> bool:
        return name in self.refs or name in self.local or name in ALLOWED_BUILTINS

    def visit_Name(self, node: ast.Name) -> None:
        if self._known(node.id):
            return
        if node.id in self.aliases or node.id in ALLOWED_ROOTS:
            return
        self.problems.append(f"name {node.id!r} is not allowed (only medtl/MONAI/torch names, config references and basic builtins)")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr.startswith("__") and node.attr not in SAFE_DUNDERS:
            self.problems.append(f"attribute {node.attr!r} reaches Python internals")
            return
        dotted = _dotted(node)
        root = dotted.split(".")[0] if dotted else None
        if dotted and not self._known(root):  # a module path: torch.cuda.is_available, os.environ
            reason = _allowed_dotted(self._module_path(dotted))
            if reason:
                self.problems.append(reason)
            return
        self.visit(node.value)  # a method or field of a config value or a local

    def _module_path(self, dotted: str) -> str:
        """``dist.get_rank`` -> ``torch.distributed.get_rank`` through the config's imports."""
        root, _, rest = dotted.partition(".")
        full = self.aliases.get(root, root)
        return f"{full}.{rest}" if rest else full

    def visit_Call(self, node: ast.Call) -> None:
        self.visit(node.func)
        for arg in (*node.args, *node.keywords):
            self.visit(arg)


def _prepare(expression: str) -> tuple[str, set[str]]:
    """The expression with ``@id`` references as plain names (MONAI does the same before eval)."""
    refs: set[str] = set()

    def name(match: re.Match) -> str:
        ref = "__ref_" + re.sub(r"\W", "_", match.group(1))
        refs.add(ref)
        return ref

    return _REFERENCE.sub(name, expression), refs


def audit_expression(expression: str, aliases: dict[str, str] | None = None) -> list[str]:
    """Reasons why the ``$`` expression (without its ``$``) is outside the allow-list; empty if allowed."""
    text, refs = _prepare(expression.strip())
    if text.startswith(("import ", "from ")):
        try:
            tree = ast.parse(text)
        except SyntaxError as exc:
            return [f"not valid Python ({exc.msg})"]
        problems = []
        for node in tree.body:
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                return ["only one import statement is allowed per expression"]
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names]
            problems += [r for m in modules if (r := _allowed_dotted(m)) and m != "os"]
        return problems
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        return [f"not valid Python ({exc.msg})"]
    visitor = _ExpressionAudit(refs, aliases or {})
    visitor.visit(tree)
    return visitor.problems


def import_aliases(expression: str) -> dict[str, str]:
    """Names an allowed ``$import`` expression binds: ``{"dist": "torch.distributed", "bn_adapt": "medtl.adapt.adabn.adabn"}``."""
    try:
        tree = ast.parse(expression.strip())
    except SyntaxError:
        return {}
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {(a.asname or a.name.split(".")[0]): (a.name if a.asname else a.name.split(".")[0]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names}
    return out


def _walk(config: Any, where: str = "") -> Iterator[tuple[str, str, Any]]:
    """``(where, key, value)`` for every leaf and ``_target_`` in a parsed config."""
    if isinstance(config, dict):
        for key, value in config.items():
            here = f"{where}#{key}" if where else str(key)
            if isinstance(value, (dict, list)):
                yield from _walk(value, here)
            else:
                yield here, str(key), value
    elif isinstance(config, list):
        for i, value in enumerate(config):
            here = f"{where}#{i}" if where else str(i)
            if isinstance(value, (dict, list)):
                yield from _walk(value, here)
            else:
                yield here, str(i), value


def audit_config(config: Any, file: str) -> list[Finding]:
    """Every ``$`` expression and ``_target_`` of one parsed config file that is outside the allow-list."""
    leaves = list(_walk(config))
    aliases: dict[str, str] = {}
    for _, _, value in leaves:
        if isinstance(value, str) and value.startswith("$") and value[1:].strip().startswith(("import ", "from ")):
            aliases |= import_aliases(value[1:])
    findings = []
    for where, key, value in leaves:
        if value is True and re.search(r"trust|unsafe", key, re.IGNORECASE) or key == "weights_only" and value is False:
            findings.append(Finding(file, where, f"{key}: {value}", "turns on loading pickled code, which can run programs"))
        if not isinstance(value, str):
            continue
        if key == "_target_":
            target = value.lstrip("$")
            if "." in target:
                reason = _allowed_dotted(target)
            else:  # MONAI resolves bare names among its own components only
                reason = None if re.fullmatch(r"[A-Za-z_]\w*", target) else "not a component name"
            if reason:
                findings.append(Finding(file, where, value, reason))
        elif value.startswith("$"):
            findings += [Finding(file, where, value, r) for r in audit_expression(value[1:], aliases)]
    return findings


def _literal_arguments(text: str) -> bool:
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return False
    for node in tree.elts if isinstance(tree, ast.Tuple) else [tree]:
        if _dotted(node) in _LOGGING_STREAMS:
            continue
        try:
            ast.literal_eval(node)
        except ValueError:
            return False
    return True


def audit_logging_conf(path: str | Path, file: str = "configs/logging.conf") -> list[Finding]:
    """``logging.config.fileConfig`` evaluates ``class`` and ``args``: only plain handlers with
    literal arguments (or sys.stdout/sys.stderr) pass."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as exc:
        return [Finding(file, "", "", f"not a readable logging config ({exc.__class__.__name__})")]
    findings = []
    for section in parser.sections():
        for key, value in parser.items(section):
            if key == "class" and value.strip() not in _LOGGING_CLASSES:
                findings.append(Finding(file, f"[{section}]", f"class={value}", "handler/formatter class outside the standard logging ones"))
            elif key in ("()",):
                findings.append(Finding(file, f"[{section}]", f"{key}={value}", "a factory call is evaluated by fileConfig"))
            elif key in ("args", "kwargs") and not _literal_arguments(value):
                findings.append(Finding(file, f"[{section}]", f"{key}={value}", "arguments may only be literals or sys.stdout/sys.stderr"))
    return findings


__all__ = ["Finding", "audit_config", "audit_expression", "audit_logging_conf", "import_aliases"]
