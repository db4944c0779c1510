"""Starting the benchmark's targets side by side (the sink, the gateways, the bare relay,
Postfix, Postfix + OpenDKIM), one measured client run against one of them, and stopping
them in order. With a DKIM key (--dkim, --realistic), each run of a signing target ends by
checking one message the sink received from it (the sink keeps one on request)."""

from __future__ import annotations

import argparse
import secrets
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.common import MP, REPO, Child, free_ports, start_child
from harness.host import host_speed_ms
from harness.smtp.client import ClientSpec, run_client
from harness.smtp.dkimkey import RSA_BITS, DkimKey, make_key, verify
from harness.smtp.gateway import CATEGORY, GatewayProcess, audit_fsyncs, fsync_summary
from harness.smtp.opendkim import OpenDkim, installed
from harness.smtp.postfix import Postfix, ensure_installed
from harness.smtp.relay import BareValkey, RelaySpec, relay_main
from harness.smtp.report import GATEWAY_TARGETS, PLAINTEXT_TARGETS, TARGET_LABELS, Row, fmt
from harness.smtp.sink_process import SinkOptions, sink_main
from harness.tls import make_pki

POSTFIX_DRAIN_S = 60.0  # after a Postfix run: how long to wait for its queue to empty


@dataclass
class Bench:
    args: argparse.Namespace
    root: Path
    allowed: tuple[str, ...]
    opted_out: tuple[str, ...]
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    children: list[Child] = field(default_factory=list)
    counts: Any = None
    gateways: dict[str, GatewayProcess] = field(default_factory=dict)  # target -> its gateway
    bare: BareValkey | None = None
    postfixes: dict[str, Postfix] = field(default_factory=dict)  # target -> its instance
    opendkim: OpenDkim | None = None
    dkim: DkimKey | None = None
    ports: dict[str, tuple[int, ...]] = field(default_factory=dict)  # STARTTLS, implicit
    watch: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    trees: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def start(self) -> None:
        self.pki = make_pki(self.root / "pki")
        self.counts = MP.RawArray("q", 3)  # messages, recipients, "keep the next message"
        if self.args.dkim:
            self.dkim = make_key(self.root / "dkim")
        options = SinkOptions(
            kind=self.args.sink, pipelining=self.args.provider, rtt_ms=self.args.rtt_ms,
            capture=self.capture,
        )  # fmt: skip
        sink, ports = start_child("sink", sink_main, self.pki, self.password, self.counts, options)
        sink_port = ports[0]  # the gateway and the relay forward with STARTTLS
        self.children.append(sink)
        self.ports["limit"] = ports
        self.ports["limit-plain"] = (ports[2], ports[2])
        self.watch["limit"] = self.watch["limit-plain"] = [("sink", sink.pid)]
        kind = "sink.py (asyncio protocol)" if self.args.sink == "lean" else "aiosmtpd"
        print(f"  sink      pid {sink.pid:<7} {kind}, STARTTLS required, TLS 1.3, counts only;")
        print("                    a third listener without TLS or AUTH for the plaintext rows")
        if self.args.provider:
            print(f"                    a provider {self.args.rtt_ms:g} ms away: PIPELINING"
                  " offered, every reply held that long (harness/smtp/sink.py)")  # fmt: skip
        if self.dkim is not None:
            print(f"  dkim      RSA-{RSA_BITS} key for d={self.dkim.domain} s={self.dkim.selector}:"
                  f" {self.dkim.key_file}")  # fmt: skip
        for target in ("postfix", "postfix-dkim"):
            if target in self.args.target_list:
                self._start_postfix(target, sink.pid, ports[2])
        for target in GATEWAY_TARGETS:
            if target in self.args.target_list:
                n_workers = target in ("optgate-n", "optgate-n-nodkim")
                n = self.args.n_workers if n_workers else self.args.workers
                self._start_gateway(target, sink.pid, sink_port, n)
        if "relay" in self.args.target_list:
            self._start_relay(sink.pid, sink_port)

    @property
    def gateway(self) -> GatewayProcess | None:
        """The gateway of this checkout with --workers (the one --profile samples)."""
        return self.gateways.get("optgate")

    @property
    def capture(self) -> Path | None:
        """Where the sink keeps the one message it is asked for (with a DKIM key only)."""
        return self.root / "sink-sample.eml" if self.args.dkim else None

    def _start_milter(self) -> str:
        """OpenDKIM for the postfix-dkim row; '' or why it cannot run."""
        assert self.dkim is not None
        why = installed()
        if why:
            return why
        self.opendkim = OpenDkim(self.root, self.dkim)
        try:
            took = self.opendkim.start()
        except (RuntimeError, OSError) as exc:
            return str(exc)
        od = self.opendkim
        print(f"  opendkim  pid {od.pid:<7} opendkim -f -x {od.conf} (Mode s, relaxed/relaxed),"
              f" {od.socket}, ready in {took:.1f} s")  # fmt: skip
        return ""

    def _start_postfix(self, target: str, sink_pid: int, plain_port: int) -> None:
        why = ensure_installed()
        if not why and target == "postfix-dkim":
            why = self._start_milter()
        pf = None
        if not why:
            pf = Postfix(
                self.root, port=free_ports(1)[0], sink_port=plain_port,
                concurrency=self.args.sessions, name=target,
                milter=self.opendkim.milter if self.opendkim and target == "postfix-dkim" else "",
            )  # fmt: skip
            try:
                took = pf.start()
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                why = f"postfix would not start: {exc}"
                pf.stop()
        master = pf.master_pid() if pf is not None and not why else None
        if pf is None or master is None:
            print(f"  {target:<9} SKIPPED: {why or 'no master.pid after start'}")
            self.args.target_list.remove(target)
            return
        self.postfixes[target] = pf
        self.ports[target] = (pf.port, pf.port)
        self.watch[target] = [("sink", sink_pid)]
        if target == "postfix-dkim" and self.opendkim is not None:
            self.watch[target].append(("opendkim", self.opendkim.pid))
        self.trees[target] = [(target, master)]
        version = (
            subprocess.run(
                ["postconf", "-d", "-h", "mail_version"],
                capture_output=True,
                timeout=30,
                check=False,
            )
            .stdout.decode()
            .strip()
        )
        print(
            f"  postfix   pid {master:<7} Postfix {version} master (+ its children), ready in"
            f" {took:.1f} s; 127.0.0.1:{pf.port}, plaintext, no AUTH, relayhost"
            f" [127.0.0.1]:{plain_port} plaintext;"
        )
        print(
            f"                    config, queue and data dirs in {pf.dir};"
            f" destination concurrency {max(20, self.args.sessions)}; log to {pf.maillog.name}"
        )
        if target == "postfix-dkim":
            print("                    smtpd_milters = OpenDKIM above; connection cache to"
                  " the sink, pipelining when offered")  # fmt: skip

    def _start_gateway(
        self, target: str, sink_pid: int, sink_port: int, workers: int
    ) -> GatewayProcess:
        base = target == "optgate@base"
        signs = self.dkim is not None and not target.endswith("-nodkim")
        name = f"gateway-base-{workers}w" if base else f"gateway-{workers}w"
        gw = GatewayProcess(
            self.root, self.pki, sink_port=sink_port, pool_size=self.args.sessions,
            password=self.password, workers=workers, name=name + ("-dkim" if signs else ""),
            source=self.args.baseline if base else REPO, dkim=self.dkim if signs else None,
        )  # fmt: skip
        origin = gw.origin()
        if origin != gw.source.resolve() / "gateway":
            raise RuntimeError(f"{target}: `gateway` imports from {origin}, not {gw.source}")
        self.gateways[target] = gw  # stopped by stop() even if it fails to start
        took = gw.start()
        print(f"  gateway   pid {gw.pid:<7} python -m gateway serve --workers {gw.workers},"
              f" ready in {took:.1f} s" + (", DKIM-signing" if signs else ""))  # fmt: skip
        if base:
            print(f"            optgate@base: the gateway of {gw.source} ({origin})")
        workers = gw.worker_pids()
        if gw.workers > 1:
            print(
                f"  workers   pids {', '.join(map(str, workers))} (CPU summed with the supervisor)"
            )
        self.ports[target] = (gw.smtp_port, gw.smtps_port)
        gateway = [("gateway", pid) for pid in dict.fromkeys([gw.pid, *workers])]
        self.watch[target] = [*gateway, ("sink", sink_pid)]
        if gw.valkey:
            self.watch[target].append(("valkey", gw.valkey.pid))
            print(
                f"  valkey    pid {gw.valkey.pid:<7} embedded valkey-server started by the gateway"
            )
        else:
            print("  valkey    (no <data_dir>/redis/server.pid: its CPU is not measured)")
        if self.opted_out:
            took = gw.optout(self.opted_out)
            n = len(self.opted_out)
            print(f"            {n} addresses opted out (optgate optout add, {took:.1f} s)")
        return gw

    def _start_relay(self, sink_pid: int, sink_port: int) -> None:
        self.bare = BareValkey(self.root / "bare-valkey")
        self.bare.load(self.opted_out)
        spec = RelaySpec(self.pki, self.password, sink_port, self.bare.socket, self.args.sessions)
        child, ports = start_child("relay", relay_main, spec)
        self.children.append(child)
        self.ports["relay"] = ports
        valkey_pid = self.bare.proc.pid
        self.watch["relay"] = [("relay", child.pid), ("sink", sink_pid), ("valkey", valkey_pid)]
        print(f"  relay     pid {child.pid:<7} bare aiosmtpd -> SMISMEMBER -> pooled aiosmtplib")
        print(f"  valkey    pid {valkey_pid:<7} the bare relay's, no persistence")

    def stop(self) -> list[str]:
        notes: list[str] = []
        for child in self.children:
            if child.role == "relay":
                child.stop()
        if self.bare is not None:
            self.bare.stop()
        for pf in self.postfixes.values():
            notes.extend(pf.stop())
        if self.opendkim is not None:
            notes.extend(self.opendkim.stop())
        for gw in self.gateways.values():
            notes.extend(gw.stop())
        for child in self.children:
            child.stop()
        return notes

    def spec(self, target: str, size: int, rcpts: int) -> ClientSpec:
        a = self.args
        return ClientSpec(
            port=self.ports[target][1 if a.implicit_tls else 0],
            implicit=a.implicit_tls,
            ca_pem=self.pki.ca_pem,
            password=self.password,
            sessions=a.sessions,
            warmup_s=a.warmup,
            seconds=a.seconds,
            size=size,
            rcpts=rcpts,
            reuse=not a.new_connection_per_message,
            rate=a.rate,
            allowed=self.allowed,
            opted_out=self.opted_out,
            optout_share=a.optout_share,
            watch=tuple(self.watch[target]),
            run_id=secrets.token_hex(4),
            plaintext=target in PLAINTEXT_TARGETS,
            watch_trees=tuple(self.trees.get(target, ())),
            multipart=a.realistic,
            category=CATEGORY if a.realistic else "",
        )

    def measure(self, case: str, target: str, spec: ClientSpec, *, label: str = "") -> Row:
        sunk = self.counts[0], self.counts[1]
        speed = host_speed_ms()
        gw = self.gateways.get(target)
        fsyncs = audit_fsyncs(gw) if gw is not None else {}
        if self.capture is not None:
            self.capture.unlink(missing_ok=True)
            self.counts[2] = 1  # the sink keeps the next message it gets
        result = run_client(spec)
        fsync_note = fsync_summary(fsyncs, audit_fsyncs(gw)) if gw is not None else ""
        row = Row(
            case, target, result, spec.seconds, self.counts[0] - sunk[0], self.counts[1] - sunk[1],
            rcpts=spec.rcpts,
        )  # fmt: skip
        if target in self.postfixes:
            row.note = self._drain_postfix(self.postfixes[target], row, sunk)
        row.dkim = self._check_dkim(case, target)
        print(
            f"  {case:<11} {label or TARGET_LABELS[target]:<18} {row.rate:7.0f} msg/s"
            f"  p50 {fmt(row.p(0.5), '.2f')} ms  p99 {fmt(row.p(0.99), '.2f')} ms"
            f"  errors {result.errors}  (host: {speed:.1f} ms)"
            + (f"\n{'':15}{fsync_note} (warm-up included)" if fsync_note else ""),
            flush=True,
        )
        return row

    def _check_dkim(self, case: str, target: str) -> str:
        """The message the sink kept during this run, for a signing target: verified or why
        not; it is kept as <root>/samples/<target> <case>.eml (see --keep)."""
        signing = target == "postfix-dkim" or (
            target in GATEWAY_TARGETS and not target.endswith("-nodkim")
        )
        if self.dkim is None or self.capture is None or not signing:
            return ""
        self.counts[2] = 0
        if not self.capture.exists():
            return "NOT checked (the sink kept no message)"
        kept = self.root / "samples" / f"{target} {case}.eml"
        kept.parent.mkdir(exist_ok=True)
        self.capture.replace(kept)
        return verify(kept.read_bytes(), self.dkim)

    def _drain_postfix(self, pf: Postfix, row: Row, sunk: tuple[int, int]) -> str:
        """Postfix queues: wait (bounded) until its queue is empty; the sink counts before/after."""
        at_end, queued = row.sink_messages, pf.queued()
        started = time.monotonic()
        while queued and time.monotonic() - started < POSTFIX_DRAIN_S:
            time.sleep(0.2)
            queued = pf.queued()
        row.sink_messages, row.sink_rcpts = self.counts[0] - sunk[0], self.counts[1] - sunk[1]
        left = f", {queued} STILL QUEUED after {POSTFIX_DRAIN_S:.0f} s" if queued else ""
        return (
            f"the sink had {at_end} messages when the client finished, {row.sink_messages} after"
            f" the queue drained ({time.monotonic() - started:.1f} s{left}); the client had"
            " 250 replies for its measured window only (warm-up and drain not counted)"
        )


def run_paced(bench: Bench, rows: list[Row], case: str, size: int, n: int) -> list[Row]:
    """The harness limit and every optgate target again, paced to Postfix's msg/s in `case`:
    the latency optgate adds when it carries the load Postfix carries at its best. (In the
    closed loop, latency is sessions / throughput, so p99 there measures throughput.)"""
    postfix = next((r for r in rows if r.case == case and r.target == "postfix"), None)
    if postfix is None or postfix.rate < 1:
        return []
    rate = round(postfix.rate)
    out: list[Row] = []
    for target in ("limit", *(t for t in bench.args.target_list if t.startswith("optgate"))):
        spec = replace(bench.spec(target, size, n), rate=float(rate))
        label = f"{TARGET_LABELS[target]} @{rate}/s"
        row = bench.measure(case, target, spec, label=label)
        row.note = f"paced to {rate} msg/s (Postfix's rate)"
        out.append(row)
    return out
