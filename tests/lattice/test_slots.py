"""Slot ids ``r{row}c{col}`` and the static slot configuration."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper_jax.lattice.slots import (
    SlotConfig,
    SlotSpec,
    format_slot_id,
    is_valid_slot_id,
    parse_slot_id,
    parse_slot_list,
    slot_sort_key,
    sort_slot_ids,
    validate_slot_id,
)

from tests.strategies import slot_coords, slot_ids

CANONICAL = re.compile(r"r\d+c\d+")
BAD_IDS = ["early", "mid", "late", "EARLY", " early ", "r0", "c0", "x1y2", "R0C0", "r0C0", "r01c0", "r0c01", "r-1c0",
           "r0c-1", "", " ", "r0c0 ", " r0c0", "r0c0\n", "r 0c0", "r0_c0", "r0c0r1c1", "r1.5c0", "r０c0", "0c0", "rc"]


def spec(slot_id, dim=8, topology="cnn"):
    return SlotSpec(slot_id, dim, topology)


@settings(max_examples=200, derandomize=True, database=None)
@given(slot_coords)
def test_format_parse_round_trip(rc):
    slot_id = format_slot_id(*rc)
    assert parse_slot_id(slot_id) == rc
    assert validate_slot_id(slot_id) == slot_id
    assert is_valid_slot_id(slot_id)
    assert slot_id == f"r{rc[0]}c{rc[1]}"


def test_format_examples():
    assert format_slot_id(0, 0) == "r0c0"
    assert format_slot_id(2, 10) == "r2c10"
    assert parse_slot_id("r12c3") == (12, 3)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_ids_raise_and_name_the_canonical_form(bad):
    with pytest.raises(ValueError) as info:
        parse_slot_id(bad)
    assert CANONICAL.search(str(info.value)), f"message does not show a canonical id: {info.value}"
    with pytest.raises(ValueError):
        validate_slot_id(bad)
    assert not is_valid_slot_id(bad)


@pytest.mark.parametrize("legacy", ["early", "mid", "late"])
def test_legacy_names_are_errors_not_aliases(legacy):
    with pytest.raises(ValueError, match="legacy") as info:
        validate_slot_id(legacy)
    assert "r{row}c{col}" in str(info.value)
    with pytest.raises(ValueError):
        parse_slot_list(f"r0c0,{legacy}")


@pytest.mark.parametrize("bad", [None, 0, ("r0c0",), b"r0c0"])
def test_non_string_ids_raise_value_error(bad):
    with pytest.raises(ValueError, match="r0c0"):
        parse_slot_id(bad)
    assert not is_valid_slot_id(bad)


@pytest.mark.parametrize("row, col, error", [(-1, 0, ValueError), (0, -3, ValueError), (True, 0, TypeError),
                                             (0, 1.0, TypeError), ("0", 0, TypeError)])
def test_format_rejects_bad_coordinates(row, col, error):
    with pytest.raises(error):
        format_slot_id(row, col)


def test_row_major_sort():
    ids = ["r1c0", "r0c10", "r0c2", "r0c9", "r10c0", "r2c1", "r0c0"]
    assert sort_slot_ids(ids) == ("r0c0", "r0c2", "r0c9", "r0c10", "r1c0", "r2c1", "r10c0")
    assert slot_sort_key("r0c10") > slot_sort_key("r0c2")  # numeric, not lexicographic
    assert slot_sort_key("r1c0") > slot_sort_key("r0c9")
    with pytest.raises(ValueError):
        sort_slot_ids(["r0c0", "mid"])


@settings(max_examples=100, derandomize=True, database=None)
@given(st.lists(slot_coords, unique=True, max_size=12))
def test_sort_is_row_major_for_any_ids(coords):
    ordered = sort_slot_ids(format_slot_id(*rc) for rc in coords)
    assert [parse_slot_id(s) for s in ordered] == sorted(coords)


def test_parse_slot_list():
    assert parse_slot_list("r0c1,r0c0") == ("r0c0", "r0c1")
    assert parse_slot_list(" r1c0 , r0c2 ") == ("r0c2", "r1c0")
    assert parse_slot_list("r0c0 r2c0") == ("r0c0", "r2c0")
    assert parse_slot_list("r0c0,") == ("r0c0",)
    for bad in ["", " , ", "r0c0,r0c0", "r0c0,early", "r0c0;r0c1"]:
        with pytest.raises(ValueError):
            parse_slot_list(bad)


def test_slot_spec_validation():
    assert spec("r1c0", 16).dim == 16
    with pytest.raises(ValueError, match="r0c0"):
        spec("early")
    with pytest.raises(ValueError, match="topology"):
        spec("r0c0", topology="rnn")
    for dim in (0, -4):
        with pytest.raises(ValueError, match="dim"):
            spec("r0c0", dim)
    assert not spec("r0c0").parallel and SlotSpec("r0c1", 8, "transformer", parallel=True).parallel
    with pytest.raises(TypeError, match="parallel"):
        SlotSpec("r0c1", 8, "transformer", parallel="yes")


def test_slot_config_properties_and_index():
    config = SlotConfig((spec("r0c0", 8), spec("r0c1", 8), spec("r1c0", 16)), execution_order=("r0c0", "r1c0", "r0c1"))
    assert config.slot_ids == ("r0c0", "r0c1", "r1c0")
    assert config.num_slots == 3 and config.topology == "cnn"
    assert [config.index(s) for s in config.slot_ids] == [0, 1, 2]
    assert config.spec("r1c0").dim == 16
    hash(config)  # static config: usable as a jit static argument
    with pytest.raises(ValueError) as info:
        config.index("r2c0")
    message = str(info.value)
    assert "r2c0" in message and all(s in message for s in config.slot_ids), message
    with pytest.raises(ValueError, match="legacy"):
        config.index("late")


@pytest.mark.parametrize(
    "slots, order, match",
    [
        ((spec("r0c0"), spec("r0c0")), ("r0c0", "r0c0"), "duplicate"),
        ((spec("r0c10"), spec("r0c2")), ("r0c10", "r0c2"), "row-major"),
        ((spec("r1c0"), spec("r0c1")), ("r1c0", "r0c1"), "row-major"),
        ((spec("r0c0"), spec("r0c1")), ("r0c0",), "execution order"),
        ((spec("r0c0"), spec("r0c1")), ("r0c0", "r0c2"), "execution order"),
        ((spec("r0c0"), spec("r0c1", topology="transformer")), ("r0c0", "r0c1"), "topology"),
    ],
)
def test_slot_config_validation(slots, order, match):
    with pytest.raises(ValueError, match=match):
        SlotConfig(slots, order)
