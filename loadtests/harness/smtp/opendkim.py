"""A private OpenDKIM signing milter for the Postfix + OpenDKIM row (Debian `opendkim`).

It runs in the foreground (`opendkim -f -x CONF`) as a child of the benchmark, so its pid is
known for the CPU accounting, with a config written here: Mode s (sign only), the bench
key's Domain, Selector and KeyFile, Canonicalization relaxed/relaxed (as the gateway signs),
listening on a unix socket in its own directory, mode 0666 so that Postfix's smtpd (the
postfix user) can connect. A loopback TCP socket cost ~90 ms per message here, most likely
Nagle's algorithm against delayed ACKs on the milter conversation's many small writes (with
1 session: Postfix alone 2.8 ms p50, with OpenDKIM on inet 93 ms, on the
unix socket 8.9 ms; Debian's own default is a unix socket too). Everything else is
OpenDKIM's default, which is what a platform team gets from the package: it signs mail from
InternalHosts (127.0.0.1) whose From domain is `Domain`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from harness.smtp.dkimkey import DkimKey

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


def installed() -> str:
    """'' when the opendkim binary is there, else why not."""
    if shutil.which("opendkim"):
        return ""
    return "opendkim is not installed (apt-get install opendkim)"


class OpenDkim:
    def __init__(self, root: Path, key: DkimKey) -> None:
        self.dir = root / "opendkim"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # the postfix user reaches the socket through it
        self.conf = self.dir / "opendkim.conf"
        self.log = self.dir / "opendkim.log"
        self.path = self.dir / "milter.sock"  # well under sun_path's 108 bytes under /tmp
        self.socket = f"local:{self.path}"
        self.proc: subprocess.Popen[bytes] | None = None
        settings = {
            "Mode": "s",
            "Domain": key.domain,
            "Selector": key.selector,
            "KeyFile": str(key.key_file),
            "Canonicalization": "relaxed/relaxed",
            "Socket": self.socket,
            "PidFile": str(self.dir / "opendkim.pid"),
            "UserID": "root",  # no switch: the key file is the benchmark's, under its temp dir
            "RequireSafeKeys": "false",  # the key is 0644 in a temp dir, which it would refuse
            "Background": "false",
            "AutoRestart": "false",
            "Syslog": "false",
            "UMask": "000",  # the socket 0666: smtpd connects as the postfix user
        }
        self.conf.write_text("".join(f"{k} {v}\n" for k, v in settings.items()))

    @property
    def milter(self) -> str:
        """Postfix's name for the socket (smtpd_milters)."""
        return f"unix:{self.path}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        started = time.monotonic()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["opendkim", "-f", "-x", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        while time.monotonic() - started < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opendkim exited {self.proc.returncode}: {self.tail()}")
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(self.path))
                    return time.monotonic() - started
                except OSError:
                    time.sleep(0.1)
        raise RuntimeError(f"opendkim did not listen on {self.socket}: {self.tail()}")

    def tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-3:])
        except OSError:
            return ""

    def stop(self) -> list[str]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return [f"opendkim still running {STOP_TIMEOUT_S:.0f} s after SIGTERM: SIGKILL"]
        return []
