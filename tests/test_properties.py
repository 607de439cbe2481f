"""Property-based tests: generated payloads and arguments are accepted or refused clearly, never crash."""

from __future__ import annotations

import json
from typing import Any

import pytest
from dramatiq.message import Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tasks.broker import encode_message, holds_nul
from tasks.errors import InvalidPayload, NotSerializable
from tasks.provision.payload import ProvisionPayload, validate
from tests import actors
from tests.support import query

FIELDS = {"project_id", "tenant_id", "region", "owner_id", "organization_id", "api_key_count",
          "api_key_prefix", "services", "payload"}

hostile_text = st.one_of(
    st.text(max_size=80),
    st.sampled_from(['x"; DROP DATABASE postgres; --', "a\x00b", "ünïcødé", "' OR 1=1 --", "a" * 10_000,
                     "p_owner", "UPPER", "9digit", "", " ", "us-east-1", "good_name"]),
)
values = st.one_of(hostile_text, st.integers(-5, 20), st.booleans(), st.none(), st.floats(allow_nan=False),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=8), st.booleans(),
                                                                         max_size=3))
payloads = st.dictionaries(st.sampled_from([*sorted(FIELDS - {"payload"}), "extra", "services"]), values,
                           max_size=9)
valid_base = st.fixed_dictionaries({
    "project_id": st.from_regex(r"[a-z][a-z0-9_]{0,30}", fullmatch=True),
    "tenant_id": st.from_regex(r"[A-Za-z0-9_.:-]{1,40}", fullmatch=True),
    "region": st.from_regex(r"[a-z][a-z0-9-]{1,20}", fullmatch=True),
})


@settings(max_examples=2000, deadline=None)
@given(st.one_of(payloads, valid_base, st.builds(lambda a, b: {**a, **b}, valid_base, payloads)))
def test_the_validator_accepts_or_names_the_field(raw: dict[str, Any]) -> None:
    try:
        result = validate(raw)
    except InvalidPayload as exc:
        assert exc.field.split(".")[0] in FIELDS | set(raw)  # a known field, or the unknown one given
        parent, _, name = exc.field.rpartition(".")
        unknown = exc.problem.startswith("is not a known")
        named = f"invalid {parent or 'payload'}: has an unknown field {name!r}" if unknown else f"invalid {exc.field}: "
        assert str(exc).startswith(named)
        assert len(str(exc)) < 400  # a hostile 10 kB value is never echoed whole
        return
    assert isinstance(result, ProvisionPayload)
    assert 1 <= result.api_key_count <= 10
    assert len(f"p_{result.project_id}_owner".encode()) <= 63


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=30)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
anything = st.one_of(json_values, st.sets(st.integers(), max_size=2), st.builds(object), st.binary(max_size=4),
                     st.lists(st.one_of(json_values, st.builds(object)), max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(anything)
def test_send_either_round_trips_or_refuses_and_enqueues_nothing(db_url: str, value: Any) -> None:
    before = query(db_url, "SELECT count(*) AS n FROM control_plane.jobs")[0]["n"]
    try:
        message = actors.noop.send(value)
    except NotSerializable as exc:
        assert "tests.noop" in str(exc)
        assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs")[0]["n"] == before
        return
    row = query(db_url, "SELECT payload FROM control_plane.jobs WHERE id = %s", (message.message_id,))[0]
    assert same(row["payload"]["args"], [json.loads(json.dumps(value))])


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values; jsonb keeps numbers as numeric, so 6.1e16 comes back as an int."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=500, deadline=None)
@example([], {}, {"\\u0000": None})  # spells an escape: sent
@example(["\x00"], {}, {})  # holds a NUL: refused
@given(st.lists(json_values, max_size=3), st.dictionaries(st.text(max_size=8), json_values, max_size=3),
       st.dictionaries(st.text(max_size=8), json_values, max_size=3))
def test_the_broker_writes_the_bytes_dramatiqs_encoder_would(args: list[Any], kwargs: dict[str, Any],
                                                              options: dict[str, Any]) -> None:
    # Given a message of any JSON arguments and options
    message = Message(queue_name="default", actor_name="tests.noop", args=tuple(args), kwargs=kwargs, options=options)
    # When the broker encodes it (its own fast path), Then the bytes are Dramatiq's own, or both refuse
    try:
        expected = message.encode()
    except (TypeError, ValueError):
        expected = None
    if expected is None or _has_nul(json.loads(expected)):
        with pytest.raises(NotSerializable):
            encode_message(message)
    else:
        assert encode_message(message) == expected


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(["\\", "u", "0", "\x00", "a", '"']), max_size=12))
def test_a_nul_is_found_in_json_exactly_when_the_string_holds_one(value: str) -> None:
    # Given any string of backslashes, NULs and the letters of an escape
    # When it is written as JSON, Then the NUL check sees a NUL exactly when the string holds one
    assert holds_nul(json.dumps(value)) == ("\x00" in value)


def _has_nul(value: Any) -> bool:
    """Whether a decoded JSON value holds a NUL character in any string, keys included."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False
