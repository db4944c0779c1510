"""aiosmtpd's hooks for the gateway: authentication, MAIL, RCPT and DATA, translated into
`EmailFlow` calls and their replies. It decides nothing itself.

The unsubscribe mailbox (`unsubscribe@` or `unsubscribe+TOKEN@` the unsubscribe domain, any
case) is the one recipient accepted without AUTH (docs/guarantees.md §3.2, §5.4). Such a
transaction holds unsubscribe recipients only; after DATA it records the opt-out
(`gateway.unsubscribe`) and is never forwarded. A bad token gets `550 5.1.1` (at RCPT when it
is in the local part) and nothing is ever sent back (no backscatter). Such a transaction, and
any transaction begun without a sender, is limited to `UNAUTHENTICATED_MAX_BYTES`.

The complaints mailbox (exactly ``complaints@`` the unsubscribe domain, any case) takes ARF
reports (RFC 5965) the same way: without AUTH, in a transaction of its own with no other
recipient, within the same limit; its DATA is parsed (`gateway.feedback.arf`) and applied
(`gateway.feedback.apply`), never forwarded and never answered by mail. A report that
cannot be read gets a 550 naming what is wrong, and changes nothing.
"""

from __future__ import annotations

import asyncio

import structlog
from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
)

from gateway import metrics, tls
from gateway.config import Sender
from gateway.core import tokens
from gateway.core.addresses import AddressProblem, parse_email
from gateway.core.entries import AuthFailure
from gateway.errors import (
    TEMPORARY_FAILURE,
    AuditError,
    BareLineFeed,
    RecordCorrupt,
    StoreUnavailable,
    smtp_reply,
)
from gateway.feedback import apply as feedback
from gateway.feedback import arf
from gateway.feedback.events import Malformed
from gateway.senders import Authenticator, Busy, Refused, Throttled
from gateway.smtp.flow import EmailFlow, Submission
from gateway.smtp.reader import CrlfLineReader
from gateway.smtp.server import GatewayEnvelope, GatewaySession, GatewaySMTP, Limits
from gateway.unsubscribe import MailResult, Receipt, Unsubscriber

log = structlog.get_logger("optgate.smtp")

# DATA limit of a transaction nobody authenticated (mail to the unsubscribe address): an
# unsubscribe request is a few hundred bytes, and anyone who can connect may send one, so
# the server-wide limit (25 MiB) would let each of them make every worker read and hold
# that much. Past it the rest is read and dropped (`552 5.3.4`), the session stays usable.
UNAUTHENTICATED_MAX_BYTES = 64 * 1024
UNAUTHENTICATED_TOO_BIG = "552 5.3.4 Message too big for an unauthenticated transaction"


def _declared_size(options: list[str]) -> int:
    """The MAIL ``SIZE=`` parameter (RFC 1870), 0 when absent (aiosmtpd checked its syntax)."""
    for option in options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


def _limit_transaction(server: GatewaySMTP, limit: int | None) -> None:
    """Set the DATA limit of the transaction being opened (None: the server's own)."""
    reader = getattr(server, "_reader", None)
    if isinstance(reader, CrlfLineReader):
        reader.transaction_limit = limit


# RFC 4954 §6 and RFC 3463: too many failed logins from this address (the session closes)
# and a temporary failure to check credentials (the client may try again).
THROTTLED_REPLY = "421 4.7.0 Too many failed logins from your address, try again later"
BUSY_REPLY = "454 4.7.0 Temporary authentication failure, try again later"


def _peer_common_name(server: GatewaySMTP) -> str | None:
    transport = server.transport
    obj = transport.get_extra_info("ssl_object") if transport is not None else None
    return tls.peer_common_name(obj) if obj is not None else None


