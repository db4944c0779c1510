"""A spare worker's own side (`gateway.spares`): import what a worker needs, wait on the
pipe for its arguments, then serve as that worker. Run as ``python -m gateway.spare_main``."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys

from gateway.spares import SPARE_ENV


def main() -> int:
    """A spare worker: import what a worker needs, wait to be told its arguments, serve."""
    go = os.fdopen(int(os.environ.pop(SPARE_ENV)), "rb")
    from gateway import cli, service  # the bulk of a worker's start

    for name in (*service.HTTP_MODULES, "gateway.audit.retention", "gateway.sync.worker"):
        importlib.import_module(name)
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401 - installed by `serve`; imported here, ahead of time
    line = go.readline()
    go.close()
    if not line:
        return 0  # not needed after all (the service stops)
    return cli.main(json.loads(line))


if __name__ == "__main__":
    sys.exit(main())
