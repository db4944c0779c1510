"""The verify page's check: every audit folder the console reads, chain and checkpoints
(`gateway.audit.verify`) and each stream against its anchor in the store
(`gateway.audit.anchors`), run on a thread (it reads every file). The last result is kept
in the store (``og:rv:last``: times, counts, ``FILE:LINE``; never an entry's contents), so
the overview shows it on every instance.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from redis.exceptions import RedisError

from gateway.audit import anchors as anchors_mod
from gateway.audit import verify as audit_verify
from gateway.audit.anchors import Anchors, Head
from gateway.core.keys import Keyring
from gateway.errors import StoreUnavailable
from gateway.review.index import audit_dirs
from gateway.store.redis_store import OptOutStore

LAST_KEY: Final = "og:rv:last"
ANCHOR_SCAN: Final = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class Checked:
    """One folder's result: `where` is ``FILE:LINE: why`` (or ``FILE: why``) on a break."""

    folder: str
    ok: bool
    entries: int
    where: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    ok: bool
    entries: int
    folders: tuple[Checked, ...]
    at: float
    by: str
    anchors_read: bool  # False: the store was down, cut tails were not checked


async def all_anchors(store: OptOutStore, ring: Keyring) -> list[Anchors]:
    """The anchors of every instance that keeps them in this store."""
    async with store.guard("audit anchors"):
        names = [
            n.decode() if isinstance(n, bytes) else str(n)
            async for n in store.client.scan_iter(
                match=anchors_mod.KEY_PREFIX + "*", count=ANCHOR_SCAN
            )
        ]
    found = []
    for name in sorted(names):
        instance = name[len(anchors_mod.KEY_PREFIX) :]
        found.append(await anchors_mod.read_store(store.client, instance=instance, keys=ring.audit))
    return found


def _for_folder(folder: Path, every: list[Anchors]) -> Anchors | None:
    """The anchors of the streams that live in `folder` (merged over instances)."""
    heads: dict[str, Head] = {}
    bad: dict[str, str] = {}
    for a in every:
        streams = set(a.heads) | set(a.bad)
        if not any(next(folder.glob(f"{s}-*.jsonl"), None) for s in streams):
            continue
        heads.update(a.heads)
        bad.update(a.bad)
    if not heads and not bad:
        return None
    return Anchors(source="the store", instance="", heads=heads, bad=bad)


def check(folders: list[Path], ring: Keyring, every: list[Anchors] | None) -> list[Checked]:
    out = []
    for folder in folders:
        anchors = _for_folder(folder, every) if every is not None else None
        result = audit_verify.verify_path(folder, ring, anchors)
        where = "" if result.ok else result.describe()
        out.append(Checked(folder=str(folder), ok=result.ok, entries=result.entries, where=where))
    return out


async def run(console: Any, user: str) -> Outcome:
    """Verify every folder now; keep the result in the store (best effort)."""
    deps = console.deps
    ring = deps.keyring()
    every: list[Anchors] | None
    try:
        every = await all_anchors(deps.store, ring)
    except StoreUnavailable:
        every = None
    results = await asyncio.to_thread(check, list(audit_dirs(deps.cfg)), ring, every)
    outcome = Outcome(
        ok=all(c.ok for c in results), entries=sum(c.entries for c in results),
        folders=tuple(results), at=time.time(), by=user, anchors_read=every is not None,
    )  # fmt: skip
    doc = {
        "ok": outcome.ok, "entries": outcome.entries, "at": outcome.at, "by": user,
        "anchors": outcome.anchors_read,
        "folders": [{"folder": c.folder, "ok": c.ok, "entries": c.entries, "where": c.where}
                    for c in results],
    }  # fmt: skip
    try:
        async with deps.store.guard("verify result"):
            await deps.store.client.set(LAST_KEY, orjson.dumps(doc))
    except StoreUnavailable:
        pass  # the page still shows the result
    return outcome


async def last_result(store: OptOutStore) -> Outcome | None:
    """The last check any instance ran, or None."""
    try:
        async with store.guard("verify result"):
            raw = await store.client.get(LAST_KEY)
    except (StoreUnavailable, RedisError):
        return None
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
        folders = tuple(
            Checked(folder=str(f["folder"]), ok=bool(f["ok"]), entries=int(f["entries"]),
                    where=str(f["where"]))
            for f in doc["folders"]
        )  # fmt: skip
        return Outcome(
            ok=bool(doc["ok"]), entries=int(doc["entries"]), folders=folders,
            at=float(doc["at"]), by=str(doc["by"]), anchors_read=bool(doc["anchors"]),
        )  # fmt: skip
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
