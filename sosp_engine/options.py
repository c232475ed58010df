"""Options declared once: each config field's type, default, bounds, choices, title and help sit in its annotation (a
pydantic `Field`), and checking a config, the command line's flags and the dashboard's widgets are all read from there.

A knob is added by declaring it (`Annotated[int, Field(ge=1, title=..., description=...)]`) and reading it where the
work uses it; every front end offers it from the declaration.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import annotated_types
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

NONE_WORD = "none"  # how None is written on the command line and in text inputs


@dataclass(frozen=True)
class Option:
    """One declared option as a front end offers it: its kind, default, allowed values and words."""

    name: str
    kind: type  # int, float, str, bool, or tuple (of `item`)
    default: Any
    title: str
    help: str
    choices: tuple = ()  # the only values allowed (a Literal)
    words: tuple[str, ...] = ()  # keywords allowed besides numbers or text (e.g. "auto")
    nullable: bool = False  # None is a value ("none" on the command line)
    item: type | None = None  # a tuple's element kind
    low: float | None = None
    low_open: bool = False  # the low bound itself is not allowed
    high: float | None = None
    high_open: bool = False
    aliases: tuple[str, ...] = ()  # other flags that set it (an earlier or shorter name)
    flag: str = ""  # the flag, where it is not the name's (--model for model_spec)

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag or "--" + self.name.replace("_", "-"), *self.aliases)

    def bounds(self) -> str:
        """'at least 1', 'in (0, 1]', '' : the range in words."""
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'above' if self.low_open else 'at least'} {low}"
        return f"{'below' if self.high_open else 'at most'} {high}" if self.high is not None else ""

    def parse(self, text: str) -> Any:
        """The value a typed text stands for (a flag's argument, a text input), or ValueError saying what is allowed."""
        if self.nullable and text.strip().lower() == NONE_WORD:
            return None
        if text in self.words or text in self.choices:
            return text
        if self.kind in (int, float):
            try:
                return self.kind(text)
            except ValueError:
                allowed = " or ".join((*self.words, *([NONE_WORD] if self.nullable else ())))
                raise ValueError(
                    f"takes {'a whole number' if self.kind is int else 'a number'}"
                    f"{' or ' + allowed if allowed else ''}, got '{text}'"
                ) from None
        if self.choices:
            raise ValueError(f"takes one of {', '.join(map(str, self.choices))}, got '{text}'")
        return text

    def described(self) -> str:
        """The help with the range and the default, as a flag or a widget shows it."""
        shown = self.default
        if self.kind is tuple:
            shown = " ".join(map(str, shown))
        shown = NONE_WORD if shown in (None, "") else shown
        bounds = self.bounds()
        return f"{self.help}{' (' + bounds + ')' if bounds else ''}; default {shown}"


def _number(value: float | None) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}" if value is not None else ""


@functools.cache
def options_of(cls: type) -> tuple[Option, ...]:
    """The declared options of a config class, in declaration order (nested configs and undeclared fields left out)."""
    hints = get_type_hints(cls, include_extras=True)
    found = []
    for f in dataclasses.fields(cls):
        info = _field_info(hints[f.name])
        if info is None or dataclasses.is_dataclass(_bare(hints[f.name])):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        found.append(_option(f.name, _bare(hints[f.name]), default, info))
    return tuple(found)


def option_named(cls: type, name: str) -> Option:
    return next(option for option in options_of(cls) if option.name == name)


def read_config(cls: type, data: dict[str, Any]) -> Any:
    """A config of class `cls` from its fields' values as JSON holds them, each checked against its declaration
    (pydantic's ValidationError where one is not allowed)."""
    return _adapter(cls).validate_json(json.dumps(data, default=str))


def check_config(config: object, error: type[Exception]) -> None:
    """Raise `error` naming the first field of `config` whose value its declaration does not allow."""
    try:
        read_config(type(config), dataclasses.asdict(config))
    except ValidationError as exc:
        raise error(f"the {type(config).__name__} {first_fault(exc)}") from None


def first_fault(exc: ValidationError) -> str:
    """`has a wrong value at FIELD: WHY (got VALUE)` for the first error pydantic found."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in _field_path(error["loc"])) or "its top level"
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"has fields this version does not know: {where}"
    got = repr(error.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"has a wrong value at {where}: {error['msg']} (got {got})"


def _field_path(loc: tuple) -> list:
    """The fields of an error's location, without the union member pydantic tried last ('constrained-float')."""
    path = []
    for part in loc:
        if isinstance(part, str) and (not part.isidentifier() or part in _TYPE_TAGS):
            break
        path.append(part)
    return path


_TYPE_TAGS = {"int", "float", "str", "bool", "none", "tuple", "list", "dict"}


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _field_info(hint: Any) -> FieldInfo | None:
    return next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, FieldInfo)), None)


def _bare(hint: Any) -> Any:
    """The type under `Annotated[...]`."""
    return get_args(hint)[0] if hasattr(hint, "__metadata__") else hint


def _option(name: str, kind: Any, default: Any, info: FieldInfo) -> Option:
    members = get_args(kind) if get_origin(kind) in (Union, types.UnionType) else (kind,)
    nullable = type(None) in members
    members = tuple(m for m in members if m is not type(None))
    bounds = {type(m): m for m in info.metadata}
    for member in members:  # bounds on one member of a union (a number that may also be a word)
        bounds.update(
            {
                type(m): m
                for part in getattr(member, "__metadata__", ())
                for m in getattr(part, "metadata", ())
            }
        )
    members = tuple(_bare(m) for m in members)
    words = tuple(w for m in members if get_origin(m) is Literal for w in get_args(m))
    plain = [m for m in members if get_origin(m) is not Literal]
    item = None
    if plain and get_origin(plain[0]) is tuple:
        base, item = tuple, get_args(plain[0])[0]
    elif plain:
        base = plain[0]
    else:  # only a Literal: its words are the choices
        base = type(words[0])
    low = bounds.get(annotated_types.Ge) or bounds.get(annotated_types.Gt)
    high = bounds.get(annotated_types.Le) or bounds.get(annotated_types.Lt)
    return Option(
        name=name,
        kind=base,
        default=default,
        title=info.title or name.replace("_", " ").capitalize(),
        help=info.description or "",
        choices=words if not plain else (),
        words=words if plain else (),
        nullable=nullable,
        item=item,
        low=None if low is None else getattr(low, "ge", getattr(low, "gt", None)),
        low_open=isinstance(low, annotated_types.Gt),
        high=None if high is None else getattr(high, "le", getattr(high, "lt", None)),
        high_open=isinstance(high, annotated_types.Lt),
        aliases=tuple((info.json_schema_extra or {}).get("aliases", ())),
        flag=(info.json_schema_extra or {}).get("flag", ""),
    )
