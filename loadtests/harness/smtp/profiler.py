"""--profile: py-spy attached to one gateway worker for one client run's measurement
window, summarised as the event loop's top functions, own time by component, the
gateway's functions by inclusive time, and what the other threads did."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness.common import REPO
from harness.smtp.client import ClientSpec, run_client
from harness.smtp.gateway import GatewayProcess

PROFILE_HZ = 100


def frame_key(frame: str) -> tuple[str, str]:
    """'func (path/file.py:12)' -> ('func', 'path/file.py')."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0] if where.endswith(tuple("0123456789")) else where
    for marker in ("site-packages/", "python3.11/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return name, path


def area_of(path: str) -> str:
    for marker, label in (
        ("aiosmtpd/", "aiosmtpd (server)"),
        ("aiosmtplib/", "aiosmtplib (upstream client)"),
        ("redis/", "redis-py"),
        ("structlog/", "structlog"),
        ("email/", "email (stdlib)"),
        ("asyncio/", "asyncio (Python part)"),
        ("uvloop", "uvloop"),
        ("ssl.py", "ssl.py"),
        ("orjson", "orjson"),
        ("cryptography", "cryptography"),
        ("hashlib", "hashlib"),
        ("concurrent/", "thread pool"),
        ("threading.py", "thread pool"),
    ):
        if marker in path:
            return label
    if path.startswith("gateway/"):
        return "gateway/" + path.split("/")[1].removesuffix(".py")
    if path.startswith(("lib", "0x")) or ".so" in path:
        return f"native ({path})"
    return "other: " + path


NOTES = {
    (
        "Runner.run",
        "asyncio/runners.py",
    ): "uvloop's C code: epoll, socket I/O, its own TLS, callbacks",
    ("_worker", "concurrent/futures/thread.py"): "an executor thread waiting for work",
}


@dataclass
class ThreadProfile:
    samples: int = 0
    own: Counter[tuple[str, str]] = field(default_factory=Counter)
    inclusive: Counter[tuple[str, str]] = field(default_factory=Counter)
    areas: Counter[str] = field(default_factory=Counter)
    # leaf -> the nearest gateway/ function above it: which of our calls led there
    via: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)


def read_profile(raw: Path) -> dict[str, ThreadProfile]:
    """py-spy raw stacks ('thread (tid): name;frame;...;leaf count') per thread name."""
    threads: dict[str, ThreadProfile] = {}
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        name = frames.pop(0).split(": ", 1)[-1] if frames[0].startswith("thread (") else "all"
        keys = [frame_key(f) for f in frames if f]
        if not keys:
            continue
        count = int(count_text)
        t = threads.setdefault(name, ThreadProfile())
        t.samples += count
        t.own[keys[-1]] += count
        t.areas[area_of(keys[-1][1])] += count
        for key in set(keys):
            t.inclusive[key] += count
        caller = next((k[0] for k in reversed(keys[:-1]) if k[1].startswith("gateway/")), "")
        t.via.setdefault(keys[-1], Counter())[caller] += count
    return threads


def summarize_profile(raw: Path, top: int, window_samples: float) -> str:
    threads = read_profile(raw)
    if not threads:
        return "no samples (py-spy could not read the process?)"
    main_name = (
        "MainThread" if "MainThread" in threads else max(threads, key=lambda n: threads[n].samples)
    )
    out = [
        "samples by thread (% of the window's wall time, py-spy counts a thread blocked in a"
        " syscall such as fsync as active):"
    ]
    out += [
        f"  {name}: {t.samples} ({100 * t.samples / window_samples:.0f}%)"
        for name, t in threads.items()
    ]
    main = threads[main_name]
    out.append(
        f"\n{main_name} (the event loop), top {top} functions by own time"
        f" (% of its {main.samples} samples; total = inclusive):"
    )
    out.append(f"{'self%':>6} {'total%':>7}  function (file) <- nearest gateway caller")
    for key, n in main.own.most_common(top):
        note = f"  [{NOTES[key]}]" if key in NOTES else ""
        caller = main.via[key].most_common(1)[0][0]
        via = f" <- {caller}" if caller else ""
        pct, incl = 100 * n / main.samples, 100 * main.inclusive[key] / main.samples
        out.append(f"{pct:6.1f} {incl:7.1f}  {key[0]} ({key[1]}){via}{note}")
    out.append(f"\n{main_name} own time by component:")
    out += [f"{100 * n / main.samples:6.1f}  {name}" for name, n in main.areas.most_common(12)]
    ours = [(k, n) for k, n in main.inclusive.most_common() if k[1].startswith("gateway/")]
    out.append(f"\n{main_name}, gateway functions by inclusive time:")
    out += [f"{100 * n / main.samples:6.1f}  {k[0]} ({k[1]})" for k, n in ours[:12]]
    for name, t in threads.items():
        if name != main_name:
            leaves = ", ".join(
                f"{k[0]} {100 * n / t.samples:.0f}%" for k, n in t.own.most_common(4)
            )
            out.append(f"\nthread {name}: {leaves}")
    return "\n".join(out)


def profile(gw: GatewayProcess, spec: ClientSpec, out_dir: Path, *, native: bool, top: int) -> str:
    """py-spy the gateway during one client run's measurement window; a text summary."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        return "py-spy not found: .venv/bin/pip install py-spy"
    raw, log_path = out_dir / "gateway-profile.txt", out_dir / "py-spy.log"
    duration = max(1, math.floor(spec.seconds))
    pid = gw.worker_pids()[0]  # with several workers: the first one
    cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(duration), "--rate"]
    cmd += [str(PROFILE_HZ), "--format", "raw", "--threads", "--output", str(raw)]
    cmd += ["--native"] if native else []
    spies: list[subprocess.Popen[bytes]] = []
    with log_path.open("wb") as log:

        def attach() -> None:  # when the client's window opens: warm-up is not sampled
            spies.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log))

        result = run_client(spec, on_begin=attach)
        for spy in spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
    if not spies or spies[0].returncode != 0 or not raw.exists():
        return f"py-spy failed: {log_path.read_text(errors='replace')}"
    window = result.window_s or spec.seconds
    gw_cpu = 100 * result.cpu_s.get("gateway", math.nan) / window
    frames = "Python + native" if native else "Python"
    head = (
        f"profiled run: {result.messages / spec.seconds:.0f} msg/s, gateway CPU {gw_cpu:.0f}% of"
        f" one core, sampled {duration} s at {PROFILE_HZ} Hz ({frames} frames; native code"
        " counts in the Python function that called it)"
    )
    return head + "\n" + summarize_profile(raw, top, duration * PROFILE_HZ)
