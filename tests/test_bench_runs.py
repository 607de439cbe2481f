"""``python -m bench runs``: which results files count as full runs, and the table of verdicts.

Read from a full run this repository keeps (``bench/results/20261203T180457Z.json``),
so no benchmark runs here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench import runs
from bench.harness import RESULTS

FULL_RUN = RESULTS / "20261203T180457Z.json"


@pytest.fixture
def full_run() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(FULL_RUN.read_text())
    return doc


def _changed(doc: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(doc)
    if key == "systems":
        changed["systems"] = value
    else:
        changed["config"][key] = value
    return changed


def test_a_run_of_every_system_and_phase_at_the_issues_sizes_is_a_full_run(full_run: dict[str, Any]) -> None:
    assert runs.is_full_run(full_run)
    # an option a file lacks (older harness) had its default
    older = copy.deepcopy(full_run)
    del older["config"]["provision_workers"], older["config"]["latency_rate"]
    assert runs.is_full_run(older)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("quick", True),
        ("rounds", 2),
        ("phases", ["enqueue", "drain_1x8", "drain_2x8", "latency", "growth", "memory"]),
        ("systems", ["floor", "floor_batch", "ours", "pgqueuer", "procrastinate", "dramatiq_pg"]),
        ("drain_n", 2000),
        ("enqueue_n", 200),
        ("batch_size", 100),
        ("latency_n", 10),
        ("latency_rate", 100.0),
        ("growth_sizes", [2000, 50000]),
        ("memory_sizes", [1000, 10000]),
        ("provision_n", 3),
        ("provision_workers", [1, 1]),
        ("provision_serial", True),
    ],
)
def test_a_run_that_departs_from_the_issue_in_one_thing_is_not_a_full_run(
    full_run: dict[str, Any], key: str, value: Any
) -> None:
    assert not runs.is_full_run(_changed(full_run, key, value))


def test_the_table_shows_each_targets_value_and_verdict_and_counts_them(full_run: dict[str, Any]) -> None:
    # Given the full run twice (as two files would be)
    lines = runs.table([(FULL_RUN, full_run), (FULL_RUN, full_run)]).splitlines()
    # Then one row per file, and a last row counting the runs that met each target
    assert len(lines) == 2 + 2 + 1
    verdicts = full_run["targets"]
    row = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert row[:2] == [f"`{FULL_RUN.name}`", "d251585"]
    expected = [
        f"{v['value']:.2f}{'×' if v['compared'] == 'ratio' else ''} {'✓' if v['met'] else '✗'}"  # noqa: RUF001
        for v in verdicts
    ]
    assert row[2:] == expected
    assert row[2] == "2.40× ✗"  # noqa: RUF001 (drain 2x8, as the docs report it)
    met = [cell.strip() for cell in lines[-1].strip("|").split("|")]
    assert met[0] == "met"
    assert met[2:] == [f"{2 if v['met'] else 0} of 2" for v in verdicts]


def test_bad_arguments_and_files_are_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        runs.main(["--since", "2026-12-02"])
    assert "--since wants a day as YYYYMMDD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runs.main(["--since", "20261202", str(FULL_RUN)])
    assert "named files are shown as given" in capsys.readouterr().err
    not_json = tmp_path / "notes.json"
    not_json.write_text("not json")
    with pytest.raises(SystemExit, match=r"notes\.json: not a results file"):
        runs.main([str(not_json)])
    other = tmp_path / "history-cost.json"
    other.write_text(json.dumps({"config": {}, "rounds": {}}))
    with pytest.raises(SystemExit, match=r"history-cost\.json: not a results file .*no targets"):
        runs.main([str(other)])
    with pytest.raises(SystemExit, match="no such results file"):
        runs.main([str(tmp_path / "missing.json")])
