"""Golden-ish checks of the rewrap on the fixture messages."""

from __future__ import annotations

import email
import re

import pytest

from relay.transform import Block, Decisions

from .conftest import (
    FIXTURES,
    assert_safe,
    attachments,
    header_count,
    html_part,
    load,
    parse,
    run,
    text_part,
    visible,
)

REWRAPPED = [
    "utf8_html_style.eml",
    "latin1_text_qp.eml",
    "latin9_text_8bit.eml",
    "cp1252_html_base64.eml",
    "mislabelled_latin1_cp1252.eml",
    "text_only_utf8_lf.eml",
    "related_inline_images.eml",
    "attachments_pdf_csv.eml",
    "rfc2231_filename.eml",
    "broken_mime_truncated.eml",
    "hostile_html.eml",
    "apple_mixed_inline.eml",
    "forwarded_rfc822_dkim.eml",
    "order_confirmation_30k.eml",
]

KEPT_HEADERS = ("message-id", "date", "from", "to", "cc", "reply-to", "in-reply-to", "references", "subject")


@pytest.mark.parametrize("name", REWRAPPED)
def test_rewrap_structure(name, skins):
    raw = load(name)
    out, report = run(raw, skins)
    assert report.action == "rewrapped", report
    assert report.reason == ""
    assert report.skin == "plain" and report.skin_version == skins.version("plain")
    src, msg = parse(raw), parse(out)
    # one X-Relay-Id, the skin marker, no request header left
    assert header_count(out, "X-Relay-Id") == 1 and msg["X-Relay-Id"] == "Q-0001"
    assert msg["X-Relay-Skin"] == "plain"
    assert not [
        k
        for k in msg
        if k.lower().startswith("x-relay-") and k.lower() not in ("x-relay-id", "x-relay-skin")
    ]
    assert "DKIM-Signature" not in msg
    # original headers kept, same values
    for h in KEPT_HEADERS:
        assert src.get_all(h) == msg.get_all(h), h
    # structure: alternative with text first, then html
    alt = next(p for p in msg.walk() if p.get_content_type() == "multipart/alternative")
    kinds = [p.get_content_type() for p in alt.iter_parts()]
    assert kinds[0] == "text/plain" and kinds[1] in ("text/html", "multipart/related")
    # every attachment byte-identical, with its filename
    assert attachments(src) == attachments(msg)
    # the output is safe and sits in the layout
    html = html_part(msg)
    assert_safe(html)
    assert "Maison Test SAS" in html and "camille.durand@example.org" in html
    assert text_part(msg).strip()
    # no structural defect (a copied attachment may keep its own bad base64 padding)
    assert not [d for p in msg.walk() for d in p.defects if "Base64" not in type(d).__name__]


def test_style_rules_inlined_and_link_kept(skins):
    out, _ = run(load("utf8_html_style.eml"), skins)
    html = html_part(parse(out))
    m = re.search(r'<a [^>]*href="https://www.maison-lumiere.example/compte/reset\?t=8f3a9c"[^>]*>', html)
    assert m and "background-color: #d35400" in m.group(0)
    assert "color: #888888" in html  # p.note
    assert "Réinitialisation" in parse(out)["Subject"]
    assert "Vous avez demandé à réinitialiser" in html


@pytest.mark.parametrize(
    "name, expected",
    [
        ("latin1_text_qp.eml", ["Mme Lefèvre", "n° 7734-FR a été préparé", "Nîmes", "L'équipe logistique"]),
        ("latin9_text_8bit.eml", ["25 €", "le cœur de gamme", "À bientôt"]),
        ("cp1252_html_base64.eml", ["Léa", "retour – nous l’avons bien reçu", "49,90 €"]),
        ("mislabelled_latin1_cp1252.eml", ["“AUTOMNE”", "10 € – valable jusqu’à dimanche"]),
        ("text_only_utf8_lf.eml", ["n° 10452 est expédiée", "Écrivez à", "À très vite"]),
    ],
)
def test_charsets_never_mojibake(name, expected, skins):
    out, _ = run(load(name), skins)
    msg = parse(out)
    html, text = visible(html_part(msg)), text_part(msg)
    for s in expected:
        assert s in html, (s, html)
        assert s in text, (s, text)
    for bad in ("Ã", "â€", "\ufffd", "Â"):
        assert bad not in html and bad not in text


def test_encoded_subject_decoded_in_layout(skins):
    out, _ = run(load("cp1252_html_base64.eml"), skins)
    html = html_part(parse(out))
    assert "<title>Votre retour – confirmation</title>" in html


