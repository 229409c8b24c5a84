"""Typed values out of untyped mappings: one set of checks for every reader.

Wire payloads (``core.protocol``), policy files (``core.privacy.policy``), run configs
(``core.config``), site limits (``core.privacy.limits``) and ledger lines
(``core.privacy.ledger``) all arrive as plain mappings of TOML/JSON/Flower scalars. Each
typed getter here is the one check for its type; every error names the value (the key,
prefixed by its source: ``payload field 'loss'``, ``field 'digest'``, ``dp.delta``) and
says what it must be and what it was:

    ``<name> is missing`` | ``<name> must be <rule>, got <value>``

``bool`` is never accepted where a number is expected, although Python counts it as
an ``int``: ``true`` in a TOML file or a JSON line is a mistake, not 1. Plain Python;
never imports flwr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final, TypeGuard

# Longer values are cut in messages (a mean label map holds thousands of numbers).
_SHOWN_CHARS: Final = 80


def shown(raw: object) -> str:
    """``repr(raw)``, cut to a readable length for an error message.

    Example:
        >>> shown("lots")
        "'lots'"
        >>> len(shown(list(range(1000)))) <= 83
        True
    """
    text = repr(raw)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def is_number(raw: object) -> TypeGuard[int | float]:
    """Whether ``raw`` is an int or float (a bool is not a number here).

    Example:
        >>> is_number(2), is_number(2.5), is_number(True), is_number("2")
        (True, True, False, False)
    """
    return isinstance(raw, int | float) and not isinstance(raw, bool)


def is_integer(raw: object) -> TypeGuard[int]:
    """Whether ``raw`` is an int (a bool is not).

    Example:
        >>> is_integer(2), is_integer(2.0), is_integer(False)
        (True, False, False)
    """
    return isinstance(raw, int) and not isinstance(raw, bool)


def _wrong(name: str, rule: str, raw: object, error: type[Exception]) -> Exception:
    return error(f"{name} must be {rule}, got {shown(raw)}")


def as_bool(raw: object, name: str, *, error: type[Exception] = ValueError) -> bool:
    """``raw`` when it is a bool, else ``error`` naming ``name``.

    Example:
        >>> as_bool("yes", "dp.required")
        Traceback (most recent call last):
        ...
        ValueError: dp.required must be true or false, got 'yes'
    """
    if not isinstance(raw, bool):
        raise _wrong(name, "true or false", raw, error)
    return raw


def as_int(raw: object, name: str, *, error: type[Exception] = ValueError) -> int:
    """``raw`` when it is an integer (not a bool), else ``error`` naming ``name``."""
    if not is_integer(raw):
        raise _wrong(name, "an integer", raw, error)
    return raw


def as_float(raw: object, name: str, *, error: type[Exception] = ValueError) -> float:
    """``raw`` as a float when it is a number (not a bool), else ``error``.

    Example:
        >>> as_float(2, "loss")
        2.0
        >>> as_float(True, "payload field 'loss'")
        Traceback (most recent call last):
        ...
        ValueError: payload field 'loss' must be a number, got True
    """
    if not is_number(raw):
        raise _wrong(name, "a number", raw, error)
    return float(raw)


def as_str(raw: object, name: str, *, error: type[Exception] = ValueError) -> str:
    """``raw`` when it is a string, else ``error`` naming ``name``."""
    if not isinstance(raw, str):
        raise _wrong(name, "a string", raw, error)
    return raw


def as_list(
    raw: object, name: str, *, error: type[Exception] = ValueError
) -> list[object]:
    """``raw`` when it is a list, else ``error`` naming ``name``."""
    if not isinstance(raw, list):
        raise _wrong(name, "a list", raw, error)
    return raw


def as_float_list(
    raw: object, name: str, *, error: type[Exception] = ValueError
) -> list[float]:
    """``raw`` as floats when it is a list of numbers, else ``error``."""
    if not isinstance(raw, list) or not all(is_number(value) for value in raw):
        raise _wrong(name, "a list of numbers", raw, error)
    return [float(value) for value in raw]


def as_str_list(
    raw: object, name: str, *, error: type[Exception] = ValueError
) -> list[str]:
    """``raw`` when it is a list of strings, else ``error`` naming ``name``."""
    if not isinstance(raw, list) or not all(isinstance(value, str) for value in raw):
        raise _wrong(name, "a list of names", raw, error)
    return list(raw)


def as_dict(
    raw: object, name: str, *, error: type[Exception] = ValueError
) -> dict[str, object]:
    """``raw`` (keys as strings) when it is a mapping, else ``error``."""
    if not isinstance(raw, dict):
        raise _wrong(name, "a table", raw, error)
    return {str(key): value for key, value in raw.items()}


@dataclasses.dataclass(frozen=True, slots=True)
class FieldReader:
    """Typed getters over one mapping, whose errors name the key and its source.

    Args:
        data: the mapping (a record's fields, a parsed JSON line, a flat TOML table).
        source: what the keys are, as errors should call them (``"payload field"``
            gives ``payload field 'loss'``); empty names a key bare (``dp.delta``).
        error: the exception type to raise (ValueError unless the caller has its own).

    Example:
        >>> reader = FieldReader({"loss": "high"}, "payload field")
        >>> reader.get_float("loss")
        Traceback (most recent call last):
        ...
        ValueError: payload field 'loss' must be a number, got 'high'
        >>> reader.get_int("seconds")
        Traceback (most recent call last):
        ...
        ValueError: payload field 'seconds' is missing
    """

    data: Mapping[str, object]
    source: str = ""
    error: type[Exception] = ValueError

    def name(self, key: str) -> str:
        """How errors name ``key``."""
        return f"{self.source} {key!r}" if self.source else key

    def get(self, key: str) -> object:
        """The value under ``key``; ``<name> is missing`` when there is none."""
        if key not in self.data:
            raise self.error(f"{self.name(key)} is missing")
        return self.data[key]

    def get_bool(self, key: str) -> bool:
        """The bool under ``key``."""
        return as_bool(self.get(key), self.name(key), error=self.error)

    def get_int(self, key: str) -> int:
        """The integer under ``key`` (not a bool)."""
        return as_int(self.get(key), self.name(key), error=self.error)

    def get_float(self, key: str) -> float:
        """The number under ``key`` (not a bool), as a float."""
        return as_float(self.get(key), self.name(key), error=self.error)

    def get_str(self, key: str) -> str:
        """The string under ``key``."""
        return as_str(self.get(key), self.name(key), error=self.error)

    def get_list(self, key: str) -> list[object]:
        """The list under ``key``."""
        return as_list(self.get(key), self.name(key), error=self.error)

    def get_float_list(self, key: str) -> list[float]:
        """The list of numbers under ``key``, as floats."""
        return as_float_list(self.get(key), self.name(key), error=self.error)

    def get_str_list(self, key: str) -> list[str]:
        """The list of strings under ``key``."""
        return as_str_list(self.get(key), self.name(key), error=self.error)

    def get_dict(self, key: str) -> dict[str, object]:
        """The mapping under ``key`` (keys as strings)."""
        return as_dict(self.get(key), self.name(key), error=self.error)
