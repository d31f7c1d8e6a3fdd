"""Two small SMTP tools for the latency and delivery-lag figures (run as subprocesses by bench.py).

``probe``: a Python SMTP client that times the final "." -> 250 reply of each message, one connection per
message (as PHP mail() and most shop software do), with S sessions in parallel; every message carries its
own Message-ID so the sink can tell when it arrived. Bounded in count and in time.

``sink``: a minimal SMTP server that accepts everything and records, per message, its Message-ID,
X-Relay-Id, whether it was rewrapped (X-Relay-Skin) and the wall-clock time the final "." arrived, as
one JSON line per message, flushed at once.
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import messages  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

_MID = re.compile(rb"^Message-ID:\s*<?([^>\r\n]*)>?", re.IGNORECASE | re.MULTILINE)
_RID = re.compile(rb"^X-Relay-Id:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


# ----------------------------------------------------------------------------------------------- probe


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        lines.append(line.decode("utf-8", "replace").rstrip())
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), " | ".join(lines)


async def _one(port: int, body: bytes, timeout: float) -> tuple[float, float, int, str]:
    """Sends one message; returns (seconds from '.' to the reply, wall time of the reply, code, text)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        code, text = await asyncio.wait_for(_reply(reader), timeout)
        if code != 220:
            return 0.0, time.time(), code, text
        for cmd, want in (
            (b"EHLO probe.bench\r\n", 250),
            (f"MAIL FROM:<{messages.FROM}>\r\n".encode(), 250),
            (f"RCPT TO:<{messages.TO}>\r\n".encode(), 250),
            (b"DATA\r\n", 354),
        ):
            writer.write(cmd)
            code, text = await asyncio.wait_for(_reply(reader), timeout)
            if code != want:
                return 0.0, time.time(), code, text
        writer.write(body)
        await writer.drain()
        t0 = time.perf_counter()
        writer.write(b".\r\n")
        code, text = await asyncio.wait_for(_reply(reader), timeout)
        t1 = time.perf_counter()
        wall = time.time()
        writer.write(b"QUIT\r\n")
        try:
            await asyncio.wait_for(_reply(reader), 2)
        except (TimeoutError, ConnectionError):
            pass
        return t1 - t0, wall, code, text
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def _dot_stuff(raw: bytes) -> bytes:
    body = raw if raw.endswith(b"\r\n") else raw + b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", body)


async def probe(
    port: int, count: int, sessions: int, seconds: float, kind: str, tag: str, rate: float = 0.0,
    refused_pause: float = 0.0,
) -> dict:
    """``rate`` > 0: message i starts no earlier than i / rate seconds in (a paced, light load).
    ``refused_pause``: seconds a session waits after a refusal before its next try (a client's back-off)."""
    base = messages.signed_order_confirmation() if kind == "signed" else messages.order_confirmation()
    results: list[dict] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    next_i = 0

    async def session() -> None:
        nonlocal next_i
        while next_i < count and time.monotonic() < deadline:
            i = next_i
            next_i += 1
            if rate > 0:
                await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            mid = f"{tag}-{i}@bench.invalid"
            body = _dot_stuff(messages.with_message_id(base, mid))
            try:
                lat, wall, code, text = await _one(port, body, 30.0)
            except (OSError, ConnectionError, TimeoutError) as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            if code == 250:
                results.append({"mid": mid, "lat": lat, "t250": wall, "reply": text[:120]})
            else:
                errors[str(code)] = errors.get(str(code), 0) + 1
                if refused_pause:
                    await asyncio.sleep(refused_pause)

    started = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(sessions)))
    return {
        "sessions": sessions, "sent": len(results), "errors": errors,
        "elapsed": time.perf_counter() - started, "results": results,
    }


# ------------------------------------------------------------------------------------------------ sink


class _Sink:
    def __init__(self, out) -> None:
        self.out = out

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 stamp-sink.bench ESMTP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"LHLO"):
                    writer.write(
                        b"250-stamp-sink.bench\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 104857600\r\n"
                    )
                elif verb == b"HELO":
                    writer.write(b"250 stamp-sink.bench\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    now = time.time()
                    head = data[: data.find(b"\r\n\r\n") + 2]
                    m = _MID.search(head)
                    r = _RID.search(head)
                    self.out.write(json.dumps({
                        "t": now,
                        "mid": m.group(1).decode("ascii", "replace") if m else "",
                        "rid": r.group(1).decode("ascii", "replace") if r else "",
                        "skin": b"\nX-Relay-Skin:" in head,
                        "size": len(data),
                    }) + "\n")
                    self.out.flush()
                    writer.write(b"250 2.0.0 Ok: stamped\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:  # MAIL, RCPT, RSET, NOOP, XFORWARD...
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()


async def sink(port: int, out: Path, max_seconds: float) -> None:
    s = _Sink(open(out, "a"))  # noqa: SIM115 - one line per message, flushed: bench.py reads it live
    server = await asyncio.start_server(s.handle, "127.0.0.1", port, limit=64 * 1024 * 1024, backlog=512)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        pass
    server.close()
    s.out.close()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("--port", type=int, required=True)
    pr.add_argument("--count", type=int, default=200)
    pr.add_argument("--sessions", type=int, default=1)
    pr.add_argument("--seconds", type=float, default=60.0)
    pr.add_argument("--kind", choices=("html", "signed"), default="html")
    pr.add_argument("--tag", default="probe")
    pr.add_argument("--rate", type=float, default=0.0, help="msgs per second (0: as fast as replies come)")
    pr.add_argument("--refused-pause", type=float, default=0.0, help="seconds to wait after a refusal")
    pr.add_argument("--out", type=Path, required=True)
    sk = sub.add_parser("sink")
    sk.add_argument("--port", type=int, required=True)
    sk.add_argument("--out", type=Path, required=True)
    sk.add_argument("--max-seconds", type=float, default=1800.0)
    a = p.parse_args()
    run = uvloop.run if uvloop else asyncio.run
    if a.cmd == "probe":
        res = run(probe(a.port, a.count, a.sessions, a.seconds, a.kind, a.tag, a.rate, a.refused_pause))
        a.out.write_text(json.dumps(res))
    else:
        run(sink(a.port, a.out, a.max_seconds))


if __name__ == "__main__":
    main()
