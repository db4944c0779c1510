"""Opening the configured opt-out store: the embedded server when `[redis] url` is empty,
the key check, the layout migration and the sentinel. Shared by `optgate serve`, its
supervisor and every CLI command that needs the store."""

from __future__ import annotations

import structlog

from gateway.config import Config
from gateway.core.keys import Keyring
from gateway.store import sentinel
from gateway.store.embedded import EmbeddedRedis
from gateway.store.redis_store import OptOutStore
from gateway.store.sentinel_check import SENTINEL_FIX

log = structlog.get_logger("optgate")


async def open_store(
    cfg: Config, ring: Keyring, *, quiet: bool = False
) -> tuple[OptOutStore, EmbeddedRedis | None]:
    """The configured store, starting (or attaching to) the embedded server when url is empty.

    The store's sentinel is written on the first start and required from then on
    (`store.sentinel`): a store that lost it opens, but every read of records fails
    closed until `optgate store init --force`. `quiet`: say so only in the errors raised
    (a command line prints its one line), not in the log as well."""
    embedded = None
    url = cfg.redis.url
    if not url:
        embedded = await EmbeddedRedis.ensure(cfg.gateway.data_dir)
        url = embedded.url
    store = OptOutStore.from_url(url, keyring=ring, timeout_ms=cfg.redis.timeout_ms)
    store.sentinel.quiet = quiet
    try:
        # First: every write below (the sentinel's too) waits for the replicas it needs.
        warning = await store.configure_replicas(cfg.redis.min_replicas_acked)
        if warning and not quiet:
            log.warning("store_replicas_missing", detail=warning)
        await store.check_keyring()
        moved = await store.migrate_layout()
        if moved:
            log.info("store layout: records moved into hash buckets", records=moved)
        held = await sentinel.ensure(store, cfg.keys.file)
        if held.found != "ok" and not quiet:
            log.error("store_sentinel_missing", reason=held.found, fix=SENTINEL_FIX)
    except BaseException:
        await store.close()
        if embedded is not None:
            await embedded.release()
        raise
    return store, embedded
