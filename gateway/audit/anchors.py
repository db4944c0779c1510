"""Audit anchors: each stream's durable head, kept in the store and copied off the host.

The chain and the checkpoints (``audit.files``) catch any edit, insertion, reordering and a
removed middle or closed file; what no file on the host can show is what was cut off the
end: lines off the newest file, the newest file itself with the checkpoint naming it, or a
whole stream. So each writer keeps its stream's *head* in the store:

    og:audit:anchors:<instance>   a hash: field = stream name, value = the sealed head

The fields are the list of every stream the instance ever started (never removed); each
value is one line sealed like a checkpoint (HMAC-SHA256 under the current audit key,
chained to the head entry's mac) naming the head's ``seq`` and the file holding it::

    {"ts", "seq": M, "instance", "stream", "event": "anchor", "file", "head_ts",
     "kid", "prev": <the mac of entry M>, "mac"}

Stream and instance names are configuration, never PHI (an instance name must be unique
among the gateways sharing a store). A head is written only once its entry is durable
(after the group commit's fsync): once a second (again even when unchanged, so a store
restored from a backup gets it back), at once when the stream moves to a new file, and at
a clean stop. A store outage never delays or fails an audit write: anchors are best effort,
and a failure is logged.

`optgate audit verify` reads the hash: a stream whose files end before its anchor's seq
was cut; entries after it are fine (written since the last anchor, up to a second). An
anchor proves nothing against whoever holds the audit key and the store at once, or
replays an older anchor: ``optgate audit anchor`` prints every head as one sealed
document to keep off the host, and ``audit verify --anchor FILE`` checks against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
import structlog
from redis.exceptions import RedisClusterException, RedisError

from gateway.audit import files
from gateway.core import chain as core
from gateway.core.keys import KeySet
from gateway.errors import StoreUnavailable

log = structlog.get_logger("optgate.audit.anchors")

KEY_PREFIX: Final = "og:audit:anchors:"
ANCHOR_EVENT: Final = "anchor"
COPY_EVENT: Final = "audit_anchors"
# At least once a second (the most a cut tail can hide behind the anchor).
ANCHOR_INTERVAL_S: Final = 1.0
# An HSET on a healthy store takes well under a millisecond; a store slower than this is
# treated as down for this round, so one slow call never holds back the next anchor.
ANCHOR_BUDGET_S: Final = 1.0
# Reading every anchor for `audit verify` / `audit anchor` (one HGETALL).
READ_BUDGET_S: Final = 5.0


def store_key(instance: str) -> str:
    return KEY_PREFIX + instance


@dataclass(frozen=True, slots=True, kw_only=True)
class Head:
    """A stream's durable head: its last entry's `seq` and `mac`, and the file holding it."""

    stream: str
    seq: int
    mac: str
    file: str
    ts: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Anchors:
    """Every anchored stream of an instance: the heads that verified, and why others did not.

    `source` says where they were read ("the store", or the copy's path) for messages.
    """

    source: str
    instance: str
    heads: Mapping[str, Head]
    bad: Mapping[str, str]


def head_of(file: str, line: bytes) -> Head | None:
    """The head described by a durable entry `line` of `file` (as the writer wrote it)."""
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(entry, dict):
        return None
    seq, mac, stream = entry.get("seq"), entry.get("mac"), entry.get("stream")
    if type(seq) is not int or not isinstance(mac, str) or not isinstance(stream, str):
        return None
    return Head(stream=stream, seq=seq, mac=mac, file=file, ts=str(entry.get("ts", "")))


def seal_head(head: Head, *, instance: str, keys: KeySet, ts: str) -> bytes:
    kid, key = keys.current
    fields = {
        "ts": ts,
        "seq": head.seq,
        "instance": instance,
        "stream": head.stream,
        "event": ANCHOR_EVENT,
        "file": head.file,
        "head_ts": head.ts,
    }
    return core.seal(fields, prev=head.mac, kid=kid, key=key)[0]


def open_head(line: bytes, *, keys: KeySet, instance: str, stream: str) -> Head | str:
    """The head an anchor line states, if its mac verifies and it is `stream`'s; else why."""
    if not line.endswith(b"\n"):
        line += b"\n"
    check = core.check_line(line, prev=None, expected_seq=None, keys=keys, min_kid_index=0)
    if not check.ok or check.entry is None:
        return check.why
    e = check.entry
    if e.get("event") != ANCHOR_EVENT:
        return "not an anchor"
    if e.get("stream") != stream or e.get("instance") != instance:
        return "belongs to another stream"
    file = e.get("file")
    if not isinstance(file, str) or files.parse_name(file) is None:
        return "names no file"
    return Head(stream=stream, seq=check.seq, mac=e["prev"], file=file, ts=str(e.get("head_ts")))


def _to_text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


async def read_store(client: Any, *, instance: str, keys: KeySet) -> Anchors:
    """Every anchor of `instance` in the store. Raises StoreUnavailable."""
    try:
        async with asyncio.timeout(READ_BUDGET_S):
            raw = await client.hgetall(store_key(instance))
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        raise StoreUnavailable(
            f"opt-out store: reading the audit anchors failed: {type(exc).__name__}"
        ) from exc
    heads: dict[str, Head] = {}
    bad: dict[str, str] = {}
    for field, value in raw.items():
        stream = _to_text(field)
        line = value.encode() if isinstance(value, str) else value
        opened = open_head(line, keys=keys, instance=instance, stream=stream)
        if isinstance(opened, Head):
            heads[stream] = opened
        else:
            bad[stream] = opened
    return Anchors(source="the store", instance=instance, heads=heads, bad=bad)


def seal_copy(anchors: Anchors, *, keys: KeySet, ts: str) -> bytes:
    """Every head of `anchors` as one sealed document (one JSON line) to keep elsewhere."""
    kid, key = keys.current
    heads = {
        s: {"seq": h.seq, "mac": h.mac, "file": h.file, "ts": h.ts}
        for s, h in sorted(anchors.heads.items())
    }
    fields = {"ts": ts, "event": COPY_EVENT, "instance": anchors.instance, "heads": heads}
    return core.seal_document(fields, kid=kid, key=key)


def open_copy(data: bytes, *, keys: KeySet, source: str) -> Anchors | str:
    """The anchors of a copy made by `seal_copy`, if its mac verifies; else why not."""
    doc = core.open_document(data, keys=keys)
    if isinstance(doc, str):
        return doc
    heads_doc, instance = doc.get("heads"), doc.get("instance")
    if doc.get("event") != COPY_EVENT or not isinstance(heads_doc, dict):
        return "not an anchor copy"
    if not isinstance(instance, str):
        return "names no instance"
    heads: dict[str, Head] = {}
    for stream, h in heads_doc.items():
        if not isinstance(h, dict):
            return f"bad head for {stream}"
        seq, mac, file = h.get("seq"), h.get("mac"), h.get("file")
        if type(seq) is not int or not isinstance(mac, str) or not isinstance(file, str):
            return f"bad head for {stream}"
        heads[stream] = Head(stream=stream, seq=seq, mac=mac, file=file, ts=str(h.get("ts")))
    return Anchors(source=source, instance=instance, heads=heads, bad={})


class AnchorPublisher:
    """Keeps one stream's head in the store (see the module docstring); runs on the loop.

    The writer calls `note()` after each durable batch; a task writes the newest head
    once a second, at once when the head moved to another file, and `stop()` writes the
    last one.
    """

    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis or RedisCluster (the store's own client)
        *,
        instance: str,
        stream: str,
        keys: Callable[[], KeySet],
        clock: Callable[[], float] = time.time,
        interval_s: float = ANCHOR_INTERVAL_S,
        budget_s: float = ANCHOR_BUDGET_S,
    ) -> None:
        self._client = client
        self._key = store_key(instance)
        self._instance = instance
        self._stream = stream
        self._keys = keys
        self._clock = clock
        self._interval_s = interval_s
        self._budget_s = budget_s
        self._head: tuple[str, bytes] | None = None  # (file, line) of the newest durable entry
        self._published: tuple[str, bytes] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._stopping = False
        # The stored anchor showed a cut (check_disk): it is evidence, never overwritten.
        self.frozen = False

    def note(self, file: str, line: bytes) -> None:
        """The entry `line` of `file` is durable (called on the loop after each batch)."""
        self._head = (file, line)
        if self._published is None or self._published[0] != file:
            self._wake.set()  # a new stream or a new file: anchor it now

    async def check_disk(self, *, seq: int, mac: str) -> None:
        """At open: compare the stored anchor with where the stream stands on disk.

        The disk must reach the anchor (entries after it are fine: a crash can come before
        the next anchor). If it falls short, or holds another entry at the anchored seq, the
        files were cut since: say so loudly and never overwrite that anchor, so that
        `audit verify` keeps reporting the cut rather than a restart hiding it.
        """
        try:
            async with asyncio.timeout(self._budget_s):
                stored = await self._client.hget(self._key, self._stream)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            log.warning("audit_anchor_unchecked", stream=self._stream, error=type(exc).__name__)
            return
        if stored is None:
            return
        line = stored.encode() if isinstance(stored, str) else stored
        head = open_head(line, keys=self._keys(), instance=self._instance, stream=self._stream)
        if isinstance(head, str):
            log.error("audit_anchor_invalid", stream=self._stream, why=head)
            self.frozen = True
        elif head.seq > seq or (head.seq == seq and head.mac != mac):
            log.error(
                "audit_anchor_ahead_of_disk",
                stream=self._stream,
                anchor_seq=head.seq,
                disk_seq=seq,
                file=head.file,
            )
            self.frozen = True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"audit-anchor-{self._stream}")

    async def stop(self) -> None:
        """End the task, then write the newest head (a clean stop's anchor).

        The task is told to end rather than cancelled: on Python 3.11 a cancel() that
        lands as its ``asyncio.timeout`` expires is swallowed, and the task would wait on.
        It ends within one publish's budget.
        """
        task, self._task = self._task, None
        self._stopping = True
        self._wake.set()
        if task is not None:
            await task
        await self.publish()

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            await self.publish()

    async def publish(self) -> bool:
        """Write the newest head (again, even if unchanged: a store restored from a backup
        or flushed gets it back within a second); False (logged) if the store failed."""
        head = self._head
        if head is None or self.frozen:
            return True
        parsed = head_of(*head)
        if parsed is None:  # cannot happen for a line the writer sealed
            return False
        line = seal_head(
            parsed, instance=self._instance, keys=self._keys(), ts=files.iso_ts(self._clock())
        )
        try:
            async with asyncio.timeout(self._budget_s):
                await self._client.hset(self._key, self._stream, line)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            if not self._failing:  # once per outage, not once a second
                log.warning("audit_anchor_failed", stream=self._stream, error=type(exc).__name__)
            self._failing = True
            return False
        if self._failing:
            log.info("audit_anchor_restored", stream=self._stream)
        self._failing = False
        self._published = head
        return True
