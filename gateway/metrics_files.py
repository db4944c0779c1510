"""The multiprocess metric files under ``optgate serve --workers N``: merging every worker's
files for a scrape, a fresh private directory per supervisor start, and folding a dead
worker's files into the archive.

``serve --workers N`` uses prometheus-client's multiprocess mode, so a scrape that reaches
any worker reports the whole service. The supervisor gives each worker
``PROMETHEUS_MULTIPROC_DIR`` (a private directory it wipes at start: files left by an
earlier run would be counted again); the library reads it when it is first imported and
then keeps every value in a per-process file there, and `gateway.metrics.exposition`
merges the files on each scrape. How each kind adds up across workers:

- counters and histograms are summed over every file, those of dead workers included. A
  killed worker's counts stay in the total, and its replacement (a new pid, a new file)
  counts on from zero, so a total never goes down and nothing is counted twice; only a
  supervisor restart resets them, as any process restart does. `process_dead` folds a
  dead worker's files into one ``*_archive.db`` per kind (sums, and the max for the max
  gauge), under a lock that scrapes share, so the directory does not grow by a file set
  per restart (a worker that crashes every minute for a month would leave 130,000 files
  for every scrape to read), and no scrape sees a value twice or not at all;
- `OPTOUT_EFFECT_WORST` is the ``max`` over workers, dead ones included: the worst time
  since the service started, which a worker's restart must not hide;
- `SYNC_BACKLOG` and `SYNC_DEAD_LETTERS` are ``livemostrecent``: every worker reads the
  same shared stream, so a sum would multiply them by N; the freshest reading of a live
  worker is the true value (a dead worker's reading is dropped when it is reaped).

No gauge uses the ``all`` mode, whose ``pid`` label would change with every restart. The
mode's limits apply here: no custom collectors and no ``Info`` (the multiprocess collector
cannot export them), and a metric appears only once some worker has written a value.
"""

from __future__ import annotations

import contextlib
import fcntl
import operator
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.mmap_dict import MmapedDict


def merged(directory: Path) -> bytes:
    """The metrics of every process that wrote into `directory`, merged, in the text format.

    A fresh registry per call, as the library asks: its collector reads the files anew
    (while no dead worker's files are being folded into the archive)."""
    registry = CollectorRegistry()
    # The library's collector is untyped; it only registers itself with `registry`.
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    with fold_lock(directory, fcntl.LOCK_SH):
        return generate_latest(registry)


def fresh_multiprocess_dir(directory: Path) -> Path:
    """Empty `directory` (files from an earlier run would be counted again) and make it
    private (0700: the files name every label, and other users have no business there)."""
    if directory.is_symlink():
        directory.unlink()  # rmtree refuses a link; never follow one out of the data dir
    elif directory.exists():
        shutil.rmtree(directory)
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.mkdir(mode=0o700)
    directory.chmod(0o700)  # mkdir's mode is filtered by the umask
    return directory


def process_dead(pid: int, directory: Path) -> None:
    """Tell the multiprocess files that worker `pid` is gone: its "live" gauges are dropped;
    its counters, histograms and ``max`` gauges stay in the totals, folded into the
    archive files (`_fold`)."""
    # Untyped in the library; it removes gauge_live*_<pid>.db files and nothing else.
    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    with fold_lock(directory, fcntl.LOCK_EX):
        for prefix, join in _FOLDS:
            _fold(directory / f"{prefix}_{pid}.db", directory / f"{prefix}_{ARCHIVE}.db", join)


# A dead worker's files that stay in the totals, and how their values join the archive's.
# The collector reads the text after the last "_" as the writer's pid: "archive" is one
# more writer to it, summed (counters, histograms) or maxed (the max gauge) with the rest.
_FOLDS: Final[tuple[tuple[str, Callable[[float, float], float]], ...]] = (
    ("counter", operator.add),
    ("histogram", operator.add),
    ("gauge_max", max),
)
ARCHIVE: Final = "archive"
FOLD_LOCK: Final = ".fold.lock"  # not *.db: the collector reads only those


@contextlib.contextmanager
def fold_lock(directory: Path, how: int) -> Iterator[None]:
    """Scrapes (shared) against the supervisor's folding (exclusive): a scrape between
    writing the archive and removing the dead file would count that worker twice."""
    fd = os.open(directory / FOLD_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fold(dead: Path, archive: Path, join: Callable[[float, float], float]) -> None:
    """Add `dead`'s values into `archive` (made if absent), then remove `dead`."""
    if not dead.exists():
        return

    def values(path: Path) -> dict[str, tuple[float, float]]:
        rows = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        return {key: (value, ts) for key, value, ts, _ in rows}

    kept = values(archive) if archive.exists() else {}
    out = MmapedDict(str(archive))  # type: ignore[no-untyped-call]
    try:
        for key, (value, ts) in values(dead).items():
            old_value, old_ts = kept.get(key, (None, 0.0))
            new = value if old_value is None else join(old_value, value)
            out.write_value(key, new, max(old_ts, ts))  # type: ignore[no-untyped-call]
    finally:
        out.close()  # type: ignore[no-untyped-call]
    dead.unlink()
