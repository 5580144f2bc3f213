"""Extension points with typed options, and the one spec grammar `name:key=value,...` that selects them.

An extension (a method, a modification kind, a regime, ...) is a small class with a `name` and an `Options`
dataclass; each field of `Options` is declared with `option(help, default, minimum=, maximum=, choices=,
many=)`. `Registry.parse` turns `name:key=value,...` into the class and a validated `Options` instance (a bare
value after a `many` option extends its list: `top_k:k=10,30`); `Registry.help` renders the help text from
the same metadata, so the CLI's help and the README cannot drift from what the parser accepts. A class from a
user's file is named `path/to/file.py:ClassName` (the same loader serves studies: `load_class`).
No torch here: every layer above `store` may use it."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import re
import sys
import textwrap
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from store.records import InputError, content_hash


def option(help: str, default: Any = None, *, minimum: float | None = None, maximum: float | None = None,
           choices: Iterable[str] = (), many: bool = False, default_text: str = "") -> Any:
    """A field of an options dataclass: its help, default and bounds (inclusive). `many`: a list of values
    (the default is a tuple). `default_text` describes a default that depends on the study (given as None)."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "choices": tuple(choices), "many": many,
                "default_text": default_text}
    return dataclasses.field(default=tuple(default or ()) if many else default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """An extension without options."""


class Extension:
    """Base of every extension point's classes: a registry `name`, a one-line docstring that says what it does,
    and an `Options` dataclass declared with `option`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    @classmethod
    def summary(cls) -> str:
        return (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")


E = TypeVar("E", bound=Extension)
_SPEC = re.compile(r"^(?P<name>[^:]*\.py:[A-Za-z_]\w*|[^:]*)(?::(?P<options>.*))?$", re.S)


def split_spec(text: str) -> tuple[str, str]:
    """`name:options` -> (name, options); a name may be `path/to/file.py:ClassName`."""
    match = _SPEC.match(text)
    assert match is not None  # the pattern matches every string
    return match["name"], match["options"] or ""


def _scalar(hint: Any) -> type:
    """int, float or str from a field's type hint (`int | None`, `tuple[int, ...]`, ...)."""
    args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
    if typing.get_origin(hint) in (typing.Union, types.UnionType, tuple) and args:
        return _scalar(args[0])
    return hint


def key(field: dataclasses.Field) -> str:
    """A field's key in a spec: its name without a trailing underscore (`from_` is written `from=`)."""
    return field.name.removesuffix("_")


def fields(options: type) -> list[tuple[dataclasses.Field, type]]:
    """The fields of an options dataclass with the scalar type of each."""
    hints = typing.get_type_hints(options)
    return [(f, _scalar(hints[f.name])) for f in dataclasses.fields(options)]


def _convert(value: str, kind: type, key: str, where: str) -> Any:
    if kind is str:
        return value
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        raise InputError(f"{where}: {key} needs {'an integer' if kind is int else 'a number'}, got {value!r}")
    return int(number) if kind is int else number


def check_bounds(options: Any, where: str) -> None:
    """Every field within its declared bounds and choices; one line naming the key and what it takes."""
    for f, _ in fields(type(options)):
        meta, value = f.metadata, getattr(options, f.name)
        for v in value if meta.get("many") else (value,):
            if v is None:
                continue
            if meta.get("choices") and v not in meta["choices"]:
                raise InputError(f"{where}: {key(f)}={v} is not one of {', '.join(meta['choices'])}")
            if meta.get("minimum") is not None and v < meta["minimum"]:
                raise InputError(f"{where}: {key(f)}={v:g} must be at least {meta['minimum']:g} ({meta['help']})")
            if meta.get("maximum") is not None and v > meta["maximum"]:
                raise InputError(f"{where}: {key(f)}={v:g} must be at most {meta['maximum']:g} ({meta['help']})")


def parse_options(options: type, text: str, name: str, where: str) -> Any:
    """`key=value,...` -> a validated instance of the dataclass `options`."""
    known = {key(f): (f, kind) for f, kind in fields(options)}
    given: dict[str, Any] = {}
    last = None
    for item in filter(None, text.split(",")):
        written, eq, value = item.partition("=")
        if not eq and last is not None and known[last][0].metadata.get("many"):
            written, value = last, item
        elif not eq or written not in known:
            takes = ", ".join(f"{k}=" for k in known) or "no options"
            raise InputError(f"{where}: option {item!r} not understood; {name} takes {takes}")
        field, kind = known[written]
        parsed = _convert(value, kind, written, where)
        if field.metadata.get("many"):
            given[field.name] = (*given.get(field.name, ()), parsed)
        else:
            given[field.name] = parsed
        last = written
    instance = options(**given)
    check_bounds(instance, where)
    return instance


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_text(v) for v in value)
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def label(name: str, options: Any, defaults: Any) -> str:
    """A configuration's name: `name`, then the options that differ from `defaults` in declaration order
    (`exact:models=1`, `cg:iterations=5`)."""
    changed = [f"{key(f)}={_text(getattr(options, f.name))}" for f, _ in fields(type(options))
               if getattr(options, f.name) != getattr(defaults, f.name)]
    return f"{name}:{','.join(changed)}" if changed else name


