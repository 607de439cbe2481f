"""Secrets outside provisioning: a misread BROKER_URL, a DATABASE_URL libpq cannot read whose
password holds a '"', and PostgreSQL's ``Key (column)=(value)`` DETAIL of an actor's error."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg2
import pytest

from tasks.errors import ConfigurationError
from tasks.settings import Settings
from tests.support import ROOT


@pytest.mark.parametrize("password", ["Top/zzSecret", "Top#zzSecret", "Top?zzSecret"])
def test_a_broker_url_whose_password_is_not_percent_encoded_is_refused_quoting_none_of_it(password: str) -> None:
    # Given a BROKER_URL whose password holds a '/', '#' or '?' that is not percent-encoded
    # (urllib, which pika parses it with, then takes the password's head for the port)
    url = f"amqp://guest:{password}@127.0.0.1:5672/%2F"
    # When the settings are read, Then it is refused naming the setting, quoting no part of it
    with pytest.raises(ConfigurationError, match=r"^BROKER_URL is not a valid AMQP URL") as refused:
        Settings.from_env({"BROKER_URL": url})
    assert "Top" not in str(refused.value) and "zzSecret" not in str(refused.value)
    # And a command says so in one line, not a traceback quoting the password's head
    env = {**os.environ, "BROKER_URL": url, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "stats"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("controlplane: error: BROKER_URL is not a valid AMQP URL"), done.stderr
    assert "Top" not in done.stderr + done.stdout and "Traceback" not in done.stderr
    # And the forms RabbitMQ's URLs take are still taken
    for good in ("amqp://guest:guest@127.0.0.1:5672/%2F", "amqp://127.0.0.1", "amqps://u:p%2Fq@h:5671/v?heartbeat=30",
                 "amqp://guest:a@b@127.0.0.1/%2F"):
        assert Settings.from_env({"BROKER_URL": good}).broker_url == good


@pytest.mark.parametrize("name", ["DATABASE_URL", "PROVISION_DATABASE_URL"])
@pytest.mark.parametrize(
    "url",
    [
        'postgresql://cp:q8Zm"Lw3%zzaQ@127.0.0.1/db',  # a '"' and a '%' that encodes nothing
        'postgresql://cp:q8Zm"Lw3@[::1/db',  # a '"' and an IPv6 address left open
    ],
)
def test_a_url_libpq_cannot_read_with_a_quote_in_its_password_is_refused_quoting_none_of_it(
    name: str, url: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"^{name} is not a valid PostgreSQL URL") as refused:
        Settings.from_env({name: url})
    assert not any(part in str(refused.value) for part in ("q8Zm", "Lw3", "zzaQ")), str(refused.value)


def test_a_unique_violation_on_a_secret_column_is_stored_and_logged_without_its_value(db_url: str) -> None:
    from tasks.middleware.jobs_mirror import describe_error
    from tasks.redaction import redact

    # Given an actor's statement refused on a column that holds a token (PostgreSQL's DETAIL
    # quotes the key: "Key (api_token)=(...) already exists.")
    secret = "tok_UniqueSecret42"
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.IntegrityError) as raised:
            cur.execute("CREATE TEMP TABLE creds (tenant text, api_token text, UNIQUE (tenant, api_token))")
            cur.execute("INSERT INTO creds VALUES ('t1', %s), ('t1', %s)", [secret, secret])
    finally:
        conn.close()
    assert secret in str(raised.value)
    # When its failure is described for last_error and errors, and its traceback logged
    stored = describe_error(raised.value, message=None)
    logged = redact(str(raised.value))
    # Then the value is in neither, and what the key is stays said
    assert secret not in stored and secret not in logged, (stored, logged)
    assert "Key (tenant, api_token)=([REDACTED]) already exists" in stored
    # And the other forms PostgreSQL quotes a key in are redacted too; a column that names no secret is kept
    assert redact('Key (password_hash)=(x1) is not present in table "users".') == \
        'Key (password_hash)=([REDACTED]) is not present in table "users".'
    assert redact("Key (id)=(42) already exists.") == "Key (id)=(42) already exists."
