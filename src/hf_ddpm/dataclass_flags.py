"""Command-line flags from dataclasses: each field ``name`` is a flag ``--name`` (and ``--name-with-dashes``) of the
field's type, with its default and, from the field's metadata, its ``help``, its ``aliases`` and any other
``argparse.add_argument`` keyword. The conventions are those of transformers' ``HfArgumentParser``, which
``training/train.py`` used before; this module does not import transformers, so the training extra doesn't install it
and importing it does not slow down start-up.

- ``X | None``: a flag of type X, default None.
- ``bool``: ``--flag`` alone is true, ``--flag false`` (or no, f, n, 0) is false; a field that defaults to true also
  has ``--no_flag``.
- ``list[X]``: one or more values, ``--flag 1 2 3``.

An unknown flag or a bad value stops with one line (``SystemExit``) that names it and the closest flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any, NoReturn

TRUE_WORDS = ("true", "yes", "t", "y", "1")
FALSE_WORDS = ("false", "no", "f", "n", "0")


def string_to_bool(text: str) -> bool:
    """A boolean flag's value: true, yes, t, y, 1 -> True; false, no, f, n, 0 -> False (any case)."""
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_type(hint: Any) -> tuple[Any, bool]:
    """The type of one value of a field annotated ``hint``, and whether the flag takes a list: ``int | None`` ->
    (int, False), ``list[float]`` -> (float, True). Raises TypeError for a union of two types other than None."""
    members = [member for member in typing.get_args(hint) if member is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if len(members) != 1:
            raise TypeError(f"a flag takes one type (or it and None), not {hint}")
        hint = members[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


class DataclassArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` with a flag for every field of ``dataclass_types``; ``parse_into_dataclasses``
    returns one instance of each. Errors are one line: ``SystemExit("unknown flag --learning_rat (did you mean
    --learning_rate?) ...")``."""

    def __init__(self, dataclass_types: Sequence[type], **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --learning_rat is a typo to report, not --learning_rate
        super().__init__(**kwargs)
        self.dataclass_types = tuple(dataclass_types)
        for cls in self.dataclass_types:
            hints = typing.get_type_hints(cls)
            for field in dataclasses.fields(cls):
                if field.init:
                    self.add_field(field, hints[field.name])

    def add_field(self, field: dataclasses.Field, hint: Any) -> None:
        """The flag of one field (and ``--no_<name>`` for a boolean that defaults to true)."""
        metadata = dict(field.metadata)
        names = [f"--{field.name}"]
        if "_" in field.name:
            names.append(f"--{field.name.replace('_', '-')}")
        names += metadata.pop("aliases", [])
        kind, is_list = flag_type(hint)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            raise TypeError(f"the field {field.name} has no default: every flag needs one")
        if kind is bool:
            options = {"type": string_to_bool, "nargs": "?", "const": True}  # a bare --flag is --flag true
        else:
            options = {"type": kind, "nargs": "+" if is_list else None}
        self.add_argument(*names, default=default, **{**options, **metadata})
        if kind is bool and default is True:
            negative = [f"--no_{field.name}", f"--no-{field.name.replace('_', '-')}"]
            self.add_argument(*negative, action="store_false", dest=field.name, help=f"--{field.name} false.")

    def parse_into_dataclasses(self, args: Sequence[str]) -> tuple:
        """One instance of each dataclass from the flags ``args`` (arguments the parser has beyond the fields, such
        as one added with ``add_argument``, are parsed and dropped). Raises SystemExit for an unknown flag."""
        namespace, unknown = self.parse_known_args(list(args))
        flags = [arg for arg in unknown if arg.startswith("-")]
        if flags:
            self.error(f"unknown flag {', '.join(flags)}{self.suggestion(flags[0])}")
        if unknown:
            self.error(f"unexpected value {' '.join(unknown)} (every value follows its flag)")
        values = vars(namespace)
        return tuple(
            cls(**{field.name: values[field.name] for field in dataclasses.fields(cls) if field.init})
            for cls in self.dataclass_types
        )

    def given_flags(self, args: Sequence[str]) -> dict[str, Any]:
        """The arguments that the flags ``args`` set, in any spelling (``--max-train-steps 5``, ``--recipe=gpu``),
        with their values; those left at their defaults are not in it."""
        unset = object()
        namespace = argparse.Namespace(**{action.dest: unset for action in self._actions})
        namespace, _ = self.parse_known_args(list(args), namespace)
        return {name: value for name, value in vars(namespace).items() if value is not unset}

    def suggestion(self, flag: str) -> str:
        """' (did you mean --x?)' for the flag closest to ``flag``, or '' where none is close."""
        names = [name for action in self._actions for name in action.option_strings if name.startswith("--")]
        close = difflib.get_close_matches(flag.split("=")[0], names, n=1)
        return f" (did you mean {close[0]}?)" if close else ""

    def error(self, message: str) -> NoReturn:
        """argparse's errors (an unknown flag, a bad value, a missing value) as one line, not usage and exit."""
        raise SystemExit(f"{message}; {self.prog} --help lists the flags.")
