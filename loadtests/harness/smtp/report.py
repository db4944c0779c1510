"""The SMTP benchmark's report: the run table, the ratios (to the harness limit, to Postfix,
to the baseline checkout), the 1 -> N workers scaling, the paced table, the legend and the
notes under it."""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from harness import common
from harness.common import REPO, percentile
from harness.host import checkout_rev, fs_type
from harness.smtp.client import ClientResult

# The optgate labels are set in main() with their worker counts (and DKIM or not).
TARGET_LABELS = {
    "limit": "harness limit",
    "limit-plain": "limit plaintext",
    "postfix": "Postfix",
    "postfix-dkim": "Postfix + OpenDKIM",
    "optgate-nodkim": "optgate 1 worker, no DKIM",  # --compare-dkim
    "optgate": "optgate 1 worker",
    "optgate@base": "optgate@base",  # --baseline DIR: DIR's gateway, same config and workers
    "optgate-n-nodkim": "optgate N workers, no DKIM",
    "optgate-n": "optgate N workers",
    "relay": "bare relay",
}
GATEWAY_TARGETS = ("optgate", "optgate@base", "optgate-n", "optgate-nodkim", "optgate-n-nodkim")
PLAINTEXT_TARGETS = ("limit-plain", "postfix", "postfix-dkim")  # no TLS, no AUTH from the client
# The roles whose CPU is the server's: Postfix + OpenDKIM is the instance and the milter.
SERVER_ROLES = {"postfix-dkim": ("postfix-dkim", "opendkim")}


