"""`relay` command: serve, history, queue, check.

Every failure prints one clear line naming the file and key (or the address) and exits non-zero.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys

from relay import config


def _settings(args) -> config.Settings:
    return config.load(args.config)


def _store(settings: config.Settings):
    from relay.store.database import make_engine, migrate
    from relay.store.queue import Store

    engine = make_engine(settings.database.url, pool_size=1)
    migrate(engine)
    return Store(engine)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_serve(args) -> int:
    settings = _settings(args)
    if settings.delivery.workers > 0:
        # Worker processes report metrics through files; must be set before prometheus_client loads.
        mp = settings.paths.state / "metrics"
        shutil.rmtree(mp, ignore_errors=True)
        mp.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mp)
    from relay.app import serve
    from relay.delivery.process import run_loop
    from relay.memory import return_big_blocks

    return_big_blocks()
    run_loop(serve(settings))
    return 0


def cmd_history(args) -> int:
    store = _store(_settings(args))
    entries = store.history(args.address, limit=args.limit)
    if args.json:
        for e in entries:
            e["received_at"] = _iso(e["received_at"])
            e["updated_at"] = _iso(e["updated_at"])
            for ev in e["events"]:
                ev["at"] = _iso(ev["at"])
        json.dump(entries, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    if not entries:
        print(f"no messages for {args.address}")
        return 0
    for e in entries:
        print(f"{_when(e['received_at'])}  {e['status']:<10} {e['queue_id']}  {e['subject'][:70]}")
        print(f"    from <{e['mail_from']}> via {e['source']}  message-id {e['message_id'] or '-'}")
        if e["skin"] or e["blocks"] or e["category"]:
            print(f"    {e['category'] or '-'}/{e['kind'] or '-'}  skin {e['skin'] or '-'}  "
                  f"blocks {', '.join(e['blocks']) or '-'}  products {', '.join(e['products']) or '-'}")
        if e["upstream_reply"]:
            print(f"    upstream: {e['upstream_reply']}")
        for ev in reversed(e["events"]):
            print(f"      {_when(ev['at'])} {ev['kind']:<11} {ev['detail'] or ''}")
    return 0


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def cmd_queue(args) -> int:
    store = _store(_settings(args))
    if args.action == "retry":
        if not args.ids:
            print("relay queue retry: name queue ids or recipient ids, or 'all'", file=sys.stderr)
            return 2
        n = store.retry_now(args.ids)
        print(f"{n} recipient(s) due now")
        return 0
    if args.action == "delete":
        if not args.ids:
            print("relay queue delete: name queue ids or recipient ids", file=sys.stderr)
            return 2
        n = store.delete(args.ids)
        print(f"{n} recipient(s) deleted from the queue")
        return 0
    statuses = {
        "all": ("queued", "active", "deferred", "failed"),
        "failed": ("failed",),
        "deferred": ("deferred",),
        "due": ("queued", "active"),
    }[args.state]
    rows = store.listing(statuses, limit=args.limit)
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        print()
        return 0
    counts = store.depth()
    print(f"queued {counts['queued']}  active {counts['active']}  deferred {counts['deferred']}")
    for r in rows:
        state = r["status"] + ("" if r["status"] == "failed" else " (due)" if r["due"] else "")
        print(
            f"{r['id']:>8} {r['queue_id']} {state:<15} tries {r['attempts']:<3} "
            f"next {_when(r['next_attempt_at']) if r['status'] != 'failed' else '-':<19} "
            f"<{r['mail_from']}> -> <{r['address']}>"
        )
        if r["last_reply"]:
            print(f"         {r['last_reply'][:150]}")
    return 0


def cmd_check(args) -> int:
    """Validates the config, the skins and the DKIM keys; every problem as one file:line line."""
    settings = _settings(args)
    from relay.delivery.pipeline import load_dkim_keys
    from relay.transform import SkinError, SkinLibrary

    errors = []
    try:
        skins = SkinLibrary.load(settings.paths.skins)
        names = ", ".join(skins.names()) or "none"
        if settings.rewrap.default_skin and settings.rewrap.default_skin not in skins:
            errors.append(
                f"{settings.source}: rewrap.default_skin: no skin named "
                f"{settings.rewrap.default_skin!r} in {settings.paths.skins}"
            )
    except SkinError as e:
        errors.append(str(e))
        names = "?"
    except OSError as e:
        errors.append(f"{settings.paths.skins}: {e.strerror}")
        names = "?"
    try:
        load_dkim_keys(settings)
    except config.ConfigError as e:
        errors.append(str(e))
    rules = "none"
    if settings.paths.rules.is_dir():
        from relay.rules import check as check_rules

        rule_errors = check_rules(settings.paths.rules)  # the skins were checked above
        errors.extend(rule_errors)
        rules = "errors" if rule_errors else str(settings.paths.rules)
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        return 1
    print(f"{settings.source}: ok (skins: {names}; rules: {rules})")
    return 0


def cmd_suppress(args) -> int:
    from relay.rules import cli_commands

    store = _store(_settings(args))
    return cli_commands.run(args, store.engine)


def cmd_replay(args) -> int:
    """Re-renders a logged message with today's rules and skins (or another skin), for review."""

    from relay.delivery.pipeline import load_dkim_keys
    from relay.rules import MessageFacts, RuleBook, RuleError, load_or_create_secret
    from relay.transform import Decisions, SkinError, SkinLibrary, transform

    settings = _settings(args)
    store = _store(settings)
    found = store.message(args.queue_id)
    if found is None:
        print(f"relay replay: no message {args.queue_id} in {settings.database.url}", file=sys.stderr)
        return 2
    meta, rcpts = found
    rcpt = args.rcpt or (rcpts[0] if rcpts else "client@example.org")
    try:
        skins = SkinLibrary.load(settings.paths.skins)
        decisions = Decisions(skin=settings.rewrap.default_skin or None)
        matched: list[str] = []
        versions: dict = {}
        if settings.paths.rules.is_dir():
            book = RuleBook.load(
                settings.paths.rules,
                secret=load_or_create_secret(settings.paths.secret),
                public_url=settings.http.base_url,
            )
            facts = MessageFacts.from_raw(
                meta["raw"],
                source=meta["source"],
                mail_from=meta["mail_from"],
                client_addr=meta["client_addr"],
            )
            rd = book.decide(facts, rcpt, None, meta["received_at"])  # no ledger: a replay sends nothing
            decisions, matched, versions = rd.decisions, list(rd.matched), rd.versions
    except (SkinError, RuleError) as e:
        print(f"relay replay: {e}", file=sys.stderr)
        return 1
    if args.skin:
        if args.skin not in skins:
            print(f"relay replay: no skin {args.skin!r} (have: {', '.join(skins.names())})", file=sys.stderr)
            return 2
        from dataclasses import replace

        decisions = replace(decisions, skin=args.skin)
    out, report = transform(
        meta["raw"],
        recipient=rcpt,
        queue_id=args.queue_id,
        decisions=decisions,
        skins=skins,
        mail_from=meta["mail_from"],
        dkim_keys=load_dkim_keys(settings),
        html_budget=settings.rewrap.html_budget,
    )
    _write_rendered(out, args.output)
    print(
        f"replay {args.queue_id} for {rcpt}: {report.action} skin={report.skin}@{report.skin_version} "
        f"blocks={','.join(report.blocks) or '-'} rules={','.join(matched) or '-'} "
        f"versions={versions}",
        file=sys.stderr,
    )
    return 0


