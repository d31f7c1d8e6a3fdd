"""Upstream delivery: a small pool of reused aiosmtplib connections, or the outbox folder.

aiosmtplib has no pool of its own. Each connection carries one transaction at a time; after a reply it
goes back idle (RSET after a refusal) and is reused until idle_timeout. A connection that errs is
dropped, never reused.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import time
from pathlib import Path

import aiosmtplib

from relay import metrics
from relay.config import UpstreamSettings
from relay.delivery import streamdata
from relay.delivery.retry import Reply
from relay.transform.types import Spliced, joined


class UpstreamError(Exception):
    """No reply could be had (connection refused, dropped, timed out): always a temporary failure."""


class SmtpUpstream:
    def __init__(self, settings: UpstreamSettings, local_hostname: str):
        self.settings = settings
        self.local_hostname = local_hostname
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._slots = asyncio.Semaphore(settings.max_connections)
        self._open = 0

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self.settings
        context = None
        if s.tls != "none":
            context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            if not s.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=self.local_hostname,
            timeout=s.command_timeout,
            use_tls=s.tls == "implicit",
            start_tls=s.tls == "starttls",
            tls_context=context,
            validate_certs=s.verify_tls,
            username=s.username,
            password=s.password,
        )
        try:
            await client.connect(timeout=s.connect_timeout)
        except (aiosmtplib.SMTPException, OSError) as e:
            raise UpstreamError(f"connect to {s.host}:{s.port} failed: {e}") from e
        self._open += 1
        metrics.upstream_connections.inc()
        return client

    def _drop(self, client: aiosmtplib.SMTP) -> None:
        self._open -= 1
        metrics.upstream_connections.dec()
        try:
            client.close()
        except Exception:  # noqa: BLE001
            pass

    async def _acquire(self) -> tuple[aiosmtplib.SMTP, bool]:
        """A connection and whether it was reused from the idle set."""
        now = time.monotonic()
        while self._idle:
            client, since = self._idle.pop()
            if client.is_connected and now - since < self.settings.idle_timeout:
                return client, True
            self._drop(client)
        return await self._connect(), False

    async def send(self, mail_from: str, rcpt: str, data: bytes | Spliced) -> Reply:
        """One transaction for one recipient; a Reply for every answer, UpstreamError for none."""
        async with self._slots:
            for attempt in (1, 2):
                client, reused = await self._acquire()
                try:
                    reply = await self._transaction(client, mail_from, rcpt, data)
                except aiosmtplib.SMTPServerDisconnected as e:
                    self._drop(client)
                    # A pooled connection the server closed while idle: one fresh try, then give up.
                    if attempt == 1 and reused:
                        continue
                    raise UpstreamError(f"upstream closed the connection: {e}") from e
                except (TimeoutError, aiosmtplib.SMTPException, OSError) as e:
                    self._drop(client)
                    raise UpstreamError(f"{type(e).__name__}: {e}") from e
                except BaseException:
                    self._drop(client)
                    raise
                self._idle.append((client, time.monotonic()))
                return reply
        raise AssertionError("unreachable")

    async def _transaction(
        self, client: aiosmtplib.SMTP, mail_from: str, rcpt: str, data: bytes | Spliced
    ) -> Reply:
        s = self.settings
        if not client.last_ehlo_response:
            await client.ehlo()
        options = []
        if client.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        if client.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        utf8 = not (mail_from.isascii() and rcpt.isascii())
        if utf8:
            if not client.supports_extension("smtputf8"):
                return Reply(553, "5.6.7 upstream does not support SMTPUTF8 for a non-ASCII address")
            options.append("SMTPUTF8")
        encoding = "utf-8" if utf8 else "ascii"
        try:
            await client.mail(mail_from, options=options, encoding=encoding, timeout=s.command_timeout)
            await client.rcpt(rcpt, encoding=encoding, timeout=s.command_timeout)
            if len(data) >= streamdata.STREAM_FROM:
                response = await streamdata.send_data(client, data, s.data_timeout)
            else:
                response = await client.data(joined(data), timeout=s.data_timeout)
        except aiosmtplib.SMTPResponseException as e:
            if e.code == 421:  # the server is closing the channel: RFC 5321 4.2.2
                raise aiosmtplib.SMTPServerDisconnected(f"{e.code} {e.message}") from e
            try:
                await client.rset(timeout=s.command_timeout)
            except (aiosmtplib.SMTPException, OSError):
                client.close()
            return Reply(e.code, e.message)
        return Reply(response.code, response.message)

    async def close(self) -> None:
        while self._idle:
            client, _ = self._idle.pop()
            try:
                await asyncio.wait_for(client.quit(), 2)
            except Exception:  # noqa: BLE001
                pass
            self._drop(client)


class OutboxUpstream:
    """The embedded default: each final message becomes an .eml file, written atomically and fsync'd."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    async def send(self, mail_from: str, rcpt: str, data: bytes | Spliced) -> Reply:
        return await asyncio.to_thread(self._write, mail_from, rcpt, data)

    def _write(self, mail_from: str, rcpt: str, data: bytes | Spliced) -> Reply:
        digest = hashlib.sha256(rcpt.lower().encode()).hexdigest()[:10]
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{_relay_id(data) or 'message'}-{digest}.eml"
        head = f"Return-Path: <{mail_from}>\r\nDelivered-To: {rcpt}\r\n".encode()
        tmp = self.folder / f".{name}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                f.writelines(data.pieces if isinstance(data, Spliced) else (data,))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / name)
        except OSError as e:
            return Reply(451, f"4.3.0 outbox not writable: {e.strerror}")
        return Reply(250, f"2.0.0 written to outbox as {name}")

    async def close(self) -> None:
        return None


def _relay_id(data: bytes | Spliced) -> str | None:
    if isinstance(data, Spliced):
        data = data.prefix(65536)
    i = data.find(b"X-Relay-Id: ", 0, 65536)
    if i < 0:
        return None
    end = data.find(b"\r\n", i)
    value = data[i + 12 : end if end > 0 else i + 60].decode("ascii", "replace")
    return "".join(c for c in value if c.isalnum())[:32] or None
