"""Each rule feature on fixture messages, with the shipped rules (rules/)."""

from __future__ import annotations

import email
import re
from email.utils import getaddresses

import pytest

from relay.rules import RuleBook, verify_token
from relay.transform import Decisions

from .conftest import PUBLIC, SECRET, T0, facts, msg

ORDERED = {"BF180", "DR100", "SL075", "CD004", "BO075", "PL140", "MC010", "PV012"}


def test_order_confirmation_30k_gets_complementary_block(book, order_raw):
    d = book.decide(facts(order_raw), "camille.durand@example.org", None, T0)
    assert isinstance(d.decisions, Decisions)
    assert (d.decisions.category, d.decisions.kind, d.decisions.skin) == (
        "transactional",
        "order_confirmation",
        "boutique",
    )
    assert [b.name for b in d.decisions.blocks] == ["complementary"]
    block = d.decisions.blocks[0]
    assert block.priority == 10 and len(block.products) == 3
    assert not set(block.products) & ORDERED  # never what was just ordered
    assert all(book.catalog.get(p).in_stock for p in block.products)
    assert d.products_offered == block.products
    assert "Pour accompagner votre commande" in block.html and "€" in block.html
    assert "data-relay-block" not in block.html  # the transform wraps it
    assert [f.name for f in d.followups] == ["merci-commande"]
    assert d.followups[0].due_at == T0 + 3 * 86400
    assert set(d.followups[0].payload["ordered"]) == ORDERED
    assert d.versions["rules"] == book.version and len(book.version) == 12
    assert d.versions["catalog"]
    assert not d.suppressed


@pytest.mark.parametrize("subject", ["Votre COMMANDE n°42", "Your order #1042", "Re: order status"])
def test_trusted_client_with_commande_or_order_subject(book, subject):
    d = book.decide(facts(msg(subject), source="127.0.0.1"), "claire@example.org", None, T0)
    assert d.decisions.kind == "order_confirmation"
    assert [b.name for b in d.decisions.blocks] == ["complementary"]  # featured products: nothing recognised
    featured = {p.id for p in book.catalog.featured()}
    assert set(d.decisions.blocks[0].products) <= featured


def test_untrusted_client_is_not_an_order(book):
    d = book.decide(facts(msg("Votre commande"), source="203.0.113.9"), "claire@example.org", None, T0)
    assert d.decisions.kind is None and d.decisions.blocks == ()
    # an AUTH user named in [sources] trusted is trusted
    d = book.decide(facts(msg("Votre commande"), source="prestashop"), "claire@example.org", None, T0)
    assert d.decisions.kind == "order_confirmation"


def test_shipping_and_password_reset_have_no_block(book):
    d = book.decide(facts(msg("Votre commande a été expédiée")), "claire@example.org", None, T0)
    assert (d.decisions.kind, d.decisions.blocks) == ("shipping", ())
    d = book.decide(facts(msg("Réinitialisation de votre mot de passe")), "claire@example.org", None, T0)
    assert (d.decisions.kind, d.decisions.category, d.decisions.blocks) == (
        "password_reset",
        "transactional",
        (),
    )
    assert d.followups == ()


