"""Property tests: whatever the stdlib can parse comes out parseable, with the same attachments
(decoded SHA-256, filename) and the same visible text; the lean MIME writer's output reads back
identically with the stdlib parser."""

from __future__ import annotations

import email
import hashlib
from email import policy
from email.message import EmailMessage
from html import escape

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.transform import Decisions, transform_fail_open
from relay.transform._content import normalize_ws
from relay.transform._mime import qp_encode, write_message

from .conftest import attachments, header_count, html_part, parse, run, text_part, visible

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

_chars = st.characters(
    codec="utf-8", categories=("L", "N", "P", "S", "Zs"), exclude_characters="\x85\u2028\u2029"
)
words = st.text(_chars, min_size=1, max_size=12).filter(lambda w: w.strip())
texts = (
    st.lists(
        st.one_of(words, st.just(" "), st.just("\n"), st.just("https://example.com/a?b=1&c=2")),
        min_size=1,
        max_size=40,
    )
    .map("".join)
    .filter(lambda t: t.strip())
)
filenames = (
    st.text(
        st.characters(codec="utf-8", categories=("L", "N"), include_characters=" -_.()é€"),
        min_size=1,
        max_size=30,
    )
    .map(lambda s: s.strip() + ".bin")
    .filter(lambda s: len(s) > 4)
)
attachment_st = st.tuples(
    st.binary(min_size=0, max_size=3000),
    filenames,
    st.sampled_from(["application/octet-stream", "application/pdf", "image/png", "text/csv"]),
)


def _build(body: str, as_html: bool, charset: str, atts: list, inline: list) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Boutique <shop@maison-lumiere.example>"
    msg["To"] = "camille@example.org"
    msg["Subject"] = "Commande n° 1"
    msg["Message-ID"] = "<prop@maison-lumiere.example>"
    html = "<html><body>" + "".join(f"<p>{escape(line)}</p>" for line in body.split("\n")) + "</body></html>"
    if as_html:
        msg.set_content(body, charset=charset)
        msg.add_alternative(html, subtype="html", charset=charset)
        if inline:
            html_part_ = msg.get_payload()[1]
            for i, data in enumerate(inline):
                html_part_.add_related(data, "image", "png", cid=f"<img{i}@prop>")
    else:
        msg.set_content(body, charset=charset)
    for data, name, ctype in atts:
        if ctype == "text/csv":
            msg.add_attachment(data, maintype="text", subtype="csv", filename=name)
        else:
            maintype, subtype = ctype.split("/")
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes(policy=policy.SMTP)


def _encodable(text: str, charset: str) -> bool:
    try:
        text.encode(charset)
    except UnicodeEncodeError:
        return False
    return True


@SETTINGS
@given(
    body=texts,
    as_html=st.booleans(),
    charset=st.sampled_from(["utf-8", "iso-8859-1", "iso-8859-15", "cp1252"]),
    atts=st.lists(attachment_st, max_size=3),
    inline=st.lists(st.binary(min_size=1, max_size=500), max_size=2),
)
def test_rewrap_preserves_attachments_and_text(skins, body, as_html, charset, atts, inline):
    if not _encodable(body, charset):
        charset = "utf-8"
    raw = _build(body, as_html, charset, atts, inline if as_html else [])
    out, report = run(raw, skins)
    assert report.action == "rewrapped"
    src, msg = parse(raw), parse(out)
    assert attachments(src) == attachments(msg)
    assert header_count(out, "X-Relay-Id") == 1
    expected = normalize_ws(body)
    assert expected in visible(html_part(msg))
    assert expected in normalize_ws(text_part(msg).replace("\r\n", "\n"))
    if inline and as_html:
        related = next(p for p in msg.walk() if p.get_content_type() == "multipart/related")
        assert {p["Content-ID"] for p in list(related.iter_parts())[1:]} == {
            f"<img{i}@prop>" for i in range(len(inline))
        }
    # and the compat32 parser reads the same
    assert attachments(email.message_from_bytes(out, policy=policy.compat32)) == attachments(msg)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.binary(max_size=2000)
    | st.builds(lambda h, b: h + b"\r\n\r\n" + b, st.binary(max_size=300), st.binary(max_size=600))
)
def test_any_input_comes_out_parseable(skins, raw):
    out, report = transform_fail_open(
        raw,
        recipient="a@example.org",
        queue_id="Q-1",
        decisions=Decisions(skin="plain"),
        skins=skins,
        mail_from="s@example.com",
    )
    assert report.action in ("rewrapped", "passthrough", "failed")
    assert header_count(out, "X-Relay-Id") == 1
    email.message_from_bytes(out, policy=policy.default)  # does not raise
    if report.action == "rewrapped":
        assert attachments(parse(raw)) == attachments(parse(out))


