"""`optgate audit verify [--anchor FILE] [PATH]` and `optgate audit anchor` (``audit.anchors``).

verify: the chain and checkpoints of every stream (``audit.verify``), then each stream
against its anchor: from the store by default, or from a copy made earlier by
``optgate audit anchor`` (``--anchor FILE``: the check that still holds when the store was
tampered with too). Exit 0 intact; 1 with one line naming the first break.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gateway.audit import anchors as anchors_mod
from gateway.audit import verify as audit_verify
from gateway.audit.anchors import Anchors
from gateway.audit.files import iso_ts
from gateway.config import Config
from gateway.core.keys import Keyring
from gateway.errors import StoreUnavailable

EXIT_FAILURE = 1


async def store_anchors(cfg: Config, ring: Keyring) -> Anchors:
    """Every anchor of this instance in the store. Raises StoreUnavailable."""
    from gateway.service import open_store

    store, embedded = await open_store(cfg, ring)
    try:
        return await anchors_mod.read_store(
            store.client, instance=cfg.gateway.instance, keys=ring.audit
        )
    finally:
        await store.close()
        if embedded is not None:
            await embedded.release()


def _copy(anchor_file: Path, ring: Keyring) -> Anchors | str:
    try:
        data = anchor_file.read_bytes()
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return anchors_mod.open_copy(data, keys=ring.audit, source=str(anchor_file))


async def verify(cfg: Config, ring: Keyring, path: str | None, anchor_file: str | None) -> int:
    target = Path(path) if path else cfg.audit.dir
    anchors: Anchors | None = None
    if anchor_file is not None:
        copy = _copy(Path(anchor_file), ring)
        if isinstance(copy, str):
            print(f"{anchor_file}: anchor does not verify: {copy}")
            return EXIT_FAILURE
        anchors = copy
    unreachable: StoreUnavailable | None = None
    if anchors is None and target.is_dir():
        try:
            anchors = await store_anchors(cfg, ring)
        except StoreUnavailable as exc:
            unreachable = exc  # still check the chain: a break there is reported first
    result = audit_verify.verify_path(target, ring, anchors)
    if not result.ok:
        print(result.describe())
        return EXIT_FAILURE
    if unreachable is not None:
        raise StoreUnavailable(
            f"{unreachable}; the chain is intact, but cut tails and missing streams were not "
            "checked (give --anchor FILE)"
        ) from unreachable
    against = ""
    if anchors is not None:
        against = f"; {len(anchors.heads)} streams reach their anchors in {anchors.source}"
    print(f"ok: {result.entries} entries intact in {target}{against}", file=sys.stderr)
    return 0


async def anchor(cfg: Config, ring: Keyring) -> int:
    """Print every head of this instance, sealed as one JSON line; exit 1 if any anchor in
    the store does not verify (it is named on stderr and left out)."""
    found = await store_anchors(cfg, ring)
    for stream, why in sorted(found.bad.items()):
        print(f"{stream}: anchor in {found.source} does not verify: {why}", file=sys.stderr)
    sys.stdout.buffer.write(anchors_mod.seal_copy(found, keys=ring.audit, ts=iso_ts(time.time())))
    sys.stdout.buffer.flush()
    return EXIT_FAILURE if found.bad else 0
