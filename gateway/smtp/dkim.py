"""DKIM signing (dkimpy), after every change to a message, off the event loop.

- Keys: the `[[dkim]]` entries, read and checked once at start (`load_keys`): RSA of at
  least 1024 bits (RFC 8301 §3.2; use 2048) or Ed25519 (RFC 8463), PEM in PKCS#1 or PKCS#8.
  Each key signs a probe message at load, so a key that cannot sign stops the start with a
  `ConfigError` instead of failing the first message.
- Which keys: every key whose domain is the domain of the message's one From mailbox
  (IDNs as A-labels), and only a domain its sender may use (`[[senders]] from_domains`;
  none set: any configured domain). Two keys for a domain (RSA and Ed25519, RFC 8463 §3) add two
  signatures.
- `h=`: each of `SIGNED` as often as it is present, then `OVERSIGNED` once more, present
  or not (RFC 6376 §5.4.2, §8.15): nobody can add a second From or Subject, nor a
  List-Unsubscribe or List-Unsubscribe-Post of their own, without breaking the signature.
  RFC 8058 §4 requires both list headers in `h=`; Postal and SendGrid shipped without it.
- `c=relaxed/relaxed`: survives the header refolding and trailing-space changes that
  providers make; the body is passed through byte for byte anyway.

Off the loop: dkimpy does RSA in pure Python (CRT `pow()` on 1024-bit halves, which holds
the GIL). Measured on this project's 2-core machine (`bench()`, and 20 pooled clients
sending 10 KB one-click messages through the whole gateway to a TLS sink):

    per signature        RSA-2048 9-11 ms (~100/s on one core)   Ed25519 ~1 ms
    loop lag p99         inline: seconds   thread: 15 ms   process: 4 ms (RSA, 300 queued)
    gateway msg/s        no DKIM ~165   RSA in a thread pool ~62   RSA in a process ~92

A thread pool does not help under the GIL: every `pow()` stalls the loop and the sessions
it serves, so the gateway moved a third fewer messages than with a process. A process
(spawned, never forked from a threaded loop; the keys loaded once in it) leaves the loop
free and adds a core. A second signing process gave under 10 % more here, because
`serve --workers N` already puts one gateway per core.
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Literal

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gateway.config import DkimKey
from gateway.core.addresses import domain_a_label, header_from_domain
from gateway.errors import ConfigError, OptgateError

SIGNED = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
    "in-reply-to", "references", "mime-version", "content-type",
    "content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post",
)  # fmt: skip
OVERSIGNED = (
    "from", "reply-to", "to", "cc", "subject", "date", "message-id",
    "list-unsubscribe", "list-unsubscribe-post",
)  # fmt: skip
CANONICALIZE = (b"relaxed", b"relaxed")
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: signers MUST use at least 1024 bits (SHOULD 2048)
# One signing process per gateway process: `serve --workers N` already runs one gateway per
# core, so more would only compete with the event loops for the same cores.
SIGNING_PROCESSES = 1
_PROBE = b"From: probe@example.invalid\r\nSubject: probe\r\n\r\nprobe\r\n"

Mode = Literal["process", "thread", "inline"]


class SigningFailed(OptgateError):
    """A message could not be signed. `permanent`: dkimpy refused this message (a retry
    would fail the same way); otherwise the signing process died (a retry may succeed)."""

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyMaterial:
    """One key, in the form dkimpy takes. Picklable: it is handed to the signing process."""

    domain: str  # lower-case A-label
    selector: str
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    private: bytes  # PKCS#1 PEM (RSA) or the base64 seed (Ed25519)
    dns_txt: str  # the TXT record to publish at <selector>._domainkey.<domain>


def _a_label(domain: str) -> str:
    """IDNA 2008 A-label (the one canonicaliser, `core.addresses`); UnicodeError if invalid."""
    a_label = domain_a_label(domain.strip().rstrip("."))
    if a_label is None:
        raise UnicodeError("not a valid IDNA 2008 domain")
    return a_label


def load_key(entry: DkimKey) -> KeyMaterial:
    """Read and check one `[[dkim]]` key (raises ConfigError naming the entry)."""
    where = f"[[dkim]] {entry.domain}/{entry.selector}"
    try:
        pem = entry.key_file.read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {entry.key_file}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {entry.key_file} is not an unencrypted PEM key") from exc
    public = serialization.PublicFormat
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"{where}: RSA keys need at least {MIN_RSA_BITS} bits")
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, public.SubjectPublicKeyInfo
        )
        algorithm, k, p = b"rsa-sha256", "rsa", base64.b64encode(spki).decode()
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        private = base64.b64encode(seed)
        raw_public = key.public_key().public_bytes(serialization.Encoding.Raw, public.Raw)
        algorithm, k, p = b"ed25519-sha256", "ed25519", base64.b64encode(raw_public).decode()
    else:
        raise ConfigError(f"{where}: only RSA and Ed25519 keys can sign DKIM")
    try:
        domain = _a_label(entry.domain)
    except UnicodeError:
        raise ConfigError(f"{where}: domain is not a valid IDNA 2008 domain") from None
    material = KeyMaterial(
        domain=domain,
        selector=entry.selector,
        algorithm=algorithm,
        private=private,
        dns_txt=f"v=DKIM1; k={k}; p={p}",
    )
    try:
        _signature(material, _PROBE)
    except SigningFailed as exc:
        raise ConfigError(f"{where}: the key cannot sign ({exc})") from exc
    return material


def load_keys(entries: Sequence[DkimKey]) -> tuple[KeyMaterial, ...]:
    """Every configured key, checked; every problem in one ConfigError."""
    keys, problems = [], []
    for entry in entries:
        try:
            keys.append(load_key(entry))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return tuple(keys)


def from_domain(values: Sequence[str]) -> str | None:
    """The A-label domain of a message's single From mailbox, or None (no key applies).

    The From binding's own reading (`core.addresses.header_from_domain`), so a message is
    signed only for the domain that was checked, and a From in a form that readers may take
    apart differently (lists, groups, routes, quoted local parts) is never signed.
    """
    return header_from_domain(values)


def header_list(names: Sequence[str]) -> list[bytes]:
    """The `h=` list for a message whose header fields are `names` (in order)."""
    present = [n.lower() for n in names if n.lower() in SIGNED]
    return [n.encode() for n in (*present, *OVERSIGNED)]


def _signature(key: KeyMaterial, data: bytes) -> bytes:
    """One complete DKIM-Signature field (with CRLF) for `data`."""
    try:
        d = dkim.DKIM(data, signature_algorithm=key.algorithm)
        names = [name.decode("ascii", "replace") for name, _ in d.headers]
        field: bytes = d.sign(
            key.selector.encode(),
            key.domain.encode(),
            key.private,
            canonicalize=CANONICALIZE,
            include_headers=header_list(names),
        )
    except (dkim.DKIMException, ValueError, TypeError, IndexError) as exc:
        # The class only: dkimpy's messages can quote a header line, and so an address.
        raise SigningFailed(f"dkimpy refused the message ({type(exc).__name__})") from None
    return field


# -- the signing process -------------------------------------------------------------------

_WORKER_KEYS: tuple[KeyMaterial, ...] = ()


def _init_worker(keys: tuple[KeyMaterial, ...]) -> None:
    global _WORKER_KEYS  # noqa: PLW0603 - a worker process's only state, set once at its start
    _WORKER_KEYS = keys


def _ready() -> bool:
    return True


def _sign_with(keys: tuple[KeyMaterial, ...], data: bytes, which: tuple[int, ...]) -> bytes:
    return b"".join(_signature(keys[i], data) for i in which) + data


def _sign_in_worker(data: bytes, which: tuple[int, ...]) -> bytes:
    return _sign_with(_WORKER_KEYS, data, which)


# -- the gateway's side --------------------------------------------------------------------


class Signer:
    """Signs outgoing copies with the keys that match their From domain."""

    def __init__(self, keys: tuple[KeyMaterial, ...], *, mode: Mode = "process") -> None:
        self.keys = keys
        self.mode = mode
        self._executor: Executor | None = None

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(k.domain for k in self.keys)

    def _make_executor(self) -> Executor | None:
        if self.mode == "process":
            return ProcessPoolExecutor(
                SIGNING_PROCESSES,
                mp_context=multiprocessing.get_context("spawn"),  # never fork a threaded loop
                initializer=_init_worker,
                initargs=(self.keys,),
            )
        if self.mode == "thread":
            return ThreadPoolExecutor(SIGNING_PROCESSES, thread_name_prefix="dkim")
        return None

    async def start(self) -> None:
        """Start the signing process now, so the first message does not wait for it."""
        self._executor = self._make_executor()
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, _ready)

    async def sign(self, data: bytes, domain: str | None) -> bytes:
        """`data` with a DKIM-Signature per matching key prepended (unchanged if none)."""
        which = tuple(i for i, k in enumerate(self.keys) if k.domain == domain)
        if not which:
            return data
        if self.mode == "inline":
            return _sign_with(self.keys, data, which)
        for attempt in (1, 2):
            executor = self._executor
            if executor is None:
                raise SigningFailed("the signer is not started", permanent=False)
            try:
                loop = asyncio.get_running_loop()
                if self.mode == "thread":
                    return await loop.run_in_executor(executor, _sign_with, self.keys, data, which)
                return await loop.run_in_executor(executor, _sign_in_worker, data, which)
            except BrokenProcessPool:
                # The signing process died (killed, out of memory): start a fresh one once.
                if self._executor is executor:
                    executor.shutdown(wait=False)
                    self._executor = self._make_executor()
                if attempt == 2:
                    raise SigningFailed("the signing process died", permanent=False) from None
        raise SigningFailed("unreachable", permanent=False)  # pragma: no cover

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)


async def bench(
    keys: tuple[KeyMaterial, ...], data: bytes, count: int, mode: Mode
) -> dict[str, float]:
    """Sign `count` copies concurrently; signatures/s and the event loop's worst lag (ms)."""
    signer = Signer(keys, mode=mode)
    await signer.start()
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t = loop.time()
            await asyncio.sleep(0.001)
            lags.append((loop.time() - t - 0.001) * 1000)

    tick = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(signer.sign(data, keys[0].domain) for _ in range(count)))
    finally:
        elapsed = time.perf_counter() - t0
        done.set()
        await tick
        await signer.close()
    lags.sort()
    return {
        "per_s": count / elapsed,
        "lag_max_ms": lags[-1] if lags else 0.0,
        "lag_p99_ms": lags[int(len(lags) * 0.99)] if lags else 0.0,
    }
