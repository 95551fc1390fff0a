"""The base of every typed config: dataclass fields that carry their own help text, and strict dict round trips.

A command's settings are one dataclass (nested dataclasses for the parts: `TernaryConfig`, `TrainConfig`, ...).
`option(default, help=..., choices=...)` declares a field once; the CLI builds its flags from these fields
(`commands/flags.py`), config files (JSON / YAML) and `run.json` load through `from_dict`, and the Python API
constructs the same dataclasses.  Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING

from .errors import UserError


def option(default=MISSING, *, help: str = "", choices=None, default_factory=MISSING, cli: bool = True,
           metavar=None, flag: str | None = None, resume_free: bool = False, required: bool = False,
           positional: bool = False):
    """A config field with its CLI help.  cli=False: settable from files and Python only.  flag: the CLI
    flag when it is not `--field-name`.  resume_free: may differ when a run is resumed (does not change the
    trajectory: logging, paths, threads).  required: the command needs it (from a flag, a file or Python).
    positional: a positional argument on the command line."""
    md = {"help": help, "choices": tuple(choices) if choices else None, "cli": cli, "metavar": metavar,
          "flag": flag, "resume_free": resume_free, "required": required, "positional": positional}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value, hint, where: str):
    """`value` (from JSON / YAML / argparse) as type `hint`, or a UserError naming `where`."""
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where} must be an object of {hint.__name__} fields, got {value!r}")
        return hint.from_dict(value, where)
    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: got {value!r}")
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{where} must have {len(args)} values, got {len(value)}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else typing.Any
        out = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    return value


class Config:
    """Mixin for config dataclasses: `to_dict` / `from_dict` (strict: unknown keys and wrong types are errors)
    and `replace`."""

    def to_dict(self) -> dict:
        def plain(v):
            if dataclasses.is_dataclass(v):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v
        return plain(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        if not isinstance(d, dict):
            raise UserError(f"{source}: expected an object of {cls.__name__} fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"{source}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                            f"({cls.__name__} has: {', '.join(sorted(names))})")
        h = hints(cls)
        d = dict(d)
        for f in dataclasses.fields(cls):   # a partial nested section fills in from *this* config's default
            if isinstance(d.get(f.name), dict) and dataclasses.is_dataclass(h[f.name]) \
                    and f.default_factory is not MISSING:
                d[f.name] = _merge(f.default_factory().to_dict(), d[f.name])
        return cls(**{k: coerce(v, h[k], f"{source}: {k}") for k, v in d.items()})

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def leaf_fields(cls, path: tuple[str, ...] = ()):
    """(path, field, type hint) of every non-dataclass field, depth first (nested configs flattened)."""
    h = hints(cls)
    for f in dataclasses.fields(cls):
        hint = h[f.name]
        if dataclasses.is_dataclass(hint):
            yield from leaf_fields(hint, path + (f.name,))
        else:
            yield path + (f.name,), f, hint


def get_path(obj, path: tuple[str, ...]):
    for p in path:
        obj = getattr(obj, p)
    return obj


def set_path(d: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = value


def resume_free_paths(cls) -> set[tuple[str, ...]]:
    return {path for path, f, _ in leaf_fields(cls) if f.metadata.get("resume_free")}
