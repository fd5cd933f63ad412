"""The pure helpers of the matching rules (no database)."""

from __future__ import annotations

import pytest

from appliance.query.matching import (
    ESCAPE,
    escape_like,
    has_wildcard,
    is_universal,
    wildcard_pattern,
)


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("CT*", "CT%"),
        ("?T", "_T"),
        ("100%*", "100!%%"),
        ("a_b?", "a!_b_"),
        ("a!b*", "a!!b%"),
        ("a\\b*", "a\\b%"),
        ("plain", "plain"),
    ],
)
def test_wildcard_pattern_escapes_like_metacharacters_c_2_2_2_4(value: str, pattern: str) -> None:
    """PS3.4 C.2.2.2.4: '*' -> '%', '?' -> '_'; '%', '_' and the escape
    character of the value are escaped so they match literally."""
    assert ESCAPE == "!"
    assert wildcard_pattern(value) == pattern


def test_escape_like_escapes_the_escape_character_first() -> None:
    assert escape_like("!%_") == "!!!%!_"
    assert escape_like("a\\b") == "a\\b"


@pytest.mark.parametrize(
    ("value", "universal"),
    [
        ("", True),
        ("*", True),
        ("***", True),
        (" * ", True),
        ("   ", True),
        ("* *", False),
        ("*a", False),
        ("?", False),
    ],
)
def test_universal_values_c_2_2_2_3(value: str, universal: bool) -> None:
    """PS3.4 C.2.2.2.3: zero length (after padding) is universal; C.2.2.2.4
    Note: '*' is equivalent to universal matching."""
    assert is_universal(value) is universal


def test_has_wildcard() -> None:
    assert has_wildcard("a*")
    assert has_wildcard("a?")
    assert not has_wildcard("a%_\\")