def test_text_only_becomes_paragraphs_with_links(skins):
    out, _ = run(load("text_only_utf8_lf.eml"), skins)
    html = html_part(parse(out))
    assert '<a href="https://www.laposte.example/outils/suivre-vos-envois?code=6A1234567890">' in html
    assert '<a href="mailto:aide@maison-lumiere.example">aide@maison-lumiere.example</a>' in html
    assert '<a href="http://www.maison-lumiere.example/aide">www.maison-lumiere.example/aide</a>.' in html
    assert "<p>Bonjour Camille,</p>" in html
    assert "Votre commande n° 10452 est expédiée !<br>" in html
    assert b"\r\n" not in out  # LF in, LF out
    assert parse(out)["Cc"] == "suivi@maison-lumiere.example"


def test_text_only_layout_txt(skins):
    out, _ = run(load("text_only_utf8_lf.eml"), skins, skin="texty")
    text = text_part(parse(out))
    assert text.startswith("Maison Test\n===========")
    assert "Article                 Qté   Prix" in text  # the original text, columns intact


def test_related_images_keep_cid_references(skins):
    out, _ = run(load("related_inline_images.eml"), skins)
    msg = parse(out)
    related = next(p for p in msg.walk() if p.get_content_type() == "multipart/related")
    parts = list(related.iter_parts())
    assert parts[0].get_content_type() == "text/html"
    cids = {p["Content-ID"].strip("<>") for p in parts[1:]}
    html = parts[0].get_content()
    refs = set(re.findall(r'src="cid:([^"]+)"', html))
    assert refs == cids == {"logo@maison-lumiere", "banner.png@01DC3D0A.5E6F7A80"}
    assert msg["List-Unsubscribe"] == "<mailto:unsubscribe@maison-lumiere.example?subject=camille>"


def test_pdf_and_rfc2231_names(skins):
    msg = parse(run(load("attachments_pdf_csv.eml"), skins)[0])
    pdf = next(p for p in msg.walk() if p.get_content_type() == "application/pdf")
    data = pdf.get_payload(decode=True)
    assert data.startswith(b"%PDF-1.4") and data.rstrip().endswith(b"%%EOF")
    assert pdf.get_filename() == "FA-2025-10452.pdf"
    assert msg["In-Reply-To"] == "<order-10452@maison-lumiere.example>"
    assert msg["X-ERP-Document"] == "FA-2025-10452"
    names = {p.get_filename() for p in parse(run(load("rfc2231_filename.eml"), skins)[0]).walk()}
    assert {"Facture n° 10452 été.pdf", "Garantie – Bougie.txt"} <= names


def test_format_flowed_unflowed(skins):
    text = text_part(parse(run(load("rfc2231_filename.eml"), skins)[0]))
    assert "la facture d'été et le bon de garantie." in text


def test_hostile_html_is_neutralised(skins):
    out, report = run(load("hostile_html.eml"), skins)
    assert report.action == "rewrapped"
    html = html_part(parse(out))
    assert_safe(html)
    assert "Donnez votre avis" in html and "Merci" in html
    assert "evil.example" not in html and "alert(" not in html and "document.cookie" not in html
    # the message content is a variable, never template source
    assert "{{ 7*7 }}" in html and "49" not in visible(html)
    assert header_count(out, "X-Relay-Use-Skin") == 0 and header_count(out, "X-Relay-No-Wrap") == 0


def test_apple_inline_parts_all_kept(skins):
    msg = parse(run(load("apple_mixed_inline.eml"), skins)[0])
    html = visible(html_part(msg))
    assert "voici la photo" in html and "Merci d'avance." in html
    assert [p.get_filename() for p in msg.walk() if p.get_content_type() == "image/png"] == ["IMG_0042.png"]


def test_forwarded_message_kept_and_dkim_stripped(skins):
    raw = load("forwarded_rfc822_dkim.eml")
    out, report = run(raw, skins)
    assert report.dkim == "stripped"
    msg = parse(out)
    assert "DKIM-Signature" not in msg and msg["X-Custom-Trace"] == "abc123"
    fwd = next(p for p in msg.walk() if p.get_content_type() == "message/rfc822")
    inner = fwd.get_payload()[0]
    assert inner["Subject"] == "Tarifs 2026" and "Hausse de 3 % sur la cire de soja." in inner.get_content()
    assert fwd.get_filename() == "Tarifs 2026.eml"


