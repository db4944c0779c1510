"""Three gateway processes on one 3-master Redis Cluster share opt-out state
(docs/guarantees.md §2.3, §6)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.support.processes import (
    ServeProcess,
    base_doc,
    free_port,
    opt_out,
    optgate,
    send,
    with_upstream,
    write_config,
)
from tests.support.redis_servers import Cluster
from tests.support.smtp_sink import Sink, TestPki

pytestmark = pytest.mark.slow


async def test_three_gateways_on_a_cluster_enforce_one_opt_out(
    cluster: Cluster, tmp_path: Path, pki: TestPki, sink: Sink
) -> None:
    gateways: list[ServeProcess] = []
    try:
        for name in ("gw-1", "gw-2", "gw-3"):
            port = free_port()
            doc = with_upstream(base_doc(tmp_path, pki, sink, name, port), sink, pki)
            doc["redis"] = {"url": cluster.url, "timeout_ms": 500}
            # Each gateway has its own data dir (nothing shared but the store and the key file).
            doc["gateway"]["data_dir"] = str(tmp_path / name)
            doc["keys"] = {"file": str(tmp_path / "keys.json")}
            cfg = write_config(tmp_path / f"{name}.toml", doc)
            gateways.append(ServeProcess(cfg, port, tmp_path / f"{name}.log"))
        for gw in gateways:
            await gw.wait_ready()
        recipients = [f"pat{i}@example.org" for i in range(12)]  # spread over the three masters
        for gw in gateways:
            code, text = await send(pki, gw.port, recipients)
            assert code == 250 and "0 of 12" in text, text
        opt_out(gateways[0].config, "pat7@example.org")
        for gw in gateways:
            code, text = await send(pki, gw.port, recipients)
            assert code == 250 and "1 of 12 recipients suppressed" in text, text
        got = orjson.loads(
            optgate(
                "optout", "get", "--channel", "email", "pat7@example.org", config=gateways[2].config
            ).stdout
        )
        assert got["all"] is True
    finally:
        for gw in gateways:
            gw.stop()
