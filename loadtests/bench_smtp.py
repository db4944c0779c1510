"""SMTP benchmark: optgate against the harness limit (and, optionally, a bare relay).

One invocation measures, on the same load and side by side:

1. harness limit: the client straight to the TLS sink;
2. optgate, 1 worker (--workers N for more): client -> `python -m gateway serve` (a
   subprocess with a generated config, embedded Valkey) -> the same kind of sink;
3. with --baseline DIR: optgate@base, the same with the gateway of another checkout DIR
   (PYTHONPATH=DIR, same interpreter, config and workers), and optgate/optgate@base;
4. with --bare-relay: client -> a minimal aiosmtpd -> SMISMEMBER -> pooled aiosmtplib relay
   written here (its own valkey-server) -> the sink, for context.
5. with --postfix: client -> a private Postfix instance (harness/smtp/postfix.py; plaintext,
   no AUTH) -> the sink's plaintext listener, and the plaintext limit;
6. with --compare-workers: optgate with os.cpu_count() workers too, and the 1 -> N scaling.
7. with --realistic: the one-click workload against a provider --rtt-ms away (10 KB
   multipart, category marketing, DKIM RSA-2048, 100 sessions): the harness limit,
   Postfix + OpenDKIM (harness/smtp/postfix.py, opendkim.py), optgate 1 and N workers; the
   last lines give the best optgate row / Postfix + OpenDKIM per recipient count.
8. with --dkim: the gateways sign with an RSA-2048 key for the From domain; --compare-dkim
   runs every optgate row without and with it and prints with/without per case.

Every process is separate so that no two share an interpreter: the client (N concurrent
aiosmtplib sessions, STARTTLS + AUTH PLAIN once per connection, TLS 1.3), the sink
(harness/smtp/sink.py: a lean asyncio protocol with uvloop's TLS, STARTTLS required, accepts
and counts, no disk; --sink aiosmtpd for the aiosmtpd sink of earlier runs), the gateway and
its valkey-server, and the relay. The machine's cores are shared by all of them; the report
says which ran and what else used the CPU during each measurement window.

Per run: messages/s, p50/p99 latency (MAIL to the final DATA reply), CPU seconds per 1,000
messages of each process (user+system from /proc via psutil, sampled at the edges of the
measurement window), then optgate/limit ratios and the p99 latency optgate adds.

    .venv/bin/python loadtests/bench_smtp.py --sessions 10 --seconds 15
    .venv/bin/python loadtests/bench_smtp.py --sizes 2KB --rcpts 1 --bare-relay --profile
    git worktree add /tmp/optgate-base HEAD~1
    .venv/bin/python loadtests/bench_smtp.py --sizes 2KB --rcpts 1 --baseline /tmp/optgate-base
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from harness.host import disk_fsync_probe
from harness.smtp.bench import Bench, run_paced
from harness.smtp.client import RCPT_DOMAIN, SIZES
from harness.smtp.profiler import profile
from harness.smtp.report import (
    TARGET_LABELS,
    Row,
    print_dkim_compare,
    print_errors,
    print_header,
    print_legend,
    print_notes,
    print_others,
    print_paced,
    print_ratios,
    print_realistic,
    print_replies,
    print_table,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sessions", type=int, help="concurrent client sessions (default 10; --realistic: 100)"
    )
    p.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds per run (default 10)"
    )
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    p.add_argument(
        "--sizes", help="message sizes: 2KB,10KB,50KB (default 2KB,50KB; --realistic: 10KB)"
    )
    p.add_argument("--rcpts", default="1,5", help="recipients per message (default 1,5)")
    p.add_argument(
        "--targets", default="limit,optgate", help="limit,optgate,relay (default limit,optgate)"
    )
    p.add_argument("--bare-relay", action="store_true", help="also run the bare aiosmtpd relay")
    p.add_argument(
        "--postfix",
        action="store_true",
        help="also run Postfix relaying to the sink, plaintext (and the plaintext limit);"
        " installs postfix with apt-get when missing and root",
    )
    p.add_argument(
        "--compare-workers",
        action="store_true",
        help="also run optgate with os.cpu_count() workers beside the --workers run",
    )
    p.add_argument(
        "--new-connection-per-message",
        action="store_true",
        help="connect, STARTTLS and AUTH for every message instead of reusing sessions",
    )
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    p.add_argument(
        "--implicit-tls",
        action="store_true",
        help="client connects with implicit TLS (the gateway's listen_tls) instead of STARTTLS",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="pace the client to this many msg/s in total (default 0: as fast as possible)",
    )
    p.add_argument(
        "--paced",
        action="store_true",
        help="with --postfix: then run the harness limit and optgate again, paced to the"
        " msg/s Postfix reached, for the latency each adds at the same load",
    )
    p.add_argument(
        "--pool", type=int, default=1000, help="recipient addresses drawn from (default 1000)"
    )
    p.add_argument(
        "--optouts", type=int, default=10, help="addresses opted out via the CLI (default 10)"
    )
    p.add_argument(
        "--optout-share",
        type=float,
        default=0.1,
        help="share of recipient picks that hit an opted-out address (default 0.1)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the gateway in one extra run (see --profile-case)",
    )
    p.add_argument(
        "--profile-case",
        default="2KB:1",
        help="SIZE:RCPTS of the profiled run (default 2KB:1)",
    )
    p.add_argument(
        "--profile-native", action="store_true", help="with --profile: include native frames"
    )
    p.add_argument("--top", type=int, default=15, help="functions shown by --profile (default 15)")
    p.add_argument(
        "--sink",
        choices=("lean", "aiosmtpd"),
        default="lean",
        help="the sink: harness/smtp/sink.py's asyncio protocol (default) or aiosmtpd (earlier"
        " runs)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, profile)"
    )
    p.add_argument(
        "--realistic",
        action="store_true",
        help="10 KB multipart text+HTML, category marketing, DKIM RSA-2048, a sink --rtt-ms"
        " away offering PIPELINING, 100 sessions; rows: harness limit, Postfix + OpenDKIM,"
        " optgate 1 and N workers",
    )
    p.add_argument(
        "--rtt-ms",
        type=float,
        help="the sink as a provider this far away: PIPELINING offered, every reply held this"
        " long (default 0 and no PIPELINING; --realistic: 20)",
    )
    p.add_argument(
        "--dkim",
        action="store_true",
        help="the gateways sign with a generated RSA-2048 key for the From domain",
    )
    p.add_argument(
        "--compare-dkim",
        action="store_true",
        help="run every optgate row without and with DKIM (implies --dkim)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run the gateway of the checkout DIR (e.g. `git worktree add DIR REV`) as"
        " optgate@base, same interpreter, config and workers, and report optgate/optgate@base",
    )
    args = p.parse_args(argv)
    args.provider = args.realistic or args.rtt_ms is not None  # the sink offers PIPELINING
    args.rtt_ms = args.rtt_ms if args.rtt_ms is not None else 20.0 if args.realistic else 0.0
    args.sessions = args.sessions or (100 if args.realistic else 10)
    args.sizes = args.sizes or ("10KB" if args.realistic else "2KB,50KB")
    args.dkim = args.dkim or args.compare_dkim or args.realistic
    if args.realistic:
        args.targets = ",".join(["limit", "postfix-dkim", *args.targets.split(",")])
        args.compare_workers = True
    if args.rtt_ms < 0 or (args.provider and args.sink != "lean"):
        p.error("--rtt-ms needs the lean sink and a delay of 0 or more")
    args.size_list = [s.strip().upper() for s in args.sizes.split(",") if s.strip()]
    args.rcpt_list = [int(n) for n in args.rcpts.split(",") if n.strip()]
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.bare_relay and "relay" not in args.target_list:
        args.target_list.append("relay")
    if args.postfix:
        args.target_list += ["limit-plain", "postfix"]
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "gateway" / "__init__.py").is_file():
            p.error(f"--baseline: {args.baseline} is not a checkout (no gateway/__init__.py)")
        args.target_list += ["optgate", "optgate@base"]
    args.n_workers = os.cpu_count() or 1
    if args.compare_workers and args.n_workers != args.workers:
        args.target_list.append("optgate-n")
    if args.compare_dkim:
        signing = [t for t in ("optgate", "optgate-n") if t in args.target_list]
        args.target_list += [f"{t}-nodkim" for t in signing]
    order = list(TARGET_LABELS)
    args.target_list = sorted(
        set(args.target_list), key=lambda t: order.index(t) if t in order else 0
    )
    size, _, rcpts = args.profile_case.upper().partition(":")
    if size not in SIZES or not rcpts.isdigit() or int(rcpts) < 1:
        p.error("--profile-case: expected e.g. 2KB:1 or 50KB:5")
    args.profile_size, args.profile_rcpts = size, int(rcpts)
    if args.profile and "optgate" not in args.target_list:
        args.target_list.append("optgate")
    bad = [s for s in args.size_list if s not in SIZES] + [
        t for t in args.target_list if t not in TARGET_LABELS
    ]
    if bad:
        p.error(f"unknown size or target: {', '.join(bad)}")
    if "optgate@base" in args.target_list and args.baseline is None:
        p.error("target optgate@base needs --baseline DIR")
    if (
        args.sessions < 1
        or args.seconds <= 0
        or args.workers < 1
        or not args.rcpt_list
        or min(args.rcpt_list) < 1
    ):
        p.error("--sessions, --seconds, --rcpts and --workers must be positive")
    if args.paced and (not args.postfix or args.rate):
        p.error("--paced needs --postfix and no --rate (it paces to Postfix's rate)")
    if args.pool < 2 * (max(args.rcpt_list) + args.optouts):
        p.error("--pool is too small for the recipients per message and --optouts")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for target, n in (("optgate", args.workers), ("optgate-n", args.n_workers)):
        label = f"optgate {n} worker" + ("s" if n > 1 else "")
        TARGET_LABELS[target] = label + (", DKIM" if args.compare_dkim else "")
        TARGET_LABELS[f"{target}-nodkim"] = label + ", no DKIM"
    root = Path(tempfile.mkdtemp(prefix="optgate-bench-"))
    addresses = [f"user{i:04d}@{RCPT_DOMAIN}" for i in range(args.pool)]
    random.Random(1).shuffle(addresses)
    kind = " mime" if args.realistic else ""
    cases = [(f"{s}{kind} x{n}rcpt", SIZES[s], n) for s in args.size_list for n in args.rcpt_list]
    paced_runs = 1 + sum(t.startswith("optgate") for t in args.target_list) if args.paced else 0
    runs = len(cases) * (len(args.target_list) + paced_runs) + (1 if args.profile else 0)
    print_header(args, root, runs)
    bench = Bench(
        args,
        root,
        allowed=tuple(addresses[args.optouts :]),
        opted_out=tuple(addresses[: args.optouts]),
    )
    rows: list[Row] = []
    paced: list[Row] = []
    notes: list[str] = []
    profile_text = ""
    try:
        bench.start()
        print(f"  disk      the audit log's, alone: {disk_fsync_probe(root)}")
        print("\nruns:")
        for case, size, n in cases:
            for target in args.target_list:
                rows.append(bench.measure(case, target, bench.spec(target, size, n)))
            if args.paced:
                paced += run_paced(bench, rows, case, size, n)
        if args.profile and bench.gateway is not None:
            spec = bench.spec("optgate", SIZES[args.profile_size], args.profile_rcpts)
            profile_text = profile(
                bench.gateway, spec, root, native=args.profile_native, top=args.top
            )
    except RuntimeError as exc:  # a process that would not start or answer: say which, stop
        print(f"\nbench_smtp: {exc}", file=sys.stderr)
        return 2
    finally:
        notes = bench.stop()
        for note in notes:
            print(f"shutdown: {note}")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_table(rows, os.cpu_count() or 1, args.new_connection_per_message)
    print_ratios(rows)
    print_paced(paced, args.sessions)
    print_legend(args.new_connection_per_message)
    print_errors(rows)
    print_notes(rows)
    print_others(rows)
    print_replies(rows)
    if profile_text:
        case = f"{args.profile_size} x{args.profile_rcpts}rcpt"
        print(f"\nprofile of the gateway (optgate, {case}):\n" + profile_text)
    if args.keep:
        print(f"kept {root}")
    print_dkim_compare(rows, len(args.size_list) == 1)
    if args.realistic:
        print_realistic(rows)
    unsigned = any(r.dkim and r.dkim != "verified" for r in rows)
    return 1 if any(r.result.errors for r in rows + paced) or notes or unsigned else 0


if __name__ == "__main__":
    sys.exit(main())
