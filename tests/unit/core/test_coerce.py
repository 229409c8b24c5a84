from __future__ import annotations

import re

import pytest

from core.coerce import (
    FieldReader,
    as_bool,
    as_dict,
    as_float,
    as_float_list,
    as_int,
    as_list,
    as_str,
    as_str_list,
    is_integer,
    is_number,
)


class _SourceError(ValueError):
    pass


@pytest.mark.parametrize(
    ("check", "raw", "message"),
    [
        (as_bool, "yes", "k must be true or false, got 'yes'"),
        (as_bool, 1, "k must be true or false, got 1"),
        (as_int, 2.5, "k must be an integer, got 2.5"),
        (as_int, True, "k must be an integer, got True"),
        (as_float, "1", "k must be a number, got '1'"),
        (as_float, False, "k must be a number, got False"),
        (as_str, 5, "k must be a string, got 5"),
        (as_list, "a", "k must be a list, got 'a'"),
        (as_float_list, [1.0, "a"], "k must be a list of numbers, got [1.0, 'a']"),
        (as_float_list, [True], "k must be a list of numbers, got [True]"),
        (as_str_list, ["a", 1], "k must be a list of names, got ['a', 1]"),
        (as_dict, [], "k must be a table, got []"),
    ],
)
def test_each_check_names_the_value_and_says_what_it_must_be(
    check: object, raw: object, message: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check(raw, "k")  # type: ignore[operator]


def test_checks_return_the_typed_value() -> None:
    assert as_bool(False, "k") is False
    assert as_int(3, "k") == 3
    assert as_float(3, "k") == 3.0
    assert isinstance(as_float(3, "k"), float)
    assert as_float_list([1, 2.5], "k") == [1.0, 2.5]
    assert as_str_list(["a"], "k") == ["a"]
    assert as_dict({1: "a"}, "k") == {"1": "a"}


def test_a_bool_is_neither_a_number_nor_an_integer() -> None:
    assert (is_number(True), is_integer(True)) == (False, False)
    assert (is_number(1.5), is_integer(1.5), is_integer(1)) == (True, False, True)


def test_reader_names_the_source_and_raises_its_error_type() -> None:
    # Prepare
    reader = FieldReader({"loss": "high"}, "payload field", _SourceError)

    # Execute / Assert
    with pytest.raises(_SourceError, match=r"^payload field 'seconds' is missing$"):
        reader.get_float("seconds")
    with pytest.raises(
        _SourceError, match=r"^payload field 'loss' must be a number, got 'high'$"
    ):
        reader.get_float("loss")


def test_reader_without_a_source_names_the_key_bare() -> None:
    with pytest.raises(ValueError, match=r"^dp\.delta is missing$"):
        FieldReader({}).get_float("dp.delta")


def test_long_values_are_cut_in_messages() -> None:
    with pytest.raises(ValueError, match=r"\.\.\.$") as raised:
        as_float_list(["x"] * 1000, "mean-label-map")
    assert len(str(raised.value)) < 160