# ----------------------------------------------------------------------------- the lean writer

raw_leaf = st.tuples(
    st.sampled_from(["application/octet-stream", "image/png", "text/plain"]),
    st.binary(max_size=2000),
    st.sampled_from(["base64", "quoted-printable", "7bit"]),
    filenames,
)


def _leaf_bytes(ctype: str, data: bytes, cte: str, name: str, eol: bytes, cid: str | None) -> bytes:
    part = EmailMessage()
    maintype, subtype = ctype.split("/")
    if cte == "7bit":
        data = bytes(b for b in data if 32 <= b < 127 or b == 10).replace(b"\n", b"\n") or b"x"
        data = b"\n".join(line[:900] for line in data.split(b"\n"))
    if maintype == "text":
        part.set_content(
            data.decode("ascii", "replace") if cte == "7bit" else data.decode("latin-1"),
            subtype=subtype,
            charset="utf-8" if cte != "7bit" else "us-ascii",
            cte=cte,
            disposition="attachment",
            filename=name,
        )
    else:
        part.set_content(
            data,
            maintype=maintype,
            subtype=subtype,
            cte="base64" if cte == "7bit" else cte,
            disposition="attachment",
            filename=name,
        )
    if cid:
        part["Content-ID"] = cid
    out = part.as_bytes(policy=policy.SMTP if eol == b"\r\n" else policy.default)
    return out.rstrip(b"\r\n")


@SETTINGS
@given(
    text=texts,
    html=texts,
    rel=st.lists(raw_leaf, max_size=2),
    att=st.lists(raw_leaf, max_size=3),
    eol=st.sampled_from([b"\r\n", b"\n"]),
)
def test_writer_reads_back_identically(text, html, rel, att, eol):
    related = [_leaf_bytes(*leaf, eol, f"<r{i}@x>") for i, leaf in enumerate(rel)]
    attached = [_leaf_bytes(*leaf, eol, None) for leaf in att]
    headers = [b"From: a@example.com" + eol, b"Subject: =?utf-8?q?caf=C3=A9?=" + eol]
    out = write_message(
        headers, qp_encode(text, eol), qp_encode(html, eol), related, attached, eol=eol, seed=b"s"
    )
    for pol in (policy.compat32, policy.default):
        msg = email.message_from_bytes(out, policy=pol)
        assert not [d for p in msg.walk() for d in p.defects]
        leaves = [p for p in msg.walk() if not p.is_multipart()]
        assert leaves[0].get_content_type() == "text/plain" and leaves[1].get_content_type() == "text/html"
        got_text = leaves[0].get_payload(decode=True).decode("utf-8").replace("\r\n", "\n")
        got_html = leaves[1].get_payload(decode=True).decode("utf-8").replace("\r\n", "\n")
        assert got_text == text and got_html == html
        expected = [email.message_from_bytes(b, policy=pol) for b in related + attached]
        assert len(leaves) == 2 + len(expected)
        for got, exp in zip(leaves[2:], expected, strict=True):
            assert got.get_payload(decode=True) == exp.get_payload(decode=True)
            assert got.get_filename() == exp.get_filename()
            assert got.get("Content-ID") == exp.get("Content-ID")
        if related:
            rel_part = next(p for p in msg.walk() if p.get_content_type() == "multipart/related")
            assert len(rel_part.get_payload()) == 1 + len(related)
        assert msg.get_content_type() == ("multipart/mixed" if attached else "multipart/alternative")


def test_writer_boundary_avoids_collision():
    eol = b"\r\n"
    from relay.transform._mime import make_boundary

    b = make_boundary(b"s", 0, [])
    evil = b"Content-Type: text/plain\r\n\r\n--" + b.encode() + b"\r\nnot a boundary"
    out = write_message([], qp_encode("t", eol), qp_encode("h", eol), [], [evil], eol=eol, seed=b"s")
    msg = email.message_from_bytes(out, policy=policy.default)
    leaves = [p for p in msg.walk() if not p.is_multipart()]
    assert leaves[-1].get_content() == "--" + b + "\r\nnot a boundary"
    assert hashlib.sha256(out).hexdigest()  # deterministic bytes