def test_order_confirmation(skins):
    raw = load("order_confirmation_30k.eml")
    assert 25_000 < len(raw) < 35_000
    block = Block(
        "complementary", '<p class="reco">Mèches en coton — 4,50 €</p>', priority=5, products=("MC010",)
    )
    out, report = run(
        raw, skins, decisions=Decisions(skin="plain", kind="order_confirmation", blocks=(block,))
    )
    assert report.blocks == ["complementary"] and not report.over_budget
    html = html_part(parse(out))
    assert '<div data-relay-block="complementary"><p class="reco">Mèches en coton — 4,50 €</p></div>' in html
    assert "Merci pour votre commande, Camille" in html
    assert re.search(
        r"<td style=\"text-align: right;white-space: nowrap;width: 80px;[^\"]*\">19,00", html
    )  # own <style>
    assert 'class="preheader"' in html and ">Merci pour votre commande, Camille" in html
    text = text_part(parse(out))
    assert "Suivre ma commande (https://www.maison-lumiere.example/compte/commandes/10452)" in text
    assert "Total TTC  612,70 €" in text
    assert report.html_bytes == len(html.replace("\r\n", "\n").encode())


def test_set_headers_replace(skins):
    d = Decisions(
        skin="plain",
        set_headers=(("List-Unsubscribe", "<https://u.example/x>"), ("X-Campaign", "Automne – 2025")),
    )
    out, _ = run(load("related_inline_images.eml"), skins, decisions=d)
    msg = parse(out)
    assert msg.get_all("List-Unsubscribe") == ["<https://u.example/x>"]
    assert msg["X-Campaign"] == "Automne – 2025"
    for bad in (
        ("X-Bad", "a\r\nBcc: x@evil"),
        ("Content-Type", "text/plain"),
        ("X-Relay-Id", "x"),
        ("Bad Name", "x"),
    ):
        with pytest.raises(ValueError):
            run(
                load("related_inline_images.eml"),
                skins,
                decisions=Decisions(skin="plain", set_headers=(bad,)),
            )


def test_deterministic(skins):
    raw = load("order_confirmation_30k.eml")
    assert run(raw, skins)[0] == run(raw, skins)[0]


def test_unknown_skin_raises(skins):
    from relay.transform import UnknownSkin

    with pytest.raises(UnknownSkin):
        run(load("latin1_text_qp.eml"), skins, skin="nope")


def test_invalid_queue_id(skins):
    with pytest.raises(ValueError):
        run(load("latin1_text_qp.eml"), skins, queue_id="a\r\nBcc: x")


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in FIXTURES.glob("*.eml"))
    + sorted(f"hostile/{p.name}" for p in FIXTURES.glob("hostile/*.eml")),
)
def test_a_shared_parse_gives_the_same_bytes_and_is_left_unchanged(skins, name):
    """The worker hands the rules' MIME parse to the rewrap: the output must not depend on it, and the
    tree must come out as it went in (the next recipient of the message reads it again)."""
    raw = load(name)
    shared = email.message_from_bytes(raw)
    before = _snapshot(shared)
    decisions = Decisions(skin="plain", blocks=(Block(name="b", html="<p>Vous aimerez</p>"),))
    alone = run(raw, skins, decisions=decisions)
    first = run(raw, skins, decisions=decisions, parse=lambda: shared)
    second = run(raw, skins, decisions=decisions, parse=lambda: shared)
    assert alone[0] == first[0] == second[0]
    assert _snapshot(shared) == before


def _snapshot(msg) -> list:
    return [
        (part.items(), part.get_unixfrom(), part.preamble, part.epilogue,
         part._payload if isinstance(part._payload, str) else [id(p) for p in part._payload])
        for part in msg.walk()
    ]


ALL_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.eml")) + sorted(
    f"hostile/{p.name}" for p in FIXTURES.glob("hostile/*.eml")
)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_the_lean_parse_gives_the_same_bytes(skins, name):
    """Forced on every message and every run of base64-alphabet lines, however short (a word alone on a
    line too), the lean parse must not change one output byte, nor what the rules read of the body."""
    from relay.rules import MessageFacts
    from relay.transform.parse import parse_message

    raw = load(name)
    decisions = Decisions(skin="plain", blocks=(Block(name="b", html="<p>Vous aimerez</p>"),))
    plain = run(raw, skins, decisions=decisions)
    lean = run(raw, skins, decisions=decisions, parse=lambda: parse_message(raw, lean_from=0, lean_run=1))
    assert lean[0] == plain[0]
    assert lean[1] == plain[1]
    facts = MessageFacts.from_raw(raw, source="", mail_from="")
    lean_facts = MessageFacts.from_raw(raw, source="", mail_from="")
    lean_facts.__dict__["message"] = parse_message(raw, lean_from=0, lean_run=1)
    assert (lean_facts.html, lean_facts.text) == (facts.html, facts.text)