@pytest.mark.parametrize(
    "headers,subject",
    [
        ("List-Id: Nouveautés <news.maison-lumiere.example>\r\n", "Les nouveautés d'automne"),
        ("Precedence: bulk\r\n", "Les nouveautés d'automne"),
        ("", "Newsletter : -20 % sur le lin"),
        ("", "newsletter de novembre"),
    ],
)
def test_marketing_gets_one_click_unsubscribe(book, headers, subject):
    d = book.decide(facts(msg(subject, headers=headers)), "Claire@Example.org", None, T0)
    assert (d.decisions.category, d.decisions.kind) == ("marketing", "newsletter")
    h = dict(d.decisions.set_headers)
    assert h["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    urls = re.findall(r"<([^>]+)>", h["List-Unsubscribe"])
    assert urls[0].startswith(PUBLIC + "/unsubscribe?t=") and urls[1].startswith("mailto:desinscription@")
    token = urls[0].split("t=", 1)[1]
    assert verify_token(SECRET, token, T0 + 86400) == "claire@example.org"
    assert all("\r" not in v and "\n" not in v for _, v in d.decisions.set_headers)


def test_precedence_list_is_not_bulk(book):
    d = book.decide(facts(msg("Infos", headers="Precedence: list-ish\r\n")), "c@example.org", None, T0)
    assert d.decisions.category == "transactional"


def test_request_headers_are_honoured(book):
    raw = msg(
        "Hello", headers="X-Relay-Category: Marketing\r\nX-Relay-Kind: promo\r\nX-Relay-Use-Skin: default\r\n"
    )
    d = book.decide(facts(raw), "c@example.org", None, T0)
    assert (d.decisions.category, d.decisions.kind, d.decisions.skin) == ("marketing", "promo", "default")
    assert "List-Unsubscribe" in dict(d.decisions.set_headers)


def test_harmonised_sender_keeps_address_and_records_originals(book):
    raw = msg(
        "Votre colis",
        frm="logistique-bot <noreply@logistique.example>",
        headers="Reply-To: noreply@logistique.example\r\n",
    )
    d = book.decide(facts(raw, mail_from="bounce-77@logistique.example"), "c@example.org", None, T0)
    h = dict(d.decisions.set_headers)
    assert getaddresses([h["From"]])[0][1] == "noreply@logistique.example"  # address unchanged
    assert "Maison Lumi" in str(email.header.make_header(email.header.decode_header(h["From"])))
    assert h["Organization"] == "Maison Lumière SAS"
    assert "service-client@" in h["Reply-To"] and h["Reply-To"].isascii()
    assert d.mail_from == "bounces@maison-lumiere.example"
    orig = dict(d.original_headers)
    assert (
        orig["Reply-To"] == "noreply@logistique.example"
        and orig["envelope-from"] == "bounce-77@logistique.example"
    )


def test_header_only_rules_do_not_parse_the_body(book, order_raw):
    f = facts(
        order_raw.replace(b"Subject: =?utf-8?Q?Confirmation", b"List-Id: <n.example>\r\nSubject: =?utf-8?Q?C")
    )
    d = book.decide(f, "c@example.org", None, T0)
    assert d.decisions.category == "marketing"
    assert "_bodies" not in f.__dict__ and "soup" not in f.__dict__ and "tree" not in f.__dict__


def write_rules(root, text, blocks=True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "rules.toml").write_text(text, encoding="utf-8")
    if blocks:
        (root / "blocks").mkdir(exist_ok=True)
        (root / "blocks" / "b.html").write_text("{% for p in products %}[{{ p.id }}]{% endfor %}")
    return root


CAT = """[catalog]\nfile = "{cat}"\n[block.b]\ntemplate = "b.html"\nmax_products = 2
find = [{{ selector = "a[href]", attribute = "href", pattern = '/([A-Z])$' }}]\n"""


def test_every_match_kind(tmp_path):
    cat = tmp_path / "c.csv"
    cat.write_text("id,title,availability,product_type\nA,Lampe,in_stock,L\nB,Abat-jour,in_stock,L\n")
    book = RuleBook.load(
        write_rules(
            tmp_path / "r",
            CAT.format(cat=cat)
            + r"""
[sources]
shop = ["192.0.2.0/24", "alice"]
[[rule]]
name = "by-recipient-domain"
kind = "vip"
[rule.match]
recipient = "vip.example"
[[rule]]
name = "by-sender-glob"
kind = "from-billing"
[rule.match]
mail_from = "billing-*@shop.example"
[[rule]]
name = "by-header"
kind = "ticket"
[rule.match]
header = { "x-ticket-id" = '^\d+$' }
[[rule]]
name = "by-body"
kind = "invoice"
[rule.match]
body = 'facture n°\s*\d+'
[[rule]]
name = "by-selector"
kind = "has-button"
blocks = ["b"]
allow_promotions = true
[rule.match]
html = "a.btn[href^='https://']"
not = { subject = "ignore" }
[[rule]]
name = "by-source"
category = "support"
[rule.match]
source = "shop"
""",
        )
    )
    k = lambda raw, rcpt="c@example.org", **kw: book.decide(facts(raw, **kw), rcpt, None, T0).decisions  # noqa: E731
    assert k(msg("x"), "a@sub.vip.example").kind == "vip"
    assert k(msg("x"), mail_from="billing-7@shop.example").kind == "from-billing"
    assert k(msg("x", headers="X-Ticket-Id: 123\r\n")).kind == "ticket"
    assert k(msg("x", headers="X-Ticket-Id: abc\r\n")).kind is None
    assert k(msg("x", body="Votre facture n° 42")).kind == "invoice"
    html = '<p><a class="btn" href="https://x.example/A">go</a></p>'
    d = k(msg("x", html=html))
    assert d.kind == "has-button" and d.blocks[0].html == "[B]"  # A was ordered: B, same product_type
    assert k(msg("ignore", html=html)).kind is None
    assert k(msg("x"), source="192.0.2.7").category == "support"
    assert k(msg("x"), source="alice").category == "support"
    assert k(msg("x"), source="bob").category == "transactional"


def test_promotional_block_needs_allow_promotions(tmp_path):
    cat = tmp_path / "c.csv"
    cat.write_text("id,title\nA,Lampe\n")
    book = RuleBook.load(
        write_rules(
            tmp_path / "r",
            CAT.format(cat=cat)
            + """
[[rule]]
name = "t"
blocks = ["b"]
""",
        )
    )
    d = book.decide(facts(msg("x")), "c@example.org", None, T0)
    assert d.decisions.blocks == () and "allow_promotions" in d.notes[0]


def test_first_match_wins_per_field_and_stop(tmp_path):
    book = RuleBook.load(
        write_rules(
            tmp_path / "r",
            """
[[rule]]
name = "a"
kind = "first"
[[rule]]
name = "b"
kind = "second"
category = "support"
stop = true
[[rule]]
name = "c"
skin = "other"
""",
            blocks=False,
        )
    )
    d = book.decide(facts(msg("x")), "c@example.org", None, T0)
    assert (d.decisions.kind, d.decisions.category, d.decisions.skin) == ("first", "support", "default")
    assert d.matched == ("a", "b")


def test_shadow_and_canary(tmp_path):
    book = RuleBook.load(
        write_rules(
            tmp_path / "r",
            """
[[rule]]
name = "new-skin"
mode = "shadow"
skin = "boutique"
[[rule]]
name = "half"
canary = 50
kind = "canary"
""",
            blocks=False,
        )
    )
    inside = outside = 0
    for i in range(200):
        rcpt = f"user{i}@example.org"
        d = book.decide(facts(msg("x")), rcpt, None, T0)
        assert (
            d.decisions.skin == "default" and d.shadow.skin == "boutique" and d.shadow_rules == ("new-skin",)
        )
        again = book.decide(facts(msg("x")), rcpt.upper(), None, T0)
        assert again.decisions.kind == d.decisions.kind  # deterministic per recipient
        flag = dict(d.canary)["half"]
        assert (d.decisions.kind == "canary") == flag
        inside += flag
        outside += not flag
    assert 60 < inside < 140 and outside > 60


def test_no_unsubscribe_without_secret_is_noted(tmp_path):
    book = RuleBook.load(write_rules(tmp_path / "r", '[[rule]]\nname = "m"\ncategory = "marketing"\n', False))
    d = book.decide(facts(msg("x")), "c@example.org", None, T0)
    assert "List-Unsubscribe" not in dict(d.decisions.set_headers) and "not configured" in d.notes[0]
