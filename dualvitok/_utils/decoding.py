"""Dataclass-from-dict decoding: strict keys, nested dataclasses and tuples of them found from the type hints.

One decoder for the model, training and unified configs. Unknown keys are refused (or logged when not strict) with
the path of the section and the known names; a section that is not a mapping is refused with its path.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


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


_SCALARS = (bool, int, float, str)


def _scalar_types(hint: Any) -> tuple[tuple[type, ...], bool] | None:
    """(allowed scalar types, None allowed) for hints like ``int``, ``float | None``, ``str``; None for others."""
    if hint in _SCALARS:
        return (hint,), False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = tuple(a for a in args if a is not type(None))
        if rest and all(a in _SCALARS for a in rest):
            return rest, len(rest) < len(args)
    return None


def check_type(hint: Any, value: Any, where: str) -> Any:
    """Check a scalar field's value against its hint (``int`` for a float field is fine, a bool for an int is not).

    Raises:
        ValueError: naming the field, the expected type and the value, e.g. ``data.batch_size must be int, got
            str '4'``.
    """
    allowed = _scalar_types(hint)
    if allowed is None:
        return value
    types_, nullable = allowed
    if value is None:
        if nullable:
            return value
    elif isinstance(value, bool):
        if bool in types_:
            return value
    elif isinstance(value, int) and (int in types_ or float in types_):
        return value if int in types_ else float(value)
    elif isinstance(value, float) and float in types_:
        return value
    elif isinstance(value, str) and str in types_:
        return value
    names = " or ".join(t.__name__ for t in types_) + (" or null" if nullable else "")
    raise ValueError(f"{where} must be {names}, got {type(value).__name__} {value!r}")


def from_dict(cls: type[T], data: Any, strict: bool = True, path: str = "", keep_lists: tuple[str, ...] = ()) -> T:
    """Build dataclass ``cls`` from a (nested) mapping.

    Args:
        cls: the dataclass.
        data: a dict (``None`` means all defaults); an instance of ``cls`` is returned as it is.
        strict: refuse unknown keys (``ValueError``) instead of logging and ignoring them.
        path: where ``data`` sits in the whole config, for messages (``"model.pixel_encoder"``).
        keep_lists: field names whose list values stay lists (free-form payloads); other lists become tuples.
    """
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    where = path or "root"
    if not isinstance(data, dict):
        raise ValueError(f"config section {where} of {cls.__name__} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        message = f"unknown config keys at {where} of {cls.__name__}: {unknown}; known: {sorted(fields)}"
        if strict:
            raise ValueError(message)
        logger.warning("ignoring %s", message)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            continue
        sub_path = f"{path}.{name}" if path else name
        hint = hints.get(name)
        nested, items = _dataclass_in(hint), _tuple_of_dataclass(hint)
        if nested is not None and value is not None:
            value = from_dict(nested, value, strict, sub_path, keep_lists)
        elif items is not None and isinstance(value, (list, tuple)):
            value = tuple(from_dict(items, v, strict, f"{sub_path}[{i}]", keep_lists) for i, v in enumerate(value))
        elif isinstance(value, list) and name not in keep_lists:
            value = tuple(value)
        else:
            value = check_type(hint, value, sub_path)
        kwargs[name] = value
    return cls(**kwargs)
