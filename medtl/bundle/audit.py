"""Read a received bundle's configs as data: accept only a small, declared subset of MONAI's syntax.

MONAI evaluates ``$`` expressions with Python's ``eval``, imports any ``_target_`` by its dotted
name, expands ``%`` macros from other files and hands ``logging.conf`` to ``fileConfig``, which
evaluates parts of it. Listing what is dangerous in arbitrary Python cannot be complete, so this
module does the opposite, and it judges exactly what MONAI would run:

- every workflow as MONAI assembles it: each config alone, every ordered pair (``--config_file
  "['configs/train.json', 'configs/multi_gpu_train.json']"``) and every list the bundle's docs
  name, merged with MONAI's own ``merge_kv``, ``%`` macros and relative ids resolved with MONAI's
  own functions (a macro naming a file is refused before anything is read), and each ``$``
  expression rewritten by MONAI's ``ReferenceResolver.update_refs_pattern`` (``#`` to ``::``,
  ``@id`` to ``__local_refs['id']``) before ``ast`` parses it: the audit reads the text ``eval`` gets;
- in that text: literals (numbers bounded by ``MAX_NUMBER``), references, comparisons, boolean
  logic, conditional expressions, ``-``, ``/``, ``//``; ``+`` only over numbers, over lists of the
  config, or as ``@bundle_root + '/relative/literal'`` (f-strings of numbers and conditionals of
  such literals included); ``*`` only of two number literals; indexing a list of the config by
  number or a result by key; slicing only a list of the config; f-strings only of numbers, with
  no format spec or conversion; calls only to the exact dotted names of ``allowlist.CALLS``,
  module attributes only from ``allowlist.VALUES``, on references only ``allowlist.METHODS`` and
  ``FIELDS``; ASCII only (Python folds look-alike letters such as ``ｂ`` into other names);
- ``_target_`` only from ``allowlist.TARGETS`` (a bare MONAI name only when MONAI resolves it to
  the same object), ``_mode_`` only ``default`` or ``callable``; a key ``a#_target_`` (MONAI sets
  it at that id) or ``+a`` (merged into ``a``) is judged by its last part; keys ASCII only;
- arguments that switch safe loading off (``weights_only``, ``allow_pickle``, ``reader``,
  ``trust``) refused wherever they appear;
- ``metadata.json``: plain values, no path outside the bundle; ``logging.conf``: a fixed handler
  set, no interpolation;
- config files of at most ``MAX_CONFIG_BYTES``, nested at most ``MAX_DEPTH`` deep, holding at most
  ``MAX_VALUES`` values and ``MAX_TEXT`` characters of text, without YAML anchors or aliases.

Everything else (imports, lambdas, comprehensions, names, dunder or other attributes, starred
arguments, walrus, ``%``, ``**``, slicing a string) is refused with the file, the key and the
reason. See ``docs/bundle-safety.md``.
"""

from __future__ import annotations

import ast
import configparser
import copy
import functools
import importlib
import itertools
import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator, ConfigExpression
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import EXPR_KEY, MACRO_KEY, merge_kv
from monai.utils.misc import CheckKeyDuplicatesYamlLoader, check_key_duplicates

from medtl.bundle.allowlist import ARGUMENT_RULES, CALLS, DENIED_KEYWORDS, FIELDS, METHODS, TARGETS, VALUES
from medtl.errors import MedtlError

logger = logging.getLogger(__name__)

