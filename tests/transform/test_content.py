"""Units of the content step: charsets, headers, plain text <-> HTML, sanitising."""

from __future__ import annotations

import pytest

from relay.transform._content import (
    decode_bytes,
    decode_header_value,
    html_to_text,
    preheader_of,
    sanitize_html,
    text_to_html,
)


@pytest.mark.parametrize(
    "data, charset, expected",
    [
        ("été 25 €".encode(), "utf-8", "été 25 €"),
        ("été".encode("latin-1"), "iso-8859-1", "été"),
        ("25 € œ".encode("iso-8859-15"), "ISO-8859-15", "25 € œ"),
        ("“ok” – 5 €".encode("cp1252"), "iso-8859-1", "“ok” – 5 €"),  # WHATWG: latin1 label = cp1252
        ("déjà".encode(), "iso-8859-1", "déjà"),  # UTF-8 under a latin1 label
        ("déjà".encode("cp1252"), None, "déjà"),  # undeclared, not UTF-8
        ("déjà".encode("cp1252"), "utf-8", "déjà"),  # declared UTF-8, really cp1252
        ("déjà".encode(), "x-no-such-charset", "déjà"),
        (b"\x81\x8d", "windows-1252", "\x81\x8d"),  # undefined in cp1252: no exception, no loss
    ],
)
def test_decode_bytes(data, charset, expected):
    assert decode_bytes(data, charset) == expected


def test_meta_charset_when_undeclared():
    html = '<meta charset="windows-1252"><p>café</p>'.encode("cp1252")
    assert "café" in decode_bytes(html, None, html=True)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("=?utf-8?Q?R=C3=A9initialisation?= du =?utf-8?b?bW90?=", "Réinitialisation du mot"),
        ("=?ISO-8859-1?Q?Votre_colis_est_pr=EAt?=", "Votre colis est prêt"),
        ("=?utf-8?q?a?=\r\n =?utf-8?q?b?=", "ab"),
        ("Plain\r\n folded", "Plain folded"),
        ("caf\udcc3\udca9", "café"),  # raw 8-bit UTF-8 in a header (surrogateescape)
        ("=?bogus?q?x?=", "x"),
    ],
)
def test_decode_header_value(raw, expected):
    assert decode_header_value(raw) == expected


def test_text_to_html():
    html = text_to_html(
        "Hello <you> & co\nsee https://x.example/a?b=1&c=(2). or www.y.example,\n\n  two  spaces"
    )
    assert "Hello &lt;you&gt; &amp; co<br>" in html
    assert '<a href="https://x.example/a?b=1&amp;c=(2)">https://x.example/a?b=1&amp;c=(2)</a>.' in html
    assert '<a href="http://www.y.example">www.y.example</a>,' in html
    assert html.count("<p>") == 2 and "&nbsp;two &nbsp;spaces" in html


def test_html_to_text_layout():
    text = html_to_text(
        "<h1>Title</h1><p>a<br>b</p><ul><li>one</li><li>two</li></ul>"
        "<table><tr><td>x</td><td>1 €</td></tr></table>"
        '<div style="display:none">hidden</div><p><a href="https://e.example/x">Go</a></p><pre>  keep\n</pre>'
    )
    assert text == "Title\n\na\nb\n\n- one\n- two\n\nx  1 €\n\nGo (https://e.example/x)\n\nkeep"


def test_sanitize_html():
    out = sanitize_html(
        '<p onclick="x()" style="color:red">t</p><a href="javascript:x()">a</a><img src="cid:logo@x">'
        '<a href="data:text/html,x">d</a><form action="https://evil.example"><input></form>'
        '<div style="background:url(javascript:x)">s</div>'
        '<table bgcolor="#fff" cellpadding="2"><tr><td>c</td></tr>'
        "</table>"
    )
    assert '<p style="color:red">t</p>' in out
    assert "javascript" not in out and "data:" not in out and "form" not in out and "onclick" not in out
    assert '<img src="cid:logo@x">' in out
    assert 'bgcolor="#fff"' in out and 'cellpadding="2"' in out


def test_preheader():
    assert preheader_of("<p>Hello &amp; welcome</p>") == "Hello & welcome"
    long = "<p>" + "mot " * 60 + "</p>"
    pre = preheader_of(long)
    assert len(pre) <= 101 and pre.endswith("…") and "mot mot" in pre
