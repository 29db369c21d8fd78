"""The protocols' field vocabulary (crowdd.protocol.fields): each reader returns the value or
raises bad_field naming the field; a boolean is never an integer; a number is finite."""

from __future__ import annotations

import math

import pytest

from crowdd import wire
from crowdd.errors import ErrorCode
from crowdd.protocol import fields


def bad(call: object) -> wire.WireError:
    with pytest.raises(wire.WireError) as info:
        call()  # type: ignore[operator]
    assert info.value.code == ErrorCode.BAD_FIELD
    return info.value


def test_integer_and_its_bounds() -> None:
    assert fields.integer({"n": 3}, "n") == 3
    assert fields.integer({"n": 1}, "n", lo=1) == 1
    for value in (True, -1, 1.5, "3", None):
        err = bad(lambda v=value: fields.integer({"n": v}, "n"))
        assert err.field == "n" and "integer >= 0" in err.message
    assert fields.opt_integer({}, "n") is None and fields.opt_integer({"n": 2}, "n") == 2


def test_flag_text_port_and_numbers() -> None:
    assert fields.flag({"f": False}, "f") is False and fields.flag({}, "f", default=True) is True
    assert bad(lambda: fields.flag({"f": 1}, "f")).field == "f"
    assert fields.text({"t": "abc"}, "t", 1, 3) == "abc"
    assert "printable" in bad(lambda: fields.text({"t": "a\nb"}, "t", 1, 9)).message
    assert "1..3" in bad(lambda: fields.text({"t": "abcd"}, "t", 1, 3)).message
    assert fields.port(443, "p") == 443
    for value in (0, 65536, True, "80"):
        assert bad(lambda v=value: fields.port(v, "p")).field == "p"
    assert fields.opt_number({"x": 2}, "x") == 2.0 and fields.opt_number({}, "x") is None
    for value in (math.nan, math.inf, True, "1"):
        assert bad(lambda v=value: fields.opt_number({"x": v}, "x")).field == "x"


def test_a_peers_words_are_made_plain() -> None:
    assert fields.opt_words({"w": "ok\x1b[2Jthen"}, "w") == "ok[2Jthen"  # no escape reaches a terminal
    assert fields.opt_words({}, "w") is None
    assert bad(lambda: fields.opt_words({"w": 3}, "w")).field == "w"


def test_expect_a_kind_and_a_peers_error() -> None:
    fields.expect({"type": "ok"}, "ok")
    with pytest.raises(wire.WireError) as info:
        fields.expect({"type": "status"}, "ok")
    assert info.value.code == ErrorCode.UNKNOWN_TYPE
    with pytest.raises(wire.RemoteError):
        fields.expect({"type": "error", "code": "busy", "message": "no"}, "ok")
