"""Reading processes from /proc: the process tree, resident and private memory and CPU time (Linux)."""

from __future__ import annotations

import os
from typing import Any

#: Fields of /proc/<pid>/stat after the command name, counted from 0 (``state`` is 0).
_PPID, _UTIME, _STIME, _CUTIME, _CSTIME = 1, 11, 12, 13, 14


def _stat(pid: int | str) -> tuple[str, list[str]] | None:
    """A process's command name and the fields after it, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces or parentheses: it ends at the last ')'.
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()


def _processes() -> dict[int, tuple[str, list[str]]]:
    """Every process visible now: pid -> (command name, stat fields)."""
    found: dict[int, tuple[str, list[str]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(entry)) is not None:
            found[int(entry)] = stat
    return found


def children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process visible now."""
    tree: dict[int, list[int]] = {}
    for pid, (_, fields) in _processes().items():
        tree.setdefault(int(fields[_PPID]), []).append(pid)
    return tree


def rss_kb(pid: int) -> int:
    """Resident memory of one process, in kB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def uss_kb(pid: int) -> int | None:
    """Private memory of one process (its unique set size: Private_Clean + Private_Dirty), in kB,
    from /proc/<pid>/smaps_rollup (Linux 4.14+), else summed from /proc/<pid>/smaps; None when
    neither can be read (gone, another user's, or a kernel without them).

    Unlike the resident size, it leaves out the pages shared with other processes (the
    interpreter's and libraries' files, what a forked worker still shares with its parent), so a
    process's own growth shows in it undiluted.
    """
    for name in ("smaps_rollup", "smaps"):
        try:
            with open(f"/proc/{pid}/{name}") as f:
                total, seen = 0, False
                for line in f:
                    if line.startswith(("Private_Clean:", "Private_Dirty:")):
                        total += int(line.split()[1])
                        seen = True
        except (OSError, ValueError):
            continue
        if seen:
            return total
    return None


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU time a process has used so far; 0 once it is gone.

    ``reaped_children``: plus the time of its children that have exited and been waited for.
    """
    stat = _stat(pid)
    if stat is None:
        return 0.0
    fields = stat[1]
    ticks = int(fields[_UTIME]) + int(fields[_STIME])
    if reaped_children:
        ticks += int(fields[_CUTIME]) + int(fields[_CSTIME])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree(*pids: int) -> list[int]:
    """``pids`` and all their descendants."""
    kids = children()
    found: list[int] = []
    todo = list(pids)
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(kids.get(current, []))
    return found


def postmaster_of(backend_pid: int) -> int | None:
    """The postmaster of the PostgreSQL backend ``backend_pid`` (``SELECT pg_backend_pid()``),
    or None when no such backend runs on this machine (a server elsewhere)."""
    backend = _stat(backend_pid)
    if backend is None or backend[0] != "postgres":
        return None
    parent = int(backend[1][_PPID])
    postmaster = _stat(parent)
    return parent if postmaster is not None and postmaster[0] == "postgres" else None


def server_postmaster(conn: Any) -> int | None:
    """The postmaster of the server a DB-API connection ``conn`` is connected to, when it
    runs on this machine (read while the connection's backend lives)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return postmaster_of(cur.fetchone()[0])


def postmaster_at(url: str) -> int | None:
    """:func:`server_postmaster` of the server at ``url``, on a connection of its own."""
    from tasks.db import connect

    conn = connect(url)
    try:
        return server_postmaster(conn)
    finally:
        conn.close()


def postgres_cpu_seconds(postmaster: int | None = None) -> float:
    """CPU used so far by one PostgreSQL server (``postmaster``: its postmaster and its
    children), or by every PostgreSQL process on the machine, backends that have exited included.

    A backend's time is added to its postmaster's children's time when it exits, so the
    short-lived connections (a tenant database's, for instance) count too. With
    ``postmaster``, the postmaster is read before and after its children and the reading
    taken again if a child was reaped in between, so that no backend is missed or counted
    twice. Without it, a server that stops between two readings (another test process's
    embedded one) takes all its time out of the second: a difference can come out negative.
    """
    if postmaster is not None:
        return _server_cpu_ticks(postmaster) / os.sysconf("SC_CLK_TCK")
    postgres = {pid: fields for pid, (name, fields) in _processes().items() if name == "postgres"}
    ticks = 0
    for fields in postgres.values():
        ticks += int(fields[_UTIME]) + int(fields[_STIME])
        if int(fields[_PPID]) not in postgres:  # a postmaster: its exited backends' time
            ticks += int(fields[_CUTIME]) + int(fields[_CSTIME])
    return ticks / os.sysconf("SC_CLK_TCK")


def _server_cpu_ticks(postmaster: int) -> int:
    """Clock ticks of a postmaster, its live children and its reaped ones (0 once it is gone)."""
    ticks = 0
    for _ in range(10):  # (a retry per child reaped during a reading: a few at most)
        before = _stat(postmaster)
        if before is None:
            return 0
        kids = children().get(postmaster, [])
        live = sum(int(stat[1][_UTIME]) + int(stat[1][_STIME]) for pid in kids if (stat := _stat(pid)) is not None)
        after = _stat(postmaster)
        if after is None:
            return 0
        reaped = int(after[1][_CUTIME]) + int(after[1][_CSTIME])
        ticks = int(after[1][_UTIME]) + int(after[1][_STIME]) + reaped + live
        if reaped == int(before[1][_CUTIME]) + int(before[1][_CSTIME]):
            return ticks
    return ticks


def cpu_by_role(driver: int, harness: int, postmaster: int | None = None) -> dict[str, float]:
    """CPU seconds used so far, by role, for a benchmark driver ``driver`` started by ``harness``.

    ``machine_busy``, ``machine_iowait``, ``machine_idle``: the whole machine (all cores
    summed; busy is user, nice, system, irq, softirq and steal); ``postgres``: the server
    whose postmaster is ``postmaster``, else every PostgreSQL process
    (:func:`postgres_cpu_seconds`); ``driver``; ``harness`` (the stand-in
    services run in it); ``workers``: the harness's other descendants alive now, with the
    children they have reaped (a worker process that exits leaves its time with its parent).
    The machine is shared: what is busy and in none of the roles is other work. Without
    ``postmaster``, a backend that exits between the postmaster's reading and its own is
    missed by that reading: at most one short session's time.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    mine = set(tree(driver))
    return {
        "machine_busy": (user + nice + system + irq + softirq + steal) / tick,
        "machine_iowait": iowait / tick,
        "machine_idle": idle / tick,
        "postgres": postgres_cpu_seconds(postmaster),
        "driver": sum(cpu_seconds(pid) for pid in mine),
        "harness": cpu_seconds(harness),
        "workers": sum(
            cpu_seconds(pid, reaped_children=True) for pid in tree(harness) if pid != harness and pid not in mine
        ),
    }
