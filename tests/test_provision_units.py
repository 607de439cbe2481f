"""provision_project building blocks without a database: payload, API keys, service client.

The service client runs against real stand-in HTTP servers on loopback, one per test.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from tasks.errors import Conflict, InvalidPayload, PermanentError, TransientError
from tasks.middleware.log_context import MessageContextFilter
from tasks.provision import apikeys
from tasks.provision.payload import (
    MAX_IDENTIFIER_LEN,
    PG_NAME_MAX_BYTES,
    ProvisionPayload,
    Services,
    app_role,
    database_name,
    is_project_id,
    owner_role,
    payload_hash,
    schema_name,
    validate,
)
from tasks.provision.services import ServiceClient
from tasks.provision.standin import NO_ANSWER, StandinService
from tasks.provision.state import ProjectState
from tasks.settings import Settings
from tests.support import at_once, wait_for

TOKEN = "test-token-5d41402abc4b2a76"
PEPPER = b"pepper-for-tests"
BASE62 = set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
INJECTION = 'x"; DROP DATABASE postgres; --'
HUGE = "a" * 10_240


def minimal(**overrides: object) -> dict[str, object]:
    """The smallest valid payload, with overrides (a value of ... removes the field)."""
    raw: dict[str, object] = {"project_id": "proj_1", "tenant_id": "tenant-1", "region": "us-east-1"}
    raw.update(overrides)
    return {key: value for key, value in raw.items() if value is not ...}


def assert_log_safe(exc: BaseException, *, not_containing: str = "") -> None:
    """The message is short printable ASCII and does not echo the given value."""
    message = str(exc)
    assert len(message) < 300
    assert message.isascii() and message.isprintable()
    if not_containing:
        assert not_containing not in message


# --- payload: accepted ------------------------------------------------------------------------


def test_minimal_payload_gets_defaults() -> None:
    # Given only the required fields
    raw = minimal()

    # When validated
    payload = validate(raw)

    # Then every optional field has its default, the key prefix being the project id
    assert payload == ProvisionPayload(
        project_id="proj_1",
        tenant_id="tenant-1",
        region="us-east-1",
        owner_id=None,
        organization_id=None,
        api_key_count=1,
        api_key_prefix="proj_1",
        services=Services(auth=False, realtime=False, storage=False),
    )
    assert payload.services.enabled() == ()


def test_full_payload_with_ten_keys_and_all_services() -> None:
    # Given every field, at the maximum key count
    raw = minimal(
        owner_id="user:42",
        organization_id="org.acme-eu_1",
        api_key_count=10,
        api_key_prefix="acme",
        services={"auth": True, "realtime": True, "storage": True},
    )

    # When validated
    payload = validate(raw)

    # Then the values are kept and services come in registration order
    assert payload.api_key_count == 10
    assert payload.api_key_prefix == "acme"
    assert payload.owner_id == "user:42"
    assert payload.organization_id == "org.acme-eu_1"
    assert payload.services.enabled() == ("auth", "realtime", "storage")


@pytest.mark.parametrize("region", ["us-east-1", "eu-west", "ap-southeast-2", "eu-central-1", "local", "ab"])
def test_region_formats_accepted(region: str) -> None:
    # Given / When a payload in that region / Then it validates unchanged
    assert validate(minimal(region=region)).region == region


def test_null_optional_fields_mean_defaults() -> None:
    # Given optional fields sent as JSON null
    raw = minimal(owner_id=None, organization_id=None, api_key_count=None, api_key_prefix=None, services=None)

    # When validated / Then they take their defaults
    assert validate(raw) == validate(minimal())


def test_longest_project_id_fits_every_derived_name() -> None:
    # Given a project id of the maximum length
    project_id = "p" * MAX_IDENTIFIER_LEN

    # When validated
    payload = validate(minimal(project_id=project_id))

    # Then every derived Postgres name fits in 63 bytes, and the owner role uses them all
    names = [owner_role(payload), app_role(payload), database_name(payload), schema_name(payload)]
    assert all(len(name.encode()) <= PG_NAME_MAX_BYTES for name in names)
    assert len(owner_role(payload).encode()) == PG_NAME_MAX_BYTES
    # And it keeps its provisioning to one job (its unique key), one character more does not
    assert is_project_id(project_id) and not is_project_id(project_id + "p")


def test_derived_names() -> None:
    # Given a payload / When deriving names / Then they follow the p_<id> convention
    payload = validate(minimal())
    assert owner_role(payload) == "p_proj_1_owner"
    assert app_role(payload) == "p_proj_1_app"
    assert database_name(payload) == "p_proj_1"
    assert schema_name(payload) == "proj_1"


def test_payload_is_frozen() -> None:
    # Given a validated payload / When mutated / Then it refuses
    payload = validate(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        payload.project_id = "other"  # type: ignore[misc]


def test_canonical_json_round_trips_and_hash_ignores_spelled_out_defaults() -> None:
    # Given a minimal payload and the same one with its defaults spelled out
    short = validate(minimal())
    spelled = validate(
        minimal(
            api_key_count=1,
            api_key_prefix="proj_1",
            services={"auth": False, "realtime": False, "storage": False},
        )
    )

    # When hashing and re-validating the canonical form
    canonical = short.to_json()

    # Then both hash alike, the canonical form is JSON and validates back to the same payload
    assert payload_hash(short) == payload_hash(spelled)
    assert len(payload_hash(short)) == 64 and int(payload_hash(short), 16) >= 0
    assert json.loads(json.dumps(canonical)) == canonical
    assert validate(canonical) == short
    assert canonical["api_key_prefix"] == "proj_1"
    assert canonical["services"] == {"auth": False, "realtime": False, "storage": False}


def test_hash_changes_with_any_field() -> None:
    # Given a payload / When one field differs / Then the hash differs
    base = payload_hash(validate(minimal()))
    assert payload_hash(validate(minimal(api_key_count=2))) != base
    assert payload_hash(validate(minimal(services={"auth": True}))) != base
    assert payload_hash(validate(minimal(owner_id="someone"))) != base


# --- payload: rejected ------------------------------------------------------------------------

BAD_IDENTIFIERS = [
    INJECTION,
    "Proj",
    "1proj",
    "_proj",
    "proj-1",
    "proj 1",
    "proj\x00",
    "proj\n",
    "projé",
    "proj\u202e",
    "",
    "p" * (MAX_IDENTIFIER_LEN + 1),
    HUGE,
    42,
    True,
    ["proj"],
]


@pytest.mark.parametrize("value", ["pg_catalog", "pg_shop", "information_schema", "public"])
def test_project_id_naming_a_system_schema_is_rejected(value: str) -> None:
    # Given a project id that is a schema name PostgreSQL keeps for itself or every database has
    # When validated / Then it is refused up front, naming the field, before anything is created
    with pytest.raises(InvalidPayload, match="reserves") as info:
        validate(minimal(project_id=value))
    assert info.value.field == "project_id"
    # while names that merely contain them are fine
    assert validate(minimal(project_id=value.replace("_", "") + "_x")).project_id.endswith("_x")


@pytest.mark.parametrize("value", BAD_IDENTIFIERS, ids=repr)
def test_bad_project_id_rejected(value: object) -> None:
    # Given a project id that is not a safe, short identifier
    # When validated / Then the error names project_id and is safe to log
    with pytest.raises(InvalidPayload) as info:
        validate(minimal(project_id=value))
    assert info.value.field == "project_id"
    assert_log_safe(info.value)


@pytest.mark.parametrize("value", BAD_IDENTIFIERS, ids=repr)
def test_bad_api_key_prefix_rejected(value: object) -> None:
    # Given a valid project but a bad key prefix / When validated / Then api_key_prefix is named
    with pytest.raises(InvalidPayload) as info:
        validate(minimal(api_key_prefix=value))
    assert info.value.field == "api_key_prefix"
    assert_log_safe(info.value)


@pytest.mark.parametrize("field", ["tenant_id", "owner_id", "organization_id"])
@pytest.mark.parametrize(
    "value",
    [INJECTION, "", "a b", "tab\t", "nul\x00", "quote'", "ünïcode", "a" * 129, HUGE, 7, False, {"id": "x"}],
    ids=repr,
)
def test_bad_external_id_rejected(field: str, value: object) -> None:
    # Given an external id with forbidden characters, the wrong type or length
    # When validated / Then that field is named and the message is safe to log
    with pytest.raises(InvalidPayload) as info:
        validate(minimal(**{field: value}))
    assert info.value.field == field
    assert_log_safe(info.value)


@pytest.mark.parametrize("field", ["tenant_id", "owner_id", "organization_id"])
def test_external_ids_allow_their_alphabet(field: str) -> None:
    # Given ids made of letters, digits, _ . : - up to 128 characters / Then they validate
    for value in ("Tenant-1", "org:acme.eu_1", "A" * 128):
        assert getattr(validate(minimal(**{field: value})), field) == value


@pytest.mark.parametrize(
    "value", ["US_EAST", "us east", "us_east_1", "-us", "1us", "u", "us-east-1\n", "a" * 33, "", HUGE, 1]
)
def test_bad_region_rejected(value: object) -> None:
    # Given a region outside ^[a-z][a-z0-9-]{1,31}$ / When validated / Then region is named
    with pytest.raises(InvalidPayload) as info:
        validate(minimal(region=value))
    assert info.value.field == "region"
    assert_log_safe(info.value)


@pytest.mark.parametrize("value", [0, 11, -1, True, False, "3", 3.0, [3]], ids=repr)
def test_bad_api_key_count_rejected(value: object) -> None:
    # Given a count outside 1..10 or not an integer (booleans included)
    # When validated / Then api_key_count is named
    with pytest.raises(InvalidPayload) as info:
        validate(minimal(api_key_count=value))
    assert info.value.field == "api_key_count"


@pytest.mark.parametrize("field", ["project_id", "tenant_id", "region"])
def test_missing_required_field_named(field: str) -> None:
    # Given a payload without a required field / When validated / Then that field is named
    with pytest.raises(InvalidPayload) as info:
        validate(minimal(**{field: ...}))
    assert info.value.field == field
    assert info.value.problem == "is required"


@pytest.mark.parametrize(
    ("services", "field"),
    [
        ({"billing": True}, "services.billing"),
        ({"auth": "yes"}, "services.auth"),
        ({"realtime": 1}, "services.realtime"),
        ({"storage": [True]}, "services.storage"),
        (["auth"], "services"),
        ("auth", "services"),
        ({"x" * 100: True}, "services"),
    ],
    ids=repr,
)
def test_bad_services_rejected(services: object, field: str) -> None:
    # Given a services object with an unknown name or a non-boolean flag
    # When validated / Then the dotted field is named
    with pytest.raises(InvalidPayload) as info:
        validate(minimal(services=services))
    assert info.value.field == field
    assert_log_safe(info.value, not_containing="x" * 41)


def test_unknown_top_level_field_rejected() -> None:
    # Given a payload with a field the task does not know
    # When validated / Then the unknown field is named
    with pytest.raises(InvalidPayload) as info:
        validate(minimal(database_password="hunter2"))
    assert info.value.field == "database_password"
    # And the message says so as it would reach a log, result or last_error: not taken for a
    # secret's value by the redaction ("invalid password: [REDACTED] not a known field")
    for name in ("password", "api_key"):
        with pytest.raises(InvalidPayload) as info:
            validate(minimal(**{name: "x"}))
        assert apikeys.redact(str(info.value)) == f"invalid payload: has an unknown field '{name}'"


@pytest.mark.parametrize("key", [HUGE, INJECTION, "k\x00ey", "clé"], ids=repr)
def test_unsafe_unknown_field_is_not_echoed_as_field_name(key: str) -> None:
    # Given an unknown field whose name is itself hostile
    # When validated / Then the error blames the payload and does not carry the raw key
    with pytest.raises(InvalidPayload) as info:
        validate(minimal(**{key: 1}))
    assert info.value.field == "payload"
    assert_log_safe(info.value, not_containing=HUGE[:41])


@pytest.mark.parametrize("raw", [None, [], "payload", 42, b"{}"], ids=repr)
def test_non_object_payload_rejected(raw: object) -> None:
    # Given something that is not a JSON object / When validated / Then payload is named
    with pytest.raises(InvalidPayload) as info:
        validate(raw)
    assert info.value.field == "payload"


def test_error_message_echoes_short_values_only() -> None:
    # Given a short printable bad value, a long one and one with a NUL byte
    with pytest.raises(InvalidPayload) as short:
        validate(minimal(project_id=INJECTION))
    with pytest.raises(InvalidPayload) as long:
        validate(minimal(project_id="A" + "b" * 40))
    with pytest.raises(InvalidPayload) as nul:
        validate(minimal(tenant_id="abc\x00def"))

    # Then only the short printable one appears (as a repr); the others are described
    assert repr(INJECTION) in str(short.value)
    assert "b" * 40 not in str(long.value)
    assert "41 characters" in str(long.value)
    assert "abc" not in str(nul.value) and "\x00" not in str(nul.value)


# --- API keys ---------------------------------------------------------------------------------


def test_generated_key_has_the_documented_format() -> None:
    # Given a prefix / When a key is generated
    key = apikeys.generate("acme_prod")

    # Then it reads <prefix>_<49 base62 chars>, matches the secret pattern and its checksum
    prefix, _, body = key.rpartition("_")
    assert prefix == "acme_prod"
    assert len(body) == 49 and set(body) <= BASE62
    assert apikeys.SECRET_PATTERN.fullmatch(key)
    assert apikeys.checksum_ok(key)


def test_keys_are_unique() -> None:
    # Given / When many keys are generated / Then no two are equal
    keys = {apikeys.generate("p") for _ in range(2000)}
    assert len(keys) == 2000


@pytest.mark.parametrize("fill", [b"\x00", b"\xff"])
def test_encoding_is_left_padded_to_fixed_width(fill: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the extreme random values (all zero bits, all one bits)
    monkeypatch.setattr(secrets, "token_bytes", lambda n: fill * n)

    # When a key is generated
    key = apikeys.generate("p")

    # Then the body still has exactly 43 + 6 characters and a valid checksum
    assert len(key) == len("p_") + 49
    assert apikeys.checksum_ok(key)
    if fill == b"\x00":
        assert key.startswith("p_" + "0" * 43)


def test_checksum_catches_every_single_character_change() -> None:
    # Given a valid key
    key = apikeys.generate("proj")
    body_start = len("proj_")

    # When any one body character is replaced / Then the checksum no longer matches
    for i in range(body_start, len(key)):
        replacement = "a" if key[i] != "a" else "b"
        assert not apikeys.checksum_ok(key[:i] + replacement + key[i + 1 :])


@pytest.mark.parametrize(
    "text", ["", "proj", "proj_", "proj_abc", "Proj_" + "0" * 49, "proj_" + "0" * 48 + "!", "_" + "0" * 49]
)
def test_checksum_rejects_malformed_keys(text: str) -> None:
    # Given text that is not a key / When checked / Then it fails, without raising
    assert not apikeys.checksum_ok(text)


def test_hash_is_hmac_under_the_pepper() -> None:
    # Given a key
    key = apikeys.generate("proj")

    # When hashed with the pepper
    digest = apikeys.hash_key(key, PEPPER)

    # Then it is stable hex, depends on key and pepper, and does not contain the key
    assert digest == apikeys.hash_key(key, PEPPER)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digest != apikeys.hash_key(key, b"another pepper")
    assert digest != apikeys.hash_key(apikeys.generate("proj"), PEPPER)
    assert key not in digest
    with pytest.raises(ValueError):
        apikeys.hash_key(key, b"")


def test_hint_shows_prefix_and_a_few_characters_only() -> None:
    # Given a key / When hinted
    key = apikeys.generate("proj")
    body = key.removeprefix("proj_")
    shown = apikeys.hint(key)

    # Then it shows the prefix and 4 + 4 body characters, and is not a key itself
    assert shown == f"proj_{body[:4]}…{body[-4:]}"
    assert not apikeys.SECRET_PATTERN.search(shown)


def test_generate_refuses_a_bad_prefix() -> None:
    # Given a prefix outside the identifier alphabet / When generating / Then it refuses
    with pytest.raises(ValueError):
        apikeys.generate('x"; --')


def test_redact_removes_keys_and_passwords() -> None:
    # Given text with a key, DSN and DDL passwords, a SCRAM verifier and URL credentials
    key = apikeys.generate("acme")
    scram = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"
    text = (
        f"key {key} issued; dsn host=db password=s3cr3t user=u; "
        f"ALTER ROLE r PASSWORD 'it''s secret'; verifier {scram}; "
        "url postgresql://app:hunter2@db:5432/x; glued x{key}!"
    )

    # When redacted
    cleaned = apikeys.redact(text)

    # Then no secret survives and the surrounding words do
    for secret in (key, "s3cr3t", "it''s secret", "secret'", scram, "c3RvcmVk", "hunter2"):
        assert secret not in cleaned
    assert "[REDACTED]" in cleaned
    assert cleaned.startswith("key [REDACTED] issued; dsn host=db password=[REDACTED] user=u;")
    assert "PASSWORD [REDACTED]" in cleaned
    assert "postgresql://app:[REDACTED]@db:5432/x" in cleaned


def test_redact_finds_a_key_of_the_longest_prefix_and_one_glued_to_a_long_hex_dump() -> None:
    # Given a key of the longest prefix a project can have, and one glued to 100,000 hex digits
    # (the key pattern's prefix is bounded: unbounded, redacting 80,000 such digits took 9 s)
    longest = apikeys.generate("p" * MAX_IDENTIFIER_LEN)
    glued = apikeys.generate("acme")
    dump = "0123456789abcdef" * 6_250
    # When redacted
    cleaned = apikeys.redact(f"issued {longest}; dump {dump}{glued} end")
    # Then both keys are gone, and the dump before the glued one is kept but for what could be
    # a prefix (63 characters: 5 blocks of 16 at most; unbounded, the whole dump went)
    assert longest not in cleaned and glued[-49:] not in cleaned
    assert cleaned.startswith("issued [REDACTED]; dump 0123456789abcdef")
    assert cleaned.endswith("[REDACTED] end")
    assert cleaned.count("0123456789abcdef") >= 6_250 - 5


def test_redact_removes_url_passwords_holding_an_at_sign() -> None:
    # Given connection URLs whose passwords were pasted without percent-encoding, one of them quoted,
    # and a service URL with an address in its query string
    text = ("cannot connect to 'postgresql://app:p@ss@w0rd@db:5432/x' nor postgres://u:a@b@h/y; "
            "PUT http://auth:9999/tenants/t?owner=ann@example.com failed")  # fmt: skip
    # When redacted
    cleaned = apikeys.redact(text)
    # Then no part of either password survives, and the users, hosts, databases and the service URL do
    for part in ("p@ss", "ss@w0rd", "w0rd", "u:a@"):
        assert part not in cleaned
    assert "'postgresql://app:[REDACTED]@db:5432/x'" in cleaned
    assert "postgres://u:[REDACTED]@h/y" in cleaned
    assert "http://auth:9999/tenants/t?owner=ann@example.com" in cleaned


def test_redact_removes_secrets_under_longer_setting_and_field_names() -> None:
    # Given secrets as environment dumps, JSON answers and echoed headers write them
    text = ("AUTH_SERVICE_TOKEN=tok-1 PGPASSWORD=pw-2 API_KEY_PEPPER=pep-3; "
            '{"access_token": "at-4", "client_secret": "cs-5"}; Authorization: Token tk-6; '
            "Authorization: Basic YmFzaWM=; service_tokens={'auth': 'st-7'}; the token expired")  # fmt: skip
    # When redacted
    cleaned = apikeys.redact(text)
    # Then none survives, the names do, and prose about a token is left alone
    for secret in ("tok-1", "pw-2", "pep-3", "at-4", "cs-5", "tk-6", "YmFzaWM=", "st-7"):
        assert secret not in cleaned
    assert "AUTH_SERVICE_TOKEN=[REDACTED]" in cleaned and "PGPASSWORD=[REDACTED]" in cleaned
    assert cleaned.endswith("the token expired")


def test_redact_removes_api_keys_access_keys_and_credentials_under_their_names() -> None:
    # Given a KeyError quoting a settings dict, an environment dump and a JSON answer (a review's repro)
    text = ("KeyError: {'api_key': 'ak-1', 'region': 'eu'}; AWS_SECRET_ACCESS_KEY=ak-2 ACCESS_KEY=ak-3 "
            'STRIPE_APIKEY=ak-4; {"private_key": "ak-5", "credentials": "ak-6"}; api_key_count=3')  # fmt: skip
    # When redacted
    cleaned = apikeys.redact(text)
    # Then none survives, and a field that only starts with such a name (a count, an id) is left alone
    for n in range(1, 7):
        assert f"ak-{n}" not in cleaned
    assert "'region': 'eu'" in cleaned and cleaned.endswith("api_key_count=3")


def test_redact_removes_secrets_as_python_reprs_and_dollar_quoted_ddl_write_them() -> None:
    # Given secrets as an exception quoting its arguments would show them: bytes, containers,
    # a plural name, a (name, value) pair, and DDL with dollar quotes and E'' escapes
    text = ("{'password': b'pw-1', 'user': 'app'}; connect(password=b'pw-2'); {'token': {'access': 'pw-3'}}; "
            "{'passwords': ['pw-4', 'x']}; [('client_secret', 'pw-5')]; ALTER ROLE r PASSWORD $$pw-6$$ LOGIN; "
            "ALTER ROLE r PASSWORD $q$pw-7'$q$; ALTER ROLE r PASSWORD E'it\\'s pw-8' LOGIN")  # fmt: skip
    # When redacted
    cleaned = apikeys.redact(text)
    # Then none survives, and the names, the other fields and the statements around them do
    for n in range(1, 9):
        assert f"pw-{n}" not in cleaned
    assert "{'password': [REDACTED], 'user': 'app'}" in cleaned
    assert "{'token': [REDACTED]}" in cleaned
    assert "[('client_secret', [REDACTED])]" in cleaned
    assert cleaned.endswith("ALTER ROLE r PASSWORD [REDACTED] LOGIN")


def test_a_traceback_another_handler_formatted_first_is_redacted_in_the_workers_log() -> None:
    # Given the worker's log handler with the filter, and an application's own handler on its
    # package's logger, which formats (and caches) a record's traceback before the root's runs
    worker_log, app_log = io.StringIO(), io.StringIO()
    worker_handler = logging.StreamHandler(worker_log)
    worker_handler.addFilter(MessageContextFilter())
    app_logger = logging.getLogger("myapp.redaction_test")
    app_logger.addHandler(logging.StreamHandler(app_log))
    logging.getLogger().addHandler(worker_handler)
    try:
        # When the application logs an exception quoting a connection URL
        try:
            raise RuntimeError("could not connect to postgresql://app:pw-9@db/app")
        except RuntimeError:
            app_logger.exception("connect failed")
    finally:
        logging.getLogger().removeHandler(worker_handler)
        app_logger.handlers.clear()
    # Then the worker's log has the traceback, without the password
    assert "RuntimeError: could not connect to postgresql://app:[REDACTED]@db/app" in worker_log.getvalue()
    assert "pw-9" not in worker_log.getvalue()


@pytest.mark.parametrize(
    "secret",
    [apikeys.generate("acme"), "password='two words and more'", '"token": "abc def ghi"',
     "postgresql://app:hunter2@db/app", "PASSWORD $tag$two words$tag$", "PASSWORD $$two\nlines$$",
     "PASSWORD E'two \\' words'", "('password', 'two words')"],
    ids=["api key", "quoted password", "json token", "url password", "dollar-quoted", "dollar-quoted lines",
         "escape string", "tuple"],
)  # fmt: skip
def test_a_text_past_what_is_redacted_whole_is_cut_and_no_part_of_a_secret_at_the_cut_is_kept(secret: str) -> None:
    from tasks.redaction import REDACT_MAX_CHARS, redact_head

    # Given a failed job's log line as long as its 1 MB of arguments, with a secret where the cut
    # falls at each of its characters (and one near the start)
    for offset in range(1, len(secret)):
        text = f"password=early {'x ' * ((REDACT_MAX_CHARS - offset) // 2)}"[: REDACT_MAX_CHARS - offset - 1]
        text += " " + secret + " y" * 500_000
        # When redacted for a log line
        cleaned = redact_head(text)
        # Then what is kept is cut, says so, and holds no part of the secret (8 characters of it
        # and more could be anything's), nor the early one
        assert cleaned.endswith(f" … [cut: {len(text):,} characters in all]")
        assert len(cleaned) <= REDACT_MAX_CHARS + 60
        assert "early" not in cleaned
        kept = cleaned.removesuffix(f" … [cut: {len(text):,} characters in all]")
        named = "password='" + '"token": ' + "postgresql://app:" + "PASSWORD $tag$" + "('password', "  # (names stay)
        for start in range(len(secret) - 7):
            part = secret[start : start + 8]
            assert part not in kept or part in named, (offset, part, kept[-60:])
    # And a text within the bound is redacted as a whole, as redact does
    assert redact_head(f"a {secret} b") == apikeys.redact(f"a {secret} b")
    # And of a long word the cut falls in (base64, hex), only its last 4,096 characters go
    long_word = redact_head("start " + "A" * 40_000)
    assert long_word.startswith("start AAAA") and long_word.count("A") == REDACT_MAX_CHARS - len("start ") - 4096


def test_redact_leaves_ordinary_text_alone() -> None:
    # Given a log line without secrets / When redacted / Then it is unchanged
    line = "provision_project.create_database finished for proj_1 in us-east-1 (attempt 2)"
    assert apikeys.redact(line) == line


# --- service client against the stand-ins -----------------------------------------------------


@pytest.fixture
def standin() -> Iterator[StandinService]:
    service = StandinService("auth", TOKEN)
    service.start()
    yield service
    service.stop()


def client_for(service: StandinService, *, token: str = TOKEN, timeout: float = 5.0) -> ServiceClient:
    return ServiceClient(service.name, service.url, token, timeout)


def statuses(service: StandinService) -> list[int]:
    return [status for _, _, status in service.request_log]


def assert_no_token(exc: BaseException, token: str = TOKEN) -> None:
    """Neither the message nor the chained traceback mentions the token."""
    assert token not in str(exc)
    assert token not in "".join(traceback.format_exception(exc))


def test_put_get_delete_round_trip(standin: StandinService) -> None:
    # Given a client with the right token
    client = client_for(standin)

    # When a tenant is created, updated, read, deleted and read again
    created = client.put_tenant("proj_1", {"tenant_id": "tenant-1", "region": "eu-west"})
    updated = client.put_tenant("proj_1", {"tenant_id": "tenant-1", "region": "us-east-1"})
    fetched = client.get_tenant("proj_1")
    client.delete_tenant("proj_1")
    gone = client.get_tenant("proj_1")

    # Then the upsert answers 201 then 200 and each step sees the latest state
    assert created == {"tenant_id": "tenant-1", "region": "eu-west", "project_id": "proj_1"}
    assert updated["region"] == "us-east-1"
    assert fetched == updated
    assert gone is None
    assert statuses(standin) == [201, 200, 200, 204, 404]
    assert standin.tenants == {}


def test_delete_of_missing_tenant_is_done(standin: StandinService) -> None:
    # Given no tenant / When deleted / Then no error (404 counts as done)
    client_for(standin).delete_tenant("never_created")
    assert statuses(standin) == [404]


def test_project_id_is_url_quoted(standin: StandinService) -> None:
    # Given a project id with URL metacharacters / When registered
    client_for(standin).put_tenant("a/b?c", {"tenant_id": "t"})

    # Then it travels as one quoted path segment and arrives intact
    assert standin.request_log == [("PUT", "/tenants/a%2Fb%3Fc", 201)]
    assert list(standin.tenants) == ["a/b?c"]


def test_five_hundreds_are_transient_then_success(standin: StandinService) -> None:
    # Given a service that fails the next two requests
    standin.set_faults(fail_times=2)
    client = client_for(standin)

    # When the client retries until it succeeds
    errors: list[TransientError] = []
    for _ in range(3):
        try:
            client.put_tenant("proj_1", {"tenant_id": "t"})
            break
        except TransientError as exc:
            errors.append(exc)

    # Then the two failures were transient and named the service, method, path and status
    assert len(errors) == 2
    assert "auth PUT /tenants/proj_1: HTTP 500" in str(errors[0])
    assert statuses(standin) == [500, 500, 201]
    assert "proj_1" in standin.tenants
    assert standin.state()["requests"] == 3


def test_429_is_transient(standin: StandinService) -> None:
    # Given a rate-limiting service / When called / Then TransientError names the status
    standin.set_faults(status_429_times=1)
    with pytest.raises(TransientError, match="HTTP 429"):
        client_for(standin).get_tenant("proj_1")
    assert client_for(standin).get_tenant("proj_1") is None


def test_hang_past_timeout_is_transient(standin: StandinService) -> None:
    # Given a service that answers far later than the client waits
    standin.set_faults(hang_seconds=30)

    # When called with a short timeout / Then the timeout is a TransientError
    with pytest.raises(TransientError, match=r"no answer within 0\.5s") as info:
        client_for(standin, timeout=0.5).put_tenant("proj_1", {"tenant_id": "t"})
    assert_no_token(info.value)


def _hanging(standin: StandinService, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once a request has read the stand-in's faults and begun to hang. Its client's timeout
    is no sign of that: a loaded machine may start the handler thread after the client gave up,
    and the request would then read the faults set after it (or the state after a reset)."""
    entered, stopping = threading.Event(), standin._stopping

    class Watched:
        def wait(self, timeout: float | None = None) -> bool:
            entered.set()
            return stopping.wait(timeout)

        def __getattr__(self, name: str) -> Any:
            return getattr(stopping, name)

    monkeypatch.setattr(standin, "_stopping", Watched())
    return entered


