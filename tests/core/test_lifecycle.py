"""The real `relay serve` as a subprocess: signals, restart with a full queue, kill -9 under load.

Every relay here is `python -m relay serve --config FILE` with two real worker processes, on SQLite and
on PostgreSQL, in front of an aiosmtpd sink on loopback. Processes are always ended by their own PID.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relay.app import free_port
from tests.conftest import Sink, message

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 20.0
QUEUED_AS = re.compile(r"queued as ([0-9A-F]+)")
RELAY_ID = re.compile(rb"^X-Relay-Id: ([0-9A-F]+)\r?$", re.MULTILINE)


# -- helpers shared with test_cli.py ------------------------------------------------------------------


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string for what we write
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def write_config(path: Path, sections: dict[str, dict]) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def relay_config(tmp_path: Path, db_url: str, upstream_port: int, name: str = "relay", **overrides) -> Path:
    """A config file for a subprocess relay: free loopback ports, 2 worker processes, fast retries."""
    sections: dict[str, dict] = {
        "smtp": {"listen": f"127.0.0.1:{free_port()}", "hostname": "relay.test"},
        "upstream": {"host": "127.0.0.1", "port": upstream_port, "connect_timeout": 2,
                     "command_timeout": 10, "data_timeout": 30},
        "delivery": {"workers": 2, "poll_interval": 0.05, "retry_base": 0.3, "retry_max": 2, "lease": 3},
        "database": {"url": db_url},
        "paths": {"outbox": "outbox", "state": f"state-{name}"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return write_config(tmp_path / f"{name}.toml", sections)


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """`python -m relay ARGS` to completion (bounded), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the worker processes)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def process_kind(pid: int) -> str:
    """'worker' for a delivery worker (``python -m relay.delivery``), else 'other'."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return "gone"
    return "worker" if b"\0relay.delivery\0" in cmd else "other"


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid``: with the pid, an identity that survives pid reuse."""
    st = _stat(pid)
    return st[19] if st else None


def pid_alive(pid: int, started: str | None = None) -> bool:
    """True while ``pid`` runs (a zombie counts as gone) and, if given, is the process started then."""
    st = _stat(pid)
    if st is None or st[0] == "Z":
        return False
    return started is None or st[19] == started


