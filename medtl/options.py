"""Command-line options generated from a recipe dataclass, so a default is written once.

A recipe field declared with ``knob(default, "help", choices=...)`` becomes ``--field-name`` with
that default, type, help and choices; booleans become ``--name/--no-name``; ``int | None`` accepts
``none``. ``recipe_from_args`` builds the recipe back from the parsed namespace.

Examples:
    >>> import argparse
    >>> from medtl.recipes import FineTuneRecipe
    >>> parser = argparse.ArgumentParser()
    >>> add_recipe_options(parser, FineTuneRecipe, only=("epochs", "lr"))
    >>> recipe_from_args(FineTuneRecipe, parser.parse_args(["--lr", "3e-4"]), only=("epochs", "lr")).lr
    0.0003
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["add_recipe_options", "knob", "recipe_fields", "recipe_from_args"]


def knob(default: Any, help: str, *, choices: Sequence[str] | None = None) -> Any:
    """A recipe field with the help text (and choices) its command-line option shows."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


def recipe_fields(cls: type, *, only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` that become options: declared with ``knob``, in ``only`` (when given), not in ``skip``."""
    wanted = None if only is None else set(only)
    return [
        f
        for f in dataclasses.fields(cls)
        if "help" in f.metadata and (wanted is None or f.name in wanted) and f.name not in skip
    ]


def _parser_for(annotation: str) -> Callable[[str], Any]:
    """The string-to-value converter of a field annotated ``int``, ``float``, ``str`` or ``X | None``."""
    base = annotation.replace(" ", "").removesuffix("|None")
    convert = {"int": int, "float": float, "str": str}[base]
    if base == annotation.replace(" ", ""):
        return convert
    return lambda text: None if text.lower() == "none" else convert(text)


def add_recipe_options(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    prefix: str = "",
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    title: str | None = None,
) -> None:
    """Add ``--{prefix}{field}`` for every knob of ``cls``, in an argument group when ``title`` is given."""
    group = parser.add_argument_group(title) if title else parser
    for f in recipe_fields(cls, only=only, skip=skip):
        flag = "--" + (prefix + f.name).replace("_", "-")
        dest = (prefix + f.name).replace("-", "_")
        if f.type == "bool":
            group.add_argument(
                flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=f"{f.metadata['help']} (default {'on' if f.default else 'off'})",
            )
            continue
        group.add_argument(
            flag,
            dest=dest,
            type=_parser_for(f.type),
            default=f.default,
            choices=f.metadata["choices"],
            metavar=None if f.metadata["choices"] else f.name.upper(),
            help=f"{f.metadata['help']} (default {f.default})",
        )


def recipe_from_args(
    cls: type,
    args: argparse.Namespace,
    *,
    prefix: str = "",
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    **fixed: Any,
) -> Any:
    """``cls`` with every option ``add_recipe_options`` added taken from ``args``, plus ``fixed``."""
    values = {
        f.name: getattr(args, (prefix + f.name).replace("-", "_")) for f in recipe_fields(cls, only=only, skip=skip)
    }
    return cls(**values, **fixed)
