"""The SMTP side: policy at RCPT, durable commit before 250, clear replies for everything else.

Intake does little on purpose (DESIGN.md): check policy, add the trace header, commit the raw message
and its envelope, reply. The transform runs later in the worker processes.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import ipaddress
import logging
import re
import time

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from relay import metrics
from relay.config import SmtpSettings
from relay.intake import replies
from relay.intake.auth import Authenticator, user_of
from relay.intake.data import read_data
from relay.intake.policy import RateLimiter, SessionCounter
from relay.store.committer import GroupCommitter
from relay.store.database import StoreError
from relay.store.queue import NewMessage, new_queue_id
from relay.store.summary import printable, summary

log = logging.getLogger(__name__)

_HAS_ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}")
_EHLO_KEEP = ("SIZE", "8BITMIME", "SMTPUTF8", "STARTTLS", "AUTH")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
# <dot-atom@host.name>: what nearly every client sends in MAIL and RCPT; anything else goes to aiosmtpd
_PLAIN_PATH = re.compile(rf"<((?:{_ATOM}(?:\.{_ATOM})*)@{_LABEL}(?:\.{_LABEL})*)>")


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with a session cap, a shutdown state and enhanced codes on every reply."""

    def __init__(self, handler: IntakeHandler, **kwargs):
        super().__init__(handler, **kwargs)
        self.intake = handler
        self._refused = False
        self._bare_replies = False

    def __dir__(self) -> list[str]:
        """aiosmtpd's constructor scans ``dir()`` of the protocol and of the handler, with a getattr per
        name, for its smtp_/auth_/handle_ methods: 0.2 ms per connection. Both list only those."""
        return _hook_names(type(self))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # a new connection, not the STARTTLS upgrade of one
            refusal = self.intake.refuse_connection()
            if refusal:
                self._refused = True
                metrics.messages_refused.labels(reason="session_limit").inc()
                transport.write(refusal.encode() + b"\r\n")
                transport.close()
                return
            self.intake.sessions.add(self)
            metrics.smtp_sessions.inc()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self in self.intake.sessions:
            self.intake.sessions.discard(self)
            metrics.smtp_sessions.dec()
            counted = getattr(self.session, "relay_user_counted", None)
            if counted:
                self.intake.user_sessions.release(counted)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the data read in chunks (relay.intake.data) and the whole read bounded:
        a client trickling bytes cannot hold a session forever."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            got = await asyncio.wait_for(
                read_data(self._reader, size_limit=self.data_size_limit, line_limit=self.line_length_limit),
                self.intake.settings.data_timeout,
            )
        except TimeoutError:
            metrics.messages_refused.labels(reason="data_timeout").inc()
            await self.push(replies.DATA_TIMEOUT)
            if self.transport is not None:
                self.transport.close()
            return
        if got.closed:
            log.info("client went away during DATA")
            if self.transport is not None:
                self.transport.close()
            return
        if got.refusal is not None:
            if got.refusal == "too_long":
                await self.push(replies.LINE_TOO_LONG)
            else:
                metrics.messages_refused.labels(reason="too_big").inc()
                await self.push(replies.MESSAGE_TOO_BIG.format(limit=self.data_size_limit))
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = got.content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """A plain ``<local@domain>`` without aiosmtpd's RFC 5322 parser (73 us per address, 7 % of the
        intake's profile samples; 1 us here); the result is the same, which a test checks. Input that makes
        that parser raise is a syntax error for the client, not a local problem."""
        m = _PLAIN_PATH.match(arg)
        if m is not None and "(" not in arg:  # a comment after the path: aiosmtpd's parser drops it
            addr = m.group(1)
            if not self.local_part_limit or addr.rindex("@") <= self.local_part_limit:
                return addr, arg[m.end():].lstrip()
        try:
            return super()._getaddr(arg)
        except Exception:  # noqa: BLE001 - the stdlib parser trips on some input ("0@", "0@["): the
            return None, None  # client gets aiosmtpd's 553 malformed address, not a 451 local error

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    async def push(self, status: str | bytes) -> None:
        raw = status.encode("utf-8", "surrogateescape") if isinstance(status, str) else status
        raw = _CONTROL.sub(b"?", raw)  # aiosmtpd echoes unknown commands: never echo control bytes back
        if not self._bare_replies and not _HAS_ENHANCED.match(raw):
            enhanced = replies.ENHANCED_BY_CODE.get(raw[:3].decode("ascii", "replace"))
            if enhanced and raw[3:4] in (b" ", b"-"):
                raw = raw[:4] + enhanced.encode() + b" " + raw[4:]
        await super().push(raw)

    async def smtp_EHLO(self, hostname: str):  # RFC 2034: no enhanced codes in the EHLO/HELO reply
        self._bare_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._bare_replies = False

    async def smtp_HELO(self, hostname: str):
        self._bare_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._bare_replies = False


