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


def test_an_interrupted_run_or_one_whose_floor_or_ours_failed_a_phase_is_not_a_full_run(
    full_run: dict[str, Any],
) -> None:
    # Given the file an interrupted run leaves (written after each round: one of three rounds)
    interrupted = copy.deepcopy(full_run)
    interrupted["rounds"] = interrupted["rounds"][:1]
    # And a run whose ours failed its drain in one round
    failed = copy.deepcopy(full_run)
    failed["rounds"][1]["errors"] = {"ours": {"drain_2x8": "stalled: 19000/20000 jobs ran"}}
    # And one where only a peer failed a phase
    peer_failed = copy.deepcopy(full_run)
    peer_failed["rounds"][1]["errors"] = {"celery": {"latency": "stalled"}}
    # Then neither of the first two counts, and the third does
    assert not runs.is_full_run(interrupted)
    assert not runs.is_full_run(failed)
    assert runs.is_full_run(peer_failed)


def test_a_peer_that_ran_but_was_never_measured_leaves_ahead_of_every_peer_unjudged(full_run: dict[str, Any]) -> None:
    # Given the full run's rounds with PgQueuer's drains and latencies gone (its phases failed every round)
    from bench.harness import SYSTEMS, Run

    run = Run.__new__(Run)  # only its rounds and systems: no database, no run
    run.systems = [SYSTEMS[name] for name in full_run["systems"]]
    run.skipped = {}
    run.rounds = copy.deepcopy(full_run["rounds"])
    for rnd in run.rounds:
        for metric in ("drain_2x8_per_s", "latency_p99_ms"):
            rnd["results"]["pgqueuer"].pop(metric, None)
    # When the targets are judged
    verdicts = {v["metric"]: v for v in run.targets(run.summary())}
    # Then pickup, met on its ratio (0.66x) in that run, is not claimed as met without the peer, and says why
    assert "not compared with pgqueuer" in verdicts["latency_p99_ms"]["detail"]
    assert verdicts["latency_p99_ms"]["met"] is None
    # And drain, missed on its ratio (2.40x), stays missed
    assert "not compared with pgqueuer" in verdicts["drain_2x8_per_s"]["detail"]
    assert verdicts["drain_2x8_per_s"]["met"] is False
    # And the table shows the unjudged one as such
    assert "0.66× ?" in runs.cell(verdicts["latency_p99_ms"])  # noqa: RUF001


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


def test_growth_compares_steady_rates_not_the_ramp_up_of_a_short_drain() -> None:
    from bench.harness import drain_rate, steady_rate

    # Given a 2,000-job drain whose first 200 jobs start over 0.1 s (a second process starting late,
    # the first claims) and the rest at 20,000 jobs/s
    ramp = [(0.0, i * 0.0005, 1) for i in range(200)]
    steady = [(0.0, 0.1 + i / 20000, 2) for i in range(1800)]
    rows = ramp + steady
    # Then the steady rate is the pace once under way, and the whole drain's is pulled down by the ramp
    assert 19_000 < steady_rate(rows) < 21_000
    assert drain_rate(rows) < 12_000
