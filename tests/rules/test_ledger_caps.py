"""The ledger on real SQLite and PostgreSQL; suppression and caps through decide(); the suppress CLI."""

from __future__ import annotations

import argparse
import io

from relay.rules import cli_commands
from relay.store.ledger import LedgerWrites

from .conftest import T0, facts, msg

DAY = 86400.0
NEWS = msg("Newsletter de novembre", headers="List-Id: <news.maison-lumiere.example>\r\n")


def test_suppressions(ledger):
    assert ledger.add_suppression("Claire@Example.org", reason="manual", source="cli", now=T0) is True
    assert ledger.add_suppression("claire@example.org", now=T0 + 1) is False
    assert ledger.is_suppressed("<CLAIRE@example.org>") and not ledger.is_suppressed("bob@example.org")
    ledger.add_suppression("bob@example.org", now=T0 + 5)
    assert [s.address for s in ledger.list_suppressions()] == ["bob@example.org", "Claire@Example.org"]
    assert [s.address for s in ledger.list_suppressions(like="CLAIRE")] == ["Claire@Example.org"]
    assert ledger.remove_suppression("claire@example.org") and not ledger.remove_suppression(
        "claire@example.org"
    )
    assert not ledger.is_suppressed("claire@example.org")


def test_offers_sends_and_followups(ledger):
    ledger.record_offers("a@x.org", "Q1", ["P1", "P2", "P1"], T0, block="b")
    ledger.record_offers("A@x.org", "Q2", ["P1"], T0 + 10 * DAY)
    assert ledger.offer_count("a@x.org", "P1", T0 - 1) == 2
    assert ledger.offer_count("a@x.org", "P1", T0 + 1) == 1
    assert ledger.offer_counts("a@x.org", T0 - 1) == {"P1": 2, "P2": 1}
    assert ledger.offers_for("a@x.org")[0] == ("Q2", "", "P1", T0 + 10 * DAY)
    assert sorted(o[2] for o in ledger.offers_for("a@x.org") if o[0] == "Q1") == ["P1", "P2"]
    for i in range(3):
        ledger.record_send("a@x.org", f"M{i}", "marketing", T0 + i * DAY)
    ledger.record_send("a@x.org", "T1", "transactional", T0)
    assert (
        ledger.marketing_count("a@x.org", T0) == 3 and ledger.marketing_count("a@x.org", T0 + 1.5 * DAY) == 1
    )
    fid = ledger.schedule_followup(
        "a@x.org", "merci", "Q1", T0 + 3 * DAY, payload={"ordered": ["P1"]}, now=T0
    )
    assert ledger.schedule_followup("a@x.org", "merci", "Q1", T0 + 3 * DAY, now=T0) is None  # idempotent
    assert ledger.due_followups(T0 + 2 * DAY) == []
    (due,) = ledger.due_followups(T0 + 3 * DAY)
    assert (due.id, due.payload, due.status) == (fid, {"ordered": ["P1"]}, "pending")
    assert ledger.mark_followup_done(fid, T0 + 3 * DAY) is True
    assert ledger.mark_followup_done(fid, T0 + 3 * DAY) is False
    assert ledger.due_followups(T0 + 9 * DAY) == []
    f2 = ledger.schedule_followup("a@x.org", "merci", "Q2", T0 + 4 * DAY, now=T0)
    assert ledger.cancel_followups("a@x.org", T0) == 1 and ledger.cancel_followup(f2, T0) is False
    f3 = ledger.schedule_followup("a@x.org", "merci", "Q3", T0 + 4 * DAY, now=T0)
    ledger.add_suppression("a@x.org", now=T0)  # unsubscribe cancels pending follow-ups
    assert [f.status for f in ledger.followups_for("a@x.org") if f.id == f3] == ["cancelled"]


def test_marketing_suppressed_transactional_still_goes(book, ledger):
    d = book.decide(facts(NEWS), "claire@example.org", ledger, T0)
    assert not d.suppressed
    ledger.add_suppression("claire@example.org", reason="one-click", now=T0)
    d = book.decide(facts(NEWS), "Claire@example.org", ledger, T0)
    assert d.suppressed and d.suppress_reason == "unsubscribed"
    d = book.decide(facts(msg("Votre commande"), source="127.0.0.1"), "claire@example.org", ledger, T0)
    assert not d.suppressed and d.decisions.category == "transactional"
    assert d.followups == ()  # the marketing follow-up is not scheduled for an unsubscribed recipient
    assert "unsubscribed" in " ".join(d.notes)