class IntakeHandler:
    """aiosmtpd handler: one coroutine per SMTP verb that needs a decision."""

    def __init__(self, settings: SmtpSettings, committer: GroupCommitter):
        self.settings = settings
        self.committer = committer
        self.sessions: set[RelaySMTP] = set()
        self.closing = False
        self.authenticator = Authenticator(settings)
        self.rates = RateLimiter()
        self.user_sessions = SessionCounter()

    def __dir__(self) -> list[str]:  # see RelaySMTP.__dir__
        return _hook_names(type(self))

    # -- connection policy --------------------------------------------------------------------------

    def refuse_connection(self) -> str | None:
        if self.closing:
            return replies.SHUTTING_DOWN
        if len(self.sessions) >= self.settings.max_sessions:
            return replies.TOO_MANY_SESSIONS
        return None

    def trusted(self, session: Session) -> bool:
        try:
            addr = ipaddress.ip_address(_peer_host(session))
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.settings.trusted_networks)

    def source(self, session: Session) -> str:
        """The name rules see: the AUTH user when there is one, else the client address."""
        user = user_of(session)
        return user.source if user else _peer_host(session)

    # -- SMTP hooks ---------------------------------------------------------------------------------

    async def handle_EHLO(self, server, session: Session, envelope: Envelope, hostname: str, responses):
        session.host_name = hostname
        keep = [responses[0]] + [
            r for r in responses[1:] if r[4:].split(" ", 1)[0].upper() in _EHLO_KEEP
        ] + ["250-ENHANCEDSTATUSCODES"]
        return [r[:3] + "-" + r[4:] for r in keep[:-1]] + [keep[-1][:3] + " " + keep[-1][4:]]

    async def handle_PROXY(self, server, session: Session, envelope: Envelope, proxy_data) -> bool:
        """Behind HAProxy or a TCP load balancer: policy and logs see the real client address."""
        return bool(proxy_data and proxy_data.valid)

    async def handle_MAIL(self, server, session: Session, envelope: Envelope, address: str, options):
        if not _clean_address(address, allow_empty=True):
            metrics.messages_refused.labels(reason="bad_address").inc()
            return replies.BAD_SENDER
        user = user_of(session)
        if user is not None:
            if not user.sender_allowed(address):
                metrics.messages_refused.labels(reason="sender_not_allowed").inc()
                return replies.SENDER_NOT_ALLOWED.format(user=user.name)
            if not getattr(session, "relay_user_counted", None):
                if not self.user_sessions.acquire(user.name, user.max_sessions):
                    metrics.messages_refused.labels(reason="session_limit").inc()
                    return replies.USER_SESSIONS.format(user=user.name)
                session.relay_user_counted = user.name
            if user.messages_per_minute and not self.rates.allow(user.name, user.messages_per_minute):
                metrics.messages_refused.labels(reason="rate_limit").inc()
                return replies.RATE_LIMITED.format(source=user.source, limit=user.messages_per_minute)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.SENDER_OK

    async def handle_RCPT(self, server, session: Session, envelope: Envelope, address: str, options):
        # aiosmtpd accepts every recipient unless a hook refuses: this is what keeps us from being open.
        if not (self.trusted(session) or getattr(session, "authenticated", False)):
            metrics.messages_refused.labels(reason="relay_denied").inc()
            log.info("relay denied for %s to %s", _peer_host(session), address)
            return replies.RELAY_DENIED
        if not _clean_address(address):
            metrics.messages_refused.labels(reason="bad_address").inc()
            return replies.BAD_ADDRESS
        user = user_of(session)
        limit = min(self.settings.max_recipients, user.max_recipients or self.settings.max_recipients) \
            if user else self.settings.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            metrics.messages_refused.labels(reason="too_many_recipients").inc()
            return replies.TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return replies.RECIPIENT_OK

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        raw = envelope.original_content or b""
        if len(raw) > self.settings.max_message_size:
            metrics.messages_refused.labels(reason="too_big").inc()
            return replies.MESSAGE_TOO_BIG.format(limit=self.settings.max_message_size)
        if self.committer.overloaded():
            metrics.messages_refused.labels(reason="overloaded").inc()
            return replies.OVERLOADED
        now = time.time()
        queue_id = new_queue_id(now)
        message_id, subject = summary(raw)
        peer = _peer_host(session)
        helo = printable(session.host_name or "")
        trace = _received_header(helo, peer, self.settings.hostname, queue_id, envelope, now)
        if isinstance(raw, bytearray):  # a big message: no second copy of it, not even for a moment
            raw[:0] = trace
            full = raw
        else:
            full = trace + raw
        message = NewMessage(
            queue_id=queue_id, mail_from=envelope.mail_from or "", recipients=tuple(envelope.rcpt_tos),
            raw=full, source=self.source(session), client_addr=peer, helo=helo,
            message_id=message_id, subject=subject, received_at=now,
        )
        try:
            await self.committer.commit(message)
        except StoreError as e:
            log.error("message from %s not stored: %s", peer, e)
            metrics.messages_refused.labels(reason="store_unavailable").inc()
            return replies.NOT_STORED
        except Exception:
            log.exception("message from %s not stored", peer)
            metrics.messages_refused.labels(reason="internal_error").inc()
            return replies.NOT_STORED
        metrics.messages_received.inc()
        metrics.intake_seconds.observe(time.perf_counter() - started)
        log.info("queued %s from=<%s> nrcpt=%d size=%d", queue_id, message.mail_from,
                 len(message.recipients), len(full))
        return replies.QUEUED.format(queue_id=queue_id)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default is a 500 carrying the exception text: temporary, and nothing leaked, instead.
        if isinstance(error, ConnectionError | asyncio.IncompleteReadError):
            log.info("client went away: %s", type(error).__name__)  # not our fault, not an error
            return replies.INTERNAL_ERROR
        log.exception("SMTP session error", exc_info=error)
        metrics.messages_refused.labels(reason="internal_error").inc()
        return replies.INTERNAL_ERROR

    # -- lifecycle ------------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Lets transactions in flight finish (up to ``timeout``), then closes every session."""
        self.closing = True
        deadline = time.monotonic() + timeout
        while any(s.in_transaction for s in self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self.sessions):
            if s.transport is not None:
                try:
                    await asyncio.wait_for(s.push(replies.SHUTTING_DOWN), 0.5)
                except Exception:  # noqa: BLE001 - the peer may be gone already
                    pass
                if s.transport is not None:  # the push may have seen the peer go
                    s.transport.close()


