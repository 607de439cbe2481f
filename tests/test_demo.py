"""``controlplane demo`` when the provisioning it shows cannot succeed: it says why, at once."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.support import ROOT, query


def test_the_demo_reports_a_failed_provisioning_at_once_instead_of_timing_out(
    server_url: str, tmp_path: Path
) -> None:
    # Given a database whose role may create databases but not roles (the provisioning's first
    # step creates two), owned by that role
    role, name = f"cp_demo_{uuid.uuid4().hex[:8]}", f"cp_demo_{uuid.uuid4().hex[:8]}"
    query(server_url, f"CREATE ROLE {role} LOGIN CREATEDB")
    query(server_url, f"CREATE DATABASE {name} OWNER {role}")
    url = make_url(server_url).set(username=role, password=None, database=name).render_as_string(hide_password=False)
    env = {k: v for k, v in os.environ.items() if k not in ("BROKER_URL", "PROVISION_DATABASE_URL")}
    env |= {"DATABASE_URL": url, "CONTROLPLANE_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    try:
        # When the demo runs there
        result = subprocess.run([sys.executable, "-m", "tasks.cli", "demo"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=170)
    finally:
        query(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        query(server_url, f"DROP ROLE IF EXISTS {role}")
    # Then it ends with one line saying provisioning failed and why (not a 180 s timeout),
    # and stops its worker
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert lines[-1].startswith("controlplane: error: provisioning the demo project failed:"), result.stderr
    assert "permission denied to create role" in lines[-1]
    assert "Traceback" not in result.stderr
    # And the jobs it showed before are named by their whole ids, one per job, which the
    # `controlplane jobs` commands take
    shown = {line.split()[1] for line in result.stdout.splitlines() if "attempts=" in line}
    assert len(shown) >= 4, result.stdout
    assert all(str(uuid.UUID(job_id)) == job_id for job_id in shown), shown


def test_the_demo_runs_on_a_new_embedded_server_when_database_url_is_unset(tmp_path: Path) -> None:
    from tasks import db

    # Given a folder with nothing in it and DATABASE_URL unset, as on a new user's machine
    home = tmp_path / ".controlplane"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "PROVISION_DATABASE_URL")}
    env |= {"CONTROLPLANE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    try:
        # When the README's demo runs there
        result = subprocess.run([sys.executable, "-m", "tasks.cli", "demo"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        # Then it makes the server, runs every job and provisions the project
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"created a new, empty embedded PostgreSQL in {home / 'pgdata'}" in result.stderr
        assert "connected  as " in result.stdout and "worker stopped; nothing left running." in result.stdout
    finally:
        db.stop_embedded(home)