def kill_if_same(pid: int, started: str | None) -> None:
    """SIGKILL ``pid`` only if it is still the process we saw (never a stranger that reused the pid)."""
    if started is not None and pid_alive(pid, started):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class RelayProcess:
    """`relay serve --config FILE` as a subprocess, ready once its SMTP port greets."""

    def __init__(self, config: Path):
        self.config = config
        text = config.read_text()
        self.port = int(re.search(r'^listen = "127\.0\.0\.1:(\d+)"', text, re.MULTILINE).group(1))
        self.log_path = config.with_suffix(f".{time.monotonic_ns()}.log")
        self.proc: subprocess.Popen | None = None
        self.children: dict[int, str | None] = {}  # pid -> start time

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RelayProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in cleanup()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(self.config)],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited with {self.proc.returncode} at start:\n{self.log()}")
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=2) as c:
                    c.noop()
                break
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)
        else:
            raise AssertionError(f"relay not ready within {READY_TIMEOUT}s:\n{self.log()}")
        # the workers are spawned right after the listener opens; remember them for the kill -9 checks
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self._note_children()
            if sum(process_kind(p) == "worker" for p in self.children) >= 2:
                break
            time.sleep(0.05)
        return self

    def _note_children(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for p in child_pids(self.pid):
                self.children.setdefault(p, start_time(p))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        self._note_children()
        self.proc.send_signal(sig)  # by PID, and never to a process Popen has already reaped

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        """Ends this relay and its children by PID, whatever state the test left them in."""
        if self.proc is None:
            return
        self._note_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(12)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(pid_alive(p, t) for p, t in self.children.items()):
            time.sleep(0.05)
        for p, t in self.children.items():
            kill_if_same(p, t)
        self._log.close()


@pytest.fixture
def relays():
    """Starts subprocess relays; every one is stopped (and its children reaped) at the end."""
    started: list[RelayProcess] = []

    def start(config: Path) -> RelayProcess:
        r = RelayProcess(config)
        started.append(r)
        return r.start()

    yield start
    for r in started:
        r.cleanup()


@pytest.fixture
def upstream():
    """A sink on a reserved loopback port, not started: the test decides when upstream is up."""
    s = Sink()
    yield s
    s.stop()


def open_store(db_url: str):
    from relay.store.database import make_engine
    from relay.store.queue import Store

    return Store(make_engine(db_url, pool_size=1))


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def relay_ids(sink: Sink) -> list[str]:
    out = []
    for m in list(sink.messages):
        found = RELAY_ID.findall(m.data.split(b"\r\n\r\n", 1)[0])
        assert len(found) == 1, m.data[:500]
        out.append(found[0].decode())
    return out


def queue_id_of(reply: bytes | str) -> str:
    text = reply.decode() if isinstance(reply, bytes) else reply
    m = QUEUED_AS.search(text)
    assert m, text
    return m.group(1)


# -- 1. SIGTERM / SIGINT with a transaction in flight ----------------------------------------------------


class RawClient:
    """A byte-level SMTP client, so a transaction can be left half-way through DATA."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"closed by the server after {lines!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"\r\n".join(lines)

    def command(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def new_session_refused(port: int) -> bool:
    """True if a fresh connection is refused, or greeted with 421 / closed instead of 220."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError:
        return True
    with s:
        try:
            greeting = s.recv(512)
        except OSError:
            return True
    return not greeting.startswith(b"220")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_lets_the_transaction_in_flight_finish(sig, relays, upstream, db_url, tmp_path):
    upstream.start()
    relay = relays(relay_config(tmp_path, db_url, upstream.port))
    c = RawClient(relay.port)
    try:
        assert c.reply().startswith(b"220")
        assert c.command("EHLO client.test").startswith(b"250")
        assert c.command("MAIL FROM:<shop@boutique.example>").startswith(b"250")
        assert c.command("RCPT TO:<inflight@example.org>").startswith(b"250")
        assert c.command("DATA").startswith(b"354")
        raw = message(subject="Sent across a shutdown", to="inflight@example.org")
        head, body = raw[: len(raw) // 2], raw[len(raw) // 2 :]
        c.sock.sendall(head)
        time.sleep(0.2)

        signalled = time.monotonic()
        relay.send_signal(sig)
        wait_until(lambda: new_session_refused(relay.port), 5, "new sessions refused after the signal",
                   interval=0.05)
        assert relay.proc.poll() is None, "the relay exited with a transaction in flight"

        c.sock.sendall(body + b"\r\n.\r\n")
        reply = c.reply()
        assert reply.startswith(b"250 "), reply
        queue_id = queue_id_of(reply)
        # then the relay says goodbye and closes the session (the client stays until it does)
        assert c.reply().startswith(b"421 4.3.2"), "shutdown notice after the transaction"
        assert c.sock.recv(100) == b"", "session closed by the relay"
    finally:
        c.close()
    rc = relay.wait(max(0.1, 10 - (time.monotonic() - signalled)))
    elapsed = time.monotonic() - signalled
    assert rc == 0, relay.log()
    assert elapsed < 10
    assert "Traceback" not in relay.log(), relay.log()

    store = open_store(db_url)
    try:
        entries = store.history("inflight@example.org")
    finally:
        store.engine.dispose()
    assert [e["queue_id"] for e in entries] == [queue_id]
    assert entries[0]["status"] in ("queued", "sent")
    assert entries[0]["subject"] == "Sent across a shutdown"


def test_worker_processes_and_a_lean_main_process_deliver_a_due_follow_up(relays, upstream, db_url, tmp_path):
    """`relay serve` runs two worker children and nothing else (no multiprocessing resource tracker); the
    main process never loads the rewrap and rules stack (lxml, css-inline, nh3: ~14 MB of RSS each time);
    and the follow-up scheduler, now in worker 0, queues a due follow-up that reaches the upstream."""
    from relay.store.database import make_engine
    from relay.store.ledger import Ledger

    upstream.start()
    paths = {"rules": str(ROOT / "rules"), "skins": str(ROOT / "skins")}
    r = relays(relay_config(tmp_path, db_url, upstream.port, paths=paths))
    assert sorted(process_kind(p) for p in child_pids(r.pid)) == ["worker", "worker"]
    with open(f"/proc/{r.pid}/maps") as f:
        libraries = {line.rsplit("/", 1)[-1].split(".")[0] for line in f if ".so" in line}
    assert not libraries & {"etree", "css_inline", "nh3"}, libraries
    engine = make_engine(db_url, pool_size=1)
    try:
        now = time.time()
        shop = "shop@maison-lumiere.example"
        payload = {"mail_from": shop, "from": f"Maison Lumiere <{shop}>"}
        Ledger(engine).schedule_followup(
            "camille@example.org", "merci-commande", "Q0FOLLOWUP01", now - 1, payload=payload, now=now
        )
    finally:
        engine.dispose()
    wait_until(lambda: upstream.messages, 30, "the due follow-up delivered")
    assert upstream.messages[0].rcpt_tos == ["camille@example.org"]
    store = open_store(db_url)
    try:
        (entry,) = store.history("camille@example.org")
    finally:
        store.engine.dispose()
    assert entry["source"] == "relay-followup" and "accompagner" in entry["subject"], entry


class RelayHung(AssertionError):
    """The relay did not exit after a signal because its stop() raised."""


# Regression: IntakeHandler.drain once called `s.transport.close()` after `await s.push(...)`, when a
# client that vanished meanwhile had left transport None: stop() raised and the relay hung at exit.
def test_signal_with_a_client_vanishing_during_the_goodbye(relays, upstream, tmp_path):
    """An idle client that does not read (its replies back up) and resets the connection at shutdown.

    Intake only: the store plays no part, so this runs on SQLite alone.
    """
    upstream.start()
    relay = relays(relay_config(tmp_path, f"sqlite:///{tmp_path}/relay.db", upstream.port))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(("127.0.0.1", relay.port))
    try:
        assert s.recv(512).startswith(b"220")
        # pipeline NOOPs without reading the replies until the relay's writes are blocked (bounded)
        s.setblocking(False)
        chunk, sent, deadline = b"NOOP\r\n" * 1000, 0, time.monotonic() + 10
        while sent < 50_000_000 and time.monotonic() < deadline:
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                time.sleep(0.2)
                try:
                    sent += s.send(chunk)
                except BlockingIOError:
                    break  # stayed full: the relay stopped reading, its replies are backed up
        else:
            pytest.fail("could not back up the relay's replies")
        signalled = time.monotonic()
        relay.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping: no new sessions" in relay.log(), 5, "the relay to start stopping",
                   interval=0.02)
        time.sleep(0.1)  # the 421 goodbye is now waiting on this client (for up to 0.5 s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
    finally:
        s.close()
    while time.monotonic() - signalled < 10 and relay.proc.poll() is None:
        if "AttributeError: 'NoneType' object has no attribute 'close'" in relay.log():
            time.sleep(0.5)  # let the process reach its hang (or exit) before judging
            if relay.proc.poll() is None:
                relay.proc.kill()  # hung for good: its workers still run; end it now, not in 12 s
                relay.wait(5)
                raise RelayHung(f"stop() raised and the relay hung:\n{relay.log()[-1500:]}")
        time.sleep(0.05)
    rc = relay.proc.poll()
    if rc is None:
        raise RelayHung(f"no exit within 10 s of SIGTERM:\n{relay.log()[-1500:]}")
    assert rc == 0 and "Traceback" not in relay.log(), relay.log()


# -- 2. restart with a full queue -----------------------------------------------------------------------


class DeliveredMoreThanOnce(AssertionError):
    """A message reached the sink twice although the relay was only ever stopped cleanly."""


def test_restart_with_a_full_queue_delivers_each_message_once(relays, upstream, db_url, tmp_path,
                                                              record_property):
    n = 50
    config = relay_config(tmp_path, db_url, upstream.port)  # upstream not started: every try defers
    first = relays(config)
    sent: list[str] = []
    with smtplib.SMTP("127.0.0.1", first.port, timeout=30) as c:
        for i in range(n):
            rcpt = f"full{i}@example.org"
            c.ehlo_or_helo_if_needed()
            c.mail("shop@boutique.example")
            c.rcpt(rcpt)
            code, text = c.data(message(subject=f"full queue {i}", to=rcpt))
            assert code == 250, text
            sent.append(queue_id_of(text))
    assert len(set(sent)) == n

    store = open_store(db_url)
    try:
        wait_until(lambda: store.counts().get("deferred", 0) >= 10, 20, "deliveries deferred while down")
        first.send_signal(signal.SIGTERM)
        assert first.wait(10) == 0, first.log()
        after_stop = store.counts()
        assert after_stop.get("sent", 0) == 0 and sum(after_stop.values()) == n, after_stop

        upstream.start()
        second = relays(config)
        # retry_base is 0.3 s and retry_max 2 s, so the deferred ones come due by themselves
        wait_until(lambda: set(sent) <= set(relay_ids(upstream)), 30, "every message delivered after restart")
        wait_until(lambda: store.counts().get("sent", 0) == n, 15, "every recipient recorded as sent")
        time.sleep(0.5)  # a late duplicate would show up here
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0, second.log()
    finally:
        store.engine.dispose()
    got = collections.Counter(relay_ids(upstream))
    assert set(got) == set(sent), "only the messages sent, every one of them"
    assert {m.rcpt_tos[0] for m in upstream.messages} == {f"full{i}@example.org" for i in range(n)}
    duplicates = {q: c for q, c in got.items() if c > 1}
    record_property("restart_duplicates", sum(c - 1 for c in duplicates.values()))
    record_property("left_active_by_clean_stop", after_stop.get("active", 0))
    if duplicates:
        raise DeliveredMoreThanOnce(
            f"{len(duplicates)} of {n} messages delivered more than once after a clean restart "
            f"({after_stop.get('active', 0)} recipients were left 'active' by the SIGTERM stop)"
        )


# -- 3. kill -9 under load ------------------------------------------------------------------------------


SOAK_MESSAGES = int(os.environ.get("RELAY_SOAK_MESSAGES", "300"))
# A worker polls its parent every 0.5 s, then lets deliveries in flight finish (Worker.drain, up to 5 s).
CHILD_EXIT_LIMIT = 7.0
CLIENT_THREADS = 4


class LoadClient(threading.Thread):
    """Sends its share over smtplib, reconnecting after errors, recording every queue id that got a 250."""

    def __init__(self, index: int, port: int, count: int, deadline: float, acked: list[str]):
        super().__init__(name=f"load-{index}", daemon=True)
        self.index, self.port, self.count, self.deadline, self.acked = index, port, count, deadline, acked
        self.errors = 0
        self.lock = threading.Lock()

    def run(self) -> None:
        done = 0
        client: smtplib.SMTP | None = None
        while done < self.count and time.monotonic() < self.deadline:
            rcpt = f"load{self.index}-{done}@example.org"
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
                    client.ehlo()
                client.mail("shop@boutique.example")
                client.rcpt(rcpt)
                code, text = client.data(message(subject=f"load {self.index} {done}", to=rcpt))
                if code == 250:
                    self.acked.append(queue_id_of(text))  # list.append is atomic
                    done += 1
                else:
                    self.errors += 1
                    time.sleep(0.05)
            except (OSError, smtplib.SMTPException):
                self.errors += 1
                if client is not None:
                    try:
                        client.close()
                    except OSError:
                        pass
                client = None
                time.sleep(0.1)  # the relay is down (killed): try again once it is back
        if client is not None:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()


@pytest.mark.slow
def test_kill_9_under_load_loses_no_acknowledged_message(relays, upstream, db_url, tmp_path, record_property):
    n = SOAK_MESSAGES
    budget = 30 + n / 10  # seconds, for the whole load
    upstream.start()
    config = relay_config(tmp_path, db_url, upstream.port)
    first = relays(config)
    acked: list[str] = []
    deadline = time.monotonic() + budget
    per = [n // CLIENT_THREADS + (1 if i < n % CLIENT_THREADS else 0) for i in range(CLIENT_THREADS)]
    clients = [LoadClient(i, first.port, per[i], deadline, acked) for i in range(CLIENT_THREADS)]
    for t in clients:
        t.start()

    # kill -9 in the middle of the load: intake, group commits and deliveries all in flight
    wait_until(lambda: len(acked) >= n // 3 or not any(t.is_alive() for t in clients), budget,
               "a third of the load acknowledged", interval=0.01)
    first._note_children()
    children = {p: (process_kind(p), t) for p, t in first.children.items() if pid_alive(p, t)}
    assert [k for k, _ in children.values()].count("worker") == 2, children
    acked_before_kill = len(acked)
    first.proc.kill()
    first.wait(5)
    killed = time.monotonic()
    exited: dict[int, float] = {}
    deadline = killed + CHILD_EXIT_LIMIT
    while time.monotonic() < deadline and len(exited) < len(children):
        for p, (_, t) in children.items():
            if p not in exited and not pid_alive(p, t):
                exited[p] = round(time.monotonic() - killed, 2)
        time.sleep(0.02)
    children_exit = {f"{kind}-{p}": exited.get(p) for p, (kind, _) in children.items()}
    survivors = [p for p in children if p not in exited]
    for p in survivors:
        kill_if_same(p, children[p][1])
    assert not survivors, f"children still running {CHILD_EXIT_LIMIT}s after kill -9: {children_exit}"

    second = relays(config)
    for t in clients:
        t.join(max(0.1, deadline - time.monotonic()))
        assert not t.is_alive(), "load client did not finish within its budget"
    assert len(acked) == n and len(set(acked)) == n

    wanted = set(acked)
    wait_until(lambda: wanted <= set(relay_ids(upstream)), 60, "every acknowledged message delivered")
    store = open_store(db_url)
    try:
        wait_until(lambda: store.depth() == {"queued": 0, "active": 0, "deferred": 0}, 20, "queue empty")
        counts = store.counts()
    finally:
        store.engine.dispose()
    time.sleep(0.5)
    delivered = collections.Counter(relay_ids(upstream))
    duplicates = {q: c for q, c in delivered.items() if c > 1}
    unacknowledged = set(delivered) - wanted  # committed, but the 250 was lost with the kill
    report = {
        "db": db_url.split(":", 1)[0], "messages": n, "acked_before_kill": acked_before_kill,
        "client_errors": sum(t.errors for t in clients), "delivered": sum(delivered.values()),
        "duplicates": sum(c - 1 for c in duplicates.values()), "duplicate_ids": sorted(duplicates)[:20],
        "delivered_without_250": len(unacknowledged), "children_exit_s": children_exit,
        "store": counts,
    }
    record_property("kill9", json.dumps(report))
    print(f"\nkill -9 under load: {json.dumps(report)}")
    second.send_signal(signal.SIGTERM)
    assert second.wait(10) == 0, second.log()


def test_free_port_stays_out_of_the_ephemeral_range_and_never_repeats():
    """Ports the tests listen on later must not be ones the kernel may give to an outgoing connection
    (to PostgreSQL, to a sink) in the meantime: that was an EADDRINUSE at random in make test."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(100)]
    assert len(set(ports)) == 100
    assert all(p < low for p in ports), (low, max(ports))
    for p in ports[:5]:  # and they can be listened on
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
