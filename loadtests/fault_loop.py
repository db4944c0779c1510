"""Kill loops against `optgate serve --workers 2` under SMTP load (a harness, not a test).

    python loadtests/fault_loop.py [--worker-kills N] [--worker-interval S]
                                   [--store-kills N] [--store-interval S] [--sessions N]
                                   [--disk-full S] [--short]

Three scenarios, each on a fresh data dir with the outbox upstream (the zero-setup default,
which tells exactly what was forwarded, to whom), `--sessions` STARTTLS + AUTH senders
in a loop, and 1 recipient in 10 opted out beforehand:

- worker-kill: a random worker SIGKILLed every `--worker-interval` seconds;
- store-kill: the embedded valkey-server SIGKILLed every `--store-interval` seconds;
- disk-full: the audit folder is a 512 KiB tmpfs (mounted here: run as root), filled to
  ENOSPC by a file for `--disk-full` seconds, then freed. Checked: sends begun once it is
  full (after a grace for what the audit file's last page still holds) answer 451, never
  250; every message forwarded has its decision entry in the audit log; sends are
  answered 250 again once space returns, without a worker restart. Its line adds "full:
  250 N 451 N", "unaudited N" (forwarded without a decision entry) and "restarts N";
  recovery is from freeing the space to the next 250. Without a tmpfs (mount refused)
  the scenario says so and is skipped.

Per scenario, one line: sent, delivered (250 and in the outbox), suppressed (250 to an
opted-out recipient, not forwarded), 4xx, cut (no reply: connection gone), LOST (250 to a
recipient not opted out, missing from the outbox), LEAKED (anything in the outbox for an
opted-out recipient), DUP (a Message-ID forwarded twice), kills, recovery after each kill
(median/max: to the replacement worker's ``worker_ready``; for the store, to the next
250), seconds with no live worker (sampled every 50 ms: no worker that has reported ready
is alive), zombies seen, and ``optgate audit verify``. Exit code 1 when LOST, LEAKED or a
zombie is not 0, when `serve` died, or when the audit log does not verify.
`--short` (tests/test_faults.py runs it): 5 kills each, 1 s apart, and the disk full
for 3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib
from harness.faults import PASSWORD, RECIPIENTS, Gateway, Tally, opted_out
from harness.tls import client_context

SAMPLE_S = 0.05  # how often "is any worker alive and ready?" is asked
MID_RE = re.compile(rb"Message-ID: <(fl-[0-9a-z-]+)@loop\.example>")
# The audit folder of the disk-full scenario: large enough for the opt-out import and
# seconds of entries, small enough to fill in a moment.
AUDIT_TMPFS_SIZE = "512k"
FILL_AFTER_S = 2.0  # sends flow (and are audited) before the disk fills
# A full tmpfs still takes appends into the last page an audit file already holds (up to
# 4 KiB each): a few sends right after the fill may still be audited and answered 250.
FULL_GRACE_S = 1.0


async def sender(gw: Gateway, tally: Tally, n: int, stop: asyncio.Event) -> None:
    ctx = client_context(gw.pki.ca_pem)
    i = 0
    while not stop.is_set():
        rcpt = random.randrange(RECIPIENTS)
        mid = f"fl-{n}-{i}"
        i += 1
        body = (
            f"From: app@sender.example\r\nTo: r{rcpt}@example.org\r\nSubject: loop\r\n"
            f"Message-ID: <{mid}@loop.example>\r\n\r\nhello\r\n"
        )
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=gw.smtp, start_tls=True, tls_context=ctx, timeout=10
        )
        tally.sent += 1
        began = time.monotonic()
        try:
            await smtp.connect()
            await smtp.login("app", PASSWORD)
            await smtp.sendmail("app@sender.example", [f"r{rcpt}@example.org"], body)
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                tally.four += 1
                if exc.code == 451:
                    tally.fours.append((began, time.monotonic()))
            else:
                tally.cut += 1  # not expected: counted, and shown
            await asyncio.sleep(0.05)
        except (OSError, aiosmtplib.SMTPException, TimeoutError):
            tally.cut += 1
            await asyncio.sleep(0.05)
        else:
            tally.acked[mid] = rcpt
            tally.oks.append((began, time.monotonic()))
        finally:
            smtp.close()


async def watch(gw: Gateway, tally: Tally, stop: asyncio.Event) -> None:
    """Seconds with no live, ready worker; zombies among serve's children."""
    first_seen: dict[int, float] = {}  # zombie pid -> when first seen
    counted: set[int] = set()
    ready: set[int] = set()
    while not stop.is_set():
        kids = gw.children()
        ready |= gw.ready_pids()
        if not any(w and st != "Z" and pid in ready for pid, (st, w) in kids.items()):
            tally.no_worker_s += SAMPLE_S
        # A dead child is a zombie until the supervisor's next tick (0.1 s) reaps it: one
        # still a zombie a second later was not going to be reaped.
        now = time.monotonic()
        zombies = {pid for pid, (st, _) in kids.items() if st == "Z"}
        first_seen = {pid: first_seen.get(pid, now) for pid in zombies}
        stuck = {pid for pid, t in first_seen.items() if now - t > 1.0} - counted
        tally.zombies += len(stuck)
        counted |= stuck
        await asyncio.sleep(SAMPLE_S)


