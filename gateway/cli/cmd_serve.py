"""`optgate serve [--workers N]`: one gateway process, or a supervisor of N workers
sharing the ports."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from gateway import logs
from gateway.cli.common import config, fail, with_config
from gateway.errors import OptgateError


def cmd_serve(args: argparse.Namespace) -> int:
    # Imported here, not above: every other command starts without loading the servers.
    from gateway import process, supervisor

    # Until the event loop installs its handlers, a reload request must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cfg = config(args)
    logs.configure(cfg.log.format)  # [log] format: console or json, access lines included
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    if args.worker_index is not None:
        asyncio.run(process.serve(cfg, worker=args.worker_index))
        return 0
    workers = supervisor.default_workers() if args.workers is None else args.workers
    if workers < 1:
        fail("--workers must be at least 1")
    process.preflight(cfg)  # ConfigError: one line, exit 2, nothing started
    try:
        if workers == 1:
            asyncio.run(process.serve(cfg))
            return 0
        return asyncio.run(supervisor.Supervisor(cfg, workers, args.config).run())
    except (OptgateError, OSError) as exc:
        # What was started has been stopped (`Gateway.start`, the supervisor's `run`).
        line = process.startup_problem(exc, cfg)
        if line is None:
            raise
        fail(line)


def add_parser(sub: Any) -> None:
    s = with_config(sub.add_parser("serve", help="run the gateway"))
    s.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the ports (default: CPU count)",
    )
    s.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)