def describe_option(field: dataclasses.Field, kind: type) -> str:
    meta = field.metadata
    shape = f"{kind.__name__.upper()},..." if meta.get("many") else "|".join(meta.get("choices") or ()) or \
        kind.__name__.upper()
    if meta.get("default_text"):
        default = meta["default_text"]
    elif field.default is None or field.default == ():
        default = ""
    else:
        default = _text(field.default)
    return f"{key(field)}={shape}: {meta.get('help', '')}" + (f" (default {default})" if default else "")


class Registry(Generic[E]):
    """The classes of one extension point by name; `path/to/file.py:ClassName` loads a user's class."""

    def __init__(self, what: str, base: type[E], builtins: Iterable[type[E]]):
        self.what, self.base = what, base
        self.builtins: dict[str, type[E]] = {cls.name: cls for cls in builtins}

    def __contains__(self, name: object) -> bool:
        return name in self.builtins

    def __iter__(self):
        return iter(self.builtins)

    def __getitem__(self, name: str) -> type[E]:
        return self.builtins[name]

    def names(self) -> list[str]:
        return list(self.builtins)

    def resolve(self, name: str) -> type[E]:
        """A built-in by name, or `path/to/file.py:ClassName`."""
        if name in self.builtins:
            return self.builtins[name]
        if not name.endswith(".py") and ".py:" not in name:
            raise InputError(f"unknown {self.what} {name!r}; use one of {', '.join(self.builtins)} "
                             "or path/to/file.py:ClassName")
        cls = load_class(name, self.base, self.what)
        if cls.name in self.builtins and self.builtins[cls.name] is not cls:
            raise InputError(f"{name}: the {self.what} name {cls.name!r} is taken by a built-in; choose another")
        return cls

    def parse(self, text: str) -> tuple[type[E], Any]:
        """`name:key=value,...` -> the class and its validated options."""
        name, options = split_spec(text)
        cls = self.resolve(name)
        return cls, parse_options(cls.Options, options, cls.name, f"{self.what} {text!r}")

    def help(self) -> str:
        """One paragraph per class: `name  summary`, then one line per option with its meaning and default."""
        lines = []
        for name, cls in self.builtins.items():
            lines += textwrap.wrap(f"{name}: {cls.summary()}", 112, subsequent_indent="    ")
            for f, kind in fields(cls.Options):
                lines += textwrap.wrap(describe_option(f, kind), 112, initial_indent=" " * 4,
                                       subsequent_indent=" " * 8)
        return "\n".join(lines)


def help_text(sections: Iterable[tuple[str, Registry]], footer: str) -> str:
    """Headed sections of `Registry.help()`, indented, then `footer`: the option lists of `--help` and the README."""
    lines = []
    for heading, registry in sections:
        lines += [heading, *(f"  {line}" for line in registry.help().splitlines())]
    return "\n".join([*lines, footer])


def load_class(spec: str, base: type, what: str) -> type:
    """The class `ClassName` from `path/to/file.py:ClassName`, a subclass of `base` with a `name`. The module is
    imported afresh (an edited file is seen) and kept in `sys.modules`, so its classes pickle by reference."""
    path, _, cls_name = spec.rpartition(":")
    if not path.endswith(".py") or not cls_name:
        raise InputError(f"{what} {spec!r}: name a class as path/to/file.py:ClassName")
    file = Path(path).resolve()
    if not file.is_file():
        raise InputError(f"{what} file {path} does not exist")
    module_name = f"ifledger_user_{content_hash(str(file), length=8)}"
    spec_obj = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[module_name] = module
    try:
        spec_obj.loader.exec_module(module)
    except SystemExit as e:
        raise InputError(f"{what} file {path} called sys.exit({e.code!r}) when imported") from None
    except Exception as e:
        raise InputError(f"{what} file {path} failed to import: {type(e).__name__}: {e}") from e
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise InputError(f"{path} has no {base.__name__} subclass named {cls_name!r}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise InputError(f"{path}:{cls_name} must define {missing} (abstract in {base.__name__})")
    if not getattr(cls, "name", ""):
        raise InputError(f"{path}:{cls_name} must set a `name`")
    return cls