async def kill_workers(gw: Gateway, tally: Tally, kills: int, interval: float) -> None:
    for _ in range(kills):
        await asyncio.sleep(interval)
        workers = [pid for pid, (st, w) in gw.children().items() if w and st != "Z"]
        if not workers:
            continue
        before = gw.log_text().count("event='worker_ready'")
        os.kill(random.choice(workers), signal.SIGKILL)
        killed, tally.kills = time.monotonic(), tally.kills + 1
        while gw.log_text().count("event='worker_ready'") <= before:
            if time.monotonic() - killed > 30:
                break
            await asyncio.sleep(0.02)
        tally.recovery.append(time.monotonic() - killed)


async def kill_store(gw: Gateway, tally: Tally, kills: int, interval: float) -> None:
    for _ in range(kills):
        await asyncio.sleep(interval)
        pid = gw.store_pid()
        try:
            os.kill(pid or 0, signal.SIGKILL) if pid else None
        except ProcessLookupError:
            pid = None  # the pid file still names the last victim: not restarted yet
        if pid is None:
            continue
        killed, tally.kills = time.monotonic(), tally.kills + 1
        # The next 250 for a send begun after the kill (one already past its lookup may
        # finish with the store down).
        while time.monotonic() - killed < 30:
            after = [done for began, done in tally.oks[-50:] if began > killed]
            if after:
                tally.recovery.append(min(after) - killed)
                break
            await asyncio.sleep(0.01)
        else:
            tally.recovery.append(30.0)


async def fill_audit(gw: Gateway, tally: Tally, hold_s: float) -> None:
    """Fill the audit tmpfs to ENOSPC, hold it full for `hold_s`, free it; the recovery
    is from freeing to the next 250 of a send begun after."""
    await asyncio.sleep(FILL_AFTER_S)
    filler = gw.audit_dir / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    filled, tally.kills = time.monotonic(), tally.kills + 1
    await asyncio.sleep(hold_s)
    filler.unlink()
    freed = time.monotonic()
    tally.full = (filled, freed)
    while time.monotonic() - freed < 30:
        after = [done for began, done in tally.oks[-50:] if began > freed]
        if after:
            tally.recovery.append(min(after) - freed)
            return
        await asyncio.sleep(0.01)
    tally.recovery.append(30.0)


def audited_ids(gw: Gateway) -> set[str]:
    """The loop's Message-IDs that have a decision entry allowing them."""
    found: set[str] = set()
    for path in gw.audit_dir.rglob("*.jsonl"):
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("event") == "decision" and entry.get("decision") == "allow":
                    m = re.search(r"fl-[0-9a-z-]+", str(entry.get("message_id", "")))
                    if m:
                        found.add(m.group(0))
    return found


def mount_tmpfs(folder: Path) -> str:
    """Mount a small tmpfs on `folder`; "" when done, else why not."""
    folder.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={AUDIT_TMPFS_SIZE},mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], check=False)


def outbox(gw: Gateway) -> tuple[dict[str, int], set[int]]:
    """{Message-ID: copies forwarded}, and the recipient indexes anything went to."""
    copies: dict[str, int] = {}
    rcpts: set[int] = set()
    for env in (gw.root / "var" / "outbox").glob("*.json"):
        for r in json.loads(env.read_text())["rcpts"]:
            rcpts.add(int(r.removeprefix("r").partition("@")[0]))
        m = MID_RE.search(env.with_suffix(".eml").read_bytes())
        if m:
            mid = m.group(1).decode()
            copies[mid] = copies.get(mid, 0) + 1
    return copies, rcpts