@dataclass
class Row:
    case: str
    target: str
    result: ClientResult
    seconds: float
    sink_messages: int
    sink_rcpts: int
    note: str = ""
    rcpts: int = 0  # recipients per message of the case
    dkim: str = ""  # a sample the sink got: "verified" or why not ("" = not checked)

    @property
    def rate(self) -> float:
        return self.result.messages / self.seconds

    def p(self, q: float, values: list[float] | None = None) -> float:
        return percentile(sorted(self.result.latencies_ms if values is None else values), q)

    def cpu_per_k(self, role: str) -> float | None:
        cpu = self.result.cpu_s.get(role)
        if cpu is None or not self.result.messages:
            return None
        return 1000 * cpu / self.result.messages

    @property
    def server_cpu_per_k(self) -> float | None:
        if self.target in GATEWAY_TARGETS:
            return self.cpu_per_k("gateway")
        parts = [self.cpu_per_k(role) for role in SERVER_ROLES.get(self.target, (self.target,))]
        return None if None in parts else sum(p for p in parts if p is not None)

    @property
    def total_cpu_per_k(self) -> float:
        if not self.result.messages:
            return math.nan
        return 1000 * sum(self.result.cpu_s.values()) / self.result.messages


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def render(header: list[str], body: list[list[str]]) -> str:
    """A plain text table: first two columns left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), *(line(row) for row in body)])


def table_row(r: Row, ncpu: int, per_message: bool, first: bool) -> list[str]:
    res = r.result
    window = res.window_s * ncpu
    m = {k: 100 * v / window for k, v in res.machine_s.items()} if window else {}
    ours = 100 * sum(res.cpu_s.values()) / window if window else math.nan
    other = max(0.0, m.get("busy", math.nan) - ours - m.get("irq", 0.0) - m.get("steal", 0.0))
    sut = r.server_cpu_per_k
    cells = [r.case if first else "", TARGET_LABELS[r.target], f"{r.rate:.0f}"]
    cells += [fmt(r.p(0.5)), fmt(r.p(0.99))]
    if per_message:
        cells.append(fmt(r.p(0.99, res.connect_ms), ".1f"))
    cells += [str(res.errors), fmt(sut, ".3f"), fmt(r.cpu_per_k("valkey"), ".3f")]
    cells += [fmt(r.cpu_per_k("sink"), ".3f"), fmt(r.cpu_per_k("client"), ".3f")]
    cells.append(fmt(r.total_cpu_per_k, ".3f"))
    cells += [fmt(v, ".0f") + "%" for v in (m.get("busy"), m.get("irq"), m.get("steal"), other)]
    cells.append(f"{r.sink_messages}/{r.sink_rcpts}")
    return cells


def print_table(rows: list[Row], ncpu: int, per_message: bool) -> None:
    header = ["case", "target", "msg/s", "p50 ms", "p99 ms"]
    header += ["connp99"] if per_message else []
    header += ["err", "CPU/1k: server", "valkey", "sink", "client", "total"]
    header += ["busy", "irq", "steal", "other", "sink got msgs/rcpts"]
    body = [
        table_row(r, ncpu, per_message, i == 0 or rows[i - 1].case != r.case)
        for i, r in enumerate(rows)
    ]
    print("\n" + render(header, body))


def ratio_row(case: str, other: Row, base: Row) -> list[str]:
    return [
        case,
        TARGET_LABELS[other.target],
        f"{other.rate / base.rate:.2f}x",
        fmt(other.p(0.5) / base.p(0.5), ".1f") + "x",
        fmt(other.p(0.99) / base.p(0.99), ".1f") + "x",
        fmt(other.total_cpu_per_k / base.total_cpu_per_k, ".1f") + "x",
        fmt(other.p(0.99) - base.p(0.99)),
    ]


def print_ratios(rows: list[Row]) -> None:
    by = {(r.case, r.target): r for r in rows}
    cases = list(dict.fromkeys(r.case for r in rows))
    servers = ("postfix", "postfix-dkim", *GATEWAY_TARGETS, "relay")
    body: list[list[str]] = []
    for case in cases:  # Postfix (plaintext) against the plaintext limit, the rest against TLS
        for target in servers:
            plain = target in PLAINTEXT_TARGETS and (case, "limit-plain") in by
            base = by.get((case, "limit-plain" if plain else "limit"))
            other = by.get((case, target))
            if base is not None and other is not None and base.rate:
                body.append(ratio_row(case, other, base))
    if body:
        header = ["vs harness limit", "target", "msg/s", "p50", "p99", "CPU/msg", "p99 added ms"]
        print("\n" + render(header, body))
        print("  (Postfix against the plaintext limit when it ran, the others against the TLS +")
        print("  AUTH limit)")
    body = []
    for case in cases:
        postfix = by.get((case, "postfix-dkim")) or by.get((case, "postfix"))
        for target in servers[2:]:
            other = by.get((case, target))
            if postfix is not None and other is not None and postfix.rate:
                body.append(ratio_row(case, other, postfix))
    if body:
        header = ["vs Postfix", "target", "msg/s", "p50", "p99", "CPU/msg", "p99 - Postfix p99"]
        print("\n" + render(header, body))
        print("  (against Postfix + OpenDKIM when it ran; optgate and the relay with STARTTLS +")
        print("  AUTH, Postfix plaintext without AUTH; Postfix answers after queueing)")
    print_baseline(by, cases)
    for case in cases:
        one, many = by.get((case, "optgate")), by.get((case, "optgate-n"))
        if one is None or many is None or not one.rate:
            continue
        print(
            f"\nscaling {case}: {TARGET_LABELS['optgate']} -> {TARGET_LABELS['optgate-n']}:"
            f" {many.rate / one.rate:.2f}x msg/s"
        )
        for r in (one, many):
            window = r.result.window_s or r.seconds
            share = {k: 100 * v / window for k, v in r.result.cpu_s.items()}
            used = ", ".join(f"{k} {v:.0f}%" for k, v in share.items())
            print(f"  {TARGET_LABELS[r.target]}: % of one core: {used}")
        print(
            f"  the client, the sink, valkey-server and the gateway share the same"
            f" {os.cpu_count()} cores (nothing pinned): the client does not leave a core free,"
            " so this is not the issue's 'client leaves a core free' scaling figure."
        )


def print_baseline(by: dict[tuple[str, str], Row], cases: list[str]) -> None:
    """optgate / optgate@base per case: this checkout's gateway against the baseline's."""
    body: list[list[str]] = []
    for case in cases:
        base, other = by.get((case, "optgate@base")), by.get((case, "optgate"))
        if base is not None and other is not None and base.rate:
            body.append(ratio_row(case, other, base))
    if body:
        header = ["vs optgate@base", "target", "msg/s", "p50", "p99", "CPU/msg", "p99 added ms"]
        print("\n" + render(header, body))
        print("  (this checkout's gateway against the --baseline checkout's, same run and config)")


def print_errors(rows: list[Row]) -> None:
    for r in rows:
        if r.result.errors or r.result.cut:
            samples = "; ".join(f"{n}x {text}" for text, n in r.result.error_samples.most_common(3))
            print(
                f"  errors in {r.case} / {TARGET_LABELS[r.target]}: {r.result.errors} ({samples})"
                + (f"; {r.result.cut} sessions cut after the drain time" if r.result.cut else "")
            )


def print_notes(rows: list[Row]) -> None:
    for r in rows:
        if r.note:
            print(f"  {r.case} / {TARGET_LABELS[r.target]}: {r.note}")
        if r.dkim:
            print(f"  {r.case} / {TARGET_LABELS[r.target]}: DKIM-Signature of one message the"
                  f" sink got: {r.dkim} (dkimpy, the bench key)")  # fmt: skip


def print_dkim_compare(rows: list[Row], one_size: bool) -> None:
    """--compare-dkim: each optgate row with DKIM against the same gateway without."""
    by = {(r.case, r.target): r for r in rows}
    for r in rows:
        without = by.get((r.case, f"{r.target}-nodkim"))
        if without is None or not without.rate:
            continue
        case = f"{r.rcpts}rcpt" if one_size else f"{r.case.split()[0]} {r.rcpts}rcpt"
        print(
            f"dkim {case}: with/without = {r.rate / without.rate:.2f}  ({TARGET_LABELS[r.target]};"
            f" gateway CPU per message: with {fmt(r.cpu_per_k('gateway'))} ms,"
            f" without {fmt(without.cpu_per_k('gateway'))} ms)"
        )


def print_realistic(rows: list[Row]) -> None:
    """--realistic's last lines: the best optgate row of each case against Postfix + OpenDKIM."""
    for case in dict.fromkeys(r.case for r in rows):
        here = [r for r in rows if r.case == case]
        postfix = next((r for r in here if r.target == "postfix-dkim"), None)
        best = max((r.rate for r in here if r.target in ("optgate", "optgate-n")), default=0.0)
        n = here[0].rcpts
        if postfix is None or not postfix.rate:
            why = "did not run" if postfix is None else "delivered nothing"
            print(f"realistic {n}rcpt: optgate/postfix+opendkim = n/a (Postfix + OpenDKIM {why})")
        else:
            print(f"realistic {n}rcpt: optgate/postfix+opendkim = {best / postfix.rate:.2f}")