class GatewayHandler:
    """aiosmtpd hooks. Every reply after DATA comes from `EmailFlow`."""

    def __init__(
        self,
        *,
        flow: EmailFlow,
        auth: Authenticator,
        limits: Limits,
        unsubscribe: Unsubscriber | None = None,
        links: tokens.Links | None = None,
        complaints: feedback.Applier | None = None,
    ) -> None:
        self.flow = flow
        self.auth = auth
        self.limits = limits
        self.unsubscribe = unsubscribe
        self.links = links  # where the unsubscribe mailbox is (its domain)
        self.complaints = complaints  # applies ARF reports to the complaints mailbox
        self._background: set[asyncio.Task[None]] = set()

    def throttled(self, client: str) -> str | None:
        """The reply to AUTH from an address past its failed-login limit, else None."""
        return THROTTLED_REPLY if self.auth.throttled(client) is not None else None

    async def login(self, server: GatewaySMTP, mechanism: str, data: object) -> AuthResult | str:
        """Check AUTH PLAIN/LOGIN credentials (awaited: scrypt runs off the loop). A str is
        a reply after which the session is closed (the address is throttled)."""
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        name = data.login.decode("utf-8", "replace")
        result = await self.auth.login(name, data.password, server.client_host)
        if isinstance(result, Sender):
            return AuthResult(success=True, auth_data=result)
        if isinstance(result, Throttled):
            return THROTTLED_REPLY
        if isinstance(result, Busy):
            return AuthResult(success=False, handled=False, message=BUSY_REPLY)
        log.info("auth_failure", mechanism=mechanism, blocks=result.blocks)
        metrics.auth_failure("smtp")
        await self._audit_auth_failure(name, mechanism, result)
        return AuthResult(success=False, handled=False)  # 535 5.7.8

    async def _audit_auth_failure(self, name: str, mechanism: str, result: Refused) -> None:
        """Every failed login is audited as `auth_failure` (the one event name on every
        channel), before the client is answered. A login that is not a configured sender
        is recorded as "unknown": it may be an address. `blocks`: this failure reached the
        address's limit (no address is recorded)."""
        known = name if name in self.auth.senders else "unknown"
        event = AuthFailure(
            channel="email",
            reason="bad-credentials",
            sender=known,
            mechanism=mechanism,
            blocks=result.blocks,
        )
        try:
            await self.flow.audit.append([event])
        except AuditError:
            log.error("audit_auth_failure_write_failed")  # still refused

    def _sender(self, server: GatewaySMTP, session: GatewaySession) -> Sender | None:
        if session.sender is not None:
            return session.sender
        data: object = session.auth_data
        if session.authenticated and isinstance(data, Sender):
            session.sender = data
            return data
        cn = _peer_common_name(server)
        if cn is not None:
            session.sender = self.auth.by_certificate(cn)
        return session.sender

    async def handle_MAIL(
        self,
        server: GatewaySMTP,
        session: GatewaySession,
        envelope: GatewayEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        sender = self._sender(server, session)
        # Before any other check, so no transaction keeps an earlier one's limit.
        _limit_transaction(server, None if sender is not None else UNAUTHENTICATED_MAX_BYTES)
        if sender is not None and "email" not in sender.channels:
            return "550 5.7.1 This sender may not send email"
        if sender is None and _declared_size(options) > UNAUTHENTICATED_MAX_BYTES:
            return UNAUTHENTICATED_TOO_BIG
        parsed = parse_email(address, smtputf8=bool(envelope.smtp_utf8))
        if isinstance(parsed, AddressProblem):
            return parsed.reply.replace("destination", "sender")
        envelope.mail_from = parsed.address
        envelope.mail_options.extend(options)
        envelope.optgate_rcpts.clear()
        envelope.optgate_unsubscribe.clear()
        return "250 2.1.0 Sender ok"

    async def _unsubscribe_rcpt(
        self, server: GatewaySMTP, envelope: GatewayEnvelope, address: str
    ) -> str | None:
        """The reply to an RCPT of the unsubscribe mailbox; None for any other address."""
        if self.unsubscribe is None or self.links is None or not self.links.is_mailbox(address):
            return None
        if envelope.optgate_rcpts:
            return "452 4.5.3 Send unsubscribe requests in a transaction of their own"
        if _declared_size(envelope.mail_options) > UNAUTHENTICATED_MAX_BYTES:
            return UNAUTHENTICATED_TOO_BIG
        local = address.rpartition("@")[0]
        token = ""
        if "+" in local:
            token = local.partition("+")[2].lower()
            if await self.unsubscribe.verify(token) is None:
                return "550 5.1.1 Unknown unsubscribe address"
        if len(envelope.optgate_unsubscribe) >= self.limits.max_recipients:
            return "452 4.5.3 Too many recipients"
        # An authenticated sender may write to the mailbox too: the same small limit.
        _limit_transaction(server, UNAUTHENTICATED_MAX_BYTES)
        envelope.optgate_unsubscribe.append(token)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Unsubscribe address ok"

    def _is_complaints(self, address: str) -> bool:
        if self.complaints is None or self.links is None:
            return False
        local, at, domain = address.rpartition("@")
        return bool(at) and domain.lower() == self.links.domain and local.lower() == arf.MAILBOX

    @staticmethod
    def _complaint_txn(envelope: GatewayEnvelope) -> bool:
        """A transaction to the complaints mailbox: it has a recipient, and it is neither
        a message nor an unsubscribe (each keeps its own list of recipients)."""
        return bool(envelope.rcpt_tos) and not envelope.optgate_rcpts and not (
            envelope.optgate_unsubscribe
        )

    def _complaints_rcpt(
        self, server: GatewaySMTP, envelope: GatewayEnvelope, address: str
    ) -> str | None:
        """The reply to an RCPT of the complaints mailbox; None for any other address."""
        if not self._is_complaints(address):
            return None
        if envelope.optgate_rcpts or envelope.optgate_unsubscribe:
            return "452 4.5.3 Send complaint reports in a transaction of their own"
        if envelope.rcpt_tos:
            return "250 2.1.5 Recipient ok (duplicate ignored)"
        if _declared_size(envelope.mail_options) > UNAUTHENTICATED_MAX_BYTES:
            return UNAUTHENTICATED_TOO_BIG
        _limit_transaction(server, UNAUTHENTICATED_MAX_BYTES)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Complaints address ok"

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """aiosmtpd's EHLO lines plus PIPELINING (RFC 2920: commands are read in order from
        one buffer, so a client may send MAIL, RCPTs and DATA in one write) and
        ENHANCEDSTATUSCODES (RFC 2034: every reply carries one, see `push`)."""
        session.host_name = hostname  # what aiosmtpd does itself when there is no hook
        *lines, last = responses
        return [*lines, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]

    async def handle_RCPT(
        self,
        server: GatewaySMTP,
        session: GatewaySession,
        envelope: GatewayEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        complaint = self._complaints_rcpt(server, envelope, address)
        if complaint is not None:
            return complaint
        if self._complaint_txn(envelope):  # nothing joins a report: it is never forwarded
            return "452 4.5.3 Send complaint reports in a transaction of their own"
        unsubscribe = await self._unsubscribe_rcpt(server, envelope, address)
        if unsubscribe is not None:
            return unsubscribe
        if self._sender(server, session) is None:
            return "530 5.7.0 Authentication required"
        if envelope.optgate_unsubscribe:
            return "452 4.5.3 Send unsubscribe requests in a transaction of their own"
        parsed = parse_email(address, smtputf8=bool(envelope.smtp_utf8))
        if isinstance(parsed, AddressProblem):
            return parsed.reply
        rcpts = envelope.optgate_rcpts
        if any(r.address == parsed.address for r in rcpts):
            return "250 2.1.5 Recipient ok (duplicate ignored)"
        if len(rcpts) >= self.limits.max_recipients:
            return "452 4.5.3 Too many recipients"
        rcpts.append(parsed)
        envelope.rcpt_tos.append(parsed.address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(
        self, server: GatewaySMTP, session: GatewaySession, envelope: GatewayEnvelope
    ) -> str:
        if envelope.optgate_unsubscribe and self.unsubscribe is not None:
            return await self._unsubscribe_data(self.unsubscribe, envelope)
        if self.complaints is not None and self._complaint_txn(envelope):
            return await self._complaint_data(self.complaints, envelope)
        sender = self._sender(server, session)
        if sender is None or envelope.mail_from is None or envelope.original_content is None:
            return "503 5.5.1 No valid transaction"  # unreachable: RCPT required a sender
        submission = Submission(
            sender=sender,
            mail_from=envelope.mail_from,
            rcpts=tuple(envelope.optgate_rcpts),
            data=envelope.original_content,
            smtputf8=bool(envelope.smtp_utf8),
        )
        return str(await self.flow.process(submission))

    async def _unsubscribe_data(self, unsub: Unsubscriber, envelope: GatewayEnvelope) -> str:
        received = Receipt.now()
        data = envelope.original_content or b""
        local_tokens = [t for t in envelope.optgate_unsubscribe if t]
        try:
            result = await unsub.by_mail(local_tokens, data, received=received)
        except (StoreUnavailable, RecordCorrupt, AuditError) as exc:
            log.warning("unsubscribe_unavailable", error=type(exc).__name__)
            return smtp_reply(exc)
        if result is MailResult.DONE:
            return "250 2.0.0 Ok: unsubscribed"
        if result is MailResult.MALFORMED:
            return "554 5.6.0 Malformed message"
        return "550 5.1.1 Unknown unsubscribe address"

    async def _complaint_data(self, complaints: feedback.Applier, envelope: GatewayEnvelope) -> str:
        """An ARF report: applied, or refused with what is wrong (550), or 451 to retry."""
        events = arf.parse(envelope.original_content or b"")
        if isinstance(events, Malformed):
            metrics.feedback_event(arf.PROVIDER_NAME, "request", "malformed")
            return f"550 5.6.0 {events.detail}"
        result = await complaints.apply(events)
        if isinstance(result, Malformed):
            metrics.feedback_event(arf.PROVIDER_NAME, "request", "malformed")
            return f"550 5.1.3 {result.detail}"
        if isinstance(result, feedback.Busy):
            return TEMPORARY_FAILURE
        return "250 2.0.0 Ok: report received"

    async def handle_exception(self, error: Exception) -> str:
        """The one place a failure no hook answered becomes its reply (`errors.smtp_reply`).
        Never a traceback to the client; the sender retries (nothing was answered 250)."""
        if not isinstance(error, BareLineFeed):
            log.error("smtp_session_error", error=type(error).__name__)
        return smtp_reply(error)
