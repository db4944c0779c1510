"""Review index: build speed, search by recipient, the overview's daily counts, size.

Generates N audit entries (default 10,000,000) in 4 streams of one folder, in the audit
writer's own file format: ``{stream}-{YYYY-MM-DD}[.n].jsonl`` over the last 60 days, a new
part when a file passes --file-mib, each line sealed with HMAC-SHA256 and chained to the one
before under a generated key (`core.chain.seal`, as the writer seals), so `optgate audit
verify` accepts the entries. Not written: the checkpoints that close each file (``.ckpt``)
and the store's anchors; the index reads neither.

The mix: 76 % decisions (allow 70 %, suppress 20 %, defer 5 %, reject 5 %; seven categories;
email 70 %, SMS 30 %; five senders), 19 % deliveries (sharing their decision's txn and
Message-ID), 3 % opt-outs and 1 % opt-ins from five sources, 1 % access and auth entries.
Recipients are pseudonyms drawn from a pool of --recipients (default 1,000,000, at most
N / 10), so a person has about ten entries.

Then it measures, on the same machine:
  - build: `ReviewIndex.rebuild()` (as `optgate audit reindex`), entries/s (target >= 50,000)
  - refresh: 1 % more entries appended, then `refresh()`, entries/s
  - search: `search(Query(recipient=P), limit=50)` for 1,000 random pseudonyms, p50/p99
    (target p99 < 100 ms)
  - daily: `daily(30)`, the overview's counts, cold and warm (target < 1 s)
  - size: index bytes on disk per entry

    .venv/bin/python loadtests/bench_review.py                    # 10,000,000 entries
    .venv/bin/python loadtests/bench_review.py --entries 200000   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from gateway.audit import files as audit_files
from gateway.core import chain
from gateway.review.index import ReviewIndex
from gateway.review.index_types import Query
from loadtests.harness.common import percentile

STREAMS: Final = 4
DAYS: Final = 60  # the overview shows 30: half the entries fall outside its window
SEARCHES: Final = 1000
PAGE: Final = 50  # rows per search page, as the console shows them
CATEGORIES: Final = (
    "marketing", "fundraising", "research", "appointment-reminder", "refill-reminder",
    "billing", "emergency-alert",
)  # fmt: skip
SENDERS: Final = ("reminders-app", "billing-app", "crm", "research-portal", "alerts")
SOURCES: Final = ("link", "keyword", "api", "cli", "provider")
DECISIONS: Final = (("allow", 70), ("suppress", 20), ("defer", 5), ("reject", 5))
RULES: Final = {"allow": "no-opt-out", "suppress": "opted-out", "defer": "store-timeout",
                "reject": "bad-recipient"}  # fmt: skip


class _Stream:
    """One stream's files and chain, written as the writer writes them."""

    def __init__(self, directory: Path, name: str, key: bytes, file_bytes: int) -> None:
        self.directory, self.name, self.key, self.file_bytes = directory, name, key, file_bytes
        self.seq, self.prev = 0, ""
        self.file: tuple[str, int] | None = None
        self.out: Any = None
        self.size = 0

    def append(self, ts: str, fields: dict[str, Any]) -> None:
        self.seq += 1
        body = {"ts": ts, "seq": self.seq, "instance": self.name, "stream": self.name, **fields}
        line, self.prev = chain.seal(body, prev=self.prev, kid="k1", key=self.key)
        day = ts[:10]
        if self.file is None or day > self.file[0]:
            self._open((day, 0))
        elif self.size + len(line) > self.file_bytes:
            self._open((day, self.file[1] + 1))
        self.out.write(line)
        self.size += len(line)

    def _open(self, file: tuple[str, int]) -> None:
        self.close()
        self.file, self.size = file, 0
        self.out = (self.directory / audit_files.file_name(self.name, *file)).open("wb")

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None


def _entries(rng: random.Random, pool: Sequence[str], n: int) -> Any:
    """`n` entries' own fields (no ts, seq...), in the mix of the module docstring."""
    decisions = [d for d, w in DECISIONS for _ in range(w)]
    made = 0
    while made < n:
        roll = rng.random()
        rcpt = pool[rng.randrange(len(pool))]
        channel = "email" if rng.random() < 0.7 else "sms"
        if roll < 0.95:
            txn = f"{rng.getrandbits(64):016x}"
            mid = f"<{txn}@app.example>" if channel == "email" else ""
            decision, category = rng.choice(decisions), rng.choice(CATEGORIES)
            sender = rng.choice(SENDERS)
            yield {"event": "decision", "channel": channel, "sender": sender, "txn": txn,
                   "decision": decision, "category": category, "recipient": rcpt,
                   "message_id": mid, "rule": RULES[decision], "reason": decision}  # fmt: skip
            made += 1
            if decision == "allow" and made < n and rng.random() < 0.27:
                yield {"event": "delivery", "channel": channel, "sender": sender, "txn": txn,
                       "category": category, "recipient": rcpt, "message_id": mid,
                       "outcome": "accepted", "code": 250}  # fmt: skip
                made += 1
        elif roll < 0.99:
            event = "optout" if roll < 0.98 else "optin"
            yield {"event": event, "channel": channel, "recipient": rcpt,
                   "source": rng.choice(SOURCES),
                   "categories": rng.sample(CATEGORIES[:6], rng.randint(1, 2))}  # fmt: skip
            made += 1
        else:
            yield {"event": "admin_access", "action": "audit.search", "key_id": "k1",
                   "role": "auditor"}  # fmt: skip
            made += 1


