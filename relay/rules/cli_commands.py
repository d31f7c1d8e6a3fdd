"""``relay suppress list|add|remove``.

Wired from relay/cli.py: ``add_subparsers(sub)``, then ``run(args, engine)`` when ``args.rules_command``.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO


def add_subparsers(sub: Any) -> argparse.ArgumentParser:
    """Register ``suppress`` on the CLI's subparsers object; sets ``args.func_rules = "suppress"``."""
    p = sub.add_parser(
        "suppress", help="list, add or remove marketing suppressions (unsubscribed recipients)"
    )
    ss = p.add_subparsers(dest="suppress_cmd", required=True)
    lp = ss.add_parser("list", help="list suppressed addresses, newest first")
    lp.add_argument("--match", default=None, help="only addresses containing this text")
    lp.add_argument("--limit", type=int, default=1000)
    ap = ss.add_parser("add", help="suppress marketing to addresses (cancels their pending follow-ups)")
    ap.add_argument("addresses", nargs="+")
    ap.add_argument("--reason", default="manual")
    rp = ss.add_parser("remove", help="allow marketing to addresses again")
    rp.add_argument("addresses", nargs="+")
    p.set_defaults(rules_command="suppress")
    return p


def run(args: argparse.Namespace, engine: Any, *, out: TextIO | None = None, now: float | None = None) -> int:
    """Run a ``suppress`` sub-command on a migrated engine; returns the exit code."""
    from relay.store.ledger import Ledger

    out = out or sys.stdout
    ledger = Ledger(engine)
    now = time.time() if now is None else now
    cmd = args.suppress_cmd
    if cmd == "list":
        rows = suppress_list(ledger, match=args.match, limit=args.limit)
        for s in rows:
            when = datetime.fromtimestamp(s.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{s.address}\t{s.reason}\t{s.source or '-'}\t{when}Z", file=out)
        print(f"{len(rows)} suppressed", file=out)
        return 0
    if cmd == "add":
        for a in args.addresses:
            added = suppress_add(ledger, a, reason=args.reason, now=now)
            print(f"{a}: {'suppressed' if added else 'already suppressed'}", file=out)
        return 0
    if cmd == "remove":
        code = 0
        for a in args.addresses:
            if suppress_remove(ledger, a):
                print(f"{a}: removed", file=out)
            else:
                print(f"{a}: not suppressed", file=out)
                code = 1
        return code
    raise SystemExit(f"unknown suppress command {cmd!r}")


def suppress_list(ledger: Any, *, match: str | None = None, limit: int = 1000) -> list:
    return ledger.list_suppressions(like=match, limit=limit)


def suppress_add(ledger: Any, address: str, *, reason: str = "manual", now: float | None = None) -> bool:
    if "@" not in address:
        raise ValueError(f"not an address: {address!r}")
    return ledger.add_suppression(
        address, reason=reason, source="cli", now=time.time() if now is None else now
    )


def suppress_remove(ledger: Any, address: str) -> bool:
    return ledger.remove_suppression(address)
