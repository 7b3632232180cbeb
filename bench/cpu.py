"""CPU time of processes, from /proc (Linux), for the benchmark's per-message costs."""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _fields(pid: int) -> tuple[str, list[str]]:
    """The command name and the fields after it in /proc/<pid>/stat (the name may hold any
    character, parentheses included, so split at the last one)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    head, _, rest = stat.rpartition(")")
    return head.partition("(")[2], rest.split()


def process_cpu(pid: int, *, reaped_children: bool = False) -> float:
    """Seconds of CPU (user + system) `pid` has used; with `reaped_children`, also that of its
    children that exited and were waited for (how a server keeps its finished backends' CPU)."""
    _, fields = _fields(pid)
    # After the name: state, ppid, ... utime is the 14th field of the line, the 12th here.
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (uvicorn's worker processes), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_fields(int(entry.name))[1][1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, []))
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and the processes below it (those alive now)."""
    total = 0.0
    for member in descendants(pid):
        try:
            total += process_cpu(member)
        except OSError:
            continue  # exited meanwhile
    return total


def postgres_cpu() -> float:
    """CPU seconds of the local PostgreSQL server: every `postgres` process, plus what the
    postmaster's exited backends used (a connection opened and closed within a phase still
    counts). The whole server: other databases' load counts too."""
    processes: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name, fields = _fields(int(entry.name))
        except OSError:
            continue
        if name == "postgres":
            processes[int(entry.name)] = int(fields[1])
    total = 0.0
    for pid, parent in processes.items():
        postmaster = parent not in processes
        try:
            total += process_cpu(pid, reaped_children=postmaster)
        except OSError:
            continue
    return total
