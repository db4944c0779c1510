"""A private Postfix instance for bench_smtp.py: loopback only, relaying to the bench sink.

Installed with apt-get when missing (root only), configured in a directory of its own under
the benchmark's temp dir (main.cf, master.cf, queue_directory, data_directory, maillog), run
with `postfix -c DIR start` and stopped with `postfix -c DIR stop`. It listens on
127.0.0.1:PORT without TLS or AUTH (mynetworks = 127.0.0.0/8 may relay), delivers nothing
locally and relays everything to `[127.0.0.1]:SINK` in plaintext.

With `milter` (the Postfix + OpenDKIM row): every message passes that milter
(`smtpd_milters`, `non_smtpd_milters`; `milter_default_action = tempfail`, so a message
the milter did not see is refused rather than sent unsigned), and the SMTP client keeps its
connections to the sink (`smtp_connection_cache_destinations`) and pipelines on them
(Postfix uses PIPELINING whenever the server offers it). The instance lives in
`<root>/<name>`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 30.0
INSTALL_TIMEOUT_S = 300.0
QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold")

# chroot off everywhere ("n"): the queue is in a temp dir, not a prepared chroot jail.
MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def ensure_installed() -> str:
    """'' when postfix is (now) installed, else why not."""
    if shutil.which("postfix") and shutil.which("postconf"):
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "postfix is not installed and we are not root with apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(
            ["debconf-set-selections"],
            input=b"postfix postfix/main_mailer_type select No configuration\n",
            env=env, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", "postfix"],
            env=env, capture_output=True, timeout=INSTALL_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get install postfix failed: {exc}"
    if done.returncode != 0 or not shutil.which("postfix"):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        return f"apt-get install postfix exited {done.returncode}: {' '.join(tail)}"
    return ""


class Postfix:
    """One private instance: `start()` returns the seconds it took to answer 220."""

    def __init__(
        self, root: Path, *, port: int, sink_port: int, concurrency: int, milter: str = "",
        name: str = "postfix",
    ) -> None:  # fmt: skip
        self.dir = root / name
        self.conf = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.maillog = self.dir / "maillog"
        self.port = port
        self.started = False
        self.conf.mkdir(parents=True, exist_ok=True)
        self.queue.mkdir(exist_ok=True)  # postfix creates what is inside, not the directory
        # Postfix's daemons run as the postfix user: they must reach the queue under the
        # (0700) temp dir.
        for path in (root, self.dir, self.conf):
            path.chmod(0o755)
        limit = max(20, concurrency)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.dir / "data"),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.dir),
            "myhostname": "postfix.bench",
            "mydomain": "bench",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 no local delivery",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject",
            "smtpd_peername_lookup": "no",
            "smtpd_tls_security_level": "none",
            "relayhost": f"[127.0.0.1]:{sink_port}",
            "smtp_tls_security_level": "none",
            "default_destination_concurrency_limit": str(limit),
            "smtp_destination_concurrency_limit": str(limit),
            "smtputf8_enable": "no",
            "biff": "no",
        }
        if milter:
            settings |= {
                "smtpd_milters": milter,
                "non_smtpd_milters": "$smtpd_milters",
                "milter_default_action": "tempfail",
                "smtp_connection_cache_destinations": f"[127.0.0.1]:{sink_port}",
            }
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.conf / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{port}"))

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["postfix", "-c", str(self.conf), *args],
            capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip

    def start(self) -> float:
        started = time.monotonic()
        done = self._postfix("start")
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace").strip() or self._why()
            raise RuntimeError(f"postfix -c {self.conf} start exited {done.returncode}: {out}")
        self.started = True
        deadline = started + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(512).startswith(b"220"):
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"postfix did not answer on 127.0.0.1:{self.port} in 30 s")

    def _why(self) -> str:
        """postfix prints its fatal errors only to a terminal: ask `check` again under one."""
        if not shutil.which("script"):
            return self.log_tail()
        cmd = f"postfix -c {self.conf} check"
        done = subprocess.run(
            ["script", "-qc", cmd, "/dev/null"], capture_output=True, timeout=60, check=False
        )
        return done.stdout.decode(errors="replace").strip() or self.log_tail()

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def queued(self) -> int:
        """Messages still in the queue (files under its queue directories)."""
        n = 0
        for name in QUEUE_DIRS:
            for _, _, files in os.walk(self.queue / name):
                n += len(files)
        return n

    def log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> list[str]:
        if not self.started:
            return []
        done = self._postfix("stop")
        self.started = False
        if done.returncode != 0:
            return [f"postfix stop exited {done.returncode}: {done.stderr.decode().strip()}"]
        return []