@functools.cache
def _hook_names(cls: type) -> list[str]:
    return sorted(n for n in dir(cls) if n.startswith(("smtp_", "auth_", "handle_")))


def _peer_host(session: Session) -> str:
    proxy = getattr(session, "proxy_data", None)
    if proxy is not None and proxy.valid and proxy.src_addr is not None:
        return str(proxy.src_addr)
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


def _clean_address(address: str | None, allow_empty: bool = False) -> bool:
    """Valid UTF-8 (aiosmtpd hands undecodable bytes over as surrogates) and no control characters:
    an address that cannot be stored or sent later is refused now, permanently, not deferred forever."""
    if not address:
        return allow_empty
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in address)


def _received_header(helo: str, peer: str, hostname: str, queue_id: str, envelope: Envelope,
                     now: float) -> bytes:
    """RFC 5321 4.4 trace line; the only change intake makes to the message."""
    helo = re.sub(r"[^\x21-\x7e]", "?", helo)[:100] or "unknown"
    proto = "UTF8SMTP" if envelope.smtp_utf8 else "ESMTP"
    rcpt = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
    line = (
        f"Received: from {helo} ([{peer}])\r\n\tby {hostname} (brand-relay) with {proto} id {queue_id}"
        f"{rcpt};\r\n\t{email.utils.formatdate(now)}\r\n"
    )
    return line.encode("utf-8", "replace")
