"""CPU accounting: user+system seconds of the benchmark's processes (from /proc via psutil),
of the whole machine, and of every process outside the benchmark."""

from __future__ import annotations

from collections.abc import Collection

import psutil  # type: ignore[import-untyped]


def cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


def total_cpu_seconds(pids: list[int]) -> float:
    """user+system seconds of these processes together (those gone count nothing)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def tree_pids(pid: int, exclude: set[int]) -> list[int]:
    """A process and its live descendants, but exclude."""
    try:
        root = psutil.Process(pid)
        return [p.pid for p in (root, *root.children(recursive=True)) if p.pid not in exclude]
    except psutil.Error:
        return []


def tree_cpu(pid: int) -> dict[int, float]:
    """pid -> user+system seconds of a process and all its live descendants; key -pid: the
    children it has reaped (Postfix's daemons exit after max_use requests: still counted)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        reaped = root.cpu_times()
    except psutil.Error:
        return {}
    out = {-pid: float(reaped.children_user + reaped.children_system)}
    for proc in procs:
        cpu = cpu_seconds(proc)
        if cpu is not None:
            out[proc.pid] = cpu
    return out


def machine_cpu() -> dict[str, float]:
    """Machine CPU seconds since boot, all cores summed: busy, irq (+softirq), steal.

    Loopback TCP is mostly processed in softirq context, which Linux does not charge to any
    process: it shows here as irq."""
    t = psutil.cpu_times()
    irq = float(getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))
    steal = float(getattr(t, "steal", 0.0))
    return {"busy": float(t.user + t.nice + t.system) + irq + steal, "irq": irq, "steal": steal}


def all_process_cpu(exclude: Collection[int] = ()) -> dict[int, tuple[str, float]]:
    """pid -> (name, user+system seconds) of every process (kernel threads too) but exclude."""
    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if proc.pid not in exclude and times is not None:
            out[proc.pid] = (proc.info["name"] or "?", float(times.user + times.system))
    return out


def top_others(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], n: int = 3
) -> list[tuple[str, float]]:
    """The n processes outside the benchmark that used the most CPU between two scans."""
    used: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        start = before.get(pid, (name, 0.0))[1]
        if cpu - start > 0:
            used[name] = used.get(name, 0.0) + cpu - start
    return sorted(used.items(), key=lambda item: item[1], reverse=True)[:n]