def print_others(rows: list[Row]) -> None:
    print("  outside the benchmark, busiest processes per window (% of one core; kernel threads")
    print("  such as jbd2 (fsync journal), kworker and ksoftirqd (loopback) work for the bench):")
    for r in rows:
        window = r.result.window_s or r.seconds
        top = ", ".join(f"{name} {100 * cpu / window:.0f}%" for name, cpu in r.result.others)
        print(f"    {r.case} / {TARGET_LABELS[r.target]}: {top or '-'}")


def print_replies(rows: list[Row]) -> None:
    for r in rows:
        if r.target != "limit":
            top = ", ".join(f"{n} '{text}'" for text, n in r.result.replies.most_common(3))
            print(f"  replies {r.case} / {TARGET_LABELS[r.target]}: {top}")


def print_paced(rows: list[Row], sessions: int) -> None:
    if not rows:
        return
    print(f"\nat Postfix's rate ({sessions} sessions, paced): the latency optgate adds")
    header = ["case", "target", "msg/s", "p50 ms", "p99 ms", "p99 added ms", "errors"]
    table: list[list[str]] = []
    for row in rows:
        limit = next(r for r in rows if r.case == row.case and r.target == "limit")
        added = "" if row is limit else fmt(row.p(0.99) - limit.p(0.99))
        table.append(
            [row.case, TARGET_LABELS[row.target], f"{row.rate:.0f}", fmt(row.p(0.5)),
             fmt(row.p(0.99)), added, str(row.result.errors)]
        )  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for r in [header, *table]:
        print("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))))  # fmt: skip


def print_header(args: argparse.Namespace, root: Path, runs: int) -> None:
    mode = "a new connection per message" if args.new_connection_per_message else "persistent"
    pace = f"paced to {args.rate:.0f} msg/s" if args.rate else "as fast as possible"
    loop = f"uvloop {metadata.version('uvloop')}" if common.uvloop else "asyncio (no uvloop)"
    print(
        f"SMTP benchmark: {args.sessions} sessions, {mode} connections, {pace}, "
        f"{args.seconds:g} s measured after {args.warmup:g} s warm-up, {runs} runs"
    )
    print(
        f"machine: os.cpu_count()={os.cpu_count()}, Python {sys.version.split()[0]}, "
        f"{loop} in client/sink/relay; temp dir {root} ({fs_type(root)})"
    )
    print(
        f"recipients: {args.pool} addresses, {args.optouts} opted out, "
        f"{100 * args.optout_share:.0f}% of recipient picks hit an opted-out one"
    )
    if args.baseline is not None:
        print(f"compared: optgate = {REPO} at {checkout_rev(REPO)}, optgate@base ="
              f" {args.baseline} at {checkout_rev(args.baseline)}")  # fmt: skip
    print("processes (nothing pinned; all share the same cores):")
    print("  client    a new process per run, all sessions on one event loop; it samples the CPU")


def print_legend(per_message: bool) -> None:
    conn = "; connp99: p99 from TCP connect (STARTTLS, AUTH) to it" if per_message else ""
    print(
        f"\nlatency: MAIL to the final DATA reply{conn}.\n"
        "CPU/1k: user+system seconds of each process during the window, per 1,000 messages.\n"
        "host: CPU ms of a fixed pure-Python loop just before the run (lower = faster host;\n"
        "this VM drifts by a third within minutes without showing steal).\n"
        "busy: the whole machine, % of all cores; irq: softirq+irq (loopback TCP, charged to no\n"
        "process); steal: taken by the hypervisor; other: the rest, outside this benchmark.\n"
        "sink got: copies the sink accepted during the whole run, warm-up included (optgate\n"
        "does not forward opted-out recipients)."
    )
