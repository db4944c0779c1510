"""Real Redis/Valkey servers for tests: standalone and a 3-master Cluster (with replicas
if asked), loopback only.

Every process is started here with ``start_new_session`` and tracked by pid; ``stop()``,
``kill()`` and an atexit hook end only those pids, and where setpriv(1) is available the
kernel ends them with the test process too (a run killed by a timeout runs no atexit
hook). ``pause()``/``resume()`` are SIGSTOP and SIGCONT (a slow store), ``kill()`` is
SIGKILL (a store down or restarted). `running_cluster()` is the one way tests get a
Cluster: started, or the test skipped, and every node it ever started ended after.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.store.server_process import find_server_binary
from tests.support.ports import free_port

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
CLUSTER_TIMEOUT_S = 20.0

_STARTED: dict[int, subprocess.Popen[bytes]] = {}
# setpriv --pdeathsig: the server gets SIGKILL when the thread that started it (the test
# process's) dies, however it dies; the setting survives the exec into the server.
_SETPRIV = shutil.which("setpriv")


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL `proc` (by its pid) if it still runs, reap it, and stop tracking it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)
    _STARTED.pop(proc.pid, None)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_STARTED.values()):
        _end(proc)


def cli_binary() -> str | None:
    """valkey-cli beside the server binary, else one from PATH."""
    beside = Path(find_server_binary()).with_name("valkey-cli")
    if beside.exists():
        return str(beside)
    return shutil.which("valkey-cli") or shutil.which("redis-cli")


def short_tempdir(prefix: str = "og-") -> Path:
    """A temp dir short enough for a unix socket path (pytest's tmp_path may not be)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass
class RedisServer:
    """One server process on 127.0.0.1:`port` with its data in `home`."""

    home: Path
    binary: str = field(default_factory=find_server_binary)
    port: int = field(default_factory=free_port)
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    _admin: redis.Redis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RedisServer:
        self.home.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.home),
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.home / "server.log"),
            *self.args,
        ]  # fmt: skip
        if _SETPRIV is not None:
            argv = [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True
        )
        _STARTED[self.proc.pid] = self.proc
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with self.client() as c:
                    c.ping()
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.02)
            else:
                return self
        self.kill()
        log = (self.home / "server.log").read_text(errors="replace")[-500:]
        raise RuntimeError(f"{self.binary} did not start on port {self.port}: {log}")

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    @property
    def admin(self) -> redis.Redis:
        """One long-lived connection, so that reading stats adds no connection handshake."""
        if self._admin is None:
            self._admin = redis.Redis(
                host="127.0.0.1", port=self.port, socket_timeout=2.0, single_connection_client=True
            )
        return self._admin

    def info(self, *sections: str) -> dict[str, Any]:
        first, *rest = sections or ("default",)
        return dict(self.admin.info(first, *rest))

    def reset_stats(self) -> None:
        self.admin.config_resetstat()

    def _drop_admin(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync."""
        self._drop_admin()
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.pid, signal.SIGCONT)
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        _STARTED.pop(self.proc.pid, None)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown; SIGKILL if it does not exit in time."""
        self._drop_admin()
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.pid, signal.SIGCONT)
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        _STARTED.pop(self.proc.pid, None)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()


def start_standalone(
    home: Path, *, binary: str | None = None, appendfsync: str | None = "always"
) -> RedisServer:
    """A standalone server; `appendfsync=None` runs it without an AOF (a cache-style Redis)."""
    args = ["--appendonly", "no"]
    if appendfsync is not None:
        args = ["--appendonly", "yes", "--appendfsync", appendfsync]
    server = RedisServer(home=home, args=args)
    if binary is not None:
        server.binary = binary
    return server.start()