def test_marketing_cap_per_rolling_week(book, ledger):
    now = T0
    for i in range(3):  # marketing_per_week = 3 in rules/00-settings.toml
        d = book.decide(facts(NEWS), "c@example.org", ledger, now)
        assert not d.suppressed
        d.record(ledger, "c@example.org", f"Q{i}", now)
        now += DAY
    d = book.decide(facts(NEWS), "c@example.org", ledger, now)
    assert d.suppressed and "marketing cap" in d.suppress_reason
    d.record(ledger, "c@example.org", "Q9", now)  # a suppressed decision records nothing
    assert ledger.marketing_count("c@example.org", 0) == 3
    assert not book.decide(
        facts(msg("Votre commande"), source="::1"), "c@example.org", ledger, now
    ).suppressed
    assert not book.decide(facts(NEWS), "c@example.org", ledger, T0 + 7 * DAY + 1).suppressed  # rolling


def test_product_offer_cap(book, ledger, order_raw):
    rcpt = "camille.durand@example.org"
    first = book.decide(facts(order_raw), rcpt, ledger, T0)
    first.record(ledger, rcpt, "Q1", T0)
    second = book.decide(facts(order_raw), rcpt, ledger, T0 + DAY)
    assert second.products_offered == first.products_offered  # offered once: still allowed (cap 2)
    second.record(ledger, rcpt, "Q2", T0 + DAY)
    third = book.decide(facts(order_raw), rcpt, ledger, T0 + 2 * DAY)
    assert third.products_offered and not set(third.products_offered) & set(first.products_offered)
    later = book.decide(facts(order_raw), rcpt, ledger, T0 + 31 * DAY)  # 30-day window passed
    assert later.products_offered == first.products_offered
    other = book.decide(facts(order_raw), "someone@example.org", ledger, T0 + 2 * DAY)
    assert other.products_offered == first.products_offered  # per recipient


def test_suppress_cli(ledger):
    parser = argparse.ArgumentParser(prog="relay")
    cli_commands.add_subparsers(parser.add_subparsers(dest="command"))

    def run(*argv):
        out = io.StringIO()
        args = parser.parse_args(["suppress", *argv])
        assert args.rules_command == "suppress"
        code = cli_commands.run(args, ledger.engine, out=out, now=T0)
        return code, out.getvalue()

    assert run("add", "a@x.org", "b@x.org", "--reason", "complaint") == (
        0,
        "a@x.org: suppressed\nb@x.org: suppressed\n",
    )
    code, out = run("list")
    assert code == 0 and "a@x.org\tcomplaint\tcli\t" in out and out.endswith("2 suppressed\n")
    assert run("remove", "a@x.org") == (0, "a@x.org: removed\n")
    assert run("remove", "a@x.org") == (1, "a@x.org: not suppressed\n")
    assert run("list", "--match", "b@")[1].endswith("1 suppressed\n")


def test_gathered_after_send_writes_land_in_one_transaction(ledger):
    """A worker gathers the caps and follow-up writes of a group of recipients, then writes them at once;
    a follow-up the message already scheduled is skipped, not an error that would void the rest."""
    ledger.schedule_followup("b@x.org", "merci", "Q9", T0 + 3 * DAY, now=T0)  # from an earlier attempt
    writes = LedgerWrites()
    writes.record_send("B@x.org", "Q9", "marketing", T0, kind="newsletter", rules_version="r1")
    writes.record_offers("b@x.org", "Q9", ["P1", "P2", "P1"], T0, block="cross")
    writes.schedule_followup("b@x.org", "merci", "Q9", T0 + 3 * DAY, payload={"ordered": ["P1"]}, now=T0)
    writes.schedule_followup("c@x.org", "merci", "Q9", T0 + 3 * DAY, now=T0)
    ledger.write(writes)
    assert ledger.marketing_count("b@x.org", T0) == 1
    assert ledger.offer_counts("b@x.org", T0 - 1) == {"P1": 1, "P2": 1}
    assert len(ledger.followups_for("b@x.org")) == 1 and len(ledger.followups_for("c@x.org")) == 1
    ledger.write(LedgerWrites())  # nothing gathered: nothing written, no error
