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


def is_full_run(doc: dict[str, Any]) -> bool:
    """Whether a results file is a run of every system and phase at the issue's sizes."""
    config = doc.get("config") or {}
    return (
        not config.get("quick")
        and (config.get("rounds") or 0) >= 3
        and set(config.get("phases") or ()) >= set(PHASES)
        and set(doc.get("systems") or ()) >= set(DEFAULT_SYSTEMS)
        and config.get("drain_n") == 20000
        and list(config.get("growth_sizes") or ()) == [2000, 200000]
        and list(config.get("memory_sizes") or ()) == [1000, 100000]
        and config.get("provision_n") == 20
    )


def cell(verdict: dict[str, Any] | None) -> str:
    if verdict is None or verdict.get("value") is None:
        return "-"
    suffix = "×" if verdict["compared"] == "ratio" else ""  # noqa: RUF001
    return f"{verdict['value']:.2f}{suffix} {'✓' if verdict['met'] else '✗'}"


def table(files: list[Path]) -> str:
    """The Markdown table: one row per file, then the count of runs that met each target."""
    metrics = [metric for metric, *_ in TARGETS]
    lines = [
        "| run | ours | " + " | ".join(HEADINGS[m] for m in metrics) + " |",
        "|---|---|" + "---:|" * len(metrics),
    ]
    met = dict.fromkeys(metrics, 0)
    judged = dict.fromkeys(metrics, 0)
    for path in files:
        doc = json.loads(path.read_text())
        verdicts = {v["metric"]: v for v in doc.get("targets", [])}
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
    parser.add_argument("--since", default="", metavar="YYYYMMDD", help="only the full runs started on or after")
    ns = parser.parse_args(argv)
    files: list[Path] = ns.files
    if not files:
        candidates = sorted(p for p in RESULTS.glob("*.json") if _RUN_FILE.fullmatch(p.name) and p.name >= ns.since)
        files = [p for p in candidates if is_full_run(json.loads(p.read_text()))]
    if not files:
        print(f"no full runs in {RESULTS}; `python -m bench run --growth-sizes 2000,200000 "
              "--memory-sizes 1000,100000` makes one")  # fmt: skip
        return 1
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        print(f"no such results file: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(table(files))
    return 0