@dataclass
class Cluster:
    """Three masters, each with `replicas` replicas (none by default), slots split by
    `valkey-cli --cluster create`."""

    home: Path
    nodes: list[RedisServer] = field(default_factory=list)
    replicas: int = 0
    # Longer than any pause a test makes, so a paused node is not failed; a failover test
    # sets it low, so that a killed primary's replica is promoted within about that time.
    node_timeout_ms: int = 5000
    # Every node process this cluster started, replaced nodes' too: `stop()` ends them all.
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> Cluster:
        cli = cli_binary()
        if cli is None:
            raise RuntimeError("no valkey-cli/redis-cli to create the cluster")
        for i in range(3 * (1 + self.replicas)):
            home = self.home / f"node{i}"
            node = RedisServer(
                home=home,
                args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(home / "nodes.conf"),
                    "--cluster-port", str(free_port()),
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--appendonly", "yes",
                    "--appendfsync", "always",
                ],
            )  # fmt: skip
            self.nodes.append(node)
            self._start(node)
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
        result = subprocess.run(
            [*create, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True,
            timeout=CLUSTER_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"cluster create failed: {result.stdout[-500:]!r}")
        deadline = time.monotonic() + CLUSTER_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(self._ready(n) for n in self.nodes) and self._replicated():
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the cluster did not reach cluster_state:ok")
        while not self._replicas_confirm():  # a loaded machine: the links still settling
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not confirm a write in time")
            time.sleep(0.1)
        return self

    def _replicas_confirm(self) -> bool:
        """A write on every primary is fsynced there and held by its replicas within a
        second (WAITAOF, as the gateway's durable writes ask), so a test's first durable
        write does not meet replicas still finishing their first sync."""
        if not self.replicas:
            return True
        client = redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)
        try:
            return self._probe(client)
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _probe(self, client: redis.RedisCluster) -> bool:
        seen: set[str] = set()
        for i in range(200):
            key = f"og-probe-{i}"
            node = client.get_node_from_key(key)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            client.set(key, b"1")
            got = client.execute_command("WAITAOF", 1, self.replicas, 1000, target_nodes=node)
            client.delete(key)
            if int(got[0]) < 1 or int(got[1]) < self.replicas:
                return False
        return len(seen) == 3

    def _start(self, node: RedisServer) -> None:
        try:
            node.start()
        finally:
            if node.proc is not None:
                self.started.append(node.proc)

    def restart_node(self, node: RedisServer) -> RedisServer:
        """A new process for a killed `node` (same home, port and arguments) in its place:
        it rejoins the cluster from its nodes.conf."""
        back = RedisServer(home=node.home, port=node.port, args=node.args)
        self.nodes[self.nodes.index(node)] = back
        self._start(back)
        return back

    def _ready(self, node: RedisServer) -> bool:
        with node.client() as c:
            info = c.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text and f"cluster_known_nodes:{len(self.nodes)}" in text

    def _replicated(self) -> bool:
        """Every primary has its replicas connected and in sync."""
        if not self.replicas:
            return True
        primaries = self.primaries()
        if len(primaries) != 3:
            return False
        return all(self.online_replicas(p) >= self.replicas for p in primaries)

    @staticmethod
    def online_replicas(primary: RedisServer) -> int:
        """Replicas of `primary` past their first sync (state online, not wait_bgsave)."""
        info = primary.info("replication")
        count = int(info.get("connected_slaves", 0))
        return sum(
            1 for i in range(count) if dict(info.get(f"slave{i}") or {}).get("state") == "online"
        )

    def alive(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def primaries(self) -> list[RedisServer]:
        """The live nodes that are primaries now (by their own INFO replication)."""
        out = []
        for node in self.alive():
            with contextlib.suppress(redis.RedisError):
                if node.info("replication").get("role") == "master":
                    out.append(node)
        return out

    def replicas_of(self, primary: RedisServer) -> list[RedisServer]:
        """The live nodes replicating `primary`."""
        out = []
        for node in self.alive():
            with contextlib.suppress(redis.RedisError):
                info = node.info("replication")
                if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port:
                    out.append(node)
        return out

    def wait_state_ok(self, timeout_s: float = CLUSTER_TIMEOUT_S) -> bool:
        """Wait until every live node says cluster_state:ok (a failover is complete)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ok = True
            for node in self.alive():
                try:
                    with node.client() as c:
                        info = c.execute_command("CLUSTER", "INFO")
                except redis.RedisError:
                    ok = False
                    break
                text = info.decode() if isinstance(info, bytes) else str(info)
                ok = ok and "cluster_state:ok" in text
            if ok:
                return True
            time.sleep(0.05)
        return False

    def node_for_slot(self, slot: int) -> RedisServer:
        with self.nodes[0].client() as c:
            shards = c.execute_command("CLUSTER", "SLOTS")
        for start, end, primary, *_ in shards:
            if start <= slot <= end:
                port = int(primary[1])
                return next(n for n in self.nodes if n.port == port)
        raise LookupError(slot)

    def stop(self) -> None:
        """Stop every node cleanly, then SIGKILL by pid whatever this cluster started that
        still runs (a node whose stop failed, or one a test replaced without stopping)."""
        try:
            for node in self.nodes:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    node.stop()
        finally:
            for proc in self.started:
                _end(proc)


@contextlib.contextmanager
def running_cluster(
    prefix: str, *, replicas: int = 0, node_timeout_ms: int = 5000
) -> Iterator[Cluster]:
    """A started Cluster in a short temp dir named `prefix`, the test skipped if loopback
    cannot host one; afterwards every node it started is ended and its dir removed."""
    c = Cluster(home=short_tempdir(prefix), replicas=replicas, node_timeout_ms=node_timeout_ms)
    try:
        try:
            c.start()
        except (RuntimeError, OSError, subprocess.SubprocessError, redis.RedisError) as exc:
            shape = f"with {replicas} replica(s) per primary " if replicas else ""
            pytest.skip(f"could not start a 3-master cluster {shape}on loopback: {exc}")
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.home, ignore_errors=True)
