"""Dataclass-from-dict decoding: strict keys, typed fields, nested dataclasses found from the type hints.

The one decoder of the package (model, training and unified configs). Unknown keys are refused (or logged when not
strict) with the path of the section and the known names; a section that is not a mapping, or a value of the wrong
type, raises :class:`ConfigFieldError` naming the dotted field (``pixel_encoder.ch must be an integer, got '32'``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import types
import typing
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ConfigFieldError(ValueError):
    """A config value has the wrong type or range; ``field`` is its dotted path (e.g. ``pixel_encoder.ch``)."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"invalid config: {field} {message}" if field else f"invalid config: {message}")

    def within(self, prefix: str) -> ConfigFieldError:
        """The same error for a field nested under ``prefix``."""
        return ConfigFieldError(f"{prefix}.{self.field}" if self.field else prefix, self.message)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a dataclass, cached."""
    return typing.get_type_hints(cls)


def describe(value: Any) -> str:
    """``'512' (str)``: a value and its type, for messages."""
    return f"{value!r} ({type(value).__name__})"


def check_type(value: Any, hint: Any, name: str) -> Any:
    """``value`` checked against the annotation ``hint``; returns it normalised (ints accepted for floats, lists for
    tuples). Hints other than bool/int/float/str, tuples of those and their optionals are not checked.

    Raises:
        ConfigFieldError: naming ``name``, what was expected and what was given.
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return value
        hint = rest[0]
        args = typing.get_args(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigFieldError(name, f"must be true or false, got {describe(value)}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigFieldError(name, f"must be an integer, got {describe(value)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigFieldError(name, f"must be a number, got {describe(value)}")
        if not math.isfinite(value):
            raise ConfigFieldError(name, f"must be finite, got {value!r}")
        return float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigFieldError(name, f"must be a string, got {describe(value)}")
    elif typing.get_origin(hint) is tuple and args and not _dataclass_in(args[0]):
        if not isinstance(value, (list, tuple)):
            raise ConfigFieldError(name, f"must be a list, got {describe(value)}")
        item = args[0]
        return tuple(check_type(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    return value


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type in ``X``, ``X | None`` or ``Optional[X]``, else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a) and isinstance(a, type)]
        return found[0] if len(found) == 1 else None
    return None


def _tuple_of_dataclass(hint: Any) -> type | None:
    """``X`` for ``tuple[X, ...]`` where X is a dataclass, else None."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return _dataclass_in(args[0])
    return None


def _section(cls: type, value: Any, name: str, path: str, strict: bool, keep_lists: tuple[str, ...],
             check_types: bool) -> Any:
    """Decode a nested section; its ConfigFieldErrors get ``name`` prefixed to their field."""
    try:
        return from_dict(cls, value, strict, path, keep_lists, check_types)
    except ConfigFieldError as e:
        raise e.within(name) from None


def from_dict(cls: type[T], data: Any, strict: bool = True, path: str = "", keep_lists: tuple[str, ...] = (),
              check_types: bool = True) -> T:
    """Build dataclass ``cls`` from a (nested) mapping.

    Args:
        cls: the dataclass.
        data: a dict; an instance of ``cls`` is returned as it is. A nested section given as ``None`` (an empty
            YAML section) gets its defaults unless its annotation allows ``None``.
        strict: refuse unknown keys (``ValueError``) instead of logging and ignoring them.
        path: where ``data`` sits in the whole config, for messages of unknown keys (``"model.pixel_encoder"``).
        keep_lists: field names whose list values stay lists (free-form payloads); other lists become tuples.
        check_types: check scalar and tuple fields against their annotations (:func:`check_type`); dataclasses
            that validate themselves in ``__post_init__`` may turn this off.

    Raises:
        ConfigFieldError: a section that is not a mapping, or a mistyped value (its field path is relative to
            ``data``). ValueError: unknown keys when ``strict``.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigFieldError("", f"{path or 'the config'} must be a JSON object (dict), got {describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        message = f"unknown config keys at {path or 'root'} of {cls.__name__}: {unknown}; known: {sorted(fields)}"
        if strict:
            raise ValueError(message)
        logger.warning("ignoring %s", message)
    hints = type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            continue
        sub_path = f"{path}.{name}" if path else name
        hint = hints.get(name)
        nested, items = _dataclass_in(hint), _tuple_of_dataclass(hint)
        if nested is not None and value is None and hint is nested:
            value = {}  # an empty section (``run:`` in YAML) means its defaults; ``X | None`` fields keep None
        if nested is not None and value is not None:
            if not isinstance(value, (dict, nested)):
                raise ConfigFieldError(name, f"must be an object (a dict of {nested.__name__} fields), got "
                                             f"{describe(value)}")
            value = _section(nested, value, name, sub_path, strict, keep_lists, check_types)
        elif items is not None and isinstance(value, (list, tuple)):
            value = tuple(_section(items, v, f"{name}[{i}]", f"{sub_path}[{i}]", strict, keep_lists, check_types)
                          for i, v in enumerate(value))
        elif isinstance(value, list) and name in keep_lists:
            pass
        elif check_types:
            value = check_type(value, hint, name)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