def generate(directory: Path, n: int, recipients: int, file_mib: int, seed: int) -> list[str]:
    """Write the audit folder; return the recipient pool."""
    rng = random.Random(seed)
    pool = [f"{rng.getrandbits(128):032x}" for _ in range(recipients)]
    key = os.urandom(32)
    streams = [
        _Stream(directory, f"gw-{i + 1}", key, file_mib * 1024 * 1024) for i in range(STREAMS)
    ]
    start = datetime.now(UTC) - timedelta(days=DAYS - 1)
    start = start.replace(hour=0, minute=0, second=0, microsecond=0)
    step_ms = DAYS * 86_400_000 / max(1, n)
    for i, fields in enumerate(_entries(rng, pool, n)):
        ms = int(i * step_ms)
        ts = audit_files.iso_ts(start.timestamp() + ms / 1000)
        streams[i % STREAMS].append(ts, fields)
    for s in streams:
        s.close()
    return pool


def _append(directory: Path, pool: Sequence[str], n: int) -> None:
    """`n` more entries at the end of each stream's newest file (a day's traffic)."""
    rng = random.Random(7)
    now = audit_files.iso_ts(time.time())
    newest = sorted(directory.glob("*.jsonl"))
    by_stream: dict[str, Path] = {}
    for p in newest:
        parsed = audit_files.parse_name(p.name)
        if parsed is not None:
            by_stream[parsed[0]] = p  # sorted: the last is the newest
    outs = [p.open("ab") for p in by_stream.values()]
    try:
        for i, fields in enumerate(_entries(rng, pool, n)):
            # Not chained to the file's last line: the index does not check macs.
            line, _ = chain.seal({"ts": now, "seq": 0, **fields}, prev="", kid="k1", key=b"k")
            outs[i % len(outs)].write(line)
    finally:
        for o in outs:
            o.close()


def _timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def measure(directory: Path, pool: Sequence[str], n: int) -> list[tuple[str, str, str]]:
    audit = directory / "audit"
    index = ReviewIndex.open(directory / "review-index", [audit])
    try:
        built, build_s = _timed(index.rebuild)
        extra = max(1000, n // 100)
        _append(audit, pool, extra)
        refreshed, refresh_s = _timed(index.refresh)
        rng = random.Random(11)
        times = []
        for p in rng.sample(list(pool), min(SEARCHES, len(pool))):
            _, took = _timed(lambda p=p: index.search(Query(recipient=p), limit=PAGE))
            times.append(took)
        times.sort()
        now = datetime.now(UTC)
        _, daily_cold = _timed(lambda: index.daily(30, now))
        _, daily_warm = _timed(lambda: index.daily(30, now))
        stats = index.stats()
    finally:
        index.close()
    rate = built / build_s
    p99 = percentile(times, 0.99)
    return [
        ("entries indexed", f"{built:,}", f"{n:,} generated"),
        ("build", f"{rate:,.0f} entries/s ({build_s:.1f} s)",
         "ok" if rate >= 50_000 else "below 50,000/s"),
        ("refresh", f"{refreshed / refresh_s:,.0f} entries/s ({refreshed:,} appended)", ""),
        ("search by recipient p50", f"{percentile(times, 0.5) * 1000:.1f} ms", ""),
        ("search by recipient p99", f"{p99 * 1000:.1f} ms",
         "ok" if p99 < 0.1 else "above 100 ms"),
        ("daily(30) cold / warm", f"{daily_cold * 1000:.1f} / {daily_warm * 1000:.1f} ms",
         "ok" if daily_cold < 1 else "above 1 s"),
        ("index size", f"{stats.bytes / 1e6:,.1f} MB, {stats.bytes / stats.entries:.0f} B/entry",
         ""),
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--entries", type=int, default=10_000_000, help="default 10,000,000")
    p.add_argument("--recipients", type=int, default=1_000_000,
                   help="pseudonym pool (default 1,000,000; at most entries / 10)")  # fmt: skip
    p.add_argument("--file-mib", type=int, default=64, help="audit file part size (default 64)")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-review-", dir=args.dir))
    try:
        (work / "audit").mkdir()
        recipients = max(1, min(args.recipients, args.entries // 10))
        print(f"generating {args.entries:,} entries, {recipients:,} recipients in {work}",
              flush=True)  # fmt: skip
        pool, gen_s = _timed(
            lambda: generate(work / "audit", args.entries, recipients, args.file_mib, args.seed)
        )
        audit_mb = sum(f.stat().st_size for f in (work / "audit").iterdir()) / 1e6
        print(f"generated in {gen_s:.1f} s ({audit_mb:,.1f} MB of audit files)", flush=True)
        rows = measure(work, pool, args.entries)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    value_w = max(len(r[1]) for r in rows)
    print(f"\n{'measure':<{width}}  {'result':<{value_w}}  target")
    for name, value, verdict in rows:
        print(f"{name:<{width}}  {value:<{value_w}}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