def cmd_preview(args) -> int:
    """Rewraps one .eml as the relay would, for admins editing a skin."""
    from pathlib import Path

    from relay.delivery.pipeline import load_dkim_keys
    from relay.transform import Decisions, SkinError, SkinLibrary, transform

    settings = _settings(args)
    path = Path(args.file)
    try:
        raw = path.read_bytes()
    except OSError as e:
        print(f"relay preview: {path}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        skins = SkinLibrary.load(settings.paths.skins)
    except SkinError as e:
        print(f"relay preview: {e}", file=sys.stderr)
        return 1
    skin = args.skin or settings.rewrap.default_skin
    if skin not in skins:
        print(
            f"relay preview: no skin {skin!r} in {settings.paths.skins} (have: {', '.join(skins.names())})",
            file=sys.stderr,
        )
        return 2
    try:
        out, report = transform(
            raw,
            recipient=args.rcpt,
            queue_id="PREVIEW",
            decisions=Decisions(skin=skin),
            skins=skins,
            mail_from=args.mail_from,
            dkim_keys=load_dkim_keys(settings),
            html_budget=settings.rewrap.html_budget,
        )
    except SkinError as e:
        print(f"relay preview: {e}", file=sys.stderr)
        return 1
    _write_rendered(out, args.output)
    print(
        f"{report.action}{': ' + report.reason if report.reason else ''} (skin {report.skin}, "
        f"html {report.html_bytes} bytes{', OVER BUDGET' if report.over_budget else ''})",
        file=sys.stderr,
    )
    return 0


def _write_rendered(message: bytes, output: str | None) -> None:
    """To ``output`` (its HTML part alone when the name ends in .html), else to stdout."""
    if output and output.endswith(".html"):
        message = _html_of(message)
    if output:
        from pathlib import Path

        Path(output).write_bytes(message)
    else:
        sys.stdout.buffer.write(message)


def _html_of(message: bytes) -> bytes:
    import email
    from email.policy import compat32

    msg = email.message_from_bytes(message, policy=compat32)
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            payload = part.get_payload(decode=True) or b""
            return payload.decode(part.get_content_charset() or "utf-8", "replace").encode("utf-8")
    return b""


def cmd_purge(args) -> int:
    """Log retention: removes messages older than N days whose recipients are all final."""
    import time

    if args.days <= 0:
        print("relay purge: --days must be positive", file=sys.stderr)
        return 2
    n = _store(_settings(args)).purge(before=time.time() - args.days * 86400)
    print(f"{n} message(s) older than {args.days} days removed from the log")
    return 0


def cmd_hash_password(args) -> int:
    """Reads one password from stdin (so scripts can pipe it) and prints its scrypt hash."""
    from relay.intake.auth import hash_password

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("relay hash-password: empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description="brand-relay: rewrapping SMTP relay")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument(
            "--config", "-c", help=f"TOML config file (default: ${config.ENV_CONFIG} or built-in)"
        )
        return sp

    s = with_config(sub.add_parser("serve", help="run the relay"))
    s.set_defaults(fn=cmd_serve)

    h = with_config(sub.add_parser("history", help="one recipient's timeline, newest first"))
    h.add_argument("address")
    h.add_argument("--json", action="store_true")
    h.add_argument("--limit", type=int, default=100)
    h.set_defaults(fn=cmd_history)

    q = with_config(sub.add_parser("queue", help="list the queue; retry or delete entries"))
    q.add_argument("action", nargs="?", choices=("list", "retry", "delete"), default="list")
    q.add_argument("ids", nargs="*", help="queue ids, recipient ids, or 'all' (retry)")
    q.add_argument("--state", choices=("all", "due", "deferred", "failed"), default="all")
    q.add_argument("--limit", type=int, default=200)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_queue)

    c = with_config(sub.add_parser("check", help="validate the configuration, skins and keys"))
    c.set_defaults(fn=cmd_check)

    from relay.rules import cli_commands

    sp = cli_commands.add_subparsers(sub)
    sp.add_argument("--config", "-c", help="TOML config file")
    sp.set_defaults(fn=cmd_suppress)

    rp = with_config(sub.add_parser("replay", help="re-render a logged message with today's files"))
    rp.add_argument("queue_id")
    rp.add_argument("--skin", help="render with this skin instead of the one the rules choose")
    rp.add_argument("--rcpt", help="render for this recipient (default: the message's first)")
    rp.add_argument("-o", "--output", help="write here; a name ending in .html writes the HTML part alone")
    rp.set_defaults(fn=cmd_replay)

    pg = with_config(sub.add_parser("purge", help="delete finished mail older than N days from the log"))
    pg.add_argument("--days", type=float, required=True)
    pg.set_defaults(fn=cmd_purge)

    hp = sub.add_parser("hash-password", help="hash a password read from stdin for [[smtp.users]]")
    hp.set_defaults(fn=cmd_hash_password)

    pv = with_config(sub.add_parser("preview", help="rewrap an .eml with a skin, as the relay would"))
    pv.add_argument("file", help="the message (.eml)")
    pv.add_argument("--skin", help="skin name (default: rewrap.default_skin)")
    pv.add_argument("--rcpt", default="client@example.org", help="recipient the message is rendered for")
    pv.add_argument("--mail-from", default="shop@example.com", help="envelope sender")
    pv.add_argument("-o", "--output", help="write here; a name ending in .html writes the HTML part alone")
    pv.set_defaults(fn=cmd_preview)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
    try:
        return args.fn(args)
    except config.ConfigError as e:
        print(f"relay: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the store down, a file unreadable: one clear line
        from relay.store.database import StoreError

        if isinstance(e, StoreError):
            print(f"relay: store error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
