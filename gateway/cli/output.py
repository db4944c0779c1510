"""What the CLI prints for people and for scripts.

Records go to stdout as JSON lines unless stdout is a terminal (or ``--json`` is given):
then as a table for people (`rich`). What scripts read is the same bytes whenever stdout
is not a terminal. Progress bars are for people too: drawn on stderr only when stderr is
a terminal, never mixed into what a pipe or a log file gets."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson


def for_people(args: argparse.Namespace) -> bool:
    """A table rather than JSON lines: stdout is a terminal and ``--json`` was not given."""
    return sys.stdout.isatty() and not getattr(args, "json", False)


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC, to the second ("2025-01-31T08:00:00Z")."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, (dict, bool)):
        return orjson.dumps(value).decode()
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """`rows` as one table on stdout (columns: the first row's keys, by default)."""
    from rich.console import Console
    from rich.table import Table

    names = list(columns or (rows[0].keys() if rows else ()))
    t = Table(*names, show_lines=False)
    for row in rows:
        t.add_row(*(_cell(row.get(n)) for n in names))
    Console(soft_wrap=False).print(t if names else "(none)")


def records(
    args: argparse.Namespace, rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None
) -> None:
    """JSON lines (one per row, flushed as they come), or a table for people."""
    if for_people(args):
        table(list(rows), columns)
        return
    out = sys.stdout.buffer
    for row in rows:
        out.write(orjson.dumps(row) + b"\n")
        out.flush()


@contextlib.contextmanager
def progress(label: str, total: float | None, unit: str) -> Iterator[Callable[[float], None]]:
    """A progress bar on stderr when it is a terminal: yields ``done(n)`` that moves it to
    `n` of `total` (None: unknown, only the count shows); a no-op otherwise."""
    if not sys.stderr.isatty():
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn() if unit != "bytes" else TextColumn("{task.percentage:>3.0f}%"),
        TextColumn(unit if unit != "bytes" else ""),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.update(task, completed=n)