def test_a_request_that_hung_does_not_use_up_faults_set_after_it_arrived(
    standin: StandinService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a request that hangs past its client's timeout
    hanging = _hanging(standin, monkeypatch)
    standin.set_faults(hang_seconds=2.0)
    with pytest.raises(TransientError, match="no answer"):
        client_for(standin, timeout=0.2).put_tenant("proj_stale", {"tenant_id": "t"})
    wait_for(hanging.is_set, what="the request to hang")
    # When the next test's faults are set while it still hangs
    standin.set_faults(hang_seconds=0, drop_after_commit_times=1)
    wait_for(lambda: "proj_stale" in standin.tenants, what="the stale request to be applied")
    # Then the fault is still there for the next request
    with pytest.raises(TransientError, match="connection failed"):
        client_for(standin).put_tenant("proj_1", {"tenant_id": "t"})


def test_a_request_that_hung_across_a_reset_leaves_the_fresh_state_alone(
    standin: StandinService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a request that hangs past its client's timeout
    hanging = _hanging(standin, monkeypatch)
    standin.set_faults(hang_seconds=2.0)
    with pytest.raises(TransientError, match="no answer"):
        client_for(standin, timeout=0.1).put_tenant("proj_stale", {"tenant_id": "t"})
    wait_for(hanging.is_set, what="the request to hang")
    # When the stand-in is reset for the next test while it still hangs, and a new request is served
    standin.reset()
    client_for(standin).put_tenant("proj_1", {"tenant_id": "t"})
    # Then the stale request, once awake, is dropped: the fresh state holds only what came after the reset
    wait_for(lambda: standin.state()["stale_requests"] == 1, what="the stale request to be dropped")
    assert list(standin.tenants) == ["proj_1"]
    assert standin.state()["requests"] == 1


def test_rejected_token_is_permanent_and_not_echoed(standin: StandinService) -> None:
    # Given a service that rejects every token
    standin.set_faults(reject_token=True)

    # When called / Then PermanentError names the service and status but never the token
    with pytest.raises(PermanentError) as info:
        client_for(standin).put_tenant("proj_1", {"tenant_id": "t"})
    assert not isinstance(info.value, TransientError)
    assert "auth PUT /tenants/proj_1: HTTP 401" in str(info.value)
    assert_no_token(info.value)
    assert standin.tenants == {}


SLASHED_TOKEN = "sk/live/9f8e+7d6c=5b4aSECRETXYZ"


@pytest.mark.parametrize(
    ("body", "leak"),
    [
        # (what the service answered, the token's spelling in it, with nothing but the token)
        (json.dumps({"auth": f"Bearer {SLASHED_TOKEN}"}).replace("/", "\\/"),
         json.dumps(SLASHED_TOKEN)[1:-1].replace("/", "\\/")),
        ("auth=Bearer%20" + quote(SLASHED_TOKEN, safe=""), quote(SLASHED_TOKEN, safe="")),
        ("auth=Bearer+" + quote_plus(SLASHED_TOKEN), quote_plus(SLASHED_TOKEN)),
        # "Bearer " is 7 bytes: from the 4th group of 4 on, the text encodes the token alone
        (base64.b64encode(f"Bearer {SLASHED_TOKEN}".encode()).decode(),
         base64.b64encode(f"Bearer {SLASHED_TOKEN}".encode()).decode()[12:-4]),
        (base64.urlsafe_b64encode(SLASHED_TOKEN.encode()).decode(),
         base64.urlsafe_b64encode(SLASHED_TOKEN.encode()).decode()[:-4]),
    ],
    ids=["json-escaped", "percent", "percent-plus", "base64", "base64-urlsafe"],
)
def test_a_token_a_failing_service_echoes_encoded_is_scrubbed(standin: StandinService, body: str, leak: str) -> None:
    # Given a token with characters that encodings change, echoed by a failing service
    client = client_for(standin, token=SLASHED_TOKEN)
    # When the error is made of its answer
    error = str(client._error("PUT", "/tenants/p1", 500, body.encode()))
    # Then the token is in it in no spelling
    assert "HTTP 500" in error
    assert SLASHED_TOKEN not in error
    assert leak not in error, error


def test_a_refused_credentials_answer_is_not_quoted(standin: StandinService) -> None:
    error = client_for(standin)._error("GET", "/tenants/p1", 401, b'{"error": "bad token", "you_sent": "xyz"}')
    assert str(error) == "auth GET /tenants/p1: HTTP 401 (check the auth service token)"


def test_wrong_token_is_permanent(standin: StandinService) -> None:
    # Given a client holding the wrong token / When called / Then 401 is permanent, token unsaid
    wrong = "wrong-token-e99a18c428cb38d5"
    with pytest.raises(PermanentError, match="HTTP 401") as info:
        client_for(standin, token=wrong).get_tenant("proj_1")
    assert_no_token(info.value, wrong)


def test_other_client_errors_are_permanent(standin: StandinService) -> None:
    # Given a body the service refuses (empty tenant_id) / When sent / Then 400 is permanent
    with pytest.raises(PermanentError, match="HTTP 400") as info:
        client_for(standin).put_tenant("proj_1", {"tenant_id": ""})
    assert not isinstance(info.value, Conflict)


def test_drop_after_commit_is_transient_but_applied(standin: StandinService) -> None:
    # Given a service that applies the next PUT and DELETE then hangs up
    standin.set_faults(drop_after_commit_times=2)
    client = client_for(standin)

    # When the PUT is dropped / Then the error is transient but the tenant exists
    with pytest.raises(TransientError, match="connection failed") as put_error:
        client.put_tenant("proj_1", {"tenant_id": "t"})
    assert "proj_1" in standin.tenants
    assert_no_token(put_error.value)

    # When the DELETE is dropped / Then transient again, the tenant is gone, and a retry is fine
    with pytest.raises(TransientError):
        client.delete_tenant("proj_1")
    assert standin.tenants == {}
    client.delete_tenant("proj_1")
    assert statuses(standin) == [NO_ANSWER, NO_ANSWER, 404]


def test_connection_refused_is_transient() -> None:
    # Given a port nobody listens on
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    # When called / Then TransientError
    client = ServiceClient("storage", f"http://127.0.0.1:{port}", TOKEN, 1.0)
    with pytest.raises(TransientError, match="storage GET /tenants/proj_1: connection failed"):
        client.get_tenant("proj_1")


def _whole_request(conn: socket.socket) -> bytes:
    """A request read to the end of its body (its ``Content-Length``): closed with bytes of it
    unread, the socket would answer with a reset, not the answer the test means to give."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while found is not None and len(body) < int(found.group(1)):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class _RawServer:
    """A one-answer-at-a-time HTTP server on loopback that answers each request with ``answer(sock)``."""

    def __init__(self, answer: Any) -> None:
        self.requests: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._answer = answer
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                request = _whole_request(conn)
                self.requests.append(request.split(b"\r\n", 1)[0])
                with contextlib.suppress(OSError):
                    self._answer(conn)

    def close(self) -> None:
        self._sock.close()


def test_an_answer_trickled_past_the_timeout_is_a_timeout_not_a_partial_answer() -> None:
    # Given a service that sends its answer one byte at a time, slower than the client's timeout
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{" + b" " * 200 + b"}":
            if stop.wait(0.05):
                return
            conn.sendall(bytes([byte]))

    server = _RawServer(trickle)
    try:
        client = ServiceClient("auth", server.url, TOKEN, 0.5)
        # When a PUT is made / Then it ends as a transient timeout, not a success or a bad answer
        with pytest.raises(TransientError, match=r"no (whole )?answer within 0\.5s"):
            client.put_tenant("proj_1", {"tenant_id": "t"})
    finally:
        stop.set()
        server.close()


def test_a_put_applied_but_answered_unreadably_stays_touched_so_compensation_undoes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tasks.provision import register

    # Given a service that registers the tenant, then answers 200 with a body that is not JSON
    def applied_then_plain_text(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nOK")

    server = _RawServer(applied_then_plain_text)
    touched: list[tuple[str, bool]] = []
    monkeypatch.setattr(register, "_touch", lambda state, service, on: touched.append((service, on)) or True)
    monkeypatch.setattr(register, "_run_held", lambda state, service: contextlib.nullcontext(True))
    settings = Settings.from_env({"AUTH_SERVICE_URL": server.url, "AUTH_SERVICE_TOKEN": TOKEN})
    state = ProjectState(payload=validate(minimal(services={"auth": True})), status="provisioning", steps={},
                         secret_nonce=None, job_id=None)
    try:
        # When the services step runs / Then it fails for good, and auth stays touched (not untouched)
        with pytest.raises(PermanentError, match="non-JSON body"):
            register.register_services(settings, state)
    finally:
        server.close()
    assert touched == [("auth", True)]
    # while a 4xx (the service refused: it applied nothing) is untouched again
    refusing = _RawServer(lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"))
    touched.clear()
    try:
        settings = Settings.from_env({"AUTH_SERVICE_URL": refusing.url, "AUTH_SERVICE_TOKEN": TOKEN})
        with pytest.raises(PermanentError, match="HTTP 400"):
            register.register_services(settings, state)
    finally:
        refusing.close()
    assert touched == [("auth", True), ("auth", False)]


def _put_answered(answer: bytes, raises: type[Exception], service: str = "auth") -> tuple[Exception, _RawServer]:
    """What a ``PUT`` raises against a service that answers ``answer`` (raw HTTP), and that service."""
    server = _RawServer(lambda conn: conn.sendall(answer))
    try:
        with pytest.raises(raises) as info:
            ServiceClient(service, server.url, TOKEN, 2.0).put_tenant("proj_1", {"tenant_id": "t"})
    finally:
        server.close()
    return info.value, server


def test_an_answer_cut_short_of_its_content_length_is_a_dropped_connection_not_a_bad_answer() -> None:
    # Given a service that registers the tenant and closes the connection halfway through its
    # answer's body (a clean close, not a reset: http.client hands over the short body)
    cut = b'HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"tenant_id": "t",'
    # When a PUT is made / Then it is transient (retried; PUT is an upsert), and says what happened
    error, _ = _put_answered(cut, TransientError, "realtime")
    assert re.search(r"HTTP 201, the connection closed 4\d\d bytes short of its answer", str(error)), str(error)


@pytest.mark.parametrize("method", ["PUT", "GET"])
def test_a_2xx_answer_nested_too_deep_to_decode_is_a_permanent_bad_answer(method: str) -> None:
    # Given a service that answers 200 with a JSON body nested 100,000 deep (garbage, well under
    # the 1 MB the client reads): not a JSON object, so a permanent error (docs/services.md)
    body = b"[" * 100_000 + b"]" * 100_000
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    server = _RawServer(lambda conn: conn.sendall(answer))
    try:
        client = ServiceClient("auth", server.url, TOKEN, 2.0)
        # When the request is made / Then it fails for good, saying what was wrong (not a
        # RecursionError, which the step would retry 8 times over minutes for the same answer)
        with pytest.raises(PermanentError, match=f"auth {method} /tenants/proj_1: HTTP 200"):
            if method == "PUT":
                client.put_tenant("proj_1", {"tenant_id": "t"})
            else:
                client.get_tenant("proj_1")
    finally:
        server.close()


@pytest.mark.parametrize(("status", "refused"), [(301, True), (308, True), (307, True), (302, False), (303, False)])
def test_a_redirect_is_not_followed_and_says_where_it_points_and_which_setting_to_mend(
    status: int, refused: bool
) -> None:
    # Given a service URL that answers with a redirect (http to https, a moved path)
    location = b"https://auth.example.test:8443/v2/tenants/proj_1?sig=abc"
    # When a PUT is made
    error, server = _put_answered(b"HTTP/1.1 %d Moved\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n"
                                  % (status, location), PermanentError)  # fmt: skip
    # Then the error names the redirect, the host it points to (not its path or query) and the
    # setting; a 301, 307 or 308 applied nothing here (refused: nothing for compensation to
    # undo), a 302 or 303 may have come after the request was applied
    message = str(error)
    assert f"HTTP {status}, a redirect to https://auth.example.test:8443: set AUTH_SERVICE_URL" in message
    assert "sig=abc" not in message and "/v2" not in message
    assert getattr(error, "refused", False) is refused
    assert len(server.requests) == 1  # not followed


@pytest.mark.parametrize("header", ["30", "DATE"])
def test_a_429s_retry_after_rides_on_its_transient_error(header: str) -> None:
    # Given a service answering 429 with a Retry-After of 30 s, in seconds or as an HTTP date
    import email.utils
    import time

    value = email.utils.formatdate(time.time() + 30, usegmt=True) if header == "DATE" else header
    error, _ = _put_answered(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: %s\r\nContent-Length: 0\r\n\r\n"
                             % value.encode(), TransientError, "storage")  # fmt: skip
    # Then the error carries the wait (Retries makes the next attempt wait at least that)
    assert isinstance(error, TransientError) and error.retry_after is not None and 25 <= error.retry_after <= 30


def test_compensation_deregisters_every_touched_service_even_when_one_fails() -> None:
    from tasks.provision import register

    # Given a project registered with auth and realtime, whose realtime (deregistered first) fails
    gone: list[str] = []

    def deleted(conn: socket.socket) -> None:
        gone.append("auth")
        conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

    auth = _RawServer(deleted)
    realtime = _RawServer(lambda conn: conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"))
    settings = Settings.from_env({"AUTH_SERVICE_URL": auth.url, "AUTH_SERVICE_TOKEN": TOKEN,
                                  "REALTIME_SERVICE_URL": realtime.url, "REALTIME_SERVICE_TOKEN": TOKEN})
    payload = validate(minimal(services={"auth": True, "realtime": True}))
    try:
        # When compensation deregisters them / Then realtime's failure is raised, after auth's went
        with pytest.raises(TransientError, match="realtime DELETE"):
            register.deregister_services(settings, payload, ["auth", "realtime"])
    finally:
        auth.close()
        realtime.close()
    assert gone == ["auth"]


def test_client_repr_and_constructor_keep_the_token_out() -> None:
    # Given a client / Then its repr omits the token, and a bad token is refused without echo
    client = ServiceClient("auth", "http://127.0.0.1:1/admin/", TOKEN, 1.0)
    assert TOKEN not in repr(client)
    with pytest.raises(ValueError) as info:
        ServiceClient("auth", "http://127.0.0.1:1", "bad token\n", 1.0)
    assert "bad token" not in str(info.value)
    with pytest.raises(ValueError):
        ServiceClient("auth", "http://user:pw@127.0.0.1:1", TOKEN, 1.0)
    # and a URL whose port is not a number is refused without quoting it (urllib's own error does)
    with pytest.raises(ValueError) as info:
        ServiceClient("auth", "http://svc:abcSECRET/", TOKEN, 1.0)
    assert "abcSECRET" not in str(info.value) and "port" in str(info.value)


# --- stand-in control over HTTP ---------------------------------------------------------------


def http_json(url: str, method: str = "GET", body: object = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_faults_state_and_reset_over_http(standin: StandinService) -> None:
    # Given a fault set over HTTP, as a test in another process would
    status, faults = http_json(f"{standin.url}/_faults", "POST", {"fail_times": 1})
    assert status == 200 and isinstance(faults, dict) and faults["fail_times"] == 1

    # When a request consumes it and another succeeds
    client = client_for(standin)
    with pytest.raises(TransientError):
        client.put_tenant("proj_1", {"tenant_id": "t"})
    client.put_tenant("proj_1", {"tenant_id": "t"})

    # Then /_state reports tenants and request counts, and /_reset clears everything
    status, state = http_json(f"{standin.url}/_state")
    assert status == 200 and isinstance(state, dict)
    assert state["tenants"] == {"proj_1": {"tenant_id": "t", "project_id": "proj_1"}}
    assert state["requests"] == 2 and state["request_counts"] == {"PUT": 2}
    assert http_json(f"{standin.url}/_reset", "POST", {})[0] == 200
    assert standin.tenants == {} and standin.request_log == [] and standin.faults.fail_times == 0


@pytest.mark.parametrize(
    "body", [{"fail_times": -1}, {"fail_times": True}, {"reject_token": 1}, {"explode": 1}, [1]], ids=repr
)
def test_bad_fault_settings_are_refused(standin: StandinService, body: object) -> None:
    # Given a malformed fault setting / When posted / Then 400 and nothing changes
    status, _ = http_json(f"{standin.url}/_faults", "POST", body)
    assert status == 400
    assert standin.faults == type(standin.faults)()


def test_cli_starts_three_standins_and_stops_on_sigterm() -> None:
    # Given the stand-in CLI started in its own process
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.provision.standin"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "AUTH_SERVICE_TOKEN": TOKEN},
    )
    try:
        assert process.stdout is not None
        lines = [json.loads(process.stdout.readline()) for _ in range(3)]

        # When each announced URL is used
        assert [line["service"] for line in lines] == ["auth", "realtime", "storage"]
        assert [line["setting"] for line in lines] == [
            "AUTH_SERVICE_URL",
            "REALTIME_SERVICE_URL",
            "STORAGE_SERVICE_URL",
        ]
        client = ServiceClient("auth", lines[0]["url"], TOKEN, 5.0)
        client.put_tenant("proj_1", {"tenant_id": "t"})

        # Then it serves, never prints the token, and exits cleanly on SIGTERM
        _, state = http_json(f"{lines[0]['url']}/_state")
        assert isinstance(state, dict)
        assert state["tenants"] == {"proj_1": {"tenant_id": "t", "project_id": "proj_1"}}
        assert TOKEN not in json.dumps(lines)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(("url", "address"), [
    ("postgresql://root@127.0.0.1:5432/postgres", ("127.0.0.1", 5432)),
    ("postgresql://u:p%40ss@[::1]:6000/d", ("::1", 6000)),
    ("postgresql://db.internal/d", ("db.internal", 5432)),
    # several hosts, each with its port or none: the first host and its own port (or the default)
    ("postgresql://h1,h2:5433/d", ("h1", 5432)),
    ("postgresql://h1:5434,h2:5433/d", ("h1", 5434)),
    # a unix socket directory in the query, and no host at all
    ("postgresql:///d?host=/var/run/postgresql&port=5433", ("/var/run/postgresql", 5433)),
    ("postgresql:///d", ("localhost", 5432)),
])
def test_a_projects_result_names_the_first_server_of_the_target_url(url: str, address: tuple[str, int]) -> None:
    from tasks.provision.workflow import _server_address

    # Given the tenant server's URL as an operator may write it
    # When the result's host and port are read from it
    # Then they are the first server's, never an error that would fail a finished project's activate step
    assert _server_address(url) == address


def test_processes_creating_the_pepper_at_once_all_get_the_same_whole_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.provision import secrets as project_secrets

    # (each home's pepper is another deployment's: the check against the database is not this test's)
    monkeypatch.setattr(project_secrets, "_check", lambda value, where, made, record: None)

    # Given a fresh home, no API_KEY_PEPPER, and several workers starting at once (20 times over)
    for attempt in range(20):
        settings = Settings.from_env({"CONTROLPLANE_HOME": str(tmp_path / f"home{attempt}")})
        got = at_once(functools.partial(project_secrets.pepper, settings), 6)
        # Then each read the one pepper, whole (64 hex characters), and only that 0600 file exists
        assert len(set(got)) == 1 and len(got[0]) == 64, got
        assert [p.name for p in settings.home.iterdir()] == ["api-key-pepper"]
        assert (settings.home / "api-key-pepper").stat().st_mode & 0o777 == 0o600


def test_redact_removes_a_bearer_token_an_error_echoes() -> None:
    # Given an error that echoes an Authorization header with a bearer token (an HTTP client's
    # exception text, a proxy's 4xx body), a token no other pattern knows the name of
    text = "401 from https://auth.internal/tenants: request had 'Authorization: Bearer eyJhbGciOi.abc-DEF_123'"
    # When redacted
    cleaned = apikeys.redact(text)
    # Then the token is gone, the scheme word is kept
    assert "eyJhbGciOi" not in cleaned
    assert "Bearer [REDACTED]" in cleaned
