"""Config machinery: help-carrying fields, typed coercion of file and command-line values,
unknown-key errors, and reading JSON/YAML files. The phases' dataclasses live in config.py."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from .errors import ConfigError


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (lists/dicts get a factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


class ConfigBase:
    """Shared machinery: from_dict with unknown-key errors, typed overrides, help text."""

    _section: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config"):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown key '{cls._section}.{unknown[0]}' "
                              f"(known: {', '.join(sorted(names))})")
        types = cls.field_types()
        return cls(**{k: coerce(v, types[k], f"{source}: {cls._section}.{k}") for k, v in data.items()})

    def override(self, key: str, raw: str, source: str = "command line"):
        """Return a copy with ``key`` set from the string ``raw`` parsed by the field's type."""
        types = self.field_types()
        if key not in {f.name for f in dataclasses.fields(self)}:  # type: ignore[arg-type]
            raise ConfigError(f"{source}: unknown key '{self._section}.{key}'")
        where = source if source.startswith("--") else f"{source}: {self._section}.{key}"
        value = coerce(parse_literal(raw), types[key], where)
        return dataclasses.replace(self, **{key: value})  # type: ignore[type-var]

    @classmethod
    def help_lines(cls) -> list[tuple[str, Any, str]]:
        return [(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory(),  # type: ignore[misc]
                 f.metadata.get("help", "")) for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    def check(self, ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{self._section}.{key}={getattr(self, key)!r}: expected {expected}")

    def validate(self) -> None:  # overridden per phase
        pass


def parse_literal(raw: str) -> Any:
    """Parse a command-line value: JSON when it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, ValueError):
        return raw


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if isinstance(value, str):  # "a,b" on the command line; "1,0.5" for a list of numbers
            value = [v if args and args[0] is str else parse_literal(v) for v in value.split(",") if v]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):  # "--x 1": a list of one number
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, args[0], where) for v in value] if args else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml  # PyYAML: optional, only YAML config files need it
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text) if text.strip() else {}
    except Exception as e:  # yaml and json raise different types
        raise ConfigError(f"{p}: cannot parse config: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return data
