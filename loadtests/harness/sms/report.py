"""The SMS benchmark's report: a row per target (requests/s, latency, statuses, the CPU of
every process, what else the machine did) and the ratios to the harness limit."""

from __future__ import annotations

import os

from harness.sms.load import ClientResult


def cpu_text(r: ClientResult, window_s: float) -> str:
    """Each process's share of one core, and its CPU per request in microseconds."""
    rate = r.done / r.window_s if r.window_s else 0.0
    parts = []
    for name, cpu in r.cpu_s.items():
        share = cpu / window_s
        text = f"{name} {share * 100:.0f}%"
        if name in r.cpu_parts:  # the supervisor and each worker
            text += " (" + " + ".join(f"{p / window_s * 100:.0f}" for p in r.cpu_parts[name]) + ")"
        if rate:
            text += f" {share / rate * 1e6:.0f}us/req"
        parts.append(text)
    return ", ".join(parts)


def report(rows: list[tuple[str, ClientResult]], connections: int, fsync_ms: str) -> None:
    cores = os.cpu_count() or 1
    print(f"\nSMS send, {connections} connections, TLS 1.3 on every hop, {cores} cores")
    print(f"fsync of the data directory's disk: {fsync_ms}\n")
    print(f"{'target':<34} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}  statuses")
    for label, r in rows:
        rate = r.done / r.window_s if r.window_s else 0.0
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items()))
        errors = f", client errors: {r.errors}" if r.errors else ""
        print(f"{label:<34} {rate:>7.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f}  {statuses}{errors}")
        w = r.cpu_window_s or 1.0
        split = (
            f"; client connections per worker: {' + '.join(map(str, r.conn_split))}"
            if len(r.conn_split) > 1
            else ""
        )
        print(f"{'':<34} CPU (% of one core): {cpu_text(r, w)}  [client: {r.client}]{split}")
        top = ", ".join(f"{name} {cpu / w * 100:.0f}%" for name, cpu in r.outside_top)
        print(
            f"{'':<34} outside the bench: {r.outside_s / w * 100:.0f}% ({top or '-'}); "
            f"steal {r.steal_s / w * 100:.0f}%; load avg before {r.load[0]:.2f}"
        )
    limit = rows[0][1]
    if limit.done:
        base = limit.done / limit.window_s
        for label, r in rows[1:]:
            print(
                f"{label.split(' (')[0]} / harness limit: {r.done / r.window_s / base:.2f} of "
                f"the throughput; p99 added: {r.p99_ms - limit.p99_ms:.2f} ms"
            )
    print(
        "\nCPU: user+system of each process over the measured window (gateway: the serve "
        "process and\nits workers, not valkey). outside the bench: every other process in that "
        "window (kernel\nthreads such as jbd2, the fsync journal, work for the bench too)."
    )