#: An id as MONAI resolves it once ``#`` became ``::``, in ASCII.
_ID = re.compile(r"[A-Za-z0-9_]+(?:::[A-Za-z0-9_]+)*")
#: A ``%`` macro copying another id of the same config.
_CLEAN_MACRO = re.compile(r"%[A-Za-z0-9_]+(?:(?:#|::)[A-Za-z0-9_]+)*")
#: The name MONAI's ``update_refs_pattern`` gives the resolved references in the evaluated text.
_LOCAL_REFS = ReferenceResolver._vars
_MAX_EXPRESSION = 2000
#: Values (mapping entries and list items, nested) a config may hold before it is refused unread.
MAX_VALUES = 100_000
#: How deep a config's lists and mappings may nest (a bundle config nests under 10 deep).
MAX_DEPTH = 64
#: Bytes of one config file, and characters of text in one parsed config (YAML aliases repeat text).
MAX_CONFIG_BYTES = MAX_TEXT = 2 << 20
#: The largest number an expression may write: enough for sizes and seeds, too small to allocate
#: or loop for long (``10**13`` needs ``**``, refused).
MAX_NUMBER = 10**6
#: How many configs a bundle may hold: every ordered pair of them is audited as a workflow.
MAX_CONFIGS = 16
#: How many longer ``--config_file`` lists the docs may name (a bundle's README names one or two).
MAX_LISTED_WORKFLOWS = 16
#: Values read across every workflow audited (each one merges its configs): the audit's time bound.
#: About 20 s on a 2-core machine; the shipped bundles need under 6,000.
MAX_AUDITED_VALUES = 400_000
#: A path under the bundle as ``@bundle_root + ...`` builds it: ``/``-separated ASCII names, none
#: empty, ``.``, ``..`` or hidden.
_RELATIVE_PATH = re.compile(r"(?:/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)+")
_MAX_PATH_VARIANTS = 64
#: Calls whose result is a number, so they may be formatted into a path or added to numbers.
_NUMBER_CALLS = frozenset(
    {
        "len",
        "int",
        "float",
        "round",
        "abs",
        "torch.distributed.get_rank",
        "torch.distributed.get_world_size",
        "torch.cuda.device_count",
    }
)
_MISSING = object()
_MODES = frozenset({"default", "callable"})
_SPECIAL_KEYS = frozenset({"_target_", "_mode_", "_requires_", "_disabled_", "_desc_"})
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)
_UNARY = (ast.USub, ast.UAdd, ast.Not)
_COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Is, ast.IsNot, ast.In, ast.NotIn)
#: Text that starts a path at the root, a drive or home, or climbs with ``..``.
_ROOTED = re.compile(r"^(?:[/\\~]|[A-Za-z]:[/\\])")
_CLIMBS = re.compile(r"(?:^|[/\\])\.\.(?:[/\\]|$)")
_OUTSIDE = "a path outside the bundle (use @bundle_root + '/...', or a command-line argument)"


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


def _reference(node: ast.AST) -> str | None:
    """The id of a reference as MONAI writes it into the evaluated text (``__local_refs['id']``), or None."""
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id == _LOCAL_REFS
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, str)
    ):
        return node.slice.value
    return None


def _on_reference(node: ast.AST) -> bool:
    """A reference, or an index into one (``@prepared['items']``)."""
    while _reference(node) is None and isinstance(node, ast.Subscript):
        node = node.value
    return _reference(node) is not None


def _number_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _path_reason(text: str) -> str | None:
    if _CLIMBS.search(text):
        return f"{text!r} climbs out of the bundle with '..'"
    if _ROOTED.match(text):
        return f"{text!r} starts a path outside the bundle (only @bundle_root + '/...' builds paths)"
    return None


def _sum_operands(node: ast.AST) -> list[ast.AST]:
    """``a + b + c`` (parsed as ``(a + b) + c``) as ``[a, b, c]``."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return [*_sum_operands(node.left), node.right]
    return [node]


class _AnyId(dict):
    """Every id counts as defined, so MONAI's ``update_refs_pattern`` rewrites each reference as at run time."""

    def __contains__(self, key: object) -> bool:
        return True


def evaluated_text(value: str) -> str:
    """The text MONAI's ``ConfigExpression.evaluate`` hands to ``eval`` for the ``$`` string ``value``:
    ``#`` made ``::`` everywhere (strings and comments too), each ``@id`` made ``__local_refs['id']``,
    ``$`` and the leading blanks ``eval`` skips removed."""
    return ReferenceResolver.update_refs_pattern(value, _AnyId())[len(EXPR_KEY) :].lstrip(" \t")


def _lookup(config: Mapping, ref: str) -> Any:
    """The config value ``ref`` names (following ``@`` aliases a few steps), or ``_MISSING``."""
    for _ in range(8):
        node: Any = config
        for part in ref.split("::"):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return _MISSING
        alias = ReferenceResolver.normalize_id(node[1:]) if isinstance(node, str) and node[:1] == "@" else None
        if alias is None or not _ID.fullmatch(alias):
            return node
        ref = alias
    return _MISSING


