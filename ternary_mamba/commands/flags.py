"""The CLI's flags, made from a command's config dataclass in one place.

Every leaf field of the config (nested configs flattened) becomes `--field-name` with its type, choices and help
taken from the field; the help shows the default of the command's default config.  Flags default to "not
given", so the settings are: the dataclass defaults, then `--config FILE` (JSON or YAML; a run's run.json
works), then the flags given on the command line.  No torch is imported here (`--help` stays instant).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

from ..config_base import get_path, leaf_fields, set_path
from ..errors import UserError

DEST = "cfg__"   # argparse dest prefix of config fields: cfg__train__lr


def _flag(path: tuple[str, ...], f) -> str:
    return f.metadata.get("flag") or "--" + path[-1].replace("_", "-")


def _kind(hint):
    """(base type, container) where container is None, 'list' (nargs '+') or 'tuple' (nargs '*' / fixed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        fixed = len(args) if origin is tuple and args and args[-1] is not Ellipsis else None
        return (args[0] if args else str), ("list" if origin is list else "tuple"), fixed
    return hint, None, None


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v)) or "none"
    return str(v)


def add_config_flags(parser: argparse.ArgumentParser, cls, defaults=None, groups: dict[str, str] | None = None,
                     with_config_file: bool = True) -> None:
    """Add one flag per leaf field of `cls` (help and defaults from `defaults`, an instance of cls)."""
    defaults = defaults if defaults is not None else cls()
    if with_config_file:
        parser.add_argument("--config", dest=DEST + "file", metavar="FILE", default=None,
                            help="a config file (JSON or YAML; a run's run.json replays it); flags override it")
    sections: dict[str, argparse._ArgumentGroup] = {}
    for path, f, hint in leaf_fields(cls):
        if not f.metadata.get("cli", True):
            continue
        target = parser
        if len(path) > 1 and groups and path[0] in groups:
            if path[0] not in sections:
                sections[path[0]] = parser.add_argument_group(groups[path[0]])
            target = sections[path[0]]
        base, container, fixed = _kind(hint)
        default = get_path(defaults, path)
        help_text = f.metadata.get("help", "")
        if default is not None and default != () and "default" not in help_text and base is not bool:
            help_text += f" (default: {_show(default)})"
        kw: dict = {"help": help_text or None, "default": argparse.SUPPRESS, "dest": DEST + "__".join(path)}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if base is not bool and not f.metadata.get("choices"):
            kw["metavar"] = f.metadata.get("metavar") or path[-1].upper()
        if base is bool and container is None:
            kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kw["type"] = base if base in (int, float) else str
            if container:
                kw["nargs"] = fixed or ("+" if container == "list" else "*")
        if f.metadata.get("positional"):
            kw.pop("dest")
            kw["metavar"] = path[-1].upper()
            target.add_argument(DEST + "__".join(path), **kw)
            continue
        if f.metadata.get("required"):
            kw["required"] = False    # may come from --config; the command checks
            kw["help"] = (kw["help"] or "") + " (required)"
        target.add_argument(_flag(path, f), **kw)


MAX_CONFIG_BYTES = 1_000_000


def _no_alias_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """safe_load without aliases: `*x` expands a shared node, and nested aliases grow exponentially (a
        "billion laughs" file); a config file has no need of them."""
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not accepted in a config file",
                                                  event.start_mark)
            return super().compose_node(parent, index)
    return Loader


def read_config_file(path: str | Path) -> dict:
    """A JSON or YAML mapping; a run folder's run.json ({"command", "config": {...}}) gives its config."""
    p = Path(path)
    if p.is_dir() and (p / "run.json").exists():
        p = p / "run.json"
    try:
        with open(p, "rb") as f:              # bounded: /dev/zero or a huge file is refused, not read whole
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise UserError(f"{p}: larger than {MAX_CONFIG_BYTES // 1000} kB; a config file is a few settings")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{p}: config file not found") from None
    except IsADirectoryError:
        raise UserError(f"{p}: is a folder (a run folder holds run.json; pass a file)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read the config file ({getattr(e, 'strerror', None) or e})") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UserError(f"{p}: YAML configs need PyYAML (pip install pyyaml); or write it as JSON") from None
        try:
            data = yaml.load(text, Loader=_no_alias_loader())  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of settings")
    if "command" in data and isinstance(data.get("config"), dict):   # a run.json
        data = data["config"]
    return data


def config_from_args(cls, ns: argparse.Namespace, command: str = "", base: dict | None = None):
    """The typed config: `base` (or the --config file), then every flag given on the command line."""
    source = getattr(ns, DEST + "file", None)
    d: dict = dict(base or {})
    if source:
        d = read_config_file(source)
    d = json.loads(json.dumps(d))    # a deep copy of plain data
    given = {k[len(DEST):]: v for k, v in vars(ns).items() if k.startswith(DEST) and k != DEST + "file"}
    for key, value in given.items():
        set_path(d, tuple(key.split("__")), list(value) if isinstance(value, tuple) else value)
    where = f"{source}" if source else (command or cls.__name__)
    return cls.from_dict(d, where)


def require(cfg, *names: str, command: str = "") -> None:
    """Fields that must be set (flags marked required may also come from --config).  The error names the
    field's flag (positional fields by their name), as the CLI user knows it."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for n in names:
        if getattr(cfg, n) in (None, [], ()):
            f = fields[n]
            what = n.upper() if f.metadata.get("positional") else _flag((n,), f)
            raise UserError(f"{what} is required" + (f" (settings field `{n}`)" if what != "--" + n else ""))


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}