async def scenario(name: str, kills: int, interval: float, sessions: int) -> bool:
    root = Path(tempfile.mkdtemp(prefix=f"fault-{name}-"))
    tmpfs = root / "audit" if name == "disk-full" else None
    if tmpfs is not None and (why := mount_tmpfs(tmpfs)):
        print(f"{name:12s} SKIPPED: no tmpfs for the audit folder ({why})", flush=True)
        return True
    try:
        return await _scenario(name, Gateway(root, tmpfs), kills, interval, sessions)
    finally:
        if tmpfs is not None:
            unmount(tmpfs)


async def _scenario(name: str, gw: Gateway, kills: int, interval: float, sessions: int) -> bool:
    gw.opt_out_recipients()
    await gw.start()
    started = gw.log_text().count("event='worker_started'")
    tally, stop, done = Tally(), asyncio.Event(), asyncio.Event()
    senders = [asyncio.create_task(sender(gw, tally, n, stop)) for n in range(sessions)]
    watcher = asyncio.create_task(watch(gw, tally, done))
    if name == "disk-full":
        await fill_audit(gw, tally, interval)
    else:
        killer = kill_workers if name == "worker-kill" else kill_store
        await killer(gw, tally, kills, interval)
    await asyncio.sleep(max(interval, 2.0))  # the last victim's replacement serves too
    stop.set()
    await asyncio.gather(*senders)
    done.set()
    await watcher
    alive = gw.proc is not None and gw.proc.poll() is None
    code = gw.stop()
    verify = gw.cli("audit", "verify")
    copies, reached = outbox(gw)
    kept = {m: r for m, r in tally.acked.items() if not opted_out(r)}
    lost = sum(1 for m in kept if m not in copies)
    leaked = sum(1 for r in reached if opted_out(r))
    dup = sum(1 for n in copies.values() if n > 1)
    rec = sorted(tally.recovery) or [0.0]
    ok_verify = "ok" if verify.returncode == 0 else f"FAILED ({verify.stdout.strip()[:80]})"
    extra, full_ok = "", True
    if tally.full is not None:
        lo, hi = tally.full[0] + FULL_GRACE_S, tally.full[1]
        ok_full = sum(1 for b, d in tally.oks if b > lo and d < hi)
        four_full = sum(1 for b, d in tally.fours if b > lo and d < hi)
        unaudited = len(set(copies) - audited_ids(gw))
        restarts = gw.log_text().count("event='worker_started'") - started
        extra = f"full: 250 {ok_full} 451 {four_full} unaudited {unaudited} restarts {restarts} "
        recovered = bool(tally.recovery) and tally.recovery[-1] < 30
        full_ok = recovered and four_full > 0 and not (ok_full or unaudited or restarts)
    print(
        f"{name:12s} sent {tally.sent} delivered {len(kept) - lost} "
        f"suppressed {len(tally.acked) - len(kept)} 4xx {tally.four} cut {tally.cut} "
        f"LOST {lost} LEAKED {leaked} DUP {dup} kills {tally.kills} "
        f"recovery median {statistics.median(rec):.2f} s max {rec[-1]:.2f} s "
        f"no-worker {tally.no_worker_s:.1f} s zombies {tally.zombies} "
        f"{extra}serve {'running' if alive else f'DIED (exit {code})'} verify {ok_verify}",
        flush=True,
    )
    return alive and full_ok and not (lost or leaked or tally.zombies) and verify.returncode == 0


async def main(args: argparse.Namespace) -> int:
    ok = True
    if args.worker_kills:
        ok &= await scenario("worker-kill", args.worker_kills, args.worker_interval, args.sessions)
    if args.store_kills:
        ok &= await scenario("store-kill", args.store_kills, args.store_interval, args.sessions)
    if args.disk_full:
        ok &= await scenario("disk-full", 1, args.disk_full, args.sessions)
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker-kills", type=int, default=20)
    p.add_argument("--worker-interval", type=float, default=2.0)
    p.add_argument("--store-kills", type=int, default=5)
    p.add_argument("--store-interval", type=float, default=3.0)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--disk-full", type=float, default=5.0, help="seconds the audit disk is full")
    p.add_argument("--short", action="store_true", help="5 kills each, 1 s apart; disk full 3 s")
    a = p.parse_args()
    if a.short:
        a.worker_kills = a.store_kills = 5
        a.worker_interval = a.store_interval = 1.0
        a.sessions = 3
        a.disk_full = 3.0
    sys.exit(asyncio.run(main(a)))
