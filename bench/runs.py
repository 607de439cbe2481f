"""``python -m bench runs [FILE ...]``: ours against the issue's targets, one row per results file.

Without files, every full run in ``bench/results/``: every system and phase at
the issue's sizes (the default ``python -m bench run`` with ``--growth-sizes
2000,200000 --memory-sizes 1000,100000``), at least 3 rounds. Each cell is the
value the target is judged on (a ratio to floor of the same round, or growth's
and memory's own ratio) and whether that run met it, as the run itself judged
it (``targets`` in its results file, the peers' comparisons included). The last
row counts the runs that met each target: one run is one sample of a noisy host.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from bench.harness import PHASES, RESULTS, TARGETS
from bench.systems import DEFAULT_SYSTEMS

#: Column headings, in TARGETS' order.
HEADINGS = {
    "drain_2x8_per_s": "drain 2×8",  # noqa: RUF001 (the docs' tables' sign)
    "enqueue_single_per_s": "enqueue 1/call",
    "enqueue_batch_per_s": "batch",
    "latency_p99_ms": "pickup p99",
    "growth_ratio": "growth",
    "memory_ratio": "memory",
    "provision_per_project_s": "provision",
}

#: A results file of ``python -m bench run`` (not the measurement aids' files).
_RUN_FILE = re.compile(r"\d{8}T\d{6}Z\.json")


#: The issue's sizes and the harness's defaults, as a results file's ``config`` holds them.
#: A key a file lacks was an option not yet there: the run had its default.
ISSUE_CONFIG: dict[str, Any] = {
    "quick": False,
    "enqueue_n": 2000,
    "drain_n": 20000,
    "batch_size": 500,
    "latency_n": 200,
    "latency_rate": 50.0,
    "growth_sizes": [2000, 200000],
    "memory_sizes": [1000, 100000],
    "provision_n": 20,
    "provision_workers": [2, 8],
    "provision_serial": False,
    "provision_hand_threads": 1,
}


def is_full_run(doc: dict[str, Any]) -> bool:
    """Whether a results file is a run of every system and phase at the issue's sizes, 3 rounds or more.

    The rounds counted are the ones written, not the ones asked for (the harness writes the
    file after every round, so an interrupted run's file holds fewer), and a round in which
    floor or ours failed a phase does not count.
    """
    config = doc.get("config") or {}
    rounds = doc.get("rounds") or []
    complete = [r for r in rounds if not any((r.get("errors") or {}).get(name) for name in ("floor", "ours"))]
    return (
        (config.get("rounds") or 0) >= 3
        and len(complete) >= 3
        and len(complete) == len(rounds)
        and set(config.get("phases") or ()) >= set(PHASES)
        and set(doc.get("systems") or ()) >= set(DEFAULT_SYSTEMS)
        and all(config.get(key, value) == value for key, value in ISSUE_CONFIG.items())
    )


def cell(verdict: dict[str, Any] | None) -> str:
    if verdict is None or verdict.get("value") is None:
        return "-"
    suffix = "×" if verdict["compared"] == "ratio" else ""  # noqa: RUF001
    mark = "?" if verdict.get("met") is None else "✓" if verdict["met"] else "✗"  # ?: measured, not judged
    return f"{verdict['value']:.2f}{suffix} {mark}"


def load(path: Path) -> dict[str, Any]:
    """A results file of ``python -m bench run``; SystemExit naming the file if it is not one."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"no such results file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{path}: not a results file of `python -m bench run` ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("targets"), list):
        raise SystemExit(f"{path}: not a results file of `python -m bench run` (it has no targets)")
    return doc


def _full_run_or_none(path: Path) -> dict[str, Any] | None:
    try:
        doc = load(path)
    except SystemExit:  # an interrupted run's file, or one from before the harness judged targets
        return None
    return doc if is_full_run(doc) else None


def table(runs: list[tuple[Path, dict[str, Any]]]) -> str:
    """The Markdown table of (file, its contents): one row per file, then the count of runs that met each target."""
    metrics = [metric for metric, *_ in TARGETS]
    lines = [
        "| run | ours | " + " | ".join(HEADINGS[m] for m in metrics) + " |",
        "|---|---|" + "---:|" * len(metrics),
    ]
    met = dict.fromkeys(metrics, 0)
    judged = dict.fromkeys(metrics, 0)
    for path, doc in runs:
        verdicts = {v["metric"]: v for v in doc["targets"]}
        for metric in metrics:
            verdict = verdicts.get(metric)
            if verdict is not None and verdict.get("met") is not None:
                judged[metric] += 1
                met[metric] += bool(verdict["met"])
        # The snapshot's commit when it had a COMMIT file, else the harness's (the snapshot was of HEAD)
        commit = str((doc.get("ours_source") or {}).get("commit") or (doc.get("git") or {}).get("commit") or "?")[:7]
        lines.append(f"| `{path.name}` | {commit} | " + " | ".join(cell(verdicts.get(m)) for m in metrics) + " |")
    lines.append("| met | | " + " | ".join(f"{met[m]} of {judged[m]}" for m in metrics) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench runs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", type=Path, help="results files (default: the full runs in bench/results)")
    parser.add_argument("--since", metavar="YYYYMMDD", help="only the full runs started on or after that day (UTC)")
    ns = parser.parse_args(argv)
    if ns.since is not None and not re.fullmatch(r"\d{8}", ns.since):
        parser.error(f"--since wants a day as YYYYMMDD, e.g. 20261202, not {ns.since!r}")
    if ns.since is not None and ns.files:
        parser.error("--since selects among bench/results' full runs; named files are shown as given")
    runs = [(path, load(path)) for path in ns.files]
    if not runs:
        since = ns.since or ""
        candidates = sorted(p for p in RESULTS.glob("*.json") if _RUN_FILE.fullmatch(p.name) and p.name >= since)
        runs = [(p, doc) for p in candidates if (doc := _full_run_or_none(p)) is not None]
        if not runs:
            where = f"{RESULTS}" + (f" since {ns.since}" if ns.since else "")
            print(f"no full runs in {where}; `python -m bench run --growth-sizes 2000,200000 "
                  "--memory-sizes 1000,100000` makes one", file=sys.stderr)  # fmt: skip
            return 1
    print(table(runs))
    return 0
