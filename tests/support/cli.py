"""`optgate` command-line processes against an in-process test gateway's store, keys and
audit folder (the `Running` of tests/conftest.py)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import Running
from tests.support import processes


def cli_config(r: Running) -> Path:
    """A config file for `optgate` processes that reach this gateway's store and keys."""
    doc: dict[str, Any] = {
        "gateway": {"instance": r.cfg.gateway.instance, "data_dir": str(r.cfg.gateway.data_dir)},
        "keys": {"file": str(r.cfg.keys.file)},
        "audit": {"dir": str(r.cfg.audit.dir)},
    }
    if r.cfg.redis.url:
        doc["redis"] = {"url": r.cfg.redis.url}
    return processes.write_config(r.tmp_path / "cli.toml", doc)


async def optgate(r: Running, *args: str) -> subprocess.CompletedProcess[str]:
    """`optgate ARGS --config <r's>` in a subprocess, off the event loop."""
    return await asyncio.to_thread(processes.optgate, *args, config=cli_config(r))