class _Expression:
    """Checks one expression as ``eval`` gets it, node by node; collects the reasons it is refused.
    ``lookup`` gives the config value a reference names, so ``+`` and slicing see what they join."""

    def __init__(self, lookup: Callable[[str], Any]) -> None:
        self.lookup = lookup
        self.problems: list[str] = []
        self.path_problems: list[str] = []

    def refuse(self, reason: str) -> None:
        self.problems.append(reason)

    def refuse_path(self, reason: str) -> None:
        self.problems.append(reason)
        self.path_problems.append(reason)

    def check(self, node: ast.AST) -> None:
        if (ref := _reference(node)) is not None:
            if not _ID.fullmatch(ref):
                self.refuse(f"@{ref} is not an id MONAI resolves (ASCII ids joined by #; no relative or empty ids)")
        elif isinstance(node, ast.Constant):
            self._constant(node)
        elif isinstance(node, ast.Name):
            self.refuse(f"name {node.id!r} is not allowed (only @references, and allow-listed calls)")
        elif isinstance(node, ast.Attribute):
            self._attribute(node)
        elif isinstance(node, ast.Call):
            self._call(node)
        elif isinstance(node, ast.Subscript):
            self._subscript(node)
        elif isinstance(node, ast.BinOp):
            self._binop(node)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, _UNARY):
                self.refuse(f"operator {type(node.op).__name__} is not allowed")
            self.check(node.operand)
        elif isinstance(node, ast.BoolOp):
            for value in node.values:
                self.check(value)
        elif isinstance(node, ast.Compare):
            bad = [type(op).__name__ for op in node.ops if not isinstance(op, _COMPARISONS)]
            if bad:
                self.refuse(f"operator {bad[0]} is not allowed")
            for value in (node.left, *node.comparators):
                self.check(value)
        elif isinstance(node, ast.IfExp):
            for value in (node.test, node.body, node.orelse):
                self.check(value)
        elif isinstance(node, ast.List | ast.Tuple):
            for value in node.elts:
                self.check(value)
        elif isinstance(node, ast.Dict):
            if None in node.keys:
                self.refuse("** in a dict display is not allowed")
            for value in (*(k for k in node.keys if k is not None), *node.values):
                self.check(value)
        elif isinstance(node, ast.JoinedStr):
            self._path_texts(node, anchored=False)
        else:
            self.refuse(f"{type(node).__name__} is not allowed in a config expression")

    def _constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, str):
            if reason := _path_reason(value):
                self.refuse_path(reason)
        elif type(value) in (int, float):
            if not (math.isfinite(value) and abs(value) <= MAX_NUMBER):
                self.refuse(f"the number {value!r} is out of range (at most {MAX_NUMBER:,} either way)")
        elif value is not None and not isinstance(value, bool):
            self.refuse(f"a {type(value).__name__} literal is not allowed")

    def _number(self, node: ast.AST) -> bool:
        """Whether ``node`` gives a number: a literal, a config number, a counting call, or arithmetic of them."""
        if (ref := _reference(node)) is not None:
            value = self.lookup(ref)
            return self._unresolved(ref, value) or type(value) in (int, float)
        if isinstance(node, ast.Call):
            return _dotted(node.func) in _NUMBER_CALLS
        if isinstance(node, ast.BinOp) and isinstance(node.op, _ARITHMETIC):
            return self._number(node.left) and self._number(node.right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            return self._number(node.operand)
        return _number_literal(node)

    @staticmethod
    def _unresolved(ref: str, value: Any) -> bool:
        """A reference to an id the workflow lacks: MONAI stops at it before evaluating the expression
        (metadata ids are always there)."""
        return value is _MISSING and ref.split("::", 1)[0] != ConfigParser.meta_key

    def _config_list(self, node: ast.AST) -> bool:
        """Whether ``node`` is a list display or a reference to a list of the config (handlers, sizes)."""
        if isinstance(node, ast.List):
            return True
        ref = _reference(node)
        if ref is None:
            return False
        value = self.lookup(ref)
        if self._unresolved(ref, value):
            return True
        if isinstance(value, str) and value.startswith(EXPR_KEY):
            try:
                return isinstance(ast.parse(evaluated_text(value), mode="eval").body, ast.List)
            except (SyntaxError, ValueError, MemoryError, RecursionError):
                return False
        return isinstance(value, list)

    def _binop(self, node: ast.BinOp) -> None:
        if not isinstance(node.op, _ARITHMETIC):
            self.refuse(f"operator {type(node.op).__name__} is not allowed (no %, **, or bit operations)")
        elif isinstance(node.op, ast.Add):
            operands = _sum_operands(node)
            if _reference(operands[0]) == "bundle_root":
                self._path(operands[1:])
                return
            if not (all(self._number(o) for o in operands) or all(self._config_list(o) for o in operands)):
                self.refuse_path(
                    "+ joins only numbers or lists of the config; a path is @bundle_root + '/relative/literal'"
                )
            for operand in operands:
                self.check(operand)
            return
        elif isinstance(node.op, ast.Mult) and not (_number_literal(node.left) and _number_literal(node.right)):
            self.refuse("* multiplies only two number literals (no string or list repetition)")
        self.check(node.left)
        self.check(node.right)

    def _path(self, pieces: list[ast.AST]) -> None:
        """``@bundle_root + pieces``: every text the pieces can give must be a plain path under the bundle."""
        texts = [""]
        for piece in pieces:
            options = self._path_texts(piece, anchored=True)
            texts = [a + b for a, b in itertools.product(texts, options)]
            if len(texts) > _MAX_PATH_VARIANTS:
                self.refuse(f"a path with more than {_MAX_PATH_VARIANTS} alternatives")
                return
        for text in texts:
            if text and not _RELATIVE_PATH.fullmatch(text):
                self.refuse_path(
                    f"@bundle_root + {text!r} is not a plain path inside the bundle (write @bundle_root + "
                    "'/folder/file': no '.', '..', empty, hidden or non-ASCII parts)"
                )

    def _path_texts(self, node: ast.AST, *, anchored: bool) -> list[str]:
        """The texts a path piece can give (a formatted number as ``0``); outside ``@bundle_root +``
        (``anchored`` false) an f-string is checked like a literal."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if not anchored:
                self._constant(node)
            return [node.value]
        if isinstance(node, ast.IfExp) and anchored:
            self.check(node.test)
            return [*self._path_texts(node.body, anchored=True), *self._path_texts(node.orelse, anchored=True)]
        if isinstance(node, ast.JoinedStr):
            parts = []
            for value in node.values:
                if isinstance(value, ast.FormattedValue):
                    if value.conversion != -1:
                        self.refuse("f-string conversions (!r, !s, !a) are not allowed")
                    if value.format_spec is not None:
                        self.refuse("f-string format specs are not allowed")
                    if not self._number(value.value):
                        self.refuse_path("an f-string may format only numbers (such as torch.distributed.get_rank())")
                    self.check(value.value)
                    parts.append("0")
                else:
                    parts.append(value.value)
            text = "".join(parts)
            if not anchored and (reason := _path_reason(text)):
                self.refuse_path(reason)
            return [text]
        self.refuse_path(
            "after @bundle_root + only string literals, f-strings of numbers and 'a' if c else 'b' build a path"
        )
        self.check(node)
        return [""]

    def _subscript(self, node: ast.Subscript) -> None:
        index = node.slice
        if not _on_reference(node.value):
            self.refuse_path("only a reference may be indexed (no slicing or indexing of literals)")
        elif isinstance(index, ast.Slice):
            bounds_ok = index.step is None and all(self._bound(b) for b in (index.lower, index.upper))
            if not (bounds_ok and self._config_list(node.value)):
                self.refuse_path("only a list of the config may be sliced, by numbers (@handlers[:-2]); never a string")
        elif isinstance(index, ast.Constant) and isinstance(index.value, str):
            pass  # a key: strings are not indexed by strings
        elif not (_number_literal(index) and self._config_list(node.value)):
            self.refuse_path("only a list of the config may be indexed by number (@sizes[0]); results by key")
        bounds = (index.lower, index.upper, index.step) if isinstance(index, ast.Slice) else (index,)
        for bound in bounds:
            if bound is not None:
                self.check(bound)
        self.check(node.value)

    def _bound(self, node: ast.AST | None) -> bool:
        if node is None or isinstance(node, ast.Constant) and node.value is None:
            return True
        if isinstance(node, ast.IfExp):
            return self._bound(node.body) and self._bound(node.orelse)
        return self._number(node)

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
            elif name in ("min", "max") and not all(self._number(a) or self._config_list(a) for a in node.args):
                self.refuse_path(f"{name} takes numbers or lists of the config (the least letter of a path is '/')")
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


def _checked(expression: str, config: Mapping | None) -> _Expression | list[str]:
    """The checker after reading ``expression`` (without its ``$``) as MONAI evaluates it, or the
    reasons it could not be read."""
    if len(expression) > _MAX_EXPRESSION:
        return [f"longer than {_MAX_EXPRESSION} characters"]
    if not expression.isascii():
        return ["holds a non-ASCII character (Python folds look-alike letters such as 'ｂ' into other names)"]
    try:
        if "import" in expression and ConfigExpression.is_import_statement(EXPR_KEY + expression):
            return ["import statements are not allowed"]
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        pass  # not a statement either: the expression parse below says why
    text = evaluated_text(EXPR_KEY + expression)
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, SyntaxError) else exc.__class__.__name__
        return [f"not a Python expression once MONAI rewrote it to {text[:80]!r} ({reason})"]
    checker = _Expression(functools.partial(_lookup, config or {}))
    try:
        checker.check(tree.body)
    except RecursionError:
        return ["nested too deeply"]
    return checker


def audit_expression(expression: str, config: Mapping | None = None) -> list[str]:
    """Reasons why the ``$`` expression (without its ``$``) is outside the accepted subset; empty if
    accepted. ``config`` (the workflow's merged, resolved config) says what references name: without
    it no reference counts as a list or a number."""
    checker = _checked(expression, config)
    return checker if isinstance(checker, list) else list(dict.fromkeys(checker.problems))


def path_findings(config: Any, file: str) -> list[Finding]:
    """The values of ``config`` that name a path outside the bundle, by the audit's own rules: a
    plain value rooted at ``/``, ``~`` or a drive, or holding ``..``; an expression building one
    other than ``@bundle_root + '/relative/literal'`` (``medtl bundle verify`` shows them as its own check)."""
    findings = []
    for where, value in string_values(config):
        if value.startswith(EXPR_KEY):
            checker = _checked(value[1:], config if isinstance(config, Mapping) else None)
            problems = [] if isinstance(checker, list) else checker.path_problems  # the expression audit says why
        else:
            problems = [_OUTSIDE] if _path_reason(value) else []
        findings += [Finding(file, where, value, reason) for reason in dict.fromkeys(problems)]
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
def bare_target(name: str) -> str | None:
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
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", value, re.ASCII):
        return "_target_ must be a plain dotted name (no expression, reference or macro)"
    if value in TARGETS:
        return None
    if "." not in value and bare_target(value):
        return None
    return f"{value} is not an allowed component (only the exact names in medtl.bundle.allowlist.TARGETS)"


def _audit_string(value: str, config: Mapping) -> list[str]:
    if value.startswith(EXPR_KEY):
        return audit_expression(value[1:], config)
    if value.startswith(MACRO_KEY) and not _CLEAN_MACRO.fullmatch(value):
        return ["a % macro may only copy another id of the same config (%id#key), not read a file"]
    if value.startswith("@") and not _ID.fullmatch(ReferenceResolver.normalize_id(value[1:])):
        return [f"{value} is not an id MONAI resolves (ASCII ids joined by #; no relative or empty ids)"]
    return [_OUTSIDE] if _path_reason(value) else []


def _audit(config: Any, file: str, where: str, findings: list[Finding], off: frozenset[str], root: Mapping) -> None:
    if isinstance(config, list):
        for i, value in enumerate(config):
            _audit(value, file, f"{where}#{i}" if where else str(i), findings, off, root)
        return
    if isinstance(config, str):
        findings += [Finding(file, where, config, r) for r in _audit_string(config, root)]
        return
    if not isinstance(config, dict):
        return
    for key, value in config.items():
        here = f"{where}#{key}" if where else str(key)
        if not str(key).isascii():
            findings.append(Finding(file, here, str(key), "a non-ASCII key (ids are ASCII letters, digits and _)"))
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
        _audit(value, file, here, findings, off, root)


def size_problem(config: Any) -> str | None:
    """Why a parsed config is too large to walk, or None: YAML aliases let a file of a few lines
    repeat a part (or a long string) billions of times without copying it."""
    stack, count, text = [(config, 1)], 0, 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return (
                f"holds more than {MAX_VALUES} values (YAML aliases repeating a part?); a "
                "bundle config holds a few hundred"
            )
        if depth > MAX_DEPTH:
            return f"nested more than {MAX_DEPTH} deep"
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            text += sum(len(str(k)) for k in node)
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str):
            text += len(node)
        if text > MAX_TEXT:
            return f"holds more than {MAX_TEXT >> 20} MB of text (YAML aliases repeating a string?)"
    return None


def _values(config: Any, limit: int) -> int:
    """How many values ``config`` holds, itself included, counting at most to ``limit``."""
    stack, count = [config], 0
    while stack and count < limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


class _Refused(Exception):
    """A workflow MONAI must not even assemble: ``args`` are where, the value and why."""


class _Macros:
    """MONAI's ``ConfigParser._do_resolve`` (relative ids, then ``%`` macros, in place, in MONAI's order)
    with two guards: a macro naming a file is refused before it is read, and the copies macros make
    may hold at most ``MAX_VALUES`` values (a chain of macros doubles a part at every step)."""

    def __init__(self, content: dict) -> None:
        self.parser = ConfigParser(config=content, globals=False)
        self.left = MAX_VALUES

    def resolve(self, config: Any, id: str = "") -> Any:
        if isinstance(config, dict | list):
            for key, sub_id, value in ReferenceResolver.iter_subconfigs(id=id, config=config):
                config[key] = self.resolve(value, sub_id)
        if isinstance(config, str):
            config = ConfigParser.resolve_relative_ids(id, config)
            if config.startswith(MACRO_KEY):
                if id.rsplit("::", 1)[-1] == "_target_":
                    raise _Refused(
                        id, config, "_target_ must be a plain dotted name (no expression, reference or macro)"
                    )
                path, ids = ConfigParser.split_path_id(config[len(MACRO_KEY) :])
                if path or not _CLEAN_MACRO.fullmatch(config):
                    raise _Refused(
                        id, config, "a % macro may only copy another id of the same config (%id#key), not read a file"
                    )
                part = self.parser[ids]
                self.left -= _values(part, self.left + 1)
                if self.left < 0:
                    raise _Refused(id, config, f"% macros copy more than {MAX_VALUES} values")
                return copy.deepcopy(part)
        return config


def _resolved(configs: list[dict], meta: Any) -> dict | None:
    """The configs merged as ``--config_file "[a, b]"`` merges them (MONAI's ``merge_kv``, later files
    win) with ``_meta_``, then relative ids and ``%`` macros resolved; None when MONAI could not
    assemble them (it would stop before running anything)."""
    parser = ConfigParser(config={}, globals=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merge_kv warns when a +key has nothing to merge into
            for config in copy.deepcopy(configs):
                for key, value in config.items():
                    merge_kv(parser, key, value)
            content = {ConfigParser.meta_key: copy.deepcopy(meta) if meta is not None else {}, **parser.get()}
            macros = _Macros(content)
            return macros.resolve(content)
    except _Refused:
        raise
    except (KeyError, ValueError, IndexError, TypeError):
        return None


def audit_workflow(configs: list[tuple[str, Any]], meta: Any = None) -> list[Finding]:
    """Every value outside the accepted subset in the workflow MONAI assembles from ``configs``
    (``(file, parsed config)`` in ``--config_file`` order) and the metadata ``meta``: the configs
    merged, macros and relative ids resolved, each expression read as ``eval`` gets it."""
    name = "+".join(file for file, _ in configs)
    for file, config in configs:
        if reason := size_problem(config):
            return [Finding(file, "", "", reason)]
        if not isinstance(config, dict):
            return [Finding(file, "", "", "the top level must be a mapping of ids")]
    try:
        merged = _resolved([c for _, c in configs], meta)
    except _Refused as exc:
        where, value, reason = exc.args
        return [Finding(name, ReferenceResolver.normalize_id(where).replace("::", "#"), value, reason)]
    if merged is None:
        if len(configs) > 1:
            return []  # MONAI stops at merging these; each file is audited alone
        merged = dict(configs[0][1])  # judged as written: references and macros stay unresolved
    walked = merged
    if not any(ConfigParser.meta_key in c for _, c in configs):  # metadata.json, audited as such
        walked = {k: v for k, v in merged.items() if k != ConfigParser.meta_key}
    findings: list[Finding] = []
    if walked.get("bundle_root", ".") not in (".", ""):
        findings.append(
            Finding(
                name,
                "bundle_root",
                str(walked["bundle_root"]),
                "bundle_root must be '.': the site running the bundle sets it (--bundle_root)",
            )
        )
    off = frozenset(f"@{k}" for k, v in walked.items() if v is False)
    _audit(walked, name, "", findings, off, merged)
    return findings


def audit_config(config: Any, file: str, meta: Any = None) -> list[Finding]:
    """Every value of one parsed config file outside the accepted subset, as MONAI runs it alone."""
    return audit_workflow([(file, config)], meta)


def _plain(value: Any, file: str, where: str, findings: list[Finding]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}#{key}" if where else str(key)
            # read_meta merges like read_config: "a#_target_" is set inside a, "+a" merged into a
            if str(key).lstrip("+").replace("::", "#").rsplit("#", 1)[-1] in _SPECIAL_KEYS:
                findings.append(Finding(file, here, str(key), "metadata holds plain values, not components"))
            if not str(key).isascii():
                findings.append(Finding(file, here, str(key), "a non-ASCII key (ids are ASCII letters, digits and _)"))
            _plain(item, file, here, findings)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain(item, file, f"{where}#{i}", findings)
    elif isinstance(value, str) and value[:1] in ("$", "@", "%"):
        findings.append(
            Finding(file, where, value, "metadata holds plain values: MONAI would evaluate this through @_meta_")
        )
    elif isinstance(value, str) and (reason := _path_reason(value)):
        findings.append(Finding(file, where, value, f"{reason}: configs read metadata through @_meta_"))


def audit_metadata(meta: Any, file: str = "configs/metadata.json") -> list[Finding]:
    """``metadata.json`` is read into every workflow as ``_meta_``: it may hold no expression,
    reference, macro, component or path outside the bundle."""
    if reason := size_problem(meta):
        return [Finding(file, "", "", reason)]
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


def _json_depth(text: str) -> int:
    """How deep a JSON text nests, counted on its brackets outside strings (before ``json`` recurses)."""
    depth = deepest = 0
    for bracket in re.sub(r'"(?:\\.|[^"\\])*"', "", text):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif bracket in "]}":
            depth -= 1
    return deepest


def _yaml_problem(text: str) -> str | None:
    """Why a YAML text is refused before it is built: anchors and aliases repeat parts without copying them."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            return "uses YAML anchors or aliases (&, *): a few lines could repeat a part billions of times"
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                return f"nested more than {MAX_DEPTH} deep"
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


def read_config_file(path: str | Path, name: str) -> Any:
    """A JSON or YAML config parsed as MONAI's ``ConfigParser.load_config_file`` parses it, after the
    bounds (``MAX_CONFIG_BYTES``, ``MAX_DEPTH``, no YAML anchors) are checked on its text; a
    ``MedtlError`` naming ``name`` when it is out of bounds or does not parse."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise MedtlError(f"larger than {MAX_CONFIG_BYTES >> 20} MB (a bundle config is a few KB)", path=name)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            if reason := _yaml_problem(text):
                raise MedtlError(reason, path=name)
            config = yaml.load(text, CheckKeyDuplicatesYamlLoader)  # noqa: S506 - MONAI's loader is a SafeLoader
        else:
            if _json_depth(text) > MAX_DEPTH:
                raise MedtlError(f"nested more than {MAX_DEPTH} deep", path=name)
            config = json.loads(text, object_pairs_hook=check_key_duplicates)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise MedtlError(f"does not parse ({exc.__class__.__name__}: {first})", path=name) from None
    if reason := size_problem(config):
        raise MedtlError(reason, path=name)
    return config


def config_files(root: str | Path) -> list[str]:
    """Every file under ``configs/`` MONAI would read as a config (it matches suffixes in any case),
    ``metadata.json`` left out, as bundle-relative POSIX paths."""
    root = Path(root)
    return sorted(
        p.relative_to(root).as_posix()
        for p in (root / "configs").rglob("*")
        if p.suffix.lower() in (".json", ".yaml", ".yml") and p.is_file() and p != root / "configs" / "metadata.json"
    )


#: ``--config_file "['configs/a.json', 'configs/b.json']"`` as a bundle's docs write it.
_CONFIG_LIST = re.compile(r"config_file[\s=]+[\"']?\[([^\]\n]*)\]")


def workflows(root: str | Path, names: list[str]) -> list[tuple[str, ...]]:
    """The config lists a site may run (``--config_file``): each config alone, every ordered pair
    (a second file overrides the first, as ``multi_gpu_train.json`` does ``train.json``) and every
    list of them named in the bundle's docs or metadata."""
    root = Path(root)
    runs: list[tuple[str, ...]] = [(n,) for n in names]
    runs += list(itertools.permutations(names, 2))
    texts = [p for p in (root / "docs").rglob("*") if p.is_file()] if (root / "docs").is_dir() else []
    texts += [root / "configs" / "metadata.json", root / "README.md"]
    for path in texts:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")[:MAX_CONFIG_BYTES]
        except OSError:
            continue
        for listed in _CONFIG_LIST.findall(text):
            run = tuple(n.strip(" '\"") for n in listed.split(","))
            if len(run) > 2 and all(n in names for n in run):
                runs.append(run)
    return list(dict.fromkeys(runs))


def _workload(runs: list[tuple[str, ...]], loaded: dict[str, Any]) -> str | None:
    """Why auditing ``runs`` would take too long, or None."""
    listed = sum(len(run) > 2 for run in runs)
    if listed > MAX_LISTED_WORKFLOWS:
        return f"the docs name {listed} config lists to run (more than {MAX_LISTED_WORKFLOWS})"
    sizes = {name: _values(config, MAX_VALUES + 1) for name, config in loaded.items()}
    total = sum(sizes[name] for run in runs for name in run)
    if total > MAX_AUDITED_VALUES:
        return (
            f"its {len(loaded)} configs make {len(runs)} workflows of {total:,} values in all, more than the "
            f"{MAX_AUDITED_VALUES:,} an audit reads (a bundle has a few small configs)"
        )
    return None


def audit_bundle(root: str | Path, configs: tuple[str, ...] | None = None) -> list[Finding]:
    """Findings in every workflow the bundle can run (``workflows``) over ``configs`` (default: every
    config under ``configs/``), in ``metadata.json`` (read into each as ``@_meta_``) and in
    ``logging.conf``; a file out of bounds or that does not parse is a finding too."""
    root = Path(root)
    names = list(configs) if configs is not None else config_files(root)
    findings: list[Finding] = []
    if len(names) > MAX_CONFIGS:
        return [Finding("configs", "", "", f"more than {MAX_CONFIGS} config files (a bundle has a handful)")]
    loaded, meta = {}, None
    for name in (*names, "configs/metadata.json"):
        try:
            config = read_config_file(root / name, name)
        except MedtlError as exc:
            findings.append(Finding(name, "", "", exc.message))
            continue
        if name == "configs/metadata.json":
            meta = config
            findings += audit_metadata(config, name)
        else:
            loaded[name] = config
    runs = workflows(root, list(loaded))
    if reason := _workload(runs, loaded):
        return [*findings, Finding("configs", "", "", reason)]
    for run in runs:
        findings += audit_workflow([(n, loaded[n]) for n in run], meta)
    if (root / "configs" / "logging.conf").is_file():
        findings += audit_logging_conf(root / "configs" / "logging.conf")
    return list({(f.where, f.text, f.reason): f for f in reversed(findings)}.values())[::-1]


def require_accepted(findings: Iterable[Finding], where: str | Path, *, trust: bool) -> None:
    """Refuse to run a bundle whose audit gave ``findings`` (one line, naming the first three), unless
    ``trust``: then each is logged as a warning and the run goes on (confined all the same)."""
    unique = list(dict.fromkeys(str(f) for f in findings))
    if unique and not trust:
        raise MedtlError(
            f"refusing to run: {len(unique)} config value(s) outside the allow-list: " + "; ".join(unique[:3]),
            path=where,
            hint="review them with `medtl bundle verify`; --trust runs them anyway (trusted senders only)",
        )
    for finding in unique:
        logger.warning("running with --trust: %s", finding)


__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_NUMBER",
    "MAX_TEXT",
    "MAX_VALUES",
    "Finding",
    "audit_bundle",
    "audit_config",
    "audit_expression",
    "audit_logging_conf",
    "audit_metadata",
    "audit_workflow",
    "bare_target",
    "config_files",
    "evaluated_text",
    "path_findings",
    "require_accepted",
    "read_config_file",
    "size_problem",
    "string_values",
    "workflows",
]
