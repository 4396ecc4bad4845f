"""Command-line flags made from TrainConfig's fields: the type, default and help of every flag
come from the dataclass (typing.get_type_hints), so `train`, `plan` and `resume` cannot drift from
it or from each other."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields

from app.core.config import METHOD_CHOICES, QUANTIZE_CHOICES, TrainConfig, field_help

# a field's flag when it is not --field-name; more than one: the first is documented, the rest
# are the older names, still accepted
FLAG_NAMES = {"micro_batch": ("--batch",), "val_split": ("--eval-split", "--val-split"),
              "val_data": ("--eval-data", "--val-data"), "start_from": ("--from",)}
METAVARS = {"start_from": "RUN"}  # a value's name in --help where the field's name would mislead


def config_help(name: str, cls: type = TrainConfig) -> str:
    """A field's help text, escaped for argparse."""
    return field_help(cls, name).replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, cls: type = TrainConfig, only: tuple[str, ...] | None = None,
                     skip: tuple[str, ...] = (), required: tuple[str, ...] = (), defaults: dict | None = None,
                     helps: dict | None = None) -> None:
    """One flag per field of `cls` (those in `only`, in that order, else every field not in `skip`):
    `bool` -> a switch, `bool | None` -> --x / --no-x, numbers and text -> a typed value, with the
    field's default unless `defaults` says otherwise and its help unless `helps` does. Fields with
    a fixed set of values (quantize, attention, loss_kernel) get their choices."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    names = list(only) if only is not None else [name for name in by_name if name not in skip]
    defaults, helps = defaults or {}, helps or {}
    for name in names:
        kind, optional = _base_type(hints[name])
        flags = FLAG_NAMES.get(name, ("--" + name.replace("_", "-"),))
        default = defaults.get(name, by_name[name].default if by_name[name].default is not MISSING else None)
        text = helps.get(name, config_help(name, cls))
        if kind is bool and optional:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif kind is bool:
            parser.add_argument(*flags, dest=name, action="store_true", help=text)
        else:
            options = {"required": True} if name in required else {"default": default}
            if name in METAVARS:
                options["metavar"] = METAVARS[name]
            parser.add_argument(*flags, dest=name, type=kind, choices=_choices(name), help=text, **options)


def config_values(args: argparse.Namespace, cls: type = TrainConfig) -> dict:
    """The fields of `cls` the parsed arguments give."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def _base_type(hint) -> tuple[type, bool]:
    """(int, True) for `int | None`, (str, False) for `str`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _choices(name: str) -> tuple[str, ...] | None:
    if name == "quantize":
        return QUANTIZE_CHOICES
    if name == "method":
        return METHOD_CHOICES
    if name == "early_stop":
        from app.core.train.overfit import EARLY_STOP_CHOICES  # here: each command loads its own part of the engine (the window starts without them)

        return EARLY_STOP_CHOICES
    if name in ("attention", "loss_kernel"):
        from app.core.plan.kernel_choice import ATTENTION_CHOICES, LOSS_CHOICES  # here: each command loads its own part of the engine (the window starts without them)

        return ATTENTION_CHOICES if name == "attention" else LOSS_CHOICES
    return None
