"""Queue operations at scale: Store.claim and Store.history with N logged recipients (SQLite and PostgreSQL).

Fills a fresh database (schema by relay's own migrations) with N messages of one recipient each, 2 events
per recipient (received, sent), ~10 messages per customer address, max(4000, N/250) recipients pending
(half queued and due, a quarter deferred and due, a quarter deferred for later). The raw message column
holds a 512-byte stand-in: the queries under test never read it. Then ANALYZE, then times Store.claim
(50 per call, as a worker does) and Store.history (one customer's timeline), median of 20 each, and
writes their plans (EXPLAIN QUERY PLAN on SQLite,
EXPLAIN (ANALYZE, BUFFERS) in a rolled-back transaction on PostgreSQL) as Markdown.

    python bench/queue_scale.py --rows 1000000 --out /tmp/qs.md
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import event  # noqa: E402

from relay.store.database import make_engine, migrate  # noqa: E402
from relay.store.queue import Store  # noqa: E402

BATCH = 10_000
RAW = b"X" * 512
PG_ADMIN = os.environ.get("RELAY_TEST_PG", "host=127.0.0.1 port=5432 dbname=test")


def _rows(n: int, now: float):
    """Yields (message, recipient, events) tuples for n recipients, oldest first."""
    customers = max(1, n // 10)
    pending = min(n // 2, max(4000, n // 250))
    span = 90 * 86400.0
    for i in range(n):
        t = now - span + span * i / n
        qid = f"{int(t * 1000):011X}{i:010X}"
        addr = f"client{(i * 7919) % customers}@example.org"
        left = n - i
        if left <= pending // 2:
            status, nxt, attempts = "queued", t, 0  # due now: fresh mail
        elif left <= pending * 3 // 4:
            status, nxt, attempts = "deferred", now - 60, 1  # retry due
        elif left <= pending:
            status, nxt, attempts = "deferred", now + 3600, 1  # retry later
        else:
            status, nxt, attempts = "sent", t + 1, 1
        msg = (qid, t, "commandes@maison-lumiere.example", "127.0.0.1", "127.0.0.1", "shop-web-01",
               f"<{qid}@maison-lumiere.example>", f"Confirmation de votre commande n° {i}", len(RAW), RAW)
        rcpt = (qid, addr, addr, status, attempts, nxt, 0, "250 2.0.0 Ok" if status == "sent" else None,
                t + 1, "default" if status == "sent" else None,
                '["complementary"]' if status == "sent" else None)
        evs = [(qid, addr, t, "received", "from 127.0.0.1 (127.0.0.1)")]
        if status == "sent":
            evs.append((qid, addr, t + 1, "sent", "250 2.0.0 Ok"))
        yield msg, rcpt, evs


MSG_COLS = ("queue_id", "received_at", "mail_from", "source", "client_addr", "helo", "message_id", "subject",
            "size", "raw")
RCPT_COLS = ("queue_id", "address", "address_key", "status", "attempts", "next_attempt_at", "crashes",
             "last_reply", "updated_at", "skin", "blocks")
EV_COLS = ("queue_id", "address_key", "at", "kind", "detail")


def _batches(n: int, now: float):
    m, r, e = [], [], []
    for msg, rcpt, evs in _rows(n, now):
        m.append(msg)
        r.append(rcpt)
        e.extend(evs)
        if len(m) >= BATCH:
            yield m, r, e
            m, r, e = [], [], []
    if m:
        yield m, r, e


def _ins(table: str, cols: tuple[str, ...], style: str) -> str:
    ph = ", ".join("?" if style == "qmark" else "%s" for _ in cols)
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({ph})"


def fill_sqlite(path: Path, n: int, now: float) -> float:
    started = time.perf_counter()
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")  # the fill only; the timed queries use relay's engine (FULL)
    con.execute("PRAGMA cache_size=-200000")
    for m, r, e in _batches(n, now):
        con.executemany(_ins("messages", MSG_COLS, "qmark"), m)
        con.executemany(_ins("recipients", RCPT_COLS, "qmark"), r)
        con.executemany(_ins("events", EV_COLS, "qmark"), e)
        con.commit()
    con.execute("ANALYZE")
    con.commit()
    con.close()
    return time.perf_counter() - started


def fill_pg(dsn: str, n: int, now: float) -> float:
    import psycopg

    started = time.perf_counter()
    with psycopg.connect(dsn) as con, con.cursor() as cur:
        cur.execute("SET synchronous_commit = off")
        for m, r, e in _batches(n, now):
            for table, cols, rows in (("messages", MSG_COLS, m), ("recipients", RCPT_COLS, r),
                                      ("events", EV_COLS, e)):
                with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
            con.commit()
        con.autocommit = True
        cur.execute("ANALYZE")
    return time.perf_counter() - started


class Capture:
    """Records the SQL a Store call sends, to EXPLAIN it afterwards."""

    def __init__(self, engine):
        self.engine, self.stmts, self.on = engine, [], False
        event.listen(engine, "before_cursor_execute", self._hook)

    def _hook(self, conn, cursor, statement, parameters, context, executemany):
        if self.on and not executemany:
            self.stmts.append((statement, parameters))


def _explain(engine, stmts, postgres: bool) -> str:
    out = []
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for sql, params in stmts:
            out.append("-- " + " ".join(sql.split())[:400])
            if postgres:
                cur.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, params)
                out.extend(r[0] for r in cur.fetchall())
                raw.rollback()
            else:
                cur.execute("EXPLAIN QUERY PLAN " + sql, params)
                out.extend(f"{r[0]:>3} {r[1]:>3} {r[3]}" for r in cur.fetchall())
            out.append("")
    finally:
        raw.rollback()
        raw.close()
    return "\n".join(out)


def measure(url: str, n: int, fill, fill_arg, now: float) -> dict:
    engine = make_engine(url, pool_size=2)
    migrate(engine)
    fill_s = fill(fill_arg, n, now)
    store = Store(engine)
    cap = Capture(engine)
    # history: 20 different customers (each has ~10 messages and ~20 events)
    customers = max(1, n // 10)
    hist = []
    for k in range(21):
        addr = f"client{(k * 104729) % customers}@example.org"
        t = time.perf_counter()
        entries = store.history(addr)
        hist.append(time.perf_counter() - t)
        if k == 0:
            assert entries, f"no history for {addr}"
    cap.on = True
    store.history("client1@example.org")
    cap.on = False
    hist_stmts, cap.stmts = cap.stmts, []
    # claim: 50 per call like a worker; 20 calls; the first one is captured for EXPLAIN
    # claim: 50 per call like a worker; 20 timed calls after one captured call (explained at once, while
    # the due rows it found are still there)
    cap.on = True
    store.claim("bench:explain", 50, 60.0, now)
    cap.on = False
    plans = {
        "claim": _explain(engine, cap.stmts, store.postgres),
        "history": _explain(engine, hist_stmts, store.postgres),
    }
    claim = []
    claimed = 0
    for k in range(20):
        t = time.perf_counter()
        got = store.claim(f"bench:{k}", 50, 60.0, now)
        claim.append(time.perf_counter() - t)
        claimed += len(got)
    engine.dispose()
    return {
        "rows": n, "fill_s": fill_s,
        "claim_ms_median": statistics.median(claim) * 1000, "claim_ms_max": max(claim) * 1000,
        "claimed": claimed,
        "history_ms_median": statistics.median(hist[1:]) * 1000, "history_ms_max": max(hist[1:]) * 1000,
        "plans": plans,
    }


def run(n: int, pg: bool = True) -> dict:
    now = time.time()
    results = {}
    with tempfile.TemporaryDirectory(prefix="relay-qs-") as tmp:
        db = Path(tmp) / "scale.db"
        results["sqlite"] = measure(f"sqlite:///{db}", n, fill_sqlite, db, now)
        results["sqlite"]["db_mb"] = sum(
            p.stat().st_size for p in Path(tmp).iterdir() if p.name.startswith("scale.db")
        ) / 1e6
    if pg:
        try:
            import psycopg

            name = f"relay_bench_qs_{secrets.token_hex(4)}"
            with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as c:
                c.execute(f'CREATE DATABASE "{name}"')
        except Exception as e:  # noqa: BLE001
            results["postgresql"] = {"error": f"PostgreSQL unavailable: {e}"}
            return results
        params = dict(p.split("=", 1) for p in PG_ADMIN.split())
        host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
        try:
            results["postgresql"] = measure(
                f"postgresql+psycopg://{host}:{port}/{name}", n, fill_pg,
                f"host={host} port={port} dbname={name}", now,
            )
        finally:
            with psycopg.connect(PG_ADMIN, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return results


def markdown(res: dict) -> str:
    lines = ["| store | logged recipients | fill (s) | claim 50, median of 20 (ms) | max | "
             "history, median of 20 (ms) | max |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | - | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {name} | {r['rows']:,} | {r['fill_s']:.1f} | {r['claim_ms_median']:.2f} "
            f"| {r['claim_ms_max']:.2f} "
            f"| {r['history_ms_median']:.2f} | {r['history_ms_max']:.2f} |"
        )
    for name, r in res.items():
        if "plans" not in r:
            continue
        for op in ("claim", "history"):
            kind = "EXPLAIN (ANALYZE, BUFFERS)" if name == "postgresql" else "EXPLAIN QUERY PLAN"
            lines += ["", f"{kind}, {name}, Store.{op} at {r['rows']:,} recipients:", "", "```",
                      r["plans"][op].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--no-pg", action="store_true")
    p.add_argument("--out", type=Path, help="write the Markdown section here")
    p.add_argument("--json", type=Path, help="write the raw figures here")
    a = p.parse_args()
    res = run(a.rows, pg=not a.no_pg)
    md = markdown(res)
    if a.out:
        a.out.write_text(md)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    print(md)


if __name__ == "__main__":
    main()
