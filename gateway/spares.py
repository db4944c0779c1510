"""The spare worker: a process that has imported everything a worker needs and waits.

A worker's start is mostly its imports (about 1 s of its 1.3 s, more on a loaded machine).
The supervisor therefore keeps one spare (`python -m gateway.spare_main`, blocked on a pipe);
a worker that dies is replaced by handing the spare its arguments, and a new spare is made
in the background. The spare has inherited what a worker inherits (the listening sockets,
the shared counts, its own ready pipe, ``PROMETHEUS_MULTIPROC_DIR``), and it reads the
config only once it is told to serve, so a config edited since is what a replacement runs
with. `Spares` is the supervisor's side; `gateway.spare_main` is the spare's.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway import metrics

# How a spare learns its worker's arguments: the read end of a pipe; one JSON line (argv).
SPARE_ENV = "OPTGATE_STANDBY_FD"
SPARE_RETRY_S = 1.0  # a spare that died is made again after this (never a spin)
SPARE_EXIT_S = 2.0  # a spare let go exits at once (EOF on its pipe); else it is killed

# (command, extra environment, extra fds) -> (process, read end of its ready pipe)
Popen = Callable[[list[str], dict[str, str], tuple[int, ...]], tuple[subprocess.Popen[bytes], int]]


@dataclass
class Spare:
    proc: subprocess.Popen[bytes]
    go_fd: int  # the write end of its pipe: its worker's argv, then closed
    ready_fd: int  # the read end of the ready pipe it inherited


@dataclass
class Spares:
    """At most one spare waiting, and the spares let go until they are reaped."""

    popen: Popen
    metrics_dir: Path | None = None
    waiting: Spare | None = None
    due: float = 0.0  # when to make the next spare
    leaving: list[tuple[float, subprocess.Popen[bytes]]] = field(default_factory=list)

    def take(self, argv: list[str]) -> tuple[subprocess.Popen[bytes], int] | None:
        """Hand the waiting spare a worker's `argv`: (its process, its ready pipe), or None
        when there is no live spare (the caller starts a worker the slow way)."""
        spare, self.waiting = self.waiting, None
        self.due = time.monotonic()  # the next spare, in the background
        if spare is None or spare.proc.poll() is not None:
            self.drop(spare)
            return None
        try:
            os.write(spare.go_fd, json.dumps(argv).encode() + b"\n")
        except OSError:
            self.drop(spare)  # it died meanwhile
            return None
        os.close(spare.go_fd)
        return spare.proc, spare.ready_fd

    def keep(self, *, may_start: bool) -> None:
        """Make a spare when none is waiting and `may_start` (no worker is starting)."""
        spare = self.waiting
        if spare is not None and spare.proc.poll() is not None:
            self.drop(spare)
            self.waiting = None
            self.due = time.monotonic() + SPARE_RETRY_S
        if self.waiting is not None or not may_start or time.monotonic() < self.due:
            return
        go_r, go_w = os.pipe()
        try:
            cmd = [sys.executable, "-m", "gateway.spare_main"]
            proc, ready_r = self.popen(cmd, {SPARE_ENV: str(go_r)}, (go_r,))
        finally:
            os.close(go_r)
        self.waiting = Spare(proc=proc, go_fd=go_w, ready_fd=ready_r)

    def drop(self, spare: Spare | None) -> None:
        """Let a spare go (closing its pipe ends it); `reap` reaps it."""
        if spare is None:
            return
        for fd in (spare.go_fd, spare.ready_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.leaving.append((time.monotonic(), spare.proc))

    def drop_waiting(self) -> None:
        """At stop: end the waiting spare at once. It serves nothing yet, but it holds the
        inherited listening sockets, and a spare still importing would notice its closed
        pipe only after its imports: meanwhile the kernel would queue new connections for
        nobody instead of refusing them."""
        spare = self.waiting
        self.drop(spare)
        self.waiting = None
        if spare is not None:
            with contextlib.suppress(ProcessLookupError):
                spare.proc.kill()

    def reap(self, *, wait: bool = False) -> None:
        """Reap spares let go (killed if one has not left in `SPARE_EXIT_S`)."""
        keep = []
        for since, proc in self.leaving:
            if proc.poll() is None and (wait or time.monotonic() - since > SPARE_EXIT_S):
                proc.kill()
                proc.wait()
            if proc.poll() is None:
                keep.append((since, proc))
            elif self.metrics_dir is not None:
                metrics.process_dead(proc.pid, self.metrics_dir)
        self.leaving = keep
