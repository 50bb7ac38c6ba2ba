"""Tables of TOML as dataclasses, the machinery under the stage config (:mod:`.config`): a table read into a
dataclass with every value type-checked (``coerce``) and its allowed values enforced (``build_section``), values
written back as TOML (``toml_value``), and ``section.key=value`` overrides parsed (``parse_override``). Every error
is a :class:`ConfigError` naming the file and the key."""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from typing import Any

from .errors import naming

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "tomllib", "build_section", "coerce", "toml_value", "parse_override"]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def build_section(section_type: type, values: dict[str, Any], prefix: str, source: str):
    hints = typing.get_type_hints(section_type)
    fields = {f.name: f for f in dataclasses.fields(section_type)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            valid = ", ".join(fields)
            raise ConfigError(f"{source}: unknown key '{prefix}.{key}' (valid keys in [{prefix}]: {valid})")
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}", source)
        choices = fields[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise ConfigError(
                f"{source}: {prefix}.{key} = {kwargs[key]!r} is not one of {', '.join(map(repr, choices))}"
            )
    return section_type(**kwargs)


def coerce(value: Any, expected: Any, key: str, source: str) -> Any:
    def bad() -> ConfigError:
        name = getattr(expected, "__name__", str(expected))
        return ConfigError(f"{source}: {key} must be {name}, got {type(value).__name__} {value!r}")

    origin = typing.get_origin(expected)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list of {item_type.__name__}, got {value!r}")
        return [coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad()
    if expected is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise bad()  # pragma: no cover - every field type is handled above


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in TOML syntax; bare words are strings)."""
    if "=" not in text:
        raise naming(ConfigError, "{option} {text!r}: expected section.key=value", {"option": "overrides"}, text=text)
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise naming(ConfigError, "{option} {text!r}: the key must look like section.key (e.g. train.lr)",
                     {"option": "overrides"}, text=text)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value
