"""The Python ceiling: a minimal aiosmtpd -> aiosmtplib pass-through, nothing else.

No queue, no store, no transform: each message is forwarded over a pooled upstream connection before the
client gets its reply (the upstream's own). uvloop when installed; ``--procs N`` runs N processes sharing
the listening port (SO_REUSEPORT), like the relay's worker count.

    python bench/passthrough.py --listen-port 2600 --upstream-port 2601 --procs 2
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket

import aiosmtplib
from aiosmtpd.smtp import SMTP


class Pool:
    """Reused aiosmtplib connections, one transaction at a time each."""

    def __init__(self, port: int, size: int):
        self.port = port
        self.idle: list[aiosmtplib.SMTP] = []
        self.slots = asyncio.Semaphore(size)

    async def send(self, mail_from: str, rcpts: list[str], data: bytes) -> tuple[int, str]:
        async with self.slots:
            client = None
            while self.idle and client is None:
                c = self.idle.pop()
                client = c if c.is_connected else None
            if client is None:
                client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, timeout=60)
                await client.connect()
            try:
                _errors, message = await client.sendmail(mail_from, rcpts, data)
            except aiosmtplib.SMTPResponseException as e:
                client.close()
                return e.code, e.message
            except (aiosmtplib.SMTPException, OSError) as e:
                client.close()
                return 451, f"4.4.1 upstream: {e}"
            self.idle.append(client)
            return 250, f"2.0.0 {message}"


class Handler:
    def __init__(self, pool: Pool):
        self.pool = pool

    async def handle_DATA(self, server, session, envelope) -> str:
        code, text = await self.pool.send(envelope.mail_from, envelope.rcpt_tos, envelope.original_content)
        return f"{code} {text}"


async def serve(sock: socket.socket, upstream_port: int) -> None:
    handler = Handler(Pool(upstream_port, 20))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, decode_data=False, enable_SMTPUTF8=True, hostname="passthrough.bench"),
        sock=sock,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def _listen(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(512)
    s.setblocking(False)
    return s


def _child(port: int, upstream_port: int) -> None:
    import logging

    logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(_listen(port), upstream_port))
    else:
        uvloop.run(serve(_listen(port), upstream_port))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen-port", type=int, required=True)
    p.add_argument("--upstream-port", type=int, required=True)
    p.add_argument("--procs", type=int, default=1)
    a = p.parse_args()
    if a.procs <= 1:
        _child(a.listen_port, a.upstream_port)
        return
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child, args=(a.listen_port, a.upstream_port)) for _ in range(a.procs)]
    for pr in procs:
        pr.start()

    def forward(signum, _frame):
        for pr in procs:
            if pr.pid:
                os.kill(pr.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for pr in procs:
        pr.join()


if __name__ == "__main__":
    main()
